"""Saliency-guided channel selection for LongAct (SPEC section 3), pure JAX, no optax.

A channel ``c`` of a query (key) projection is column ``c`` of ``W_Q`` (``W_K``),
``c = head * hd + j``. RoPE rotates the pair ``(j, j + hd/2)`` of every head together
(HF ``rotate_half``) and preserves the pair's norm, so ``granularity="rope_pair"``
scores a pair by its joint norm and keeps or drops both channels together.

Count rule (:func:`num_kept`): ``k = ceil(keep_ratio * n)`` of ``n`` candidates, per
selection group:

===========  ==========  ====================  ====================================
scope        granularity  group (candidates)    channels kept per layer
===========  ==========  ====================  ====================================
layer        channel      C channels            ``ceil(keep * C)``
head         channel      hd channels / head    ``H * ceil(keep * hd)``
layer        rope_pair    C/2 pairs             ``2 * ceil(keep * C/2)``
head         rope_pair    hd/2 pairs / head     ``H * 2 * ceil(keep * hd/2)``
===========  ==========  ====================  ====================================

Ties: among equal scores the LOWER index wins (channel index ``c``, or pair index
``head * hd/2 + j`` for pairs), so the mask is a deterministic function of the scores
(``lax.top_k`` guarantees this order). When ``k < n`` a NaN score is never selected
(a RoPE pair with a NaN channel is a NaN pair); only a group with more than ``n - k``
NaN candidates then keeps fewer than ``k``. ``k = n`` keeps everything.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, get_args

import jax
import jax.numpy as jnp

Scope = Literal["layer", "head"]
Granularity = Literal["channel", "rope_pair"]
SCOPES: tuple[str, ...] = get_args(Scope)
GRANULARITIES: tuple[str, ...] = get_args(Granularity)


def check_keep_ratio(keep_ratio: float) -> None:
    """Raise a ValueError unless ``0 < keep_ratio <= 1``."""
    if not isinstance(keep_ratio, (int, float)) or not 0.0 < float(keep_ratio) <= 1.0:
        raise ValueError(
            f"keep_ratio={keep_ratio!r} must be in (0, 1]: it is the fraction of channels "
            "KEPT (updated). To give the fraction dropped instead, pass sparsity= to longact()."
        )


def num_kept(num_candidates: int, keep_ratio: float) -> int:
    """Number of candidates kept in one selection group: ``ceil(keep_ratio * n)``.

    Always at least 1 and at most ``n`` for ``0 < keep_ratio <= 1``.
    """
    check_keep_ratio(keep_ratio)
    return min(num_candidates, max(1, math.ceil(float(keep_ratio) * num_candidates)))


def channels_kept_per_layer(
    num_channels: int,
    *,
    keep_ratio: float,
    head_dim: int | None = None,
    scope: Scope = "layer",
    granularity: Granularity = "channel",
) -> int:
    """Number of channels :func:`select_channels` keeps in one layer of ``C`` channels."""
    groups, candidates, width = selection_groups(num_channels, None, head_dim, scope, granularity)
    return groups * num_kept(candidates, keep_ratio) * width


def select_channels(
    scores: jax.Array,  # [..., C], typically [L, C]
    *,
    keep_ratio: float = 0.3,
    num_heads: int | None = None,
    head_dim: int | None = None,
    scope: Scope = "layer",
    granularity: Granularity = "channel",
) -> jax.Array:
    """Boolean mask of the most salient channels, ``[..., C]``; True = updated.

    .. math::
        M_c = [\\, c \\in \\mathrm{TopK}_{k}(s_g) \\,], \\qquad k = \\lceil \\rho\\, n_g \\rceil

    where ``g`` is the selection group (the layer's ``C`` channels, or one head's
    ``hd`` channels), ``n_g`` its number of candidates and ``rho = keep_ratio``. For
    ``granularity="rope_pair"`` the candidates are the RoPE pairs ``(j, j + hd/2)`` of
    each head, scored by the joint norm

    .. math::
        s_{h,j}^{\\mathrm{pair}} = \\sqrt{s_{h,j}^2 + s_{h,j+hd/2}^2},

    and a selected pair keeps both of its channels. Ties go to the lower index (see
    the module docstring). Works under ``jit``: all counts are static.

    Args:
      scores: per-channel saliency, last axis ``C = H * hd`` (``c = head * hd + j``).
      keep_ratio: fraction of candidates KEPT per group, in ``(0, 1]`` (default 0.3).
      num_heads: ``H``; optional, checked against ``C / head_dim`` when given.
      head_dim: ``hd``; required for ``scope="head"`` or ``granularity="rope_pair"``.
      scope: ``"layer"`` (top-k over the layer) or ``"head"`` (top-k within each head).
      granularity: ``"channel"`` or ``"rope_pair"``.

    Returns:
      bool ``[..., C]``; every layer keeps exactly
      :func:`channels_kept_per_layer` channels (fewer only where NaN scores leave too
      few candidates: a NaN is never selected).

    Example:
      >>> mask = select_channels(scores, keep_ratio=0.3, head_dim=64, scope="head")
    """
    scores = jnp.asarray(scores)
    if scores.ndim < 1:
        raise ValueError("select_channels expects scores [..., C]; got a scalar.")
    c = scores.shape[-1]
    groups, candidates, _ = selection_groups(c, num_heads, head_dim, scope, granularity)
    k = num_kept(candidates, keep_ratio)
    pair_head_dim = head_dim if granularity == "rope_pair" else None
    return _select(scores, k=k, groups=groups, candidates=candidates, pair_head_dim=pair_head_dim)


@functools.partial(jax.jit, static_argnames=("k", "groups", "candidates", "pair_head_dim"))
def _select(
    scores: jax.Array,  # [..., C]
    *,
    k: int,
    groups: int,
    candidates: int,
    pair_head_dim: int | None,
) -> jax.Array:
    """Top-``k`` of each of ``groups`` groups of ``candidates`` (channels or RoPE pairs)."""
    lead, c = scores.shape[:-1], scores.shape[-1]
    s = scores.astype(jnp.float32) + 0.0  # +0.0: -0.0 -> 0.0, so equal magnitudes tie exactly
    if pair_head_dim is not None:
        heads, half = c // pair_head_dim, pair_head_dim // 2
        s = s.reshape(*lead, heads, 2, half)  # [..., H, 2, hd/2]
        s = jnp.sqrt(s[..., 0, :] * s[..., 0, :] + s[..., 1, :] * s[..., 1, :])  # [..., H, hd/2]
    # NaN never wins, also for a pair (a NaN channel makes its pair's norm NaN): the
    # mapping comes after the pair norm, where -inf would have squared to +inf.
    is_nan = jnp.isnan(s).reshape(*lead, groups, candidates)  # [..., G, n]
    s = jnp.where(jnp.isnan(s), -jnp.inf, s)
    s = s.reshape(*lead, groups, candidates)  # [..., G, n]
    chosen = _top_k_mask(s, k)  # [..., G, n]
    if k < candidates:  # keep_ratio=1 keeps all (a constant mask, as plain GRPO compiles)
        chosen = chosen & ~is_nan
    if pair_head_dim is not None:
        chosen = chosen.reshape(*lead, heads, 1, half)  # [..., H, 1, hd/2]
        chosen = jnp.broadcast_to(chosen, (*lead, heads, 2, half))  # both channels of a pair
    return chosen.reshape(*lead, c)  # [..., C]


def _top_k_mask(scores: jax.Array, k: int) -> jax.Array:
    """bool mask of the ``k`` largest entries along the last axis (ties: lower index)."""
    n = scores.shape[-1]
    if k >= n:
        return jnp.ones(scores.shape, bool)
    rows = scores.reshape(-1, n)  # [R, n]
    _, idx = jax.lax.top_k(rows, k)  # [R, k]
    mask = jnp.zeros(rows.shape, bool).at[jnp.arange(rows.shape[0])[:, None], idx].set(True)
    return mask.reshape(scores.shape)


def selection_groups(
    num_channels: int,
    num_heads: int | None,
    head_dim: int | None,
    scope: str,
    granularity: str,
) -> tuple[int, int, int]:
    """``(groups per layer, candidates per group, channels per candidate)`` of a layout.

    Raises a ValueError naming the fix when the head layout is missing or does not
    divide ``num_channels``.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is not one of {SCOPES}.")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not one of {GRANULARITIES}.")
    needs_heads = scope == "head" or granularity == "rope_pair"
    if head_dim is None and num_heads is not None and num_heads > 0:
        if num_channels % num_heads:
            raise ValueError(
                f"{num_channels} channels do not split into num_heads={num_heads} heads; "
                "pass the projection's own head count (num_kv_heads for k_proj)."
            )
        head_dim = num_channels // num_heads
    if head_dim is None:
        if needs_heads:
            raise ValueError(
                f"scope={scope!r}, granularity={granularity!r} needs the head layout: pass "
                "head_dim= (or num_heads=), e.g. longact(..., num_heads=cfg.num_attention_heads, "
                "num_kv_heads=cfg.num_key_value_heads) from the model's ModelConfig."
            )
        return 1, num_channels, 1
    if head_dim <= 0 or num_channels % head_dim:
        raise ValueError(
            f"{num_channels} channels are not a whole number of heads of head_dim={head_dim}; "
            "pass the model's head_dim (C = num_heads * head_dim)."
        )
    heads = num_channels // head_dim
    if num_heads is not None and num_heads != heads:
        raise ValueError(
            f"num_heads={num_heads} * head_dim={head_dim} != {num_channels} channels; pass the "
            "head count of this projection (num_key_value_heads for k_proj)."
        )
    if granularity == "rope_pair" and head_dim % 2:
        raise ValueError(
            f"granularity='rope_pair' needs an even head_dim (RoPE rotates channel pairs "
            f"(j, j + head_dim/2)), got head_dim={head_dim}: use granularity='channel'."
        )
    width = 2 if granularity == "rope_pair" else 1
    per_head = head_dim // width
    if scope == "head":
        return heads, per_head, width
    return 1, heads * per_head, width


def selected_fraction(mask: jax.Array) -> jax.Array:
    """Fraction of channels kept, ``[...]`` from a mask ``[..., C]``."""
    return jnp.mean(mask.astype(jnp.float32), axis=-1)


def mask_overlap(prev: jax.Array, cur: jax.Array) -> jax.Array:
    """Retention: the fraction of the channels kept now that were also kept before, ``[...]``.

    .. math::
        \\mathrm{overlap} = |M^{\\mathrm{prev}} \\cap M^{\\mathrm{cur}}| \\,/\\, |M^{\\mathrm{cur}}|

    1 means the mask did not change. When both masks keep the same number of channels
    (every update after the first) this also equals ``|prev & cur| / |prev|``; for two
    independent random masks keeping a fraction ``rho`` its expectation is ``rho``. An
    empty current mask gives 1.
    """
    both = jnp.sum((prev & cur).astype(jnp.float32), axis=-1)
    kept = jnp.sum(cur.astype(jnp.float32), axis=-1)
    return jnp.where(kept > 0, both / jnp.maximum(kept, 1.0), 1.0)


def saliency_concentration(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Share of the total saliency held by the selected channels, ``[...]``.

    .. math::
        \\mathrm{conc} = \\frac{\\sum_c M_c\\, s_c}{\\sum_c s_c}

    Equals ``keep_ratio`` for flat scores and approaches 1 when a few channels carry
    all the magnitude (the LongAct observation). 0 when every score is 0.
    """
    scores = jnp.asarray(scores, jnp.float32)
    total = jnp.sum(scores, axis=-1)
    held = jnp.sum(jnp.where(mask, scores, 0.0), axis=-1)
    return jnp.where(total > 0, held / jnp.where(total > 0, total, 1.0), 0.0)
