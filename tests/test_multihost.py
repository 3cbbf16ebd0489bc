"""Two local processes (4 CPU devices each) train like one process with 8 devices.

The two processes run ``tests/multihost_job.py``: GRPO rounds with SALT and LongAct on a
``data=2, fsdp=2, tensor=2`` mesh through :func:`jaxrl_geom.rollout.collect_rollouts`,
then an orbax checkpoint written by both. This process (8 fake devices, conftest) runs
the same rounds as the reference and restores the checkpoint onto its own mesh.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import multihost_job as job
import numpy as np
import pytest

from jaxrl_geom import distributed, sharding

TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(out: Path) -> list[dict]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    port = str(_free_port())
    script = str(Path(__file__).with_name("multihost_job.py"))
    logs = [open(out / f"log{i}.txt", "w") for i in range(2)]  # noqa: SIM115
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(out), port, str(i)],
            env=env,
            stdout=logs[i],
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    try:  # until both exit, one fails (the other would wait for it forever) or time is up
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
        log = (out / f"log{i}.txt").read_text()[-4000:]
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{log}"
    return [pickle.loads((out / f"process{i}.pkl").read_bytes()) for i in range(2)]


def _assert_close_tree(got, want, rtol=1e-6):
    """Per leaf ``||got - want|| <= rtol * ||want||`` (Frobenius).

    The two runs sum gradients over the 8 devices in another order (gloo across the
    processes), a few float32 ulps per element; AdamW divides by sqrt(v), which turns
    a last-bit difference of a near-cancelling gradient into up to ~1e-5 of ``lr`` in a
    single element, so the bound is on the leaf, not on its worst element.
    """
    leaves = jax.tree_util.tree_leaves_with_path(want)
    for (path, w), g in zip(leaves, jax.tree.leaves(got), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        err, scale = np.linalg.norm(g - w), np.linalg.norm(w)
        assert err <= rtol * scale, (jax.tree_util.keystr(path), err / scale)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("multihost")
    return out, _run_two_processes(out)


def test_two_processes_match_one(two_process_run):
    from jaxrl_geom.checkpoints import Checkpointer

    out, results = two_process_run
    assert [r["process_count"] for r in results] == [2, 2]
    for res in results:
        assert "uses 4 of the 8 devices over 2 processes" in res["errors"]["partial_mesh"]
        assert "which splits a group of 4" in res["errors"]["split_group"]
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    task, tok, state, config = job.build(mesh)
    state, ref = job.run_rounds(state, mesh, range(job.ROUNDS), task, tok, config)

    # Sampler outputs, rewards and advantages agree row for row.
    n = job.PROMPTS * job.GENERATIONS
    for r, want in enumerate(ref):
        rows = np.concatenate([res["records"][r]["rows"] for res in results])
        np.testing.assert_array_equal(rows, np.arange(n))  # each process its own half
        assert results[0]["records"][r]["rows"].size == n // 2
        completions = sum((res["records"][r]["completions"] for res in results), [])
        assert completions == want["completions"]
        got_rewards = np.concatenate([res["records"][r]["rewards"] for res in results])
        np.testing.assert_array_equal(got_rewards, want["rewards"])
        got_adv = np.concatenate([res["records"][r]["advantages"] for res in results])
        np.testing.assert_allclose(got_adv, want["advantages"], rtol=1e-6, atol=1e-6)
        assert np.any(want["advantages"] != 0)  # the step has a signal to get wrong
        for res in results:  # global metrics, the same in every process
            assert res["records"][r]["reward_mean"] == pytest.approx(want["reward_mean"], 1e-6)
            assert res["records"][r]["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-7)
    _assert_close_tree(results[0]["params"], jax.device_get(state.params))

    # Restore the two-process checkpoint in this one process: it continues identically.
    # (The target only gives structure and shardings: the reference state's, so the
    # compiled step is reused.)
    ckpt = Checkpointer(out / "checkpoints")
    restored, meta = ckpt.restore(job.checkpoint_arrays(state))
    assert meta == {"round": job.ROUNDS}
    resumed = state.replace(
        params=restored["params"],
        opt_state=restored["opt_state"],
        step=restored["step"],
        rest=jax.tree.map(jnp.copy, state.rest),  # grpo_step donates its state
    )
    _assert_close_tree(resumed.params, state.params)
    more = range(job.ROUNDS, job.ROUNDS + 1)
    resumed, got = job.run_rounds(resumed, mesh, more, task, tok, config)
    state, want = job.run_rounds(state, mesh, more, task, tok, config)
    assert got[0]["completions"] == want[0]["completions"]
    _assert_close_tree(resumed.params, state.params)

    # ... and onto another mesh shape (and process count): the same numbers.
    other = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    _, _, fresh, _ = job.build(other)
    restored, _ = ckpt.restore(job.checkpoint_arrays(fresh))
    ckpt.close()
    assert restored["params"]["embed_tokens"]["embedding"].sharding.mesh.shape == other.shape
    for a, b in zip(
        jax.tree.leaves(restored["params"]), jax.tree.leaves(results[0]["params"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


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
