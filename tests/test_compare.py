"""experiments/compare.py: a micro run's outputs agree with each other, and the
statistics agree with scipy and with hand-computed t-intervals."""

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

SCRIPT = Path(__file__).parent.parent / "experiments" / "compare.py"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_t_interval_matches_scipy_and_a_hand_value(compare):
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    mean, lo, hi = compare.t_interval(x)
    # t_{0.975, 4} = 2.7764451 (tables); s = sqrt(2.5)
    half = 2.7764451052 * math.sqrt(2.5) / math.sqrt(5)
    assert mean == 3.0
    assert math.isclose(hi - mean, half, rel_tol=1e-9) and math.isclose(
        mean - lo, half, rel_tol=1e-9
    )
    ref = stats.t.interval(0.95, 4, loc=np.mean(x), scale=stats.sem(x))
    assert np.allclose((lo, hi), ref, rtol=1e-12)
    assert all(math.isnan(v) for v in compare.t_interval([0.5])[1:])


def _run(task, arm, seed, reward, **steps):
    return dict(task=task, arm=arm, seed=seed, final_reward=reward, wall_s=1.0, cpu_s=1.0,
                steps=steps, eval_rounds=[0, 1], eval_reward=[0.0, reward])  # fmt: skip


def test_summarize_pairs_seeds(compare):
    # grpo 0.5 / 0.6 / 0.7 and salt 0.6 / 0.6 / 0.9: differences 0.1 / 0 / 0.2 (sd 0.1);
    # seed 3 of salt has no grpo partner and is left out of the pairs.
    runs = [_run("t", "grpo", s, r) for s, r in enumerate([0.5, 0.6, 0.7])]
    runs += [
        _run("t", "salt", s, r, **{"salt/gamma": [0.0, g]})
        for s, r, g in zip(range(4), [0.6, 0.6, 0.9, 0.0], [0.2, 0.4, 0.6, 0.8], strict=True)
    ]
    rows = {r["arm"]: r for r in compare.summarize({"runs": runs})}
    mean, lo, hi = rows["salt"]["diff"]
    half = 4.30265272975 * 0.1 / math.sqrt(3)  # t_{0.975, 2} (tables)
    assert math.isclose(mean, 0.1, rel_tol=1e-9)
    assert math.isclose(hi - mean, half, rel_tol=1e-9)
    assert rows["grpo"]["diff"] is None and rows["salt"]["seeds"] == [0, 1, 2, 3]
    assert math.isclose(rows["salt"]["salt/gamma"], np.mean([0.1, 0.2, 0.3, 0.4]), rel_tol=1e-12)
    assert rows["grpo"]["salt/gamma"] is None


def test_micro_run_outputs_are_consistent(compare, tmp_path):
    argv = ["--out", str(tmp_path), "--size", "micro", "--tasks", "arithmetic",
            "--arms", "grpo", "salt+longact", "--seeds", "3", "--rounds", "2",
            "--prompts-per-step", "2", "--group-size", "4",
            "--eval-prompts", "4", "--eval-every", "1", "--warmup-steps", "0",
            "--warmup-batch", "8"]  # fmt: skip
    compare.main(argv)
    for name in ("results.json", "results.md", "reward_curves.png", "final_reward.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "results.json").read_text())
    runs = {r["arm"]: r for r in results["runs"]}
    assert sorted(runs) == ["grpo", "salt+longact"]
    grpo, both = runs["grpo"], runs["salt+longact"]
    for r in (grpo, both):
        assert r["eval_rounds"] == [0, 1, 2] and len(r["steps"]["loss"]) == 2
        assert r["final_reward"] == r["eval_reward"][-1]
    # Same warm-up, prompts and keys: the arms' first rollouts are the same.
    assert grpo["eval_reward"][0] == both["eval_reward"][0]
    assert grpo["steps"]["reward/mean"][0] == both["steps"]["reward/mean"][0]
    assert "salt/kappa_before" not in grpo["steps"] and len(both["steps"]["salt/gamma"]) == 2

    table = (tmp_path / "results.md").read_text()
    line = next(x for x in table.splitlines() if x.startswith("| arithmetic | salt+longact |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    s = both["steps"]
    expected = {
        3: f"{both['final_reward']:.3f}",
        4: f"{both['final_reward'] - grpo['final_reward']:+.3f}",
        7: f"{np.mean(s['salt/kappa_before']):.3f}",
        8: f"{np.mean(np.asarray(s['salt/kappa_before']) < 1):.3f}",
        9: f"{np.mean(s['salt/severity']):.3f}",
        10: f"{np.mean(s['salt/gamma']):.3f}",
        11: f"{np.mean(s['longact/q_concentration']):.3f} / "
        f"{np.mean(s['longact/k_concentration']):.3f}",
    }
    for i, want in expected.items():
        assert cells[i] == want, (i, cells[i], want)
    assert cells[2] == "1"
    assert re.search(r"after the warm-up .*arithmetic", table)


def test_merge_concatenates_runs_and_warmups(compare, tmp_path):
    parts = []
    for seeds in ([0, 1], [2]):
        d = tmp_path / f"s{seeds[0]}"
        d.mkdir()
        results = {
            "command": "x",
            "args": {},
            "wall_s": 2.0,
            "cpu_s": 1.0,
            "warmup": {"t": {str(s): {"eval": {"eval/reward_mean": 0.1 * s}} for s in seeds}},
            "runs": [_run("t", "grpo", s, 0.5 + 0.1 * s) for s in seeds],
        }
        (d / "results.json").write_text(json.dumps(results))
        parts.append(str(d))
    merged = compare.merge(parts)
    assert [r["seed"] for r in merged["runs"]] == [0, 1, 2]
    assert sorted(merged["warmup"]["t"]) == ["0", "1", "2"]
    assert (merged["wall_s"], merged["cpu_s"]) == (4.0, 2.0) and len(merged["parts"]) == 2
    row = compare.summarize(merged)[0]
    assert row["seeds"] == [0, 1, 2] and math.isclose(row["reward"][0], 0.6, rel_tol=1e-12)
