"""DAPO extras: dynamic sampling and the soft overlong punishment.

Clip-higher and the token-level loss live in :mod:`jaxrl_geom.rl.losses`
(``eps_high``, ``loss_type="dapo"``).

* Dynamic sampling: a group whose G rewards are all equal has zero advantage and adds
  nothing to the policy gradient, so DAPO drops it and samples more prompts until the
  batch is full of informative groups. :func:`dynamic_sampling_filter` is the jittable
  mask; :func:`fill_batch` is the host-side loop around a sampler (it calls the
  sampler, which is itself jitted, a data-dependent number of times).
* Soft overlong punishment: a length-aware reward that ramps from 0 to ``-1`` over the
  last ``L_buffer`` tokens before ``L_max`` (:func:`soft_overlong_punishment`).

Reference: Yu et al., "DAPO: An Open-Source LLM Reinforcement Learning System at
Scale", arXiv:2503.14476 (section 3.2 dynamic sampling, section 3.4 eq. 13).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_geom.rl.advantages import equal_reward_groups


def dynamic_sampling_filter(
    rewards: jax.Array,  # f32 [N]
    group_ids: jax.Array | None = None,  # int32 [N]
    *,
    group_size: int | None = None,
    num_groups: int | None = None,
) -> jax.Array:  # bool [N]
    """Keep mask of DAPO dynamic sampling: True for rows whose group is informative.

    .. math::
        \\mathrm{keep}_i = \\big[\\, 0 < |\\{ j \\in g(i) : R_j \\text{ correct} \\}| < G \\,\\big]
        \\;\\equiv\\; \\big[\\max_{j \\in g(i)} R_j \\ne \\min_{j \\in g(i)} R_j\\big]

    (DAPO states it for 0/1 accuracy rewards; for general rewards we keep any group
    whose rewards are not all exactly equal, i.e. whose advantages are not all 0.)
    Layouts as in :func:`~jaxrl_geom.rl.advantages.group_advantages`: ``group_ids``
    with a static ``num_groups`` under ``jit``, or ``group_size`` for contiguous groups.
    """
    return ~equal_reward_groups(rewards, group_ids, group_size=group_size, num_groups=num_groups)


class FillResult(NamedTuple):
    """What :func:`fill_batch` returns."""

    groups: list[Any]  # the batch's groups, as sample_fn returned them
    rewards: np.ndarray  # f32 [len(groups), G]
    informative: np.ndarray  # bool [len(groups)]  False for all-equal groups used as padding
    metrics: dict[str, float]


def _informative(rewards: np.ndarray) -> bool:  # rewards [G]
    return bool(np.any(rewards != rewards[0]))


def fill_batch(
    sample_fn: Callable[[int], tuple[Sequence[Any], np.ndarray]],
    target_groups: int,
    max_tries: int,
    *,
    on_short: Literal["pad", "truncate"] = "pad",
) -> FillResult:
    """DAPO dynamic sampling on the host: sample, drop all-equal groups, repeat.

    Each try calls ``sample_fn(num_missing)``, which samples and scores groups for (at
    least about) ``num_missing`` more prompts and returns ``(groups, rewards)``: a
    sequence of k opaque group payloads and their rewards ``[k, G]``. It may return more
    or fewer than asked (e.g. always a fixed-size batch, to avoid recompiling the
    sampler). Groups whose rewards are all equal are dropped; informative ones are kept
    until ``target_groups`` are collected or ``max_tries`` calls were made. Surplus
    informative groups are discarded.

    If the tries run out first, the function gives up and says so in the metrics
    (``gave_up = 1``). With ``on_short="pad"`` the batch is topped up with dropped
    groups, which keeps the batch shape static for the jitted train step: their
    advantages are 0, so they add nothing to the policy gradient, but they do count in
    the token / sequence normaliser and in the KL term. With ``"truncate"`` the short
    batch is returned as is.

    Args:
      sample_fn: host callable ``num_missing -> (groups, rewards [k, G])``.
      target_groups: groups wanted in the batch (prompts per step, ``>= 1``).
      max_tries: maximum number of ``sample_fn`` calls (``>= 1``; DAPO/verl's
        ``max_num_gen_batches``).
      on_short: ``"pad"`` or ``"truncate"`` (see above).

    Returns:
      :class:`FillResult`; ``metrics`` holds ``dynamic_sampling/{tries,
      groups_sampled, groups_dropped, groups_surplus, padded_groups, filled_fraction,
      gave_up}`` as Python floats. ``filled_fraction`` is the share of the batch made of
      informative groups.
    """
    if int(target_groups) < 1:
        raise ValueError(f"target_groups must be >= 1, got {target_groups}.")
    if int(max_tries) < 1:
        raise ValueError(f"max_tries must be >= 1 (calls to sample_fn), got {max_tries}.")
    if on_short not in ("pad", "truncate"):
        raise ValueError(f"on_short must be 'pad' or 'truncate', got {on_short!r}.")
    kept: list[tuple[Any, np.ndarray]] = []
    dropped: list[tuple[Any, np.ndarray]] = []
    tries = 0
    while len(kept) < target_groups and tries < max_tries:
        tries += 1
        groups, rewards = sample_fn(target_groups - len(kept))
        rewards = np.asarray(rewards, np.float32)
        if rewards.ndim != 2 or rewards.shape[0] != len(groups):
            raise ValueError(
                f"sample_fn returned {len(groups)} groups and rewards of shape {rewards.shape}; "
                "return rewards as [num_groups, G], one row per group."
            )
        if rewards.shape[0] and rewards.shape[1] < 2:
            raise ValueError(
                f"groups of {rewards.shape[1]} rollout: dynamic sampling compares rewards "
                "within a group; sample num_generations >= 2."
            )
        for group, r in zip(groups, rewards, strict=True):
            (kept if _informative(r) else dropped).append((group, r))

    gave_up = len(kept) < target_groups
    batch = kept[:target_groups]
    num_informative = len(batch)
    padding = dropped[: target_groups - len(batch)] if on_short == "pad" else []
    batch = batch + padding
    width = batch[0][1].shape[0] if batch else 0
    metrics = {
        "dynamic_sampling/tries": float(tries),
        "dynamic_sampling/groups_sampled": float(len(kept) + len(dropped)),
        "dynamic_sampling/groups_dropped": float(len(dropped)),
        "dynamic_sampling/groups_surplus": float(max(len(kept) - target_groups, 0)),
        "dynamic_sampling/padded_groups": float(len(padding)),
        "dynamic_sampling/filled_fraction": num_informative / target_groups,
        "dynamic_sampling/gave_up": float(gave_up),
    }
    return FillResult(
        groups=[g for g, _ in batch],
        rewards=np.stack([r for _, r in batch]) if batch else np.zeros((0, width), np.float32),
        informative=np.arange(len(batch)) < num_informative,
        metrics=metrics,
    )


def soft_overlong_punishment(
    lengths: jax.Array,  # int [N]
    max_completion_length: int,
    buffer_length: int,
    penalty_factor: float = 1.0,
) -> jax.Array:  # f32 [N]
    """DAPO's soft overlong punishment (arXiv:2503.14476, eq. 13), added to the reward.

    .. math::
        R_{length}(y) = \\lambda \\cdot \\begin{cases}
            0, & |y| \\le L_{max} - L_{cache} \\\\
            \\dfrac{(L_{max} - L_{cache}) - |y|}{L_{cache}},
                & L_{max} - L_{cache} < |y| \\le L_{max} \\\\
            -1, & L_{max} < |y|
        \\end{cases}

    ``L_cache`` is ``buffer_length`` and ``lambda`` the ``penalty_factor`` (verl's
    ``overlong_penalty_factor``; the paper uses 1).

    Args:
      lengths: ``[N]`` completion lengths in tokens.
      max_completion_length: ``L_max`` (the generation budget).
      buffer_length: ``L_cache``, in ``(0, L_max]``.
      penalty_factor: ``lambda >= 0``.

    Returns:
      ``[N]`` float32 penalties in ``[-penalty_factor, 0]``.
    """
    if int(max_completion_length) < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}.")
    if not 0 < int(buffer_length) <= int(max_completion_length):
        raise ValueError(
            f"buffer_length={buffer_length} must be in (0, max_completion_length="
            f"{max_completion_length}]; DAPO uses 4096 of 20480."
        )
    if not penalty_factor >= 0:
        raise ValueError(f"penalty_factor must be >= 0, got {penalty_factor}.")
    lengths = jnp.asarray(lengths).astype(jnp.float32)  # [N]
    l_max, l_buf = float(max_completion_length), float(buffer_length)
    expected = l_max - l_buf
    ramp = (expected - lengths) / l_buf
    penalty = jnp.where(lengths <= expected, 0.0, jnp.where(lengths <= l_max, ramp, -1.0))
    return penalty_factor * penalty
