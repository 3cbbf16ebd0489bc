"""Orbax checkpoints of a training run: array state plus a small JSON of host state.

The array state (parameters, optimizer state, step, PRNG key) is saved with orbax's
``StandardSave`` so that restoring onto a mesh puts each array straight onto the
sharding of the abstract target. Host-side state (data RNG, round) goes in JSON.

Saves are asynchronous (the arrays are copied to host memory, then written by a
background thread) and atomic (written to a temporary directory, renamed when
complete), so a kill at any moment leaves only complete checkpoints. The step
directory is created synchronously: with orbax's default asynchronous creation a failed
``mkdir`` (checkpoints path is a file, no permission) leaves orbax's non-daemon commit
threads waiting 20 minutes for a signal that never comes, and the process cannot exit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the run must stop (its message names the path)."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:400]


class Checkpointer:
    """Saves and restores ``(arrays, meta)`` pairs under ``directory/<step>``.

    Args:
      directory: where checkpoints live.
      max_to_keep: number of most recent checkpoints kept on disk.
      read_only: open existing checkpoints without creating or deleting anything.
    """

    def __init__(
        self, directory: str | Path, *, max_to_keep: int = 3, read_only: bool = False
    ) -> None:
        self.directory = Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(
                f"cannot save checkpoints: {self.directory} is not a directory; move it away."
            )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=not read_only,
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        )
        handlers = {"arrays": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_handlers=handlers
            )
        except OSError as err:
            raise CheckpointError(
                f"cannot open checkpoint directory {self.directory}: {_first_line(err)}"
            ) from err

    def save(self, step: int, arrays: Any, meta: dict[str, Any]) -> None:
        """Start saving ``arrays`` (a pytree of jax arrays) and a JSON-able ``meta`` dict.

        Returns once the arrays are copied to host memory; the write finishes in the
        background (call :meth:`wait`). Raises :class:`CheckpointError` if this save or
        the previous background write failed.
        """
        try:
            self._manager.check_for_errors()
            self._manager.save(
                int(step),
                args=ocp.args.Composite(
                    arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
                ),
            )
        except Exception as err:
            raise CheckpointError(
                f"saving checkpoint {step} to {self.directory} failed ({_first_line(err)}); "
                "the run stopped. Free disk space or fix the directory's permissions, then "
                "resume from the last complete checkpoint with --resume."
            ) from err

    def wait(self) -> None:
        """Block until the background write is complete; raise :class:`CheckpointError`."""
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as err:
            raise CheckpointError(
                f"writing a checkpoint to {self.directory} failed ({_first_line(err)})."
            ) from err

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore onto the structure, dtypes and shardings of ``target``.

        Args:
          target: a pytree like the saved one (concrete or ``jax.ShapeDtypeStruct``
            leaves carrying shardings), e.g. a freshly initialised train state.
          step: which step; default the latest.

        Raises ``ValueError`` naming the array when a shape or dtype differs from the
        checkpoint (e.g. the model architecture was changed).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(
                f"No checkpoint in {self.directory}. Train first, or point --resume at a run "
                "directory that holds a 'checkpoints' folder."
            )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        self._check_shapes(step, abstract)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["arrays"], dict(restored["meta"])

    def restore_latest(
        self, target: Any, on_skip: Callable[[int, str], None] | None = None
    ) -> tuple[int, Any, dict[str, Any]]:
        """Restore the newest checkpoint that restores; ``on_skip(step, why)`` for the others.

        A checkpoint that cannot be read (corrupted, truncated) is skipped; a shape
        mismatch with ``target`` is a ``ValueError`` (the config, not the file, is wrong).
        """
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        reasons = []
        for step in reversed(steps):
            try:
                arrays, meta = self.restore(target, step)
            except _ShapeMismatch as err:
                raise ValueError(str(err)) from None
            except Exception as err:  # tensorstore/OCDBT/JSON errors of a damaged checkpoint
                reasons.append(f"{step}: {_first_line(err)}")
                if on_skip is not None:
                    on_skip(step, _first_line(err))
                continue
            return step, arrays, meta
        raise ValueError(
            f"no checkpoint in {self.directory} can be restored ({'; '.join(reasons)}); "
            "the run cannot be resumed, start it again with --overwrite."
        )

    def _check_shapes(self, step: int, abstract: Any) -> None:
        saved = self._manager.item_metadata(step)["arrays"]
        if saved is None:
            return
        saved_flat = _by_name(saved.tree)
        wanted_flat = _by_name(abstract)
        if set(saved_flat) != set(wanted_flat):
            missing = sorted(set(wanted_flat) - set(saved_flat))
            extra = sorted(set(saved_flat) - set(wanted_flat))
            raise _ShapeMismatch(
                f"checkpoint {self.directory}/{step} does not match the model and optimizer of "
                f"this config (missing {missing[:3]}, unexpected {extra[:3]}); resume with the "
                "run's own model/optimizer options (drop the overrides that change them)."
            )
        for path, want in wanted_flat.items():
            have = saved_flat[path]
            if tuple(have.shape) != tuple(want.shape):
                raise _ShapeMismatch(
                    f"checkpoint {self.directory}/{step}: {path} has shape "
                    f"{tuple(have.shape)} but this config builds {tuple(want.shape)}; resume "
                    "with the run's own model options (drop the overrides that change them)."
                )

    def close(self) -> None:
        self._manager.close()


class _ShapeMismatch(ValueError):
    pass


def _by_name(tree: Any) -> dict[str, Any]:
    """Leaves by a path of plain names (orbax metadata and live pytrees key differently)."""

    def name(k: Any) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(name(k) for k in path): leaf for path, leaf in flat}
