"""Gram blocks of an embedding table ``E [V, D]``: the lookup alone, or a tied table.

A lookup ``y = onehot(tok) E`` has per-sample gradient
``phi_i = sum_t e_{tok_it} D_it^T``, non-zero only on the rows of the batch's tokens.
Besides the token-match ghost form (:func:`jaxrl_geom.salt.gram.embedding_ghost_gram`,
``2 N^2 T^2 D`` FLOPs) it has an exact form over the ``U <= min(V, N T)`` unique
tokens of the batch: scatter ``D`` into ``phi [N, U, D]`` a tile of tokens at a time
and add the tile's Gram, ``2 N^2 U D`` FLOPs (:func:`embedding_unique_gram`).

A tied table (lookup + head ``logits = h E^T``) has per-sample gradient
``phi_i = onehot(tok_i)^T D^emb_i + D^logits_i^T h_i``; besides lookup + head + the
cross terms (ghost form ``2 N^2 T S D``) it is one dense block over vocabulary tiles
(:func:`tied_tiled_gram`): ``2 N (T + S) V D + 2 N^2 V D`` FLOPs.
:func:`lookup_cost` / :func:`tied_costs` give ``backend="auto"`` these FLOP counts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxrl_geom.salt.gram import _low, _mm

#: Elements of one ``[N, tile, D]`` block of per-sample table gradients (64 MiB of f32).
_TABLE_ELEMENTS = 1 << 24


def _tile(n: int, dim: int, total: int) -> int:
    return max(1, min(total, _TABLE_ELEMENTS // max(1, n * dim)))


@functools.partial(jax.jit, static_argnames=("vocab_size",))
def embedding_unique_gram(tokens: jax.Array, d: jax.Array, vocab_size: int) -> jax.Array:
    """Exact lookup Gram over the batch's unique tokens (same value as the ghost form).

    .. math::
        K_{ij} = \\sum_{u \\in U} \\langle \\phi_i[u], \\phi_j[u] \\rangle, \\qquad
        \\phi_i[u] = \\sum_t [\\mathrm{tok}_{it} = u]\\, D_{it}

    Args:
      tokens: ``[N, T]`` ids (outside ``[0, V)`` contribute nothing).
      d: ``[N, T, D]`` cotangent of the lookup output.
      vocab_size: ``V``.

    Returns:
      ``[N, N]`` float32.
    """
    n, t = tokens.shape
    dim = d.shape[-1]
    size = min(vocab_size, n * t)
    valid = (tokens >= 0) & (tokens < vocab_size)
    toks = jnp.where(valid, tokens, vocab_size)  # [N, T], invalid -> V (sorts last)
    uniq = jnp.unique(toks.reshape(-1), size=size, fill_value=vocab_size)  # [U] ascending
    idx = jnp.searchsorted(uniq, toks)  # [N, T] position of each token in U
    d = jnp.where(valid[..., None], d, 0).astype(_low(d)).reshape(n * t, dim)
    tile = _tile(n, dim, size)
    rows = jnp.arange(n)[:, None] * tile  # [N, 1]

    def add_tile(gram, start):
        local = idx - start  # [N, T]
        inside = valid & (local >= 0) & (local < tile)
        seg = jnp.where(inside, rows + local, n * tile).reshape(-1)  # n * tile: dropped
        phi = jax.ops.segment_sum(d.astype(jnp.float32), seg, num_segments=n * tile)
        phi = phi.reshape(n, tile, dim).astype(d.dtype)  # [N, tile, D]
        return gram + _mm("iud,jud->ij", phi, phi), None

    starts = jnp.arange(0, size, tile)
    gram, _ = jax.lax.scan(add_tile, jnp.zeros((n, n), jnp.float32), starts)
    return gram


@functools.partial(jax.jit, static_argnames=("vocab_size",))
def tied_tiled_gram(
    tokens: jax.Array, d_lookup: jax.Array, h: jax.Array, d_logits: jax.Array, vocab_size: int
) -> jax.Array:
    """Exact Gram of a tied table's whole per-sample gradient, one vocabulary tile at a time.

    .. math::
        \\phi_i[c] = \\mathrm{onehot}(\\mathrm{tok}_i)[:, c]^\\top D^{emb}_i
                   + D^{logits}_i[:, c]^\\top h_i, \\qquad
        K = \\sum_c \\Phi[c] \\Phi[c]^\\top

    Args:
      tokens: ``[N, T]`` ids fed to the lookup; ``d_lookup`` ``[N, T, D]`` its cotangent.
      h: ``[N, S, D]`` input of the tied head; ``d_logits`` ``[N, S, V]`` its cotangent.
      vocab_size: ``V``.

    Returns:
      ``[N, N]`` float32.
    """
    n, t = tokens.shape
    dim = h.shape[-1]
    dtype = _low(d_lookup, h, d_logits)
    tile = _tile(n, dim, vocab_size)
    num = -(-vocab_size // tile)
    pad = num * tile - vocab_size
    dl = jnp.pad(d_logits.astype(dtype), ((0, 0), (0, 0), (0, pad)))
    dl = dl.reshape(*dl.shape[:2], num, tile).transpose(2, 0, 1, 3)  # [C, N, S, tile]
    de, h = d_lookup.astype(dtype), h.astype(dtype)

    def add_tile(gram, inputs):
        start, dl_tile = inputs
        onehot = (tokens[..., None] == start + jnp.arange(tile)).astype(dtype)  # [N, T, tile]
        phi = _mm("itc,itd->icd", onehot, de) + _mm("isc,isd->icd", dl_tile, h)  # [N, tile, D]
        phi = phi.astype(dtype)
        return gram + _mm("icd,jcd->ij", phi, phi), None

    starts = jnp.arange(num) * tile
    gram, _ = jax.lax.scan(add_tile, jnp.zeros((n, n), jnp.float32), (starts, dl))
    return gram


def lookup_cost(n: int, t: int, dim: int, vocab: int) -> dict[str, int]:
    """FLOPs of the lookup Gram forms: ``ghost`` ``2 N^2 T^2 D``, ``unique``
    ``2 N^2 U D`` plus one ``N T D`` scatter per token tile (``U = min(V, N T)``)."""
    n, t, dim, vocab = int(n), int(t), int(dim), int(vocab)
    size = min(vocab, n * t)
    tiles = -(-size // _tile(n, dim, size))
    return {
        "ghost": 2 * n * n * t * t * dim,
        "unique": 2 * n * n * size * dim + tiles * n * t * dim,
    }


def tied_costs(n: int, t: int, s: int, dim: int, vocab: int, head: int) -> dict[str, int]:
    """FLOPs of a tied table's Gram: ``split`` (the cheaper lookup form + ``head`` (the
    head block's FLOPs) + the cross terms ``2 N^2 T S D``) vs ``tiled`` (whole table)."""
    n, t, s, dim, vocab = int(n), int(t), int(s), int(dim), int(vocab)
    split = min(lookup_cost(n, t, dim, vocab).values()) + int(head) + 2 * n * n * t * s * dim
    tiled = 2 * n * (t + s) * vocab * dim + 2 * n * n * vocab * dim
    return {"split": split, "tiled": tiled}
