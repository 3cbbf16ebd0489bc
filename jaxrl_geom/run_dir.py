"""Run directories: what a fresh run may write into, clearing one for ``--overwrite``,
atomic JSON files, and finding the checkpoint a ``--resume`` continues from.

A run directory holds ``config.json``, ``metrics.jsonl``, ``tensorboard/``,
``checkpoints/`` (orbax), ``summary.json`` and ``reward_curve.png``. Everything here
checks before it writes: a bad directory is a ``ValueError`` naming it and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from jaxrl_geom import distributed
from jaxrl_geom.checkpoints import Checkpointer, CheckpointError
from jaxrl_geom.config import TrainConfig, to_dict

RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "metrics.jsonl.tmp",
    "summary.json",
    "reward_curve.png",
    "progress.json",
    "tensorboard",
    "checkpoints",
    "corrupt_checkpoints",
    "rollouts",
)


def check_output_dir(out_dir: Path, *, overwrite: bool) -> None:
    """A fresh run needs an empty (or absent) writable ``output_dir``; writes nothing.

    With ``overwrite``, an existing run directory (only files a run writes) is accepted
    and cleared later by :func:`train`, once the whole config has been validated.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output_dir={out_dir} is a file; choose a directory path.")
    parent = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(
            f"output_dir={out_dir} cannot be created: {parent} is not a writable directory; "
            "choose another output_dir."
        )
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if not entries:
        return
    if not overwrite:
        raise ValueError(
            f"output_dir={out_dir} is not empty ({', '.join(entries[:4])}); resume it with "
            f"'jaxrl-geom train --resume {out_dir}', replace it with --overwrite, or choose "
            "another output_dir."
        )
    foreign = [e for e in entries if e not in RUN_FILES]
    if foreign:
        raise ValueError(
            f"--overwrite only replaces a run directory, but output_dir={out_dir} also holds "
            f"{', '.join(foreign[:4])}; remove them yourself or choose another output_dir."
        )


def check_run_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """:func:`check_output_dir` for a fresh run, a ``config.json`` for ``resume``.

    Every process checks (``output_dir`` is one shared directory, as on pods with NFS
    or GCS); a failure in any process is raised in all of them, before any work.
    """
    error = None
    try:
        if resume and not (out_dir / "config.json").is_file():
            raise ValueError(f"--resume {out_dir}: not a run directory (no config.json).")
        if not resume:
            check_output_dir(out_dir, overwrite=overwrite)
    except ValueError as err:
        error = err
    distributed.raise_if_any(error)


def write_run_config(out_dir: Path, cfg: TrainConfig) -> None:
    """Create ``out_dir`` and write ``config.json`` (paths made absolute, so the run
    resumes from any working directory)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = dataclasses.replace(cfg, output_dir=str(out_dir))
    if cfg.model.path:
        model = dataclasses.replace(cfg.model, path=os.path.abspath(cfg.model.path))
        saved = dataclasses.replace(saved, model=model)
    write_json(out_dir / "config.json", to_dict(saved))


def clear_run_dir(out_dir: Path) -> None:
    for name in RUN_FILES:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def restore_run(
    out_dir: Path, cfg: TrainConfig, target: Any, *, move_damaged: bool = True
) -> tuple[int, Any, dict]:
    """Newest restorable checkpoint of ``out_dir``: ``(round, arrays, meta)``; moves damaged
    newer ones to ``corrupt_checkpoints/`` only once one restores (with ``move_damaged``:
    in a multi-process run every process restores, process 0 alone moves)."""
    try:
        ckpt = Checkpointer(out_dir / "checkpoints", read_only=True)
    except CheckpointError as err:
        raise ValueError(f"--resume {out_dir}: {err}") from None
    try:
        if not ckpt.all_steps():
            raise ValueError(
                f"--resume {out_dir}: nothing to resume, the run has no checkpoint yet (it "
                f"stopped before round checkpoint_every={cfg.checkpoint_every}); start it "
                f"again with 'jaxrl-geom train --overwrite output_dir={out_dir}'."
            )
        skipped: list[int] = []

        def warn(step: int, why: str) -> None:
            skipped.append(step)
            print(
                f"jaxrl-geom: warning: checkpoint {step} in {out_dir} cannot be restored ({why}); "
                "trying the previous one.",
                file=sys.stderr,
            )

        step, arrays, meta = ckpt.restore_latest(target, on_skip=warn)
    finally:
        ckpt.close()
    done = int(meta["grpo_round"])
    if cfg.steps <= done:
        raise ValueError(
            f"--resume {out_dir}: {done} GRPO rounds are done (checkpoint {step}) but steps="
            f"{cfg.steps}; pass steps=N with N > {done} to train further."
        )
    for bad in skipped if move_damaged else ():
        dest = out_dir / "corrupt_checkpoints" / str(bad)
        dest.parent.mkdir(exist_ok=True)
        shutil.move(str(out_dir / "checkpoints" / str(bad)), str(dest))
    return done, arrays, meta
