"""Every notebook's code cells run top to bottom against the current library, use only
its public API, and are stored without outputs."""

import ast
import json
from pathlib import Path

import matplotlib
import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
# What notebooks may import from: the package's public modules (jaxrl_geom/__init__.py,
# docs/SPEC.md section 4), never jaxrl_geom.train / jaxrl_geom.warmup or a submodule.
PUBLIC_MODULES = {
    f"jaxrl_geom.{m}"
    for m in (
        *("models", "sampling", "rl", "salt", "longact", "tasks", "sharding", "rollout"),
        *("distributed", "loop", "config", "tokenizers"),
    )
}


def code_cells(path: Path) -> list[tuple[int, str]]:
    cells = json.loads(path.read_text())["cells"]
    return [(i, "".join(c["source"])) for i, c in enumerate(cells) if c["cell_type"] == "code"]


def private_uses(source: str) -> list[str]:
    """What ``source`` imports from jaxrl_geom outside its public modules, and names
    starting with ``_`` that it imports from them."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imports = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imports = [(node.module, a.name) for a in node.names]
        else:
            continue
        for module, name in imports:
            if module == "jaxrl_geom" and name is not None:  # from jaxrl_geom import loop
                module, name = f"jaxrl_geom.{name}", None
            if module.split(".")[0] != "jaxrl_geom" or module == "jaxrl_geom":
                continue
            if module not in PUBLIC_MODULES:
                found.append(module)
            elif name is not None and name.startswith("_"):
                found.append(f"{module}.{name}")
    return found


def test_private_uses_finds_internal_imports():
    bad = (
        "from jaxrl_geom import train as T\n"
        "import jaxrl_geom.warmup\n"
        "from jaxrl_geom.salt.reweight import SaltKnobs\n"
        "from jaxrl_geom.salt import _Knobs, salt\n"
        "from jaxrl_geom import loop\n"
        "from jaxrl_geom.loop import warmup_steps\n"
        "import jaxrl_geom, numpy as np\n"
    )
    assert private_uses(bad) == [
        "jaxrl_geom.train",
        "jaxrl_geom.warmup",
        "jaxrl_geom.salt.reweight",
        "jaxrl_geom.salt._Knobs",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_public_api_and_stripped(path):
    for i, source in code_cells(path):
        assert not private_uses(source), f"{path.name} cell {i}: {private_uses(source)}"
    cells = json.loads(path.read_text())["cells"]
    for i, cell in enumerate(cells):
        if cell["cell_type"] == "code":  # outputs stay out of git
            assert cell["outputs"] == [] and cell["execution_count"] is None, (path.name, i)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, source in code_cells(path):
        exec(compile(source, f"{path.name}[cell {i}]", "exec"), namespace)  # noqa: S102
