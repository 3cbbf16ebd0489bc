"""Grouped-query self-attention with RoPE, optional q/k RMSNorm and qkv bias, a KV
cache written at one shared offset, and the LongAct q/k capture tap.

Shapes: ``B`` batch, ``T`` tokens in this call, ``S`` key slots (``T`` without a
cache, the cache length with one), ``H`` query heads, ``K`` key/value heads,
``G = H / K`` queries per kv head, ``hd`` head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_geom.models.config import ModelConfig
from jaxrl_geom.models.layers import Linear, RMSNorm, apply_rope, rope_inv_freq
from jaxrl_geom.models.taps import channel_stats

# Large negative but finite: a query row whose keys are all masked (a padded row)
# gets a uniform softmax and finite outputs instead of NaN.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def attend(
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
        out = attend(q.astype(k.dtype), k, v, kv_valid, index)  # [B, T, H, hd]
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
