"""Grouped-query self-attention with RoPE, optional q/k RMSNorm and qkv bias, a KV
cache written at one shared offset, and the LongAct q/k capture tap.

Shapes: ``B`` batch, ``T`` tokens in this call, ``S`` key slots (``T`` without a
cache, the cache length with one), ``H`` query heads, ``K`` key/value heads,
``G = H / K`` queries per kv head, ``hd`` head dim.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_geom.models.blockwise import MASK_VALUE, blockwise_attention
from jaxrl_geom.models.config import ModelConfig
from jaxrl_geom.models.layers import Linear, RMSNorm, apply_rope, rope_inv_freq
from jaxrl_geom.models.taps import channel_stats

AttentionImpl = Literal["xla", "blockwise", "cudnn", "auto"]
ATTENTION_IMPLS = ("xla", "blockwise", "cudnn", "auto")


def attend(
    q: jax.Array,  # [B, T, H, hd]
    k: jax.Array,  # [B, S, K, hd]
    v: jax.Array,  # [B, S, K, hd]
    kv_valid: jax.Array,  # bool [B, S]
    q_offset: jax.Array | int,  # slot of query 0
    *,
    impl: AttentionImpl = "xla",
    block: int = 512,
) -> jax.Array:  # [B, T, H, hd]
    """Causal masked softmax attention, one entry point for every implementation.

    * ``"xla"``: :func:`attend_xla`, the reference; holds ``[B, H, T, S]`` f32 scores.
    * ``"blockwise"``: :func:`~jaxrl_geom.models.blockwise.blockwise_attention`, online
      softmax over ``block``-token blocks; memory ``O(T block)`` forward and backward.
    * ``"cudnn"``: :func:`attend_cudnn` (GPU, bf16/fp16, cache-free calls only).
    * ``"auto"``: blockwise when keys span more than one block, else xla. (cuDNN is not
      chosen automatically until validated on a GPU against the reference.)

    All agree on query rows with at least one allowed key; rows without one
    (padding) are finite and unspecified.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r}; use one of {ATTENTION_IMPLS}.")
    if impl == "auto":
        impl = "blockwise" if k.shape[1] > block else "xla"
    if impl == "blockwise":
        return blockwise_attention(q, k, v, kv_valid, q_offset, block=block)
    if impl == "cudnn":
        return attend_cudnn(q, k, v, kv_valid, q_offset)
    return attend_xla(q, k, v, kv_valid, q_offset)


def attend_xla(
    q: jax.Array,  # [B, T, H, hd]
    k: jax.Array,  # [B, S, K, hd]
    v: jax.Array,  # [B, S, K, hd]
    kv_valid: jax.Array,  # bool [B, S]
    q_offset: jax.Array | int,  # slot of query 0
) -> jax.Array:
    """Causal masked softmax attention, GQA without repeating k/v.

    .. math::
        o_{t} = \\sum_s \\mathrm{softmax}_s\\Big(\\frac{q_t \\cdot k_s}{\\sqrt{hd}}
        + \\log[s \\le q_0 + t \\wedge \\mathrm{valid}_s]\\Big) v_s

    Query head ``h`` reads kv head ``h // G`` (HF ``repeat_kv``). Scores and the
    softmax are float32 whatever the compute dtype.
    """
    b, t, h, hd = q.shape
    s, kv = k.shape[1], k.shape[2]
    q = q.reshape(b, t, kv, h // kv, hd)  # [B, T, K, G, hd]
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (hd**-0.5)  # [B, K, G, T, S]
    q_slot = q_offset + jnp.arange(t)  # [T]
    causal = jnp.arange(s)[None, :] <= q_slot[:, None]  # [T, S]
    allowed = causal[None] & kv_valid[:, None, :]  # [B, T, S]
    scores = jnp.where(allowed[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [B, K, G, T, S]
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)  # [B, T, K, G, hd]
    return out.reshape(b, t, h, hd)


def attend_cudnn(
    q: jax.Array,  # [B, T, H, hd]
    k: jax.Array,  # [B, T, K, hd]
    v: jax.Array,  # [B, T, K, hd]
    kv_valid: jax.Array,  # bool [B, T]
    q_offset: jax.Array | int,
) -> jax.Array:  # [B, T, H, hd]
    """``jax.nn.dot_product_attention(implementation="cudnn")`` for cache-free calls.

    cuDNN takes right padding (sequence lengths), ours is a left-padded prompt then a
    right-padded completion: one contiguous span of valid tokens per row. Each row
    is rotated so its span starts at slot 0 (RoPE is already applied, so attention
    only sees the order, which rotation keeps), attended with ``is_causal`` and the
    span lengths, and rotated back. Rows whose valid tokens are not one contiguous
    span are not supported (use "blockwise").
    """
    if isinstance(q_offset, int) and q_offset == 0 and q.shape[1] == k.shape[1]:
        pass
    else:
        raise ValueError(
            'attention_impl="cudnn" serves cache-free calls only; use "auto" or "blockwise" '
            "with a KV cache."
        )
    if jax.default_backend() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            'attention_impl="cudnn" needs a GPU and dtype="bfloat16" or "float16"; use '
            '"blockwise" elsewhere.'
        )
    t = q.shape[1]
    start = jnp.argmax(kv_valid, axis=1).astype(jnp.int32)  # [B] first valid slot
    length = jnp.sum(kv_valid, axis=1).astype(jnp.int32)  # [B]
    idx = (jnp.arange(t)[None, :] + start[:, None]) % t  # [B, T]
    back = (jnp.arange(t)[None, :] - start[:, None]) % t

    def gather(x: jax.Array, where: jax.Array) -> jax.Array:
        return jnp.take_along_axis(x, where[:, :, None, None], axis=1)

    out = jax.nn.dot_product_attention(
        gather(q, idx),
        gather(k, idx),
        gather(v, idx),
        is_causal=True,
        query_seq_lengths=jnp.maximum(length, 1),
        key_value_seq_lengths=jnp.maximum(length, 1),
        implementation="cudnn",
    )
    return gather(out, back)


class Attention(nnx.Module):
    """Self-attention of one decoder layer (HF ``LlamaAttention`` / Qwen2 / Qwen3).

    Attributes:
      capture_qk: plain Python bool, default False. When True a cache-free forward
        sows ``{"q": ChannelStats, "k": ChannelStats}`` under ``"qk_stats"``
        (``nnx.Intermediate``): per-channel statistics of q ``[B, T, H*hd]`` and k
        ``[B, T, K*hd]`` after projection + bias (+ q/k norm), before RoPE, over the
        tokens of ``attention_mask`` (SPEC section 3). Toggle all layers with
        :func:`jaxrl_geom.models.taps.set_qk_capture`.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, h, kv, hd = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        kw = dict(dtype=config.compute_dtype, param_dtype=config.params_dtype, rngs=rngs)
        bias = config.attention_bias
        self.q_proj = Linear(d, h * hd, axes=("embed", "heads"), use_bias=bias, **kw)
        self.k_proj = Linear(d, kv * hd, axes=("embed", "kv"), use_bias=bias, **kw)
        self.v_proj = Linear(d, kv * hd, axes=("embed", "kv"), use_bias=bias, **kw)
        self.o_proj = Linear(h * hd, d, axes=("heads", "embed"), use_bias=config.o_proj_bias, **kw)
        if config.qk_norm:
            norm_kw = dict(
                eps=config.rms_norm_eps,
                dtype=config.compute_dtype,
                param_dtype=config.params_dtype,
            )
            self.q_norm = RMSNorm(hd, **norm_kw)
            self.k_norm = RMSNorm(hd, **norm_kw)
        else:
            self.q_norm = self.k_norm = None
        self.config = config
        self.capture_qk = False

    def __call__(
        self,
        x: jax.Array,  # [B, T, D]
        positions: jax.Array,  # int32 [B, T]
        attention_mask: jax.Array,  # bool [B, T] this call's real tokens
        kv_valid: jax.Array,  # bool [B, S] key slots holding real tokens (after this write)
        cache_kv: tuple[jax.Array, jax.Array] | None = None,  # ([B, S, K, hd], [B, S, K, hd])
        index: jax.Array | int = 0,  # write offset of this call's first token
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        c = self.config
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, c.num_attention_heads, c.head_dim)  # [B, T, H, hd]
        k = self.k_proj(x).reshape(b, t, c.num_key_value_heads, c.head_dim)  # [B, T, K, hd]
        v = self.v_proj(x).reshape(b, t, c.num_key_value_heads, c.head_dim)  # [B, T, K, hd]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.capture_qk:
            self._capture(q, k, attention_mask, cache_kv)

        inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if cache_kv is None:
            new_cache = None
        else:
            k = jax.lax.dynamic_update_slice(
                cache_kv[0], k.astype(cache_kv[0].dtype), (0, index, 0, 0)
            )
            v = jax.lax.dynamic_update_slice(
                cache_kv[1], v.astype(cache_kv[1].dtype), (0, index, 0, 0)
            )
            new_cache = (k, v)  # [B, S, K, hd] each
        out = attend(
            q.astype(k.dtype),
            k,
            v,
            kv_valid,
            index,
            impl=c.attention_impl,
            block=c.attention_block_size,
        )  # [B, T, H, hd]
        return self.o_proj(out.reshape(b, t, -1)), new_cache  # [B, T, D]

    def _capture(
        self,
        q: jax.Array,  # [B, T, H, hd]
        k: jax.Array,  # [B, T, K, hd]
        attention_mask: jax.Array,
        cache_kv: object,
    ) -> None:
        if cache_kv is not None:
            raise ValueError(
                "q/k capture runs on cache-free forwards only (training passes); call "
                "set_qk_capture(model, False) before decoding with a KV cache."
            )
        b, t = attention_mask.shape
        stats = {
            "q": channel_stats(q.reshape(b, t, -1), attention_mask),
            "k": channel_stats(k.reshape(b, t, -1), attention_mask),
        }
        self.sow(nnx.Intermediate, "qk_stats", stats)
