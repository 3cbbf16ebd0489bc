"""Orbax checkpoints of a training run: array state plus a small JSON of host state.

The array state (parameters, optimizer state, step, PRNG key) is saved with orbax's
``StandardSave`` so that restoring onto a mesh puts each array straight onto the
sharding of the abstract target. Host-side state (data RNG, config) goes in JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves and restores ``(arrays, meta)`` pairs under ``directory/<step>``.

    Args:
      directory: where checkpoints live; created if missing.
      max_to_keep: number of most recent checkpoints kept on disk.
    """

    def __init__(self, directory: str | Path, *, max_to_keep: int = 3) -> None:
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def save(self, step: int, arrays: Any, meta: dict[str, Any]) -> None:
        """Save ``arrays`` (any pytree of jax arrays) and a JSON-able ``meta`` dict."""
        self._manager.save(
            int(step),
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
            ),
        )
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore onto the structure, dtypes and shardings of ``target``.

        Args:
          target: a pytree like the saved one (concrete or ``jax.ShapeDtypeStruct``
            leaves carrying shardings), e.g. a freshly initialised train state.
          step: which step; default the latest.
        """
        step = self._manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(
                f"No checkpoint in {self.directory}. Train first, or point --resume at a run "
                "directory that holds a 'checkpoints' folder."
            )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["arrays"], dict(restored["meta"])

    def close(self) -> None:
        self._manager.close()
