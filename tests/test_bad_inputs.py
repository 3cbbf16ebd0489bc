"""The bad-input catalogue: every mistake a user can make at the command line, in a
config file, a run directory or a checkpoint gets an error naming the option or file
(and the fix) before any work, and the CLI turns it into one line with exit code 2.

CLI cases run ``cli.main`` in-process and check: exit code 2, exactly one line on
stderr that names the culprit, no traceback, and nothing written to ``output_dir``.
Library cases check the ``ValueError`` directly. (Step/advantage/LongAct inputs:
tests/test_bad_inputs_step.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from jaxrl_geom import cli, sharding
from jaxrl_geom.models import Decoder, ModelConfig, load_pretrained, save_pretrained
from jaxrl_geom.rl.rollouts import make_rollout_batch
from jaxrl_geom.sampling import Greedy, generate

TINY = [
    "model.hidden_size=32",
    "model.num_layers=1",
    "warmup.steps=1",
    "warmup.batch_size=8",
    "prompts_per_step=2",
    "num_generations=4",
    "eval_prompts=8",
    "task.kwargs={num_digits: 1}",
]


def _files(tmp: Path) -> dict[str, str]:
    """Inputs that the cases below point at (written fresh for each case)."""
    (tmp / "malformed.yaml").write_text("steps: [1, 2\ngrpo: {loss_type: dapo\n")
    (tmp / "scalar.yaml").write_text("hello world\n")
    (tmp / "section.yaml").write_text("grpo: 3\n")
    (tmp / "unknown.yaml").write_text("stepz: 3\n")
    (tmp / "adir").mkdir()
    (tmp / "afile").write_text("x")
    (tmp / "empty_run").mkdir()
    (tmp / "other").mkdir()
    (tmp / "other" / "notes.txt").write_text("mine")
    (tmp / "run_no_ckpt").mkdir()
    cfg = {"output_dir": "elsewhere", "model": {"hidden_size": 32, "num_layers": 1}}
    (tmp / "run_no_ckpt" / "config.json").write_text(json.dumps(cfg))
    (tmp / "old_run").mkdir()
    (tmp / "old_run" / "config.json").write_text("{}")
    return {k: str(tmp / k) for k in ("adir", "afile", "empty_run", "other", "old_run")} | {
        "run_no_ckpt": str(tmp / "run_no_ckpt"),
        "malformed": str(tmp / "malformed.yaml"),
        "scalar": str(tmp / "scalar.yaml"),
        "section": str(tmp / "section.yaml"),
        "unknown": str(tmp / "unknown.yaml"),
    }


# (id, argv with {placeholders}, text the one-line message must contain)
CLI_CASES = [
    ("yaml-malformed", "train --config {malformed}", "malformed.yaml is not valid YAML"),
    ("yaml-scalar-file", "train --config {scalar}", "must hold a mapping"),
    ("yaml-section-not-mapping", "train --config {section}", "grpo"),
    ("yaml-unknown-key", "train --config {unknown}", "stepz"),
    ("config-missing", "train --config {tmp}/nope.yaml", "nope.yaml does not exist"),
    ("config-is-a-directory", "train --config {adir}", "adir is not a file"),
    ("override-unknown-key", "train grpo.loss_typ=dapo", "valid keys: loss_type"),
    ("override-no-equals", "train num_generations", "key.sub=value"),
    ("wrong-type-int", "train steps=many", "steps"),
    ("wrong-type-bool", "train dynamic_sampling=maybe", "dynamic_sampling"),
    ("wrong-choice", "train grpo.loss_type=ppo", "expected one of [grpo, bnpo"),
    ("seed-negative", "train seed=-1", "seed=-1"),
    ("warmup-batch-zero", "train warmup.batch_size=0", "warmup.batch_size=0"),
    ("warmup-lr-zero", "train warmup.learning_rate=0", "warmup.learning_rate"),
    ("lr-negative", "train optim.learning_rate=-1", "optim.learning_rate"),
    ("adam-b2-one", "train optim.b2=1.0", "optim.b2"),
    ("keep-ratio", "train longact.enabled=true longact.keep_ratio=1.5", "longact.keep_ratio"),
    ("top-p-zero", "train sampling.top_p=0", "sampling.top_p"),
    ("top-k-zero", "train sampling.top_k=0", "sampling.top_k"),
    ("temperature-zero", "train sampling.temperature=0", "sampling.temperature"),
    ("eps-low", "train grpo.eps_low=1.5", "grpo.eps_low"),
    ("group-of-one", "train num_generations=1", "num_generations=1"),
    ("overlong-buffer", "train overlong_buffer=8", "overlong_buffer=8"),
    ("keep-zero-checkpoints", "train checkpoints_to_keep=0", "checkpoints_to_keep"),
    ("max-skips-zero", "train max_consecutive_skips=0", "max_consecutive_skips"),
    ("hidden-not-multiple-of-8", "train model.hidden_size=30", "model.hidden_size"),
    ("model-path-missing", "train model.path={tmp}/no_model", "model.path"),
    ("mesh-size-zero", "train mesh.fsdp=0", "mesh.fsdp"),
    ("mesh-two-minus-one", "train mesh.data=-1 mesh.fsdp=-1", "at most one size may be -1"),
    ("micro-batches-not-dividing-N", "train grpo.num_micro_batches=3", "num_micro_batches=3"),
    ("salt-option", "train salt.enabled=true salt.knobs.gamma_max=-1", "gamma_max"),
    # checked against the devices, the model and the task: still before any file
    ("mesh-vs-devices", "train {tiny} mesh.data=3", "mesh:"),
    ("micro-batch-vs-data-axes", "train {tiny} grpo.num_micro_batches=2", "data x fsdp = 8"),
    ("warmup-batch-vs-data-axes", "train {tiny} warmup.batch_size=4", "warmup.batch_size=4"),
    (
        "dimension-not-dividing-mesh-axis",
        "train {tiny} model.hidden_size=8 mesh.fsdp=1 mesh.tensor=8",
        "not divisible by mesh axis tensor=8",
    ),
    (
        "prompt-longer-than-positions",
        "train {tiny} sampling.max_new_tokens=2048",
        "max_position_embeddings=2048",
    ),
    ("task-unknown", "train {tiny} task.name=chess", "task.name"),
    ("task-kwargs-unknown", "train {tiny} task.kwargs={{bogus:1}}", "bogus"),
    # run directories
    ("output-dir-is-a-file", "train {tiny} output_dir={afile}", "afile is a file"),
    ("output-dir-not-writable", "train {tiny} output_dir={afile}/run", "not a writable directory"),
    ("output-dir-holds-a-run", "train {tiny} output_dir={old_run}", "--overwrite"),
    ("overwrite-foreign-dir", "train {tiny} --overwrite output_dir={other}", "notes.txt"),
    ("resume-with-config", "train --resume {old_run} --config {tmp}/nope.yaml", "--config"),
    ("resume-with-overwrite", "train --resume {old_run} --overwrite", "--overwrite"),
    ("resume-missing-dir", "train --resume {tmp}/nope", "nope does not exist"),
    ("resume-empty-dir", "train --resume {empty_run}", "no config.json"),
    ("resume-a-file", "train --resume {afile}", "afile is not a directory"),
    ("resume-moves-output-dir", "train --resume {old_run} output_dir=x", "stays in its directory"),
    ("resume-no-checkpoint", "train --resume {run_no_ckpt}", "nothing to resume"),
    ("eval-missing-dir", "eval {tmp}/nope", "nope does not exist"),
    ("eval-empty-dir", "eval {empty_run}", "no config.json"),
    ("eval-no-checkpoint", "eval {run_no_ckpt}", "no checkpoint yet"),
    ("eval-prompts-zero", "eval {run_no_ckpt} --prompts 0", "--prompts"),
    ("unknown-command", "fly", "invalid choice"),
]


@pytest.mark.parametrize("argv, match", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)  # a relative path written by mistake would show up below
    paths = _files(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    args = []
    for word in argv.split():
        args.extend(TINY if word == "{tiny}" else [word.format(tmp=tmp_path, **paths)])
    if args[0] == "train" and not any(a.startswith(("output_dir=", "--resume")) for a in args):
        args.append(f"output_dir={tmp_path}/run")
    code = cli.main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("jaxrl-geom: error: "), err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no writes


def test_catalogue_size():
    """At least 40 bad inputs across the project (this file + test_bad_inputs_step.py)."""
    assert len(CLI_CASES) + len(LIBRARY_CASES) >= 40


# --- library boundary: files and arrays ------------------------------------------------

TINY_MODEL = ModelConfig.tiny(64, hidden_size=16, num_hidden_layers=1)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf")
    save_pretrained(Decoder(TINY_MODEL, rngs=nnx.Rngs(0)), path)
    return path


def _copy_hf(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _truncated(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    (path / "model.safetensors").write_bytes(b"\x00garbage, not safetensors" * 10)


def _nan_weight(path: Path) -> None:
    from safetensors.numpy import load_file

    tensors = load_file(str(path / "model.safetensors"))
    w = tensors["model.norm.weight"].copy()
    w[3] = np.nan
    tensors["model.norm.weight"] = w
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _bad_config_json(path: Path) -> None:
    (path / "config.json").write_text("{not json")


def _rollout_rows_mismatch(_: Path) -> None:
    n, p, l_comp = 4, 3, 2
    make_rollout_batch(
        tokens=np.zeros((n, p + l_comp), np.int32),
        prompt_mask=np.ones((n, p), bool),
        completion_mask=np.ones((n, l_comp), bool),
        old_logprobs=np.zeros((n, l_comp), np.float32),
        advantages=np.zeros((n - 1,), np.float32),  # one row short
        group_ids=np.zeros((n,), np.int32),
    )


def _rollout_logprob_columns(_: Path) -> None:
    n, p, l_comp = 4, 3, 2
    make_rollout_batch(
        tokens=np.zeros((n, p + l_comp), np.int32),
        prompt_mask=np.ones((n, p), bool),
        completion_mask=np.ones((n, l_comp), bool),
        old_logprobs=np.zeros((n, l_comp + 1), np.float32),
        advantages=np.zeros((n,), np.float32),
        group_ids=np.zeros((n,), np.int32),
    )


def _prompt_longer_than_positions(_: Path) -> None:
    config = ModelConfig.tiny(64, hidden_size=16, num_hidden_layers=1, max_position_embeddings=8)
    model = Decoder(config, rngs=nnx.Rngs(0))
    tokens = np.ones((2, 6), np.int32)
    generate(model, tokens, np.ones((2, 6), bool), None, max_new_tokens=4, method=Greedy())


def _dimension_not_dividing(_: Path) -> None:
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    abstract = nnx.eval_shape(
        lambda: Decoder(ModelConfig.tiny(66, hidden_size=16, num_hidden_layers=1), rngs=nnx.Rngs(0))
    )
    sharding.param_shardings(abstract, mesh)


# (id, corrupt the copied HF dir or raise directly, text the error must contain)
LIBRARY_CASES = [
    ("safetensors-truncated", _truncated, "model.safetensors cannot be read"),
    ("safetensors-garbage", _garbage, "model.safetensors cannot be read"),
    ("safetensors-nan-weight", _nan_weight, "tensor model.norm.weight holds 1 non-finite"),
    ("hf-config-not-json", _bad_config_json, "config.json is not a JSON object"),
    ("rollout-rows-mismatch", _rollout_rows_mismatch, "disagree on the number of rows"),
    ("rollout-logprob-columns", _rollout_logprob_columns, "old_logprobs has 3 columns"),
    ("generate-prompt-too-long", _prompt_longer_than_positions, "max_position_embeddings=8"),
    ("param-dim-not-dividing", _dimension_not_dividing, "['embed_tokens']['embedding']"),
]


@pytest.mark.parametrize(
    "corrupt, match", [c[1:] for c in LIBRARY_CASES], ids=[c[0] for c in LIBRARY_CASES]
)
def test_library_bad_input_is_named(hf_dir, tmp_path, corrupt, match):
    path = _copy_hf(hf_dir, tmp_path / "model")
    with pytest.raises(ValueError, match=None) as info:
        corrupt(path)
        load_pretrained(path)
    assert match in str(info.value), str(info.value)


def test_clean_checkpoint_loads(hf_dir):
    """The oracle of the corruption cases: the untouched file loads, bit for bit."""
    got = dict(nnx.to_flat_state(nnx.state(load_pretrained(hf_dir), nnx.Param)))
    want = dict(nnx.to_flat_state(nnx.state(Decoder(TINY_MODEL, rngs=nnx.Rngs(0)), nnx.Param)))
    assert got.keys() == want.keys()
    for k in want:
        a, b = np.asarray(got[k].get_value()), np.asarray(want[k].get_value())
        assert a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32)), k
