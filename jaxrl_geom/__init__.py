"""jaxrl_geom: geometry-aware GRPO for language models (SALT and LongAct as optax transforms).

Public surface (docs/SPEC.md section 4), imported lazily so ``import jaxrl_geom`` is cheap:

- ``jaxrl_geom.models``: Flax NNX decoder LMs (llama, qwen2, qwen3),
  ``load_pretrained`` / ``save_pretrained``.
- ``jaxrl_geom.sampling.generate``: jitted KV-cache sampler.
- ``jaxrl_geom.rl``: advantages, policy losses, ``grpo_step``.
- ``jaxrl_geom.salt``: ``salt(...)``, ``reweight(...)``, Gram backends, ``SaltConfig``.
- ``jaxrl_geom.longact``: ``longact(...)``, activation capture helpers.
- ``jaxrl_geom.tasks``: built-in verifiable-reward tasks.
- ``jaxrl_geom.rollout``: ``collect_rollouts`` / ``evaluate_rewards``, in one process or many.
- ``jaxrl_geom.loop``: the train loop's parts (``build_policy``, ``build_optimizer``,
  ``held_out_examples``, ``warmup_steps``, ``sample_examples``, DAPO
  ``collect_rollouts_dynamic``, plus the above and ``grpo_step``) for hand-written loops.
- ``jaxrl_geom.distributed``: ``initialize()`` of a multi-process run (docs/SCALE.md).
"""

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = (
    *("models", "sampling", "rl", "salt", "longact", "tasks", "sharding"),
    *("rollout", "distributed", "loop"),
)

__all__ = list(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxrl_geom.{name}")
    raise AttributeError(f"module 'jaxrl_geom' has no attribute {name!r}")
