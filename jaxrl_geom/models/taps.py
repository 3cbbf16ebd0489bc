"""Observation taps: reductions of activations collected during the forward pass.

Taps are off by default and keep only reductions (never the [B, T, C] activations),
so capturing costs a few reductions per layer. LongAct (SPEC section 3) reads the
per-channel statistics of the query and key projections collected here.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ChannelStats(NamedTuple):
    """Per-channel activation statistics over valid tokens, kept as sums.

    Sums (not means) so that micro-batches and devices combine exactly with
    :func:`combine_stats`; means are formed once, at the end.
    """

    sum_abs: jax.Array  # [..., C]  sum_t |x_tc|
    sum_sq: jax.Array  # [..., C]  sum_t x_tc^2
    max_abs: jax.Array  # [..., C]  max_t |x_tc|
    count: jax.Array  # [...]     number of valid tokens


def channel_stats(x: jax.Array, mask: jax.Array) -> ChannelStats:
    """Reduce activations ``x [B, T, C]`` over the valid tokens ``mask [B, T]``.

    .. math::
        \\mathrm{sum\\_abs}_c = \\sum_{b,t} m_{bt} |x_{btc}|, \\quad
        \\mathrm{sum\\_sq}_c = \\sum_{b,t} m_{bt} x_{btc}^2, \\quad
        \\mathrm{max\\_abs}_c = \\max_{b,t: m_{bt}} |x_{btc}|

    Padding never enters the statistics. Computed in float32 whatever the
    activation dtype.
    """
    if x.ndim != 3 or mask.shape != x.shape[:2]:
        raise ValueError(
            f"channel_stats expects x [B, T, C] and mask [B, T]; got x {x.shape}, mask "
            f"{mask.shape}. Pass the attention mask of the same batch."
        )
    m = mask.astype(jnp.float32)[..., None]  # [B, T, 1]
    a = jnp.abs(x.astype(jnp.float32))  # [B, T, C]
    return ChannelStats(
        sum_abs=jnp.sum(a * m, axis=(0, 1)),
        sum_sq=jnp.sum(jnp.square(a) * m, axis=(0, 1)),
        max_abs=jnp.max(jnp.where(m > 0, a, 0.0), axis=(0, 1)),
        count=jnp.sum(m),
    )


def combine_stats(a: ChannelStats, b: ChannelStats) -> ChannelStats:
    """Combine statistics of two disjoint token sets (micro-batches, devices)."""
    return ChannelStats(
        sum_abs=a.sum_abs + b.sum_abs,
        sum_sq=a.sum_sq + b.sum_sq,
        max_abs=jnp.maximum(a.max_abs, b.max_abs),
        count=a.count + b.count,
    )
