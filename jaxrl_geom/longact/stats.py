"""Per-channel saliency scores from captured q/k activation statistics (SPEC section 3).

The forward pass keeps only sums (:class:`~jaxrl_geom.models.taps.ChannelStats`), so
that micro-batches and devices combine exactly; this module turns them into one score
per channel and smooths scores over steps for ``refresh="ema"``.
"""

from __future__ import annotations

from typing import Literal, get_args

import jax
import jax.numpy as jnp

from jaxrl_geom.models.taps import ChannelStats

Statistic = Literal["mean_abs", "rms", "max_abs"]
STATISTICS: tuple[str, ...] = get_args(Statistic)


def check_statistic(statistic: str) -> None:
    """Raise a ValueError naming the choices when ``statistic`` is unknown."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic={statistic!r} is not one of {STATISTICS}; pick one of them.")


def channel_scores(stats: ChannelStats, statistic: Statistic = "mean_abs") -> jax.Array:
    """Per-channel saliency ``s_c`` over the valid tokens, ``[..., C]`` float32.

    .. math::
        \\mathrm{mean\\_abs}: s_c = \\frac{1}{n} \\sum_t |x_{tc}|, \\qquad
        \\mathrm{rms}: s_c = \\sqrt{\\frac{1}{n} \\sum_t x_{tc}^2}, \\qquad
        \\mathrm{max\\_abs}: s_c = \\max_t |x_{tc}|

    with ``n = stats.count`` the number of valid tokens. A layer that saw no valid
    token (``n = 0``) scores 0 in every channel (never NaN).

    Args:
      stats: sums over valid tokens; ``sum_abs``, ``sum_sq``, ``max_abs`` ``[..., C]``
        and ``count`` ``[...]`` (e.g. ``[L, C]`` and ``[L]`` from ``collect_qk_stats``).
      statistic: ``"mean_abs"`` (SPEC default), ``"rms"`` or ``"max_abs"``.

    Returns:
      Scores ``[..., C]``, float32, non-negative.
    """
    check_statistic(statistic)
    if statistic == "max_abs":
        return jnp.asarray(stats.max_abs, jnp.float32)
    count = jnp.asarray(stats.count, jnp.float32)[..., None]  # [..., 1]
    safe = jnp.maximum(count, 1.0)
    if statistic == "mean_abs":
        score = jnp.asarray(stats.sum_abs, jnp.float32) / safe
    else:
        score = jnp.sqrt(jnp.asarray(stats.sum_sq, jnp.float32) / safe)
    return jnp.where(count > 0, score, 0.0)


def update_ema(
    prev_scores: jax.Array,  # [..., C]
    scores: jax.Array,  # [..., C]
    decay: float,
    *,
    is_first: jax.Array | bool = False,
) -> jax.Array:
    """Exponential moving average of channel scores, ``[..., C]``.

    .. math::
        \\bar s^{(0)} = s^{(0)}, \\qquad
        \\bar s^{(t)} = \\beta\\, \\bar s^{(t-1)} + (1 - \\beta)\\, s^{(t)}

    with ``beta = decay``. The first step takes the scores as they are (our choice: no
    bias correction is needed because nothing is averaged with a zero start).

    Args:
      prev_scores: the previous average (ignored when ``is_first``).
      scores: this step's scores.
      decay: ``beta`` in ``[0, 1)``; 0 follows the current batch exactly.
      is_first: scalar bool (may be traced): start the average at ``scores``.
    """
    averaged = decay * prev_scores + (1.0 - decay) * scores
    return jnp.where(is_first, scores, averaged)
