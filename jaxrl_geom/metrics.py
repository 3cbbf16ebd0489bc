"""Metric sinks for training runs: JSONL, TensorBoard events and a reward-curve PNG.

Everything here runs on the host, outside jit: metrics arrive as dicts of Python or
NumPy scalars after one ``jax.device_get`` per step.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def to_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Convert a (possibly nested) metrics mapping to a flat ``{name: float}`` dict.

    Nested keys are joined with ``/``; arrays with more than one element are skipped
    (they belong in checkpoints, not in scalar logs).
    """
    flat: dict[str, float] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                visit(f"{prefix}/{k}" if prefix else str(k), v)
            return
        arr = np.asarray(value)
        if arr.size == 1 and arr.dtype.kind in "biuf":
            flat[prefix] = float(arr.reshape(()))

    visit("", metrics)
    return flat


class MetricsWriter:
    """Writes each step's scalars to ``metrics.jsonl`` and TensorBoard event files.

    Example::

        with MetricsWriter("runs/exp1") as w:
            w.write(step, {"reward/mean": 0.4})

    Args:
      logdir: the run directory.
      resume_step: continue a run restored at this step: rows of later steps (written
        after that checkpoint, before the run stopped) are dropped from ``metrics.jsonl``
        and TensorBoard purges its events from ``resume_step + 1`` on, so the redone
        steps are not logged twice. ``None`` starts a new log.
    """

    def __init__(
        self, logdir: str | Path, *, tensorboard: bool = True, resume_step: int | None = None
    ) -> None:
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        path = self.logdir / "metrics.jsonl"
        if resume_step is not None and path.exists():
            kept = [r for r in read_jsonl(path) if r["step"] <= resume_step]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
            os.replace(tmp, path)
        mode = "w" if resume_step is None else "a"
        self._jsonl = open(path, mode, encoding="utf-8")  # noqa: SIM115
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(self.logdir / "tensorboard"), purge_step=purge)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        scalars = to_scalars(metrics)
        record = {"step": int(step), **{k: v for k, v in scalars.items() if math.isfinite(v)}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, int(step))
        return scalars

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: str | Path) -> list[dict[str, float]]:
    """Read back a ``metrics.jsonl`` file written by :class:`MetricsWriter`."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a row cut off by a kill mid-write
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON.") from None
    return rows


def plot_reward_curve(
    records: list[dict[str, float]],
    path: str | Path,
    *,
    keys: tuple[str, ...] = ("reward/mean", "eval/reward_mean"),
    title: str = "reward",
) -> Path:
    """Plot the given metric keys against ``step`` and save a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if key in r]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
