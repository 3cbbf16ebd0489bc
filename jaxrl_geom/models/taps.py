"""Observation taps: reductions of activations collected during the forward pass.

Taps are off by default and keep only reductions (never the [B, T, C] activations),
so capturing costs a few reductions per layer. LongAct (SPEC section 3) reads the
per-channel statistics of the query and key projections collected here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


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


def set_qk_capture(model: Any, on: bool) -> None:
    """Turn the LongAct q/k capture of every attention layer of ``model`` on or off.

    The flag is a static Python attribute: a jitted function sees it through the
    graph definition, so toggling it retraces once and costs nothing when off.
    Capture runs on cache-free forwards only (training passes); a cached forward
    with capture on raises.
    """
    from jaxrl_geom.models.attention import Attention  # lazy: attention imports taps

    found = False
    for _, module in nnx.iter_modules(model):
        if isinstance(module, Attention):
            module.capture_qk = bool(on)
            found = True
    if not found:
        raise ValueError(
            f"set_qk_capture: {type(model).__name__} has no Attention layers; pass a "
            "jaxrl_geom.models.Decoder."
        )


def collect_qk_stats(model_or_intermediates: Any) -> dict[str, ChannelStats]:
    """Stack the sown q/k statistics over layers: ``{"q": ChannelStats [L, Cq], "k": ...}``.

    Accepts the intermediates returned by ``nnx.capture`` (preferred; flax 0.12
    deprecates sowing outside it), or the model / ``nnx.state(model, nnx.Intermediate)``
    after a plain call. A layer called several times contributes the
    :func:`combine_stats` of its calls. Layers are ordered by index.

    Example::

        set_qk_capture(model, True)
        (logits, _), inter = nnx.capture(model, nnx.Intermediate)(tokens, positions, mask)
        stats = collect_qk_stats(inter)  # {"q": ChannelStats([L, H*hd]...), "k": ...}
    """
    state = model_or_intermediates
    if isinstance(state, nnx.Module):
        state = nnx.state(state, nnx.Intermediate)
    per_layer: list[tuple[tuple[Any, ...], dict[str, ChannelStats]]] = []
    for path, value in nnx.to_flat_state(state):
        if not path or path[-1] != "qk_stats":
            continue
        calls = value.get_value() if isinstance(value, nnx.Variable) else value
        combined = calls[0]
        for extra in calls[1:]:
            combined = {name: combine_stats(combined[name], extra[name]) for name in combined}
        per_layer.append((path, combined))
    if not per_layer:
        raise ValueError(
            "collect_qk_stats found no 'qk_stats': call set_qk_capture(model, True) and run a "
            "cache-free forward first."
        )
    if len(per_layer) == 1 and not any(isinstance(p, int) for p in per_layer[0][0]):
        return per_layer[0][1]  # scanned layers (ModelConfig.scan_layers): already [L, C]
    per_layer.sort(key=lambda item: tuple(_sort_key(p) for p in item[0]))
    stats = [s for _, s in per_layer]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *stats)


def has_stacked_layers(params: Any) -> bool:
    """True when ``params`` (an ``nnx.State``) holds scanned layers: ``layers.<name>``
    paths with a leading ``[L]`` axis instead of ``layers.<i>.<name>``."""
    return any(
        len(path) > 1 and path[0] == "layers" and not isinstance(path[1], int)
        for path, _ in nnx.to_flat_state(params)
    )


def _sort_key(part: Any) -> tuple[int, Any]:
    return (0, part) if isinstance(part, int) else (1, str(part))
