"""Per-op Gram blocks from an op's input ``X`` and output cotangent ``D`` (used by the
Gram taps of :mod:`jaxrl_geom.salt.ghost` inside the backward pass and by
:mod:`jaxrl_geom.salt.bookkeeping` after it): dense layers by backend, lookups, tied
tables (exact or as one sketch), in the layer's compute dtype with float32 results.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxrl_geom.salt.gram import (
    _bias_gram,
    _columns,
    _mm,
    choose_backend,
    dense_costs,
    dense_ghost_gram,
    dense_tiled_gram,
    embedding_ghost_gram,
)
from jaxrl_geom.salt.table import (
    embedding_unique_gram,
    lookup_cost,
    tied_costs,
    tied_tiled_gram,
)

#: Elements of one ``[N, chunk, T, T]`` ghost intermediate (16 MiB of float32). Smaller
#: than ``salt.gram``'s default: the blocks of several ops can be live at once.
_GHOST_ELEMENTS = 1 << 22


@dataclasses.dataclass(frozen=True)
class _TapSpec:
    """Static description of one tap (hashable: a ``custom_vjp`` nondiff argument)."""

    path: str  # module path, e.g. "layers.0.mlp.up_proj"
    weight: bool  # the kernel / table / scale is in scope
    bias: bool  # the bias is in scope (Linear only)
    backend: str  # dense blocks: "auto" | "ghost" | "tiled" | "sketch"
    vocab_size: int = 0  # Embedding only
    tied: bool = False  # Embedding only: the table is also the LM head
    keep: bool = False  # book-keeping: sow X and add a KeptD probe instead of a Gram tap
    last: int = 0  # LM head: only the last `last` positions carry a gradient (0: all)
    chunk_tokens: int = 1024  # LM head run by salt.head: ModelConfig.logits_chunk_tokens


# ----------------------------------------------------------------------------------------
# Gram blocks
# ----------------------------------------------------------------------------------------


def _rows(a: jax.Array) -> jax.Array:
    """``[N, ..., C]`` -> ``[N, T', C]``: every middle axis is a token axis."""
    return a.reshape(a.shape[0], -1, a.shape[-1])


def _lookup_gram(tokens: jax.Array, d: jax.Array, spec: _TapSpec) -> jax.Array:
    """Exact lookup Gram by the cheaper of the token-match ghost form and the
    unique-token form (:func:`jaxrl_geom.salt.table.lookup_cost`)."""
    d = _rows(d)
    cost = lookup_cost(*tokens.shape, d.shape[-1], spec.vocab_size)
    if spec.backend != "ghost" and cost["unique"] < cost["ghost"]:
        return embedding_unique_gram(tokens, d, spec.vocab_size)
    return embedding_ghost_gram(tokens, d, spec.vocab_size, block_elements=_GHOST_ELEMENTS)


def _sketch_features(x: jax.Array, d: jax.Array, r_in: jax.Array, r_out: jax.Array) -> jax.Array:
    """``R_in^T X_i^T D_i R_out`` ``[N, k_in, k_out]`` (float32)."""
    xs = _mm("itd,dk->itk", x, r_in.astype(x.dtype))  # [N, T, k_in]
    ds = _mm("ite,el->itl", d, r_out.astype(d.dtype))  # [N, T, k_out]
    return _mm("itk,itl->ikl", xs, ds)


def _flat_gram(psi: jax.Array) -> jax.Array:
    flat = psi.reshape(psi.shape[0], -1)  # [N, k_in * k_out]
    return _mm("ik,jk->ij", flat, flat)


def _sketch_gram(x: jax.Array, d: jax.Array, r_in: jax.Array, r_out: jax.Array) -> jax.Array:
    """``<R_in^T X_i^T D_i R_out, R_in^T X_j^T D_j R_out>_F``: the Kronecker sketch of
    :func:`jaxrl_geom.salt.gram.sketch_dense_gram` (same ``N(0, 1/k)`` factors, so the
    same unbiasedness and variance) with the projections given instead of drawn."""
    return _flat_gram(_sketch_features(x, d, r_in, r_out))


def _common(x: jax.Array, d: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x, d`` as ``[N, T', C]`` in one arithmetic dtype: the compute dtype when the
    layer computes in 16 bits (f32 accumulation happens in ``_mm``), else float32."""
    low = [a.dtype for a in (x, d) if jnp.dtype(a.dtype).itemsize < 4]
    dtype = low[0] if low else jnp.float32
    return _rows(x).astype(dtype), _rows(d).astype(dtype)


def _last(spec: _TapSpec, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """The head's tensors on the positions that can carry a gradient (``spec.last``)."""
    if not spec.last:
        return arrays
    return tuple(a[:, -spec.last :] for a in arrays)


def _dense_block(
    x: jax.Array, d: jax.Array, spec: _TapSpec, projections: tuple, *, weight: bool
) -> jax.Array:
    """Gram of a dense op ``y = x W (+ b)`` from its input and output cotangent."""
    x, d = _common(*_last(spec, x, d))  # [N, T, *]
    n = x.shape[0]
    gram = jnp.zeros((n, n), jnp.float32)
    if weight:
        backend = spec.backend
        if backend == "auto":
            backend = choose_backend(n, x.shape[1], x.shape[2], d.shape[2])
        if backend == "sketch":
            gram = _sketch_gram(x, d, *projections)
        elif backend == "ghost":
            gram = dense_ghost_gram(x, d, block_elements=_GHOST_ELEMENTS)
        else:
            gram = dense_tiled_gram(x, d)
    if spec.bias:
        gram = gram + _bias_gram(d)
    return gram


def _tied_block(
    spec: _TapSpec,
    projections: tuple,
    tokens: jax.Array,
    dy: jax.Array,
    h: jax.Array,
    d_logits: jax.Array,
) -> jax.Array:
    """Gram of a tied table's per-sample gradient (lookup + head), PSD by construction.

    Exact backends: ``K_lookup + K_head + C + C^T``. ``"sketch"``: the Kronecker sketch
    of the WHOLE table gradient ``[D, V]`` (head ``h^T D^logits`` plus lookup
    ``D^emb^T onehot(tok)``), so the Gram of the sum is a Gram (never indefinite).
    """
    h, d_logits = _last(spec, h, d_logits)
    if spec.backend == "sketch":
        r_in, r_out = projections  # [D, k], [V, k]
        head = _sketch_features(*_common(h, d_logits), r_in, r_out)  # [N, k, k]
        valid = (tokens >= 0) & (tokens < spec.vocab_size)
        rows = jnp.where(valid[..., None], jnp.take(r_out, tokens, axis=0, mode="clip"), 0.0)
        de, rows = _common(dy, rows)
        lookup = _mm("itk,itl->ikl", _mm("itd,dk->itk", de, r_in.astype(de.dtype)), rows)
        return _flat_gram(head + lookup)
    n, t = tokens.shape
    s_len, dim = h.shape[1], h.shape[-1]
    head = dense_costs(n, s_len, dim, spec.vocab_size)
    head = head[spec.backend] if spec.backend != "auto" else min(head.values())
    cost = tied_costs(n, t, s_len, dim, spec.vocab_size, head)
    if spec.backend == "tiled" or (spec.backend == "auto" and cost["tiled"] < cost["split"]):
        return tied_tiled_gram(tokens, dy, h, d_logits, spec.vocab_size)
    cross = tied_cross_gram(tokens, dy, h, d_logits)
    return (
        _lookup_gram(tokens, dy, spec)
        + _dense_block(h, d_logits, dataclasses.replace(spec, last=0), projections, weight=True)
        + cross
        + cross.T
    )


def tied_cross_gram(
    tokens: jax.Array,
    d_lookup: jax.Array,
    h: jax.Array,
    d_logits: jax.Array,
    *,
    block_elements: int = _GHOST_ELEMENTS,
) -> jax.Array:
    """Cross term of a tied table: ``C_ij = <lookup gradient of i, head gradient of j>``.

    .. math::
        C_{ij} = \\sum_{t,s} \\langle D^{emb}_{it}, h_{js} \\rangle\\,
                 D^{logits}_{js}[\\mathrm{tok}_{it}]

    (the lookup gradient of ``i`` is ``sum_t e_{tok_it} D^emb_it^T``, the head gradient
    of ``j`` is ``sum_s D^logits_js h_js^T``, both ``[V, D]``). About ``2 N^2 T S D``
    FLOPs, columns (and, when one column exceeds ``block_elements``, blocks of head
    positions) at a time. Tokens outside ``[0, V)`` contribute nothing.

    Args:
      tokens: ``[N, T]`` ids fed to the lookup.
      d_lookup: ``[N, T, D]`` cotangent of the lookup output.
      h: ``[N, S, D]`` input of the tied head.
      d_logits: ``[N, S, V]`` cotangent of the logits.
      block_elements: budget of one ``[N, T, s]`` intermediate.

    Returns:
      ``[N, N]`` float32 (not symmetric; the Gram adds ``C + C^T``).
    """
    n, t = tokens.shape
    s_len = h.shape[1]
    vocab = d_logits.shape[-1]
    valid = (tokens >= 0) & (tokens < vocab)  # [N, T]
    d = jnp.where(valid[..., None], d_lookup.astype(jnp.float32), 0.0)  # [N, T, D]
    tok = jnp.clip(tokens, 0, vocab - 1)  # [N, T]

    def block(h_blk, dl_blk):  # [s, D], [s, V] -> sum over these head positions [N]
        dh = _mm("itd,sd->its", d, h_blk.astype(jnp.float32))  # [N, T, s]
        picked = jnp.take(dl_blk.astype(jnp.float32), tok, axis=1)  # [s, N, T]
        return _mm("its,sit->i", dh, picked)

    if n * t * s_len <= block_elements:
        chunk = max(1, min(n, block_elements // (n * t * s_len)))
        return _columns(block, (h, d_logits), n, chunk)
    span = max(1, block_elements // (n * t))
    num = -(-s_len // span)
    pad = ((0, 0), (0, num * span - s_len), (0, 0))  # zero positions add nothing
    hs = jnp.pad(h, pad).reshape(n, num, span, -1)
    dls = jnp.pad(d_logits, pad).reshape(n, num, span, vocab)

    def column(h_j, dl_j):  # [num, span, D], [num, span, V] -> C[:, j]
        add = lambda acc, blk: (acc + block(*blk), None)  # noqa: E731
        return jax.lax.scan(add, jnp.zeros((n,), jnp.float32), (h_j, dl_j))[0]

    return jax.lax.map(lambda ops: column(*ops), (hs, dls)).T
