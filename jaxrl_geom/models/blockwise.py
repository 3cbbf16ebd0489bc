"""Blockwise (flash-style) causal attention in plain JAX: memory linear in ``T``.

Queries and keys are cut into blocks of ``block`` tokens. For each query block the
keys are visited block by block with an online softmax (running max ``m``, running
sum ``den``, running output), so no ``[T, S]`` score matrix exists; key blocks that lie
wholly in the causal future of the query block are skipped (about half the work
of a training forward). The backward pass is a ``custom_vjp`` that recomputes each
score block from the saved ``(q, k, v, out, m, den)``:

.. math::
    P = e^{S - m} / den, \\quad dV = P^\\top dO, \\quad dS = P \\odot (dO\\,V^\\top - D),
    \\quad D_t = dO_t \\cdot O_t, \\quad dQ = dS\\,K / \\sqrt{hd}, \\quad
    dK = dS^\\top Q / \\sqrt{hd}

Two backward sweeps (``dQ`` by query block, ``dK, dV`` by key block) avoid any
scatter; each holds one ``[B, H, block, block]`` score block at a time. Forward and
backward memory: ``O(B T H hd)`` residuals plus ``O(B H block^2)`` transients.
Masking matches :func:`jaxrl_geom.models.attention.attend_xla` on every query row
with at least one allowed key; rows with none (padding) are finite and unspecified.

Shapes: ``q [B, T, H, hd]``, ``k, v [B, S, K, hd]``, ``kv_valid bool [B, S]``;
query ``t`` sits at key slot ``q_offset + t``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Same finite "masked" score as the XLA form: a row whose visited keys are all
# masked gets a uniform softmax (finite) instead of NaN.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def blockwise_attention(
    q: jax.Array,  # [B, T, H, hd]
    k: jax.Array,  # [B, S, K, hd]
    v: jax.Array,  # [B, S, K, hd]
    kv_valid: jax.Array,  # bool [B, S]
    q_offset: jax.Array | int = 0,
    *,
    block: int = 512,
) -> jax.Array:  # [B, T, H, hd] in v.dtype
    """Causal masked softmax attention over key blocks (GQA: head ``h`` reads ``h // G``)."""
    b, t, h, hd = q.shape
    s, kvh = k.shape[1], k.shape[2]
    if block < 1:
        raise ValueError(f"attention block size must be >= 1, got {block}.")
    qb, kb = min(block, t), min(block, s)
    tp, sp = -(-t // qb) * qb, -(-s // kb) * kb
    qr = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0))).reshape(b, tp, kvh, h // kvh, hd)
    kr = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    vr = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    valid = jnp.pad(kv_valid.astype(bool), ((0, 0), (0, sp - s)))
    offset = jnp.asarray(q_offset, jnp.int32)
    out = _flash(qr, kr, vr, valid, offset, qb, kb, s)  # [B, tp, K, G, hd]
    return out[:, :t].reshape(b, t, h, hd)


def _num_key_blocks(i, offset, qb, kb, nk):
    """Key blocks ``0 .. n-1`` hold a slot <= the last query slot of query block ``i``."""
    return jnp.clip((offset + (i + 1) * qb - 1) // kb + 1, 1, nk)


def _first_query_block(j, offset, qb, kb, nq):
    """Query blocks ``>= i0`` hold a query slot >= the first key slot of key block ``j``."""
    return jnp.clip((j * kb - offset) // qb, 0, nq)


def _scores(qi, kj, valid_j, i, j, offset, qb, kb, s_real):
    """Masked scaled scores of query block ``i`` vs key block ``j``: f32 [B, K, G, qb, kb]."""
    hd = qi.shape[-1]
    sc = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32)
    sc = sc * (hd**-0.5)
    q_slot = offset + i * qb + jnp.arange(qb)  # [qb]
    k_slot = j * kb + jnp.arange(kb)  # [kb]
    allowed = (k_slot[None, :] <= q_slot[:, None])[None] & valid_j[:, None, :]  # [B, qb, kb]
    sc = jnp.where(allowed[:, None, None], sc, MASK_VALUE)
    return jnp.where((k_slot < s_real)[None, None, None, None], sc, -jnp.inf)


def _block(x, j, size, axis=1):
    return jax.lax.dynamic_slice_in_dim(x, j * size, size, axis=axis)


def _forward(q, k, v, valid, offset, qb, kb, s_real):
    b, tp, kvh, g, hd = q.shape
    nq, nk = tp // qb, k.shape[1] // kb

    def one_query_block(i):
        qi = _block(q, i, qb)  # [B, qb, K, G, hd]

        def body(j, carry):
            m, den, acc = carry  # [B, K, G, qb] x2, f32 [B, K, G, qb, hd]
            sc = _scores(qi, _block(k, j, kb), _block(valid, j, kb), i, j, offset, qb, kb, s_real)
            m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
            corr = jnp.exp(m - m_new)
            p = jnp.exp(sc - m_new[..., None])  # [B, K, G, qb, kb]
            pv = jnp.einsum(
                "bkgqs,bskd->bkgqd",
                p.astype(v.dtype),
                _block(v, j, kb),
                preferred_element_type=jnp.float32,
            )
            return m_new, den * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

        init = (
            jnp.full((b, kvh, g, qb), -jnp.inf, jnp.float32),
            jnp.zeros((b, kvh, g, qb), jnp.float32),
            jnp.zeros((b, kvh, g, qb, hd), jnp.float32),
        )
        m, den, acc = jax.lax.fori_loop(0, _num_key_blocks(i, offset, qb, kb, nk), body, init)
        out = (acc / den[..., None]).astype(v.dtype)  # [B, K, G, qb, hd]
        return jnp.transpose(out, (0, 3, 1, 2, 4)), m, den  # [B, qb, K, G, hd]

    out, m, den = jax.lax.map(one_query_block, jnp.arange(nq))  # [nq, B, qb, K, G, hd]
    out = jnp.moveaxis(out, 0, 1).reshape(b, tp, kvh, g, hd)
    return out, m, den  # m, den: [nq, B, K, G, qb]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, valid, offset, qb, kb, s_real):
    return _forward(q, k, v, valid, offset, qb, kb, s_real)[0]


def _flash_fwd(q, k, v, valid, offset, qb, kb, s_real):
    out, m, den = _forward(q, k, v, valid, offset, qb, kb, s_real)
    return out, (q, k, v, valid, offset, out, m, den)


def _flash_bwd(qb, kb, s_real, residuals, d_out):
    q, k, v, valid, offset, out, m, den = residuals
    b, tp, kvh, g, hd = q.shape
    nq, nk = tp // qb, k.shape[1] // kb
    scale = hd**-0.5
    # D_t = dO_t . O_t, [B, K, G, tp]
    delta = jnp.einsum("btkgd,btkgd->bkgt", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def probs(i, j):
        """P and dS of query block i vs key block j: f32 [B, K, G, qb, kb] each."""
        qi, kj, vj = _block(q, i, qb), _block(k, j, kb), _block(v, j, kb)
        sc = _scores(qi, kj, _block(valid, j, kb), i, j, offset, qb, kb, s_real)
        mi = jax.lax.dynamic_index_in_dim(m, i, 0, keepdims=False)
        li = jax.lax.dynamic_index_in_dim(den, i, 0, keepdims=False)
        p = jnp.exp(sc - mi[..., None]) / li[..., None]
        doi = _block(d_out, i, qb)  # [B, qb, K, G, hd]
        dp = jnp.einsum("bqkgd,bskd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
        ds = p * (dp - _block(delta, i, qb, axis=3)[..., None])
        return p, ds, qi, kj, doi

    def dq_block(i):
        def body(j, dq):
            _, ds, _, kj, _ = probs(i, j)
            return dq + jnp.einsum(
                "bkgqs,bskd->bqkgd", ds.astype(k.dtype), kj, preferred_element_type=jnp.float32
            )

        dq = jax.lax.fori_loop(
            0,
            _num_key_blocks(i, offset, qb, kb, nk),
            body,
            jnp.zeros((b, qb, kvh, g, hd), jnp.float32),
        )
        return (dq * scale).astype(q.dtype)

    def dkv_block(j):
        def body(i, carry):
            dk, dv = carry
            p, ds, qi, _, doi = probs(i, j)
            dk = dk + jnp.einsum(
                "bkgqs,bqkgd->bskd", ds.astype(q.dtype), qi, preferred_element_type=jnp.float32
            )
            dv = dv + jnp.einsum(
                "bkgqs,bqkgd->bskd", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32
            )
            return dk, dv

        zeros = jnp.zeros((b, kb, kvh, hd), jnp.float32)
        dk, dv = jax.lax.fori_loop(
            _first_query_block(j, offset, qb, kb, nq), nq, body, (zeros, zeros)
        )
        return (dk * scale).astype(k.dtype), dv.astype(v.dtype)

    dq = jnp.moveaxis(jax.lax.map(dq_block, jnp.arange(nq)), 0, 1).reshape(q.shape)
    dk, dv = jax.lax.map(dkv_block, jnp.arange(nk))  # [nk, B, kb, K, hd]
    dk = jnp.moveaxis(dk, 0, 1).reshape(k.shape)
    dv = jnp.moveaxis(dv, 0, 1).reshape(v.shape)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
