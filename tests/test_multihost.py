"""Two local processes (4 CPU devices each) train like one process with 8 devices.

Two subprocesses run ``jaxrl-geom train`` (the CLI) on a ``data=2, fsdp=2, tensor=2``
mesh with SALT and LongAct for two GRPO rounds and save orbax checkpoints; this process
(8 fake devices, conftest) runs the same command as the reference, compares the
parameters and the logged metrics, and resumes the two-process run in one process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxrl_geom import distributed, sharding

TIMEOUT_S = 170
ARGS = [
    "--no-progress",
    "model.hidden_size=32",
    "model.num_layers=1",
    "task.kwargs={num_digits: 1, partial_credit: true}",  # graded rewards: groups differ
    "warmup.steps=6",  # cheap steps that make the model answer with digits
    "warmup.batch_size=8",
    "warmup.learning_rate=0.03",
    "prompts_per_step=8",  # N = 32 rows: 16 per process, 4 groups of 4 each
    "num_generations=4",
    "eval_prompts=6",  # not a multiple of the 4 batch shards: padded, then weighted
    "eval_every=100",
    "checkpoint_every=1",
    "grpo.loss_type=dapo",
    "grpo.eps_high=0.28",
    "optim.learning_rate=0.01",
    "salt.enabled=true",
    "longact.enabled=true",
    "longact.keep_ratio=0.5",
    "mesh.data=2",
    "mesh.fsdp=2",
    "mesh.tensor=2",
    "log_rollouts=true",  # every row of every round, compared row for row below
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_two_processes(out: Path, logdir: Path) -> tuple[list, list]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    port = str(_free_port())
    logs = [open(logdir / f"log{i}.txt", "w") for i in range(2)]  # noqa: SIM115
    cmd = [sys.executable, "-m", "jaxrl_geom.cli", "train", *ARGS, f"output_dir={out}", "steps=2"]
    dist = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id"]
    procs = [
        subprocess.Popen([*cmd, *dist, str(i)], env=env, stdout=logs[i], stderr=subprocess.STDOUT)
        for i in range(2)
    ]
    return procs, logs


def _wait(procs: list, logs: list, logdir: Path) -> None:
    """Wait for both; kill the survivor as soon as one fails (it would wait forever in a
    collective) or time is up."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
    finally:  # never leave a process behind, whatever failed
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    for i, p in enumerate(procs):
        log = (logdir / f"log{i}.txt").read_text()[-4000:]
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{log}"


def _assert_close_tree(got, want, rtol=1e-6):
    """Per leaf ``||got - want|| <= rtol * ||want||`` (Frobenius).

    The two runs sum gradients over the 8 devices in another order (gloo across the
    processes), a few float32 ulps per element; AdamW divides by sqrt(v), which turns
    a last-bit difference of a near-cancelling gradient into a relative error of up to
    ~1e-2 in an element near zero (measured: 1.2e-2 relative, 4.5e-6 absolute, after 6
    warm-up and 2 GRPO steps), so the bound is on the leaf (measured <= 4.8e-7), not on
    its worst element.
    """
    leaves = jax.tree_util.tree_leaves_with_path(want)
    for (path, w), g in zip(leaves, jax.tree.leaves(got), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        err, scale = np.linalg.norm(g - w), np.linalg.norm(w)
        assert err <= rtol * scale, (jax.tree_util.keystr(path), err / scale)


def _params(run_dir: Path, step: int | None = None):
    from flax import nnx

    from jaxrl_geom.train import load_policy

    policy, _ = load_policy(run_dir, step=step)
    return jax.device_get(nnx.state(policy, nnx.Param))


def test_two_processes_match_one(tmp_path, capsys):
    from jaxrl_geom import cli
    from jaxrl_geom.metrics import read_jsonl
    from jaxrl_geom.rl.step import grpo_step

    two, one = tmp_path / "two", tmp_path / "one"
    compiled = grpo_step._cache_size()
    procs, logs = _start_two_processes(two, tmp_path)
    try:  # the single-process reference meanwhile, one round further
        assert cli.main(["train", *ARGS, f"output_dir={one}", "steps=3"]) == 0
    finally:
        _wait(procs, logs, tmp_path)

    # Only process 0 wrote the run's files; both took part in the checkpoints.
    assert sorted(p.name for p in two.iterdir()) == sorted(
        ["checkpoints", "config.json", "metrics.jsonl", "reward_curve.png", "rollouts",
         "summary.json", "tensorboard"]
    )  # fmt: skip
    assert sorted(int(p.name) for p in (two / "checkpoints").iterdir()) == [1, 2]
    log0 = (tmp_path / "log0.txt").read_text()
    log1 = (tmp_path / "log1.txt").read_text()
    assert "held-out reward" in log0 and "held-out reward" not in log1

    # Rewards, sampler statistics, advantages' effect (loss) and evaluations agree.
    got = {r["step"]: r for r in read_jsonl(two / "metrics.jsonl")}
    want = {r["step"]: r for r in read_jsonl(one / "metrics.jsonl")}
    for step in (1, 2):
        g, w = got[step], want[step]
        for k in ("reward/mean", "reward/std", "completion/length_mean", "skipped"):
            assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-7), (step, k)
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5, abs=1e-7)
        assert g["salt/kappa_before"] == pytest.approx(w["salt/kappa_before"], rel=1e-4)
        assert g["longact/q_selected_fraction"] == w["longact/q_selected_fraction"]
    assert 0.0 < got[1]["reward/std"] and 0.0 < got[2]["reward/std"]  # advantages not all 0
    for k in ("eval/reward_mean", "eval/accuracy"):  # after the warm-up, over 6 prompts
        assert got[0][k] == pytest.approx(want[0][k], rel=1e-6), k

    # Row for row (rows 0-15 sampled by process 0, 16-31 by process 1): the same
    # completion tokens, rewards and advantages, and the sampler's log-probs.
    for step in (1, 2):
        name = f"rollouts/round_{step:05d}.jsonl"
        rows2, rows1 = read_jsonl(two / name), read_jsonl(one / name)
        assert [r["row"] for r in rows2] == list(range(32))
        assert len({tuple(r["completion"]) for r in rows2}) > 1  # the rows differ
        for g, w in zip(rows2, rows1, strict=True):
            assert g["completion"] == w["completion"] and g["reward"] == w["reward"], g["row"]
            assert g["advantage"] == pytest.approx(w["advantage"], rel=1e-6, abs=1e-6)
            assert g["logprob_sum"] == pytest.approx(w["logprob_sum"], rel=1e-5, abs=1e-5)

    # Final parameters: the two-process checkpoint of round 2 equals the reference's.
    _assert_close_tree(_params(two), _params(one, step=2))

    # One process resumes the two-process run: it continues like the uninterrupted one.
    assert cli.main(["train", "--no-progress", "--resume", str(two), "steps=3"]) == 0
    assert "resumed" in capsys.readouterr().out
    _assert_close_tree(_params(two), _params(one))
    resumed = {r["step"]: r for r in read_jsonl(two / "metrics.jsonl")}
    assert resumed[3]["reward/mean"] == pytest.approx(want[3]["reward/mean"], rel=1e-6)
    # LongAct's masks start on the sharding the step returns (fresh or restored): the
    # step compiled once for all these rounds (none if an earlier test compiled it).
    assert grpo_step._cache_size() - compiled <= 1


def test_mesh_and_start_up_errors(monkeypatch, capsys):
    from jaxrl_geom import cli

    for name in (
        *("JAXRL_COORDINATOR", "JAXRL_NUM_PROCESSES", "JAXRL_PROCESS_ID"),
        *("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"),
        *("SLURM_JOB_ID", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"),
        *("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"),
    ):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="needs a coordinator: pass --coordinator"):
        distributed.initialize(num_processes=2, process_id=0)
    with pytest.raises(ValueError, match="host:port"):
        distributed.initialize("localhost", num_processes=2, process_id=0)
    with pytest.raises(ValueError, match="process-id=2 is outside"):
        distributed.initialize("127.0.0.1:1234", num_processes=2, process_id=2)
    with pytest.raises(ValueError, match="needs --process-id"):
        distributed.initialize("127.0.0.1:1234", num_processes=2)
    assert distributed.initialize().num_processes == 1  # one process: a no-op
    assert cli.main(["train", "--num-processes", "2", "--process-id", "1"]) == 2
    assert "needs a coordinator" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # srun with 4 tasks: JAX reads the rest
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.resolve() == distributed.DistributedConfig(None, 4, None, True)
    assert not distributed.resolve(num_processes=1).auto  # explicit options win
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not distributed.resolve().auto  # one task: nothing to join
    monkeypatch.setenv("JAXRL_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAXRL_NUM_PROCESSES='two'"):
        distributed.initialize()
    with pytest.raises(ValueError, match="needs 16 devices, only 8"):
        sharding.make_mesh(data=2, fsdp=4, tensor=2)
    with pytest.raises(ValueError, match="not divisible by the fixed mesh sizes"):
        sharding.make_mesh(data=3, fsdp=-1)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    with pytest.raises(ValueError, match="not divisible by data\\*fsdp = 4"):
        sharding.shard_batch(np.zeros((6, 3)), mesh)


@pytest.fixture(scope="module")
def tiny():
    from flax import nnx

    from jaxrl_geom.models import Decoder, ModelConfig
    from jaxrl_geom.tasks import get_task
    from jaxrl_geom.tokenizers import CharTokenizer

    tok = CharTokenizer()
    mc = ModelConfig.tiny(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1)
    return Decoder(mc, rngs=nnx.Rngs(1)), tok, get_task("arithmetic")


def test_row_keys_make_samples_independent_of_batch_layout(tiny):
    from jaxrl_geom.rollout import encode_prompts
    from jaxrl_geom.sampling import Sample, generate

    model, tok, task = tiny
    examples = task.sample_prompts(np.random.default_rng(0), 8)
    ptok, pmask = encode_prompts(tok, [e.prompt for e in examples])
    kw = dict(max_new_tokens=6, method=Sample(temperature=1.0), pad_id=tok.pad_id)
    key = jax.random.key(7)
    whole = generate(model, ptok, pmask, key, row_ids=np.arange(8), **kw)
    # Rows 5..7 alone: another batch bucket (4 rows, one padding row), the same samples.
    part = generate(model, ptok[5:], pmask[5:], key, row_ids=np.arange(5, 8), **kw)
    np.testing.assert_array_equal(part.completion, whole.completion[5:])
    np.testing.assert_allclose(part.logprobs, whole.logprobs[5:], rtol=1e-6, atol=1e-6)
    assert len({tuple(r) for r in whole.completion.tolist()}) > 1  # rows differ


def test_evaluate_rewards_pads_to_the_mesh(tiny):
    from flax import nnx

    from jaxrl_geom.rollout import encode_prompts, evaluate_rewards
    from jaxrl_geom.sampling import generate

    model, tok, task = tiny
    examples = task.sample_prompts(np.random.default_rng(1), 6)  # 6 rows on 4 batch shards

    def reward(text, example):
        return len(text) / 4.0

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    placed = sharding.shard_model(nnx.clone(model), mesh)
    got = evaluate_rewards(
        placed, examples=examples, tokenizer=tok, reward_fn=reward, max_new_tokens=6, mesh=mesh
    )
    ptok, pmask = encode_prompts(tok, [e.prompt for e in examples])
    out = generate(
        model, ptok, pmask, None, max_new_tokens=6, stop_tokens=(tok.eos_id,), pad_id=tok.pad_id
    )
    texts = [tok.decode(r[:n].tolist()) for r, n in zip(out.completion, out.lengths, strict=True)]
    want = np.array([reward(t, None) for t in texts])
    assert got["eval/reward_mean"] == pytest.approx(np.mean(want), rel=1e-6)
    assert got["eval/accuracy"] == pytest.approx(np.mean(np.asarray(want) >= 1), abs=1e-7)
