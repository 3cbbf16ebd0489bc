"""Group-relative advantages (GRPO and its Dr.GRPO / batch-scaled variants).

A batch holds M prompts x G rollouts = N rollouts; rollout ``i`` has the scalar
reward ``R_i`` and belongs to group ``g(i)`` (its prompt). Two layouts are accepted
everywhere in this module:

* ``group_ids`` (int32 ``[N]``, values in ``[0, num_groups)``, any order), reduced
  with ``jax.ops.segment_sum``; ``num_groups`` must be static under ``jit``;
* ``group_size=G`` for the common contiguous layout ``[g0 x G, g1 x G, ...]``
  (what ``rl.rollouts.repeat_prompts`` builds), reduced with a reshape.

References:
  Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
  Language Models" (GRPO), arXiv:2402.03300.
  Liu et al., "Understanding R1-Zero-Like Training: A Critical Perspective"
  (Dr.GRPO), arXiv:2503.20783.
  Hugging Face TRL ``GRPOTrainer`` (``scale_rewards``, ``reward_weights``).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Scale = Literal["group", "batch", "none"]
_SCALES = ("group", "batch", "none")


def combine_rewards(
    rewards: jax.Array,  # f32 [N, F]
    weights: jax.Array | None = None,  # f32 [F]
) -> jax.Array:  # f32 [N]
    """Weighted sum of F reward functions per rollout.

    .. math::
        R_i = \\sum_f w_f\\, r_{if} \\qquad (\\text{NaN } r_{if} \\text{ count as } 0)

    A reward function that does not apply to a sample returns NaN; like TRL
    (``rewards_per_func * reward_weights).nansum(dim=1)``) it then contributes 0, so a
    rollout scored by no function at all gets reward 0.

    Args:
      rewards: ``[N, F]`` rewards, one column per reward function.
      weights: ``[F]`` weights; ``None`` means all ones.

    Returns:
      ``[N]`` float32 combined rewards.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 2:
        raise ValueError(
            f"rewards must have shape [N, F] (one column per reward function), got "
            f"{rewards.shape}; for a single reward function pass rewards[:, None]."
        )
    if weights is None:
        weights = jnp.ones((rewards.shape[1],), jnp.float32)
    weights = jnp.asarray(weights, jnp.float32)
    if weights.shape != (rewards.shape[1],):
        raise ValueError(
            f"weights has shape {weights.shape} but rewards has {rewards.shape[1]} reward "
            f"functions; pass one weight per column, shape ({rewards.shape[1]},)."
        )
    return jnp.nansum(rewards * weights[None, :], axis=1)  # [N]


class _Groups(NamedTuple):
    """Per-row group statistics broadcast back to the rows."""

    mean: jax.Array  # [N] group mean of the row's group
    std: jax.Array  # [N] unbiased group std (ddof=1) of the row's group
    all_equal: jax.Array  # bool [N] the row's group has max == min


def _is_concrete(x: jax.Array) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_finite_rewards(rewards: jax.Array) -> None:
    """Raise a ValueError naming the rows whose reward is NaN or +-inf (concrete inputs
    only; under ``jit`` nothing can be read and the train step's finite guard applies).

    One such reward would spread through the group mean to its whole group (to the
    whole batch with ``scale="batch"``).
    """
    if not _is_concrete(rewards):
        return
    bad = np.flatnonzero(~np.isfinite(np.asarray(rewards)))
    if bad.size:
        shown = ", ".join(str(i) for i in bad[:10]) + (", ..." if bad.size > 10 else "")
        raise ValueError(
            f"rewards has {bad.size} non-finite value(s) (NaN or inf) at rows [{shown}]: fix "
            "the reward function (return a finite float for every completion), or combine "
            "several functions with combine_rewards, which counts NaN as 0."
        )


def _check_layout(
    n: int,
    group_ids: jax.Array | None,
    group_size: int | None,
    num_groups: int | None,
) -> int | None:
    """Validate the group layout eagerly; return ``num_groups`` for the ids layout."""
    if (group_ids is None) == (group_size is None):
        raise ValueError(
            "Pass exactly one of group_ids ([N] int32 prompt index of each rollout) or "
            "group_size=G (contiguous layout: rows [k*G, (k+1)*G) share a prompt)."
        )
    if group_size is not None:
        if not isinstance(group_size, (int, np.integer)) or group_size < 2:
            raise ValueError(
                f"group_size={group_size}: the group std is undefined for fewer than 2 "
                "rollouts per prompt; sample num_generations >= 2."
            )
        if n % group_size:
            raise ValueError(
                f"N={n} rollouts is not a multiple of group_size={group_size}; the contiguous "
                "layout needs M * G rows (or pass group_ids)."
            )
        return None
    if group_ids.shape != (n,):
        raise ValueError(
            f"group_ids has shape {group_ids.shape}, expected ({n},): one prompt index per rollout."
        )
    if not jnp.issubdtype(group_ids.dtype, jnp.integer):
        raise ValueError(f"group_ids must be integers, got dtype {group_ids.dtype}.")
    if _is_concrete(group_ids):
        ids = np.asarray(group_ids)
        if n and ids.min() < 0:
            raise ValueError("group_ids must be >= 0; use 0 .. num_groups-1 as prompt indices.")
        if num_groups is None:
            num_groups = int(ids.max()) + 1 if n else 0
        if n and ids.max() >= num_groups:
            raise ValueError(
                f"group_ids holds {int(ids.max())} but num_groups={num_groups}; ids must lie "
                "in [0, num_groups)."
            )
        counts = np.bincount(ids, minlength=num_groups)
        if np.any(counts == 1):
            raise ValueError(
                f"group {int(np.argmax(counts == 1))} has a single rollout: the group std is "
                "undefined for groups of 1; sample num_generations >= 2."
            )
    elif num_groups is None:
        raise ValueError(
            "group_ids is traced (inside jit) so the number of groups cannot be read from it; "
            "pass num_groups as a static Python int (e.g. functools.partial(..., "
            "num_groups=M) before jax.jit)."
        )
    return int(num_groups)


def _group_moments(
    rewards: jax.Array,  # f32 [N]
    group_ids: jax.Array | None,  # int32 [N]
    group_size: int | None,
    num_groups: int | None,
) -> _Groups:
    """Group mean, unbiased std and all-equal flag, broadcast to rows (two-pass)."""
    if group_size is not None:
        r = rewards.reshape(-1, group_size)  # [M, G]
        mean = jnp.mean(r, axis=1, keepdims=True)  # [M, 1]
        var = jnp.sum(jnp.square(r - mean), axis=1, keepdims=True) / (group_size - 1)
        all_equal = jnp.max(r, axis=1, keepdims=True) == jnp.min(r, axis=1, keepdims=True)
        shape = r.shape
        return _Groups(
            mean=jnp.broadcast_to(mean, shape).reshape(-1),
            std=jnp.broadcast_to(jnp.sqrt(var), shape).reshape(-1),
            all_equal=jnp.broadcast_to(all_equal, shape).reshape(-1),
        )
    seg = dict(segment_ids=group_ids, num_segments=num_groups)
    count = jax.ops.segment_sum(jnp.ones_like(rewards), **seg)  # [M]
    mean = jax.ops.segment_sum(rewards, **seg) / jnp.maximum(count, 1.0)  # [M]
    dev = rewards - mean[group_ids]  # [N]
    # max(count - 1, 1): a traced group of 1 (not checkable under jit) has dev = 0 -> std 0.
    var = jax.ops.segment_sum(jnp.square(dev), **seg) / jnp.maximum(count - 1.0, 1.0)  # [M]
    all_equal = jax.ops.segment_max(rewards, **seg) == jax.ops.segment_min(rewards, **seg)
    return _Groups(
        mean=mean[group_ids], std=jnp.sqrt(var)[group_ids], all_equal=all_equal[group_ids]
    )


def group_advantages(
    rewards: jax.Array,  # f32 [N]
    group_ids: jax.Array | None = None,  # int32 [N]
    *,
    group_size: int | None = None,
    scale: Scale = "group",
    eps: float = 1e-4,
    num_groups: int | None = None,
) -> jax.Array:  # f32 [N]
    """Group-relative advantages of GRPO.

    .. math::
        A_i = \\frac{R_i - \\operatorname{mean}_{j \\in g(i)} R_j}{\\sigma + \\epsilon}

    with ``sigma`` chosen by ``scale``:

    * ``"group"``: the std of the rollout's group (DeepSeekMath GRPO; TRL default);
    * ``"batch"``: the std of all N rewards (TRL ``scale_rewards="batch"``); the mean is
      still the group mean;
    * ``"none"``: no division, ``A_i = R_i - mean`` (Dr.GRPO, arXiv:2503.20783).

    The std is the unbiased one (``ddof=1``), as ``torch.std`` in TRL's
    ``GRPOTrainer._generate_and_score_completions``; ``eps=1e-4`` is TRL's constant.
    A group whose rewards are all equal carries no learning signal: its advantages are
    set to exactly 0 for every ``scale`` (rather than the round-off ``(R - mean) / eps``
    would leave), so it adds exactly nothing to the gradient.

    Args:
      rewards: ``[N]`` scalar rewards (finite; combine several functions with
        :func:`combine_rewards`, which maps NaN to 0).
      group_ids: ``[N]`` integer prompt index of each rollout, in ``[0, num_groups)``.
      group_size: alternatively ``G`` for the contiguous layout (rows ``[k*G, (k+1)*G)``
        share prompt ``k``). Pass exactly one of ``group_ids`` and ``group_size``.
      scale: ``"group"``, ``"batch"`` or ``"none"`` (see above).
      eps: added to the std before dividing.
      num_groups: number of groups for ``group_ids``; required (static) under ``jit``,
        inferred as ``max(group_ids) + 1`` otherwise.

    Returns:
      ``[N]`` float32 advantages.

    Raises:
      ValueError: a group of one rollout (std undefined: use ``num_generations >= 2``),
        a NaN/inf reward (naming its rows; concrete inputs), an unknown ``scale``,
        ``eps < 0`` or inconsistent shapes.

    Example:
      >>> group_advantages(jnp.array([1.0, 0.0, 0.5, 0.5]), group_size=2)
      Array([ 0.7070..., -0.7070...,  0.       ,  0.       ], dtype=float32)
    """
    if scale not in _SCALES:
        raise ValueError(f"Unknown scale {scale!r}; use one of {_SCALES}.")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}.")
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(
            f"rewards must have shape [N], got {rewards.shape}; combine several reward "
            "functions first with combine_rewards."
        )
    n = rewards.shape[0]
    if n == 0:
        raise ValueError("Empty batch (N = 0): sample at least one group of rollouts.")
    check_finite_rewards(rewards)
    if group_ids is not None:
        group_ids = jnp.asarray(group_ids)
    num_groups = _check_layout(n, group_ids, group_size, num_groups)
    stats = _group_moments(rewards, group_ids, group_size, num_groups)
    centered = rewards - stats.mean  # [N]
    if scale == "group":
        advantages = centered / (stats.std + eps)
    elif scale == "batch":
        batch_std = jnp.std(rewards, ddof=1) if n > 1 else jnp.zeros((), jnp.float32)
        advantages = centered / (batch_std + eps)
    else:
        advantages = centered
    return jnp.where(stats.all_equal, 0.0, advantages)


def equal_reward_groups(
    rewards: jax.Array,  # f32 [N]
    group_ids: jax.Array | None = None,  # int32 [N]
    *,
    group_size: int | None = None,
    num_groups: int | None = None,
) -> jax.Array:  # bool [N]
    """``True`` for the rows whose group's rewards are all exactly equal (zero std).

    Such groups get advantage 0; DAPO's dynamic sampling drops them. Same layouts and
    ``num_groups`` rule as :func:`group_advantages`.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1 or rewards.shape[0] == 0:
        raise ValueError(f"rewards must have shape [N] with N > 0, got {rewards.shape}.")
    check_finite_rewards(rewards)
    if group_ids is not None:
        group_ids = jnp.asarray(group_ids)
    num_groups = _check_layout(rewards.shape[0], group_ids, group_size, num_groups)
    return _group_moments(rewards, group_ids, group_size, num_groups).all_equal


class GroupStats(NamedTuple):
    """Reward statistics per group, for logging."""

    mean: jax.Array  # f32 [num_groups]
    std: jax.Array  # f32 [num_groups]  unbiased (ddof=1), as in group_advantages
    count: jax.Array  # f32 [num_groups]  rollouts per group
    zero_std_fraction: jax.Array  # f32 []  fraction of non-empty groups with all-equal rewards


def group_stats(
    rewards: jax.Array,  # f32 [N]
    group_ids: jax.Array,  # int32 [N]
    num_groups: int,
) -> GroupStats:
    """Per-group reward mean and std plus the fraction of zero-std groups.

    ``mean(stats.std)`` is TRL's ``reward_std`` metric and ``zero_std_fraction`` its
    ``frac_reward_zero_std``. Jittable with a static ``num_groups``; groups with no
    rollouts report mean 0, std 0 and are left out of the fraction.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    group_ids = jnp.asarray(group_ids)
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards {rewards.shape} and group_ids {group_ids.shape} must both have shape [N]."
        )
    seg = dict(segment_ids=group_ids, num_segments=num_groups)
    count = jax.ops.segment_sum(jnp.ones_like(rewards), **seg)  # [M]
    mean = jax.ops.segment_sum(rewards, **seg) / jnp.maximum(count, 1.0)  # [M]
    var = jax.ops.segment_sum(jnp.square(rewards - mean[group_ids]), **seg)
    std = jnp.sqrt(var / jnp.maximum(count - 1.0, 1.0))  # [M]
    equal = jax.ops.segment_max(rewards, **seg) == jax.ops.segment_min(rewards, **seg)
    present = count > 0
    zero_std_fraction = jnp.sum(equal & present) / jnp.maximum(jnp.sum(present), 1)
    return GroupStats(
        mean=mean, std=std, count=count, zero_std_fraction=zero_std_fraction.astype(jnp.float32)
    )
