"""Run directories that cannot be mixed up: resume after SIGKILL (bit-identical to an
uninterrupted run), a copied run resumed from another working directory, a corrupted
latest checkpoint, --overwrite, a failed checkpoint save (non-zero exit within seconds)
and the stop after too many skipped steps.

One uninterrupted run (module fixture, in-process) is the oracle of the others; the
in-process runs share its compiled sampler and step. Subprocesses only where a process
must die (SIGKILL) or exit (the save-failure hang was at interpreter exit).
"""

from __future__ import annotations

import json
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxrl_geom import cli
from jaxrl_geom import train as train_lib
from jaxrl_geom.metrics import read_jsonl

TINY = [
    "model.hidden_size=32",
    "model.num_layers=1",
    "warmup.steps=40",
    "warmup.batch_size=8",
    "prompts_per_step=2",
    "num_generations=4",
    "eval_prompts=8",
    "eval_every=1",
    "checkpoint_every=1",
    "task.kwargs={num_digits: 1, partial_credit: true}",  # graded rewards: non-zero updates
]
STEPS = 4


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "jaxrl_geom.cli", *args]


def _arrays(run: Path, step: int) -> dict[str, np.ndarray]:
    """The checkpoint's arrays as NumPy, by path (no target: as saved)."""
    tree = ocp.StandardCheckpointer().restore(run / "checkpoints" / str(step) / "arrays")
    flat = ocp.tree.to_flat_dict(tree, sep="/")
    return {k: np.asarray(v) for k, v in flat.items()}


def _assert_bit_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        assert x.shape == y.shape and x.dtype == y.dtype, k
        assert x.tobytes() == y.tobytes(), f"{k} differs"


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of STEPS rounds."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert cli.main(["train", "--no-progress", f"output_dir={out}", f"steps={STEPS}", *TINY]) == 0
    return out


def test_sigkill_mid_run_then_resume_is_bit_identical(reference, tmp_path, capsys):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _cli("train", "--no-progress", f"output_dir={run}", f"steps={STEPS}", *TINY),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "1").is_dir() and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (run / "checkpoints" / str(STEPS)).exists(), "killed too late to test anything"
    killed_at = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    at_kill = _arrays(run, killed_at)

    assert cli.main(["train", "--no-progress", "--resume", str(run)]) == 0
    assert "resumed" in capsys.readouterr().out
    final = _arrays(run, STEPS)
    params = [k for k in final if k.startswith("params/")]
    assert any(final[k].tobytes() != at_kill[k].tobytes() for k in params), "nothing trained"
    _assert_bit_identical(final, _arrays(reference, STEPS))
    # metrics continue without duplicate rows: the same rows as the uninterrupted run
    assert read_jsonl(run / "metrics.jsonl") == read_jsonl(reference / "metrics.jsonl")
    # TensorBoard: the resumed writer purges the steps after the restored checkpoint
    purges = [
        e.step
        for f in sorted((run / "tensorboard").iterdir())
        for e in _events(f)
        if e.HasField("session_log") and e.session_log.status == e.session_log.START
    ]
    assert purges and purges[-1] >= killed_at + 1


def _events(path: Path):
    """Events of a TensorBoard file (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    data, i = path.read_bytes(), 0
    while i + 12 <= len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        yield event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
        i += 12 + n + 4


def test_copied_run_resumes_in_the_copy_from_another_cwd(reference, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    original = _snapshot(reference)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the saved output_dir is not this path

    # fewer or equal rounds than done, or another architecture: an error that says so,
    # and the run is left as it was (config.json not rewritten)
    before = _snapshot(copy)
    for steps in (STEPS - 1, STEPS):
        assert cli.main(["train", "--resume", "../copy", f"steps={steps}"]) == 2
        assert f"{STEPS} GRPO rounds are done" in capsys.readouterr().err
    assert cli.main(["train", "--resume", "../copy", "steps=9", "model.hidden_size=64"]) == 2
    assert "has shape" in capsys.readouterr().err
    assert _snapshot(copy) == before
    assert cli.main(["train", "--no-progress", "--resume", "../copy", f"steps={STEPS + 1}"]) == 0
    assert _snapshot(reference) == original  # the original run is untouched
    rows = [r["step"] for r in read_jsonl(copy / "metrics.jsonl") if "reward/mean" in r]
    assert rows == list(range(1, STEPS + 2))
    saved = json.loads((copy / "config.json").read_text())
    assert saved["output_dir"] == str(copy) and saved["steps"] == STEPS + 1
    assert (copy / "checkpoints" / str(STEPS + 1)).is_dir()
    assert not (tmp_path / "elsewhere" / "runs").exists()

    capsys.readouterr()
    assert cli.main(["eval", "../copy", "--prompts", "8"]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["eval/reward_mean"] <= 1.0


def test_corrupted_latest_checkpoint_falls_back(reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    damaged = [f for f in (run / "checkpoints" / str(STEPS)).rglob("*") if f.is_file()]
    for f in damaged:
        if f.parent.name == "d":  # the array data files
            f.write_bytes(f.read_bytes()[:3])
    # Redo the last round from the previous checkpoint: bit-identical to the original.
    assert cli.main(["train", "--no-progress", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"warning: checkpoint {STEPS} in {run} cannot be restored" in err
    assert "Traceback" not in err
    assert (run / "corrupt_checkpoints" / str(STEPS)).is_dir()
    _assert_bit_identical(_arrays(run, STEPS), _arrays(reference, STEPS))
    assert read_jsonl(run / "metrics.jsonl") == read_jsonl(reference / "metrics.jsonl")


def test_failed_checkpoint_save_stops_the_run(tmp_path, monkeypatch, capsys):
    """The checkpoints path turns into a file mid-run: one line naming it, exit code 1."""
    make = train_lib.Checkpointer

    def broken(directory, **kw):
        ckpt = make(directory, **kw)
        shutil.rmtree(directory)
        Path(directory).write_text("not a directory")
        return ckpt

    monkeypatch.setattr(train_lib, "Checkpointer", broken)
    run = tmp_path / "run"
    args = ["train", "--no-progress", f"output_dir={run}", "steps=2", *TINY, "warmup.steps=1"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"saving checkpoint 1 to {run}/checkpoints failed" in err[0], err


def test_failed_save_process_exits_within_seconds(tmp_path):
    """The hang was at interpreter exit (orbax's non-daemon commit threads waiting 20 min
    for a signal the failed async mkdir never sent): a process whose save failed exits."""
    driver = (
        "import pathlib, sys, time\n"
        "import jax.numpy as jnp\n"
        "from jaxrl_geom.checkpoints import Checkpointer, CheckpointError\n"
        "d = pathlib.Path(sys.argv[1])\n"
        "ckpt = Checkpointer(d)\n"
        "d.rmdir(); d.write_text('not a directory')\n"
        "try:\n"
        "    ckpt.save(1, {'w': jnp.ones((4, 4))}, {'round': 1})\n"
        "except CheckpointError as err:\n"
        "    print(err, file=sys.stderr, flush=True)\n"
        "    print(time.time(), flush=True)\n"
        "    sys.exit(1)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", driver, str(tmp_path / "checkpoints")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    exited = time.time()
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"saving checkpoint 1 to {tmp_path}/checkpoints failed" in proc.stderr
    assert exited - float(proc.stdout.strip()) < 10.0


def test_overwrite_replaces_the_run_and_skips_stop_it(reference, tmp_path, monkeypatch, capsys):
    """--overwrite clears the old run; grpo_step reports ``skipped`` (a non-finite step
    made a no-op): the loop counts them and stops with one line and exit code 1 after
    ``max_consecutive_skips`` in a row."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    args = ["train", "--no-progress", f"output_dir={run}", "steps=4", "seed=1", *TINY]
    args += ["warmup.steps=1", "max_consecutive_skips=2"]
    assert cli.main(args) == 2  # not without --overwrite
    assert "--overwrite" in capsys.readouterr().err

    real_step = train_lib.grpo_step

    def always_skipped(state, batch, config, *args, **kw):
        state, metrics = real_step(state, batch, config, *args, **kw)
        return state, {**metrics, "skipped": np.float32(1.0)}

    monkeypatch.setattr(train_lib, "grpo_step", always_skipped)
    assert cli.main([*args, "--overwrite"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 consecutive GRPO steps were skipped at round 2" in err[0], err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1"]  # old ones gone
    assert json.loads((run / "config.json").read_text())["seed"] == 1
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 0, 1]
    assert rows[-1]["skipped_steps"] == 1.0
