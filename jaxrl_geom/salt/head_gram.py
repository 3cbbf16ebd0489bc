"""Gram blocks of the LM head from per-position statistics: never an ``[N, L, V]`` tensor.

The loss reaches the head only through the completion log-probs
``log pi_it = z_it[y_it] - lse_it`` (``z = logits / tau``), so with ``g = dL/dlog pi``
``[N, L]`` the logits' cotangent is, at every position,

.. math::
    D_{it} = \\frac{g_{it}}{\\tau} \\big(e_{y_{it}} - \\exp(z_{it} - \\mathrm{lse}_{it})\\big)

and every form below recomputes ``D`` one vocabulary tile (and one chunk of positions)
at a time from the head input ``h [N, L, D]``, the weight, ``y``, ``lse`` and ``g``
(``N, L, D, V`` below; ``W`` the ``[D, V]`` kernel, or the ``[V, D]`` table when tied):

* ``tiled``: ``G_i[:, c] = sum_t h_it D_it[c]^T`` ``[N, D, tile]`` per tile, ``K += G G^T``;
  ``4 N L D V + 2 N^2 D V`` FLOPs (one more head forward than the dense tiled form).
* ``ghost``: ``K_ij = sum_ts <h_it, h_js> <D_it, D_js>``, ``<D, D>`` summed over tiles into
  ``[N L, N L]``; ``2 N L D V + 2 (N L)^2 (V + D)`` FLOPs, for short rows only.
* ``sketch``: ``R_in^T G_i R_out = (h_i R_in)^T (D_i R_out)`` with ``D R_out`` summed over
  tiles (linear in ``D``, so it adds up over chunks).
* tied table: the lookup's ``D^emb`` joins the head per tile (whole-table tiles) or
  through the cross term ``C_ij = sum_ts <D^emb_it, h_js> D_js[tok_it]``, whose
  ``D_js[tok_it]`` needs only the logits at the looked-up tokens.

Memory: ``[N, c, tile]`` cotangent tiles (``c`` positions: the logits' own chunks, so
never more than one ``[N, c, V]`` logits chunk) and ``[N, D, tile]`` gradient tiles
(256 MiB budget), never the head's ``[N, L, V]`` logits or cotangent. ``backend="auto"``
picks by the FLOP counts of :func:`head_costs` / :func:`tied_head_costs`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_geom.salt.blocks import _common, _flat_gram, _lookup_gram, _TapSpec
from jaxrl_geom.salt.gram import _HI, _columns, _low, _mm
from jaxrl_geom.salt.table import lookup_cost

#: Elements of one ``[N, D, tile]`` per-sample head-gradient tile (256 MiB of float32).
_TILE_ELEMENTS = 1 << 26
#: Elements of one ``[N L, tile]`` cotangent tile of the ghost form (64 MiB of float32).
_CHUNK_ELEMENTS = 1 << 24
#: Smallest vocabulary tile of the tiled and sketched forms (MXU / vector width).
_MIN_TILE = 128
#: Largest ``(N L)^2`` for which ``auto`` takes the ghost form (its ``[N L, N L]`` matrices).
_GHOST_PAIRS = 1 << 24
_NO = 2**62  # the cost of a form that does not fit


class HeadWeight:
    """The head as the forward runs it: ``kernel [D, V]`` (+ ``bias [V]``) of an untied
    ``Linear``, or the tied ``table [V, D]``; ``dtype`` its compute dtype; ``chunk_tokens``
    the logits' chunk (``ModelConfig.logits_chunk_tokens``), which the forms here reuse."""

    def __init__(self, w, bias, *, tied: bool, dtype, chunk_tokens: int = 1024):
        self.w, self.bias, self.tied, self.dtype = w, bias, tied, jnp.dtype(dtype)
        self.chunk_tokens = int(chunk_tokens)

    @property
    def vocab(self) -> int:
        return self.w.shape[0] if self.tied else self.w.shape[1]

    def logits(self, h: jax.Array, start: jax.Array, tile: int) -> jax.Array:
        """f32 logits ``[..., tile]`` of columns ``start .. start + tile`` (the head's math)."""
        h = h.astype(self.dtype)
        if self.tied:
            rows = jax.lax.dynamic_slice_in_dim(self.w, start, tile, axis=0)  # [tile, D]
            return jnp.einsum(
                "...d,vd->...v", h, rows.astype(self.dtype), preferred_element_type=jnp.float32
            )
        cols = jax.lax.dynamic_slice_in_dim(self.w, start, tile, axis=1)  # [D, tile]
        z = jnp.einsum(
            "...d,dv->...v", h, cols.astype(self.dtype), preferred_element_type=jnp.float32
        )
        if self.bias is not None:
            z = z + jax.lax.dynamic_slice_in_dim(self.bias, start, tile).astype(jnp.float32)
        return z


def _d_tile(weight, h, y, lse, g, k, tile, temperature):
    """Cotangent ``D[..., cols]`` of vocabulary tile ``k`` and its column ids.

    The last tile starts at ``V - tile`` (no padded copy of the weight); columns it
    shares with the previous tile are zeroed, so each column counts once."""
    start = jnp.minimum(k * tile, weight.vocab - tile)
    cols = start + jnp.arange(tile)  # [tile]
    z = weight.logits(h, start, tile) / temperature
    p = jnp.exp(z - lse[..., None])
    d = (g / temperature)[..., None] * ((y[..., None] == cols).astype(jnp.float32) - p)
    return jnp.where(cols >= k * tile, d, 0.0), start, cols


def _plan(n: int, length: int, width: int, vocab: int, chunk_tokens: int) -> tuple[int, ...]:
    """``(tile, chunk, tiles)``: the logits' chunks of ``chunk_tokens // N`` positions (as
    :func:`jaxrl_geom.rl.logprobs.chunked_logprobs`), tiles with ``[N, width, tile]``
    within ``_TILE_ELEMENTS``: no tile is larger than one ``[N, chunk, V]`` logits chunk
    or the per-sample gradient budget."""
    chunk = max(1, min(length, chunk_tokens // max(n, 1)))
    tile = min(vocab, max(_MIN_TILE, _TILE_ELEMENTS // max(1, n * max(width, chunk))))
    return tile, chunk, -(-vocab // tile)


def _chunks(chunk: int, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """``[N, L, ...]`` -> ``[nc, N, chunk, ...]``, zero padded (``g = 0`` adds nothing)."""
    n, length = arrays[0].shape[:2]
    nc = -(-length // chunk)
    out = []
    for a in arrays:
        a = jnp.pad(a, [(0, 0), (0, nc * chunk - length)] + [(0, 0)] * (a.ndim - 2))
        out.append(jnp.swapaxes(a.reshape(n, nc, chunk, *a.shape[2:]), 0, 1))
    return tuple(out)


def _tile_loop(weight, h, y, lse, g, temperature, width, body, init):
    """``carry = body(carry, k, start, cols, acc)`` per vocabulary tile ``k``, where ``acc``
    is ``(sum over position chunks of h^T D [N, D, tile], sum_t D [N, tile])``."""
    n, length, dim = h.shape
    tile, chunk, tiles = _plan(n, length, max(width, dim), weight.vocab, weight.chunk_tokens)
    low = _low(h)
    parts = _chunks(chunk, h, y, lse, g)

    def one_tile(carry, k):
        def add(acc, part):
            h_c, y_c, lse_c, g_c = part
            d, _, _ = _d_tile(weight, h_c, y_c, lse_c, g_c, k, tile, temperature)
            phi = acc[0] + _mm("itd,itv->idv", h_c, d.astype(low))
            return (phi, acc[1] + jnp.sum(d, axis=1)), None

        zeros = (jnp.zeros((n, dim, tile), jnp.float32), jnp.zeros((n, tile), jnp.float32))
        acc, _ = jax.lax.scan(add, zeros, parts)
        start = jnp.minimum(k * tile, weight.vocab - tile)
        return body(carry, k, start, start + jnp.arange(tile), acc), None

    carry, _ = jax.lax.scan(one_tile, init, jnp.arange(tiles))
    return carry


def _bias_gram_from_sums(b: jax.Array) -> jax.Array:
    return jnp.dot(b, b.T, precision=_HI)


def head_tiled_gram(weight, h, y, lse, g, temperature, *, bias=False) -> jax.Array:
    """Exact head Gram (kernel, + bias with ``bias``) by vocabulary tiles of ``G_i``."""
    n = h.shape[0]
    low = _low(h)

    def body(gram, k, start, cols, acc):
        phi = acc[0].astype(low)  # [N, D, tile]
        gram = gram + _mm("idv,jdv->ij", phi, phi)
        return gram + _bias_gram_from_sums(acc[1]) if bias else gram

    return _tile_loop(weight, h, y, lse, g, temperature, 0, body, jnp.zeros((n, n), jnp.float32))


def head_bias_gram(weight, h, y, lse, g, temperature) -> jax.Array:
    """Gram of the head's bias gradients ``sum_t D_it`` alone."""
    n = h.shape[0]
    body = lambda gram, k, start, cols, acc: gram + _bias_gram_from_sums(acc[1])  # noqa: E731
    return _tile_loop(weight, h, y, lse, g, temperature, 0, body, jnp.zeros((n, n), jnp.float32))


def head_ghost_gram(weight, h, y, lse, g, temperature, *, bias=False) -> jax.Array:
    """Exact head Gram by the ghost form over all ``N L`` positions (short rows)."""
    n, length, dim = h.shape
    rows = n * length
    tile = min(weight.vocab, max(1, _CHUNK_ELEMENTS // rows))
    tiles = -(-weight.vocab // tile)
    low = _low(h)
    flat = lambda a: a.reshape(rows, *a.shape[2:])  # noqa: E731
    hf, yf, lf, gf = flat(h), flat(y), flat(lse), flat(g)

    def one_tile(carry, k):
        pairs, sums = carry
        d, _, _ = _d_tile(weight, hf, yf, lf, gf, k, tile, temperature)  # [N L, tile]
        dl = d.astype(low)
        pairs = pairs + _mm("av,bv->ab", dl, dl)
        return (pairs, sums + jnp.sum(d.reshape(n, length, tile), axis=1)), None

    init = (jnp.zeros((rows, rows), jnp.float32), jnp.zeros((n, tile), jnp.float32))
    (pairs, sums), _ = jax.lax.scan(one_tile, init, jnp.arange(tiles))
    hh = _mm("ad,bd->ab", hf, hf)  # [N L, N L]
    gram = jnp.sum((hh * pairs).reshape(n, length, n, length), axis=(1, 3))
    if bias:  # sum_t D over tiles is not [N, V] here: the bias block needs its own pass
        gram = gram + head_bias_gram(weight, h, y, lse, g, temperature)
    return gram


def head_sketch_features(weight, h, y, lse, g, temperature, r_in, r_out) -> jax.Array:
    """``R_in^T (sum_t h_it D_it^T) R_out`` ``[N, k_in, k_out]`` (float32), ``D R_out``
    summed over vocabulary tiles one position chunk at a time."""
    n, length, dim = h.shape
    k_out = r_out.shape[1]
    tile, chunk, tiles = _plan(n, length, k_out, weight.vocab, weight.chunk_tokens)
    low = _low(h)
    xs = _mm("itd,dk->itk", h, r_in.astype(h.dtype))  # [N, L, k_in]

    def one_chunk(part):
        h_c, y_c, lse_c, g_c = part

        def add(ds, k):
            d, start, _ = _d_tile(weight, h_c, y_c, lse_c, g_c, k, tile, temperature)
            r = jax.lax.dynamic_slice_in_dim(r_out, start, tile, axis=0)  # [tile, k_out]
            return ds + _mm("itv,vl->itl", d.astype(low), r.astype(low)), None

        ds, _ = jax.lax.scan(add, jnp.zeros((n, chunk, k_out), jnp.float32), jnp.arange(tiles))
        return ds

    ds = jax.lax.map(one_chunk, _chunks(chunk, h, y, lse, g))  # [nc, N, chunk, k_out]
    ds = jnp.swapaxes(ds, 0, 1).reshape(n, -1, k_out)[:, :length]
    return _mm("itk,itl->ikl", xs, ds)


def head_costs(n: int, length: int, dim: int, vocab: int) -> dict[str, int]:
    """FLOPs of the head Gram forms (module docstring); ``ghost`` only counts as an option
    when its ``[N L, N L]`` matrices are small (``_GHOST_PAIRS``)."""
    n, length, dim, vocab = int(n), int(length), int(dim), int(vocab)
    rows = n * length
    ghost = 2 * rows * dim * vocab + 2 * rows * rows * (vocab + dim)
    tiled = 4 * rows * dim * vocab + 2 * n * n * dim * vocab
    return {"ghost": ghost if rows * rows <= _GHOST_PAIRS else _NO, "tiled": tiled}


def head_gram(weight, h, y, lse, g, temperature, backend: str, *, bias=False) -> jax.Array:
    """Exact head Gram by ``backend`` (``"auto"``: the cheaper of :func:`head_costs`).
    ``"ghost"`` beyond ``_GHOST_PAIRS`` takes the tiled form (the same value): its
    ``[N L, N L]`` matrices would not fit."""
    cost = head_costs(*h.shape, weight.vocab)
    if backend == "auto" or (backend == "ghost" and cost["ghost"] == _NO):
        backend = "ghost" if cost["ghost"] < cost["tiled"] else "tiled"
    if backend == "ghost":
        return head_ghost_gram(weight, h, y, lse, g, temperature, bias=bias)
    return head_tiled_gram(weight, h, y, lse, g, temperature, bias=bias)


# ----------------------------------------------------------------------------------------
# Tied table: lookup + head
# ----------------------------------------------------------------------------------------


def tied_tiled_head_gram(weight, tokens, d_lookup, h, y, lse, g, temperature) -> jax.Array:
    """Exact Gram of a tied table's whole per-sample gradient by vocabulary tiles.

    .. math::
        \\phi_i[c] = \\sum_t [\\mathrm{tok}_{it} \\in c]\\, e_{tok} D^{emb\\,\\top}_{it}
                   + \\sum_s D_{is}[c]\\, h_{is}^\\top, \\qquad K = \\sum_c \\Phi[c] \\Phi[c]^\\top
    """
    n, t = tokens.shape
    dim = h.shape[-1]
    low = _low(h, d_lookup)
    valid = (tokens >= 0) & (tokens < weight.vocab)
    de = jnp.where(valid[..., None], d_lookup, 0).astype(jnp.float32).reshape(n * t, dim)
    rows = jnp.arange(n)[:, None]

    def body(gram, k, start, cols, acc):
        tile = cols.shape[0]
        inside = valid & (tokens >= k * tile) & (tokens < start + tile)  # each column once
        seg = jnp.where(inside, rows * tile + tokens - start, n * tile).reshape(-1)
        lookup = jax.ops.segment_sum(de, seg, num_segments=n * tile + 1)[: n * tile]
        phi = lookup.reshape(n, tile, dim) + jnp.swapaxes(acc[0], 1, 2)  # [N, tile, D]
        phi = phi.astype(low)
        return gram + _mm("icd,jcd->ij", phi, phi)

    return _tile_loop(weight, h, y, lse, g, temperature, 0, body, jnp.zeros((n, n), jnp.float32))


def tied_cross_from_stats(
    weight, tokens, d_lookup, h, y, lse, g, temperature, *, block_elements: int = 1 << 22
) -> jax.Array:
    """Cross term ``C_ij = sum_{t,s} <D^emb_it, h_js> D_js[tok_it]`` (``K`` adds ``C + C^T``).

    ``D_js[tok_it] = g_js / tau ([y_js = tok_it] - exp(h_js . E[tok_it] / tau - lse_js))``
    needs the logits at the looked-up tokens only: ``4 N^2 T L D`` FLOPs, columns (and
    blocks of head positions) at a time within ``block_elements`` of ``[N, T, s]``.
    """
    n, t = tokens.shape
    length = h.shape[1]
    valid = (tokens >= 0) & (tokens < weight.vocab)  # [N, T]
    de = jnp.where(valid[..., None], d_lookup.astype(jnp.float32), 0.0)  # [N, T, D]
    tok = jnp.clip(tokens, 0, weight.vocab - 1)
    e_tok = jnp.take(weight.w, tok, axis=0).astype(weight.dtype)  # [N, T, D] table rows

    def block(h_b, y_b, lse_b, g_b):  # one row's [s, D], [s] x3 -> [N]
        dh = _mm("itd,sd->its", de, h_b.astype(jnp.float32))  # [N, T, s]
        z = jnp.einsum(
            "itd,sd->its", e_tok, h_b.astype(weight.dtype), preferred_element_type=jnp.float32
        )
        p = jnp.exp(z / temperature - lse_b)
        hit = (tok[..., None] == y_b).astype(jnp.float32)
        return jnp.sum(dh * ((g_b / temperature) * (hit - p)), axis=(1, 2))

    ops = (h, y, lse, g)
    if n * t * length <= block_elements:
        chunk = max(1, min(n, block_elements // (n * t * length)))
        return _columns(block, ops, n, chunk)
    span = max(1, block_elements // (n * t))
    parts = _chunks(span, *ops)  # [nb, N, span, ...]: zero g adds nothing

    def column(j):
        add = lambda acc, blk: (acc + block(*(b[j] for b in blk)), None)  # noqa: E731
        return jax.lax.scan(add, jnp.zeros((n,), jnp.float32), parts)[0]

    return jax.lax.map(column, jnp.arange(n)).T


def tied_head_costs(
    n: int, t: int, length: int, dim: int, vocab: int, chunk_tokens: int = 1024
) -> dict[str, int]:
    """FLOPs of a tied table's Gram with the chunked head: ``split`` (cheaper lookup form +
    cheaper head form + cross ``4 N^2 T L D``) vs ``tiled`` (whole table, one lookup
    scatter of ``N T D`` per vocabulary tile)."""
    n, t, length, dim, vocab = int(n), int(t), int(length), int(dim), int(vocab)
    head = min(head_costs(n, length, dim, vocab).values())
    split = min(lookup_cost(n, t, dim, vocab).values()) + head + 4 * n * n * t * length * dim
    tiles = _plan(n, length, dim, vocab, chunk_tokens)[2]
    tiled = 4 * n * length * dim * vocab + 2 * n * n * dim * vocab + tiles * n * t * dim
    return {"split": split, "tiled": tiled}


def tied_head_gram(
    spec: _TapSpec,
    projections: tuple,
    weight: HeadWeight,
    tokens: jax.Array,
    d_lookup: jax.Array,
    head: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    temperature: float | jax.Array,
) -> jax.Array:
    """Gram of a tied table (lookup ``tokens [N, T]``, ``d_lookup [N, T, D]``; chunked head
    ``head = (h, y, lse, g)``), PSD by construction as in
    :func:`jaxrl_geom.salt.blocks._tied_block`: ``"sketch"`` sketches the whole table
    gradient; exact backends take whole-table tiles or lookup + head + ``C + C^T``."""
    h, y, lse, g = head
    if spec.backend == "sketch":
        r_in, r_out = projections  # [D, k], [V, k]
        psi = head_sketch_features(weight, h, y, lse, g, temperature, r_in, r_out)
        valid = (tokens >= 0) & (tokens < spec.vocab_size)
        rows = jnp.where(valid[..., None], jnp.take(r_out, tokens, axis=0, mode="clip"), 0.0)
        de, rows = _common(d_lookup, rows)
        lookup = _mm("itk,itl->ikl", _mm("itd,dk->itk", de, r_in.astype(de.dtype)), rows)
        return _flat_gram(psi + lookup)
    cost = tied_head_costs(*tokens.shape, *h.shape[1:], weight.vocab, weight.chunk_tokens)
    if spec.backend == "tiled" or (spec.backend == "auto" and cost["tiled"] < cost["split"]):
        return tied_tiled_head_gram(weight, tokens, d_lookup, h, y, lse, g, temperature)
    cross = tied_cross_from_stats(weight, tokens, d_lookup, h, y, lse, g, temperature)
    return (
        _lookup_gram(tokens, d_lookup, spec)
        + head_gram(weight, h, y, lse, g, temperature, spec.backend)
        + cross
        + cross.T
    )


def dense_head_gram(
    spec: _TapSpec,
    projections: tuple,
    weight: HeadWeight,
    head: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    temperature: float | jax.Array,
) -> jax.Array:
    """Gram of an untied head's kernel (``spec.weight``) and bias (``spec.bias``)."""
    h, y, lse, g = head
    n = h.shape[0]
    gram = jnp.zeros((n, n), jnp.float32)
    if spec.weight and spec.backend == "sketch":
        gram = _flat_gram(head_sketch_features(weight, *head, temperature, *projections))
    elif spec.weight:
        return head_gram(weight, *head, temperature, spec.backend, bias=spec.bias)
    if spec.bias:
        gram = gram + head_bias_gram(weight, h, y, lse, g, temperature)
    return gram
