"""The decoder language model (llama / qwen2 / qwen3) and its KV cache.

One forward serves training (no cache, all positions), prefill (cache, logits at
the last position only) and decode (cache, one token):

.. code-block:: python

    logits, cache = model(tokens, positions, attention_mask, cache=None, logits_slice=None)

Batches are left-padded: ``attention_mask`` marks real tokens (never derived from
token values), ``positions`` are the RoPE positions (``cumsum(mask) - 1`` clipped at
0). Left padding lets the whole batch share one cache write offset, so the cache is
written with a single ``dynamic_update_slice`` per layer and never concatenated.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_geom.models.attention import Attention
from jaxrl_geom.models.config import ModelConfig
from jaxrl_geom.models.layers import MLP, Embedding, Linear, RMSNorm


class KVCache(NamedTuple):
    """Per-layer key/value buffers with one write offset shared by the batch.

    A call with ``T`` tokens writes slots ``[index, index + T)``; query ``t`` attends
    to slots ``s <= index + t`` with ``valid[b, s]``. The caller keeps
    ``index + T <= S`` (``dynamic_update_slice`` clamps out-of-range offsets).
    """

    k: tuple[jax.Array, ...] | jax.Array  # per layer [B, S, K, hd] (scanned: [L, B, S, K, hd])
    v: tuple[jax.Array, ...] | jax.Array  # after RoPE; v likewise
    valid: jax.Array  # bool [B, S] slot holds a real token
    index: jax.Array  # int32 [] next write offset


def init_cache(
    config: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype | str | None = None
) -> KVCache:
    """An empty cache of ``max_len`` slots (``dtype`` defaults to ``config.dtype``)."""
    if batch <= 0 or max_len <= 0:
        raise ValueError(f"init_cache needs batch > 0 and max_len > 0, got {batch}, {max_len}.")
    dtype = jnp.dtype(config.dtype if dtype is None else dtype)
    shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
    if config.scanned:  # one stacked buffer per k / v, updated in place layer by layer
        k = jnp.zeros((config.num_hidden_layers, *shape), dtype)
        v = jnp.zeros((config.num_hidden_layers, *shape), dtype)
    else:
        k = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
        v = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
    return KVCache(
        k=k,
        v=v,
        valid=jnp.zeros((batch, max_len), bool),
        index=jnp.zeros((), jnp.int32),
    )


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``h += attn(norm(h)); h += mlp(norm(h))``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        norm_kw = dict(
            eps=config.rms_norm_eps, dtype=config.compute_dtype, param_dtype=config.params_dtype
        )
        self.input_layernorm = RMSNorm(config.hidden_size, **norm_kw)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm_kw)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(
        self,
        h: jax.Array,  # [B, T, D]
        positions: jax.Array,  # [B, T]
        attention_mask: jax.Array,  # [B, T]
        kv_valid: jax.Array,  # [B, S]
        cache_kv: tuple[jax.Array, jax.Array] | None,
        index: jax.Array | int,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        a, cache_kv = self.self_attn(
            self.input_layernorm(h), positions, attention_mask, kv_valid, cache_kv, index
        )
        h = h + a
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, cache_kv


def _call_layer(layer: DecoderLayer, *args):
    return layer(*args)


def _snapshot(state: nnx.State) -> dict:
    """``{path: (leaves, treedef)}`` of a state's Variables (to detect changes later:
    ``nnx.merge`` shares the Variable objects, so they change in place)."""
    return {path: jax.tree.flatten(v.get_value()) for path, v in nnx.to_flat_state(state)}


def _changed(before: dict, after: nnx.State) -> nnx.State:
    """The Variables of ``after`` that are new or hold other values than ``before``."""
    out = []
    for path, var in nnx.to_flat_state(after):
        leaves, treedef = jax.tree.flatten(var.get_value())
        old = before.get(path)
        same = old is not None and old[1] == treedef
        if not (same and all(a is b for a, b in zip(leaves, old[0], strict=True))):
            out.append((path, var))
    return nnx.from_flat_state(out)


def _remat_policy(config: ModelConfig):
    if config.remat_policy == "save_dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return jax.checkpoint_policies.nothing_saveable


def _stacked_layers(config: ModelConfig, rngs: nnx.Rngs) -> DecoderLayer:
    """One ``DecoderLayer`` whose parameters carry a leading ``[L]`` axis (logical
    axis ``None``: layers are never sharded)."""

    @nnx.split_rngs(splits=config.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    def create(rngs: nnx.Rngs) -> DecoderLayer:
        return DecoderLayer(config, rngs=rngs)

    return create(rngs)


class Decoder(nnx.Module):
    """Decoder LM with Hugging Face parameter names (see docs/DESIGN.md).

    Example::

        model = Decoder(ModelConfig.tiny(vocab_size=64), rngs=nnx.Rngs(0))
        logits, _ = model(tokens, positions, mask)                    # [B, T, V] float32
        cache = init_cache(model.config, batch=B, max_len=S)
        logits, cache = model(tokens, positions, mask, cache=cache, logits_slice="last")
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.config = config
        dt, pdt = config.compute_dtype, config.params_dtype
        self.embed_tokens = Embedding(
            config.vocab_size, config.hidden_size, dtype=dt, param_dtype=pdt, rngs=rngs
        )
        if config.scanned:
            self.layers = _stacked_layers(config, rngs)  # params [L, ...]
        else:
            self.layers = nnx.List(
                [DecoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)]
            )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dt, param_dtype=pdt)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(
                config.hidden_size,
                config.vocab_size,
                axes=("embed", "vocab"),
                dtype=dt,
                param_dtype=pdt,
                out_dtype=jnp.float32,
                kernel_init=nnx.initializers.normal(0.02),
                rngs=rngs,
            )

    def __call__(
        self,
        tokens: jax.Array,  # int32 [B, T]
        positions: jax.Array,  # int32 [B, T]
        attention_mask: jax.Array,  # bool [B, T]
        cache: KVCache | None = None,
        logits_slice: Literal["last"] | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Logits float32 ``[B, T, V]`` (``[B, 1, V]`` with ``logits_slice="last"``).

        Without a cache: causal mask and key-valid mask over this call's tokens. With
        a cache: writes this call's k/v at ``[index, index + T)``, marks those slots
        valid where ``attention_mask``, attends over valid slots up to each query's
        slot, and returns the cache with ``index + T``. Padded query rows give finite
        (meaningless) logits.
        """
        self._check_inputs(tokens, positions, attention_mask, cache, logits_slice)
        h, cache = self.hidden(tokens, positions, attention_mask, cache)  # [B, T, D]
        if logits_slice == "last":
            h = h[:, -1:]  # [B, 1, D] left padding: the last column is real in every row
        return self.head(h), cache

    def hidden(
        self,
        tokens: jax.Array,  # int32 [B, T]
        positions: jax.Array,  # int32 [B, T]
        attention_mask: jax.Array,  # bool [B, T]
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-normed hidden states ``[B, T, D]`` (compute dtype), before the LM head.

        ``model(...)`` is ``model.head(model.hidden(...)[0])``; callers that need
        logits at a few positions, or in chunks, slice the hidden states first.
        """
        self._check_inputs(tokens, positions, attention_mask, cache, None)
        attention_mask = attention_mask.astype(bool)
        if cache is None:
            kv_valid, index = attention_mask, 0
        else:
            kv_valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, cache.index))
            index = cache.index

        h = self.embed_tokens(tokens)  # [B, T, D]
        if self.config.scanned:
            h, new_kv = self._scan_layers(h, positions, attention_mask, kv_valid, cache, index)
            h = self.norm(h)
            if cache is None:
                return h, None
            t = tokens.shape[1]
            return h, KVCache(*new_kv, kv_valid, cache.index + t)

        call = _call_layer
        if self.config.remat:
            call = nnx.remat(_call_layer, policy=_remat_policy(self.config))
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            h, layer_cache = call(layer, h, positions, attention_mask, kv_valid, layer_cache, index)
            if layer_cache is not None:
                new_k.append(layer_cache[0])
                new_v.append(layer_cache[1])
        h = self.norm(h)
        if cache is None:
            return h, None
        t = tokens.shape[1]
        return h, KVCache(tuple(new_k), tuple(new_v), kv_valid, cache.index + t)

    def _scan_layers(self, h, positions, attention_mask, kv_valid, cache, index):
        """``lax.scan`` over the stacked layers; the cache rides in the carry and is
        updated in place at layer ``l``. Every Variable of the layer module is scanned
        along its leading ``[L]`` axis; Variables the layer creates or changes (sown
        values such as the q/k statistics, state kept by a tap) come out stacked
        ``[L, ...]`` and are written back to the stacked module."""
        graphdef, state = nnx.split(self.layers)

        def layer_fn(layer_state, h, cache_kv):
            before = _snapshot(layer_state)
            layer = nnx.merge(graphdef, layer_state)
            h, cache_kv = layer(h, positions, attention_mask, kv_valid, cache_kv, index)
            return h, cache_kv, _changed(before, nnx.state(layer))

        if self.config.remat:
            layer_fn = jax.checkpoint(layer_fn, policy=_remat_policy(self.config))

        def body(carry, xs):
            h, k_all, v_all = carry
            layer_state, i = xs
            cache_kv = None if cache is None else (k_all[i], v_all[i])
            h, cache_kv, changed = layer_fn(layer_state, h, cache_kv)
            if cache is not None:
                k_all = jax.lax.dynamic_update_index_in_dim(k_all, cache_kv[0], i, 0)
                v_all = jax.lax.dynamic_update_index_in_dim(v_all, cache_kv[1], i, 0)
            return (h, k_all, v_all), changed

        n = self.config.num_hidden_layers
        k_all, v_all = (None, None) if cache is None else (cache.k, cache.v)
        (h, k_all, v_all), changed = jax.lax.scan(body, (h, k_all, v_all), (state, jnp.arange(n)))
        nnx.update(self.layers, changed)  # e.g. q/k statistics as one [L, C] entry
        return h, (k_all, v_all)

    def head(self, h: jax.Array) -> jax.Array:  # [..., T, D] -> f32 [..., T, V]
        """The LM head (tied: the embedding's transpose) on final-normed hidden states."""
        logits = self.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)
        return logits.astype(jnp.float32)

    def _check_inputs(self, tokens, positions, attention_mask, cache, logits_slice) -> None:
        if (
            tokens.ndim != 2
            or positions.shape != tokens.shape
            or attention_mask.shape != tokens.shape
        ):
            raise ValueError(
                "Decoder expects tokens, positions and attention_mask all [B, T]; got "
                f"{tokens.shape}, {positions.shape}, {attention_mask.shape}. Build positions "
                "as cumsum(mask) - 1 clipped at 0."
            )
        if logits_slice not in (None, "last"):
            raise ValueError(f"logits_slice must be None or 'last', got {logits_slice!r}.")
        if cache is not None:
            slots = cache.valid.shape
            layers = len(cache.k)  # a tuple, or the stacked [L, ...] array
            if (
                layers != self.config.num_hidden_layers
                or isinstance(cache.k, tuple) == self.config.scanned
                or slots[0] != tokens.shape[0]
            ):
                raise ValueError(
                    f"KVCache for {layers} layers x batch {slots[0]} does not fit this "
                    f"model ({self.config.num_hidden_layers} layers) and batch {tokens.shape[0]}; "
                    "build it with init_cache(model.config, batch, max_len)."
                )
            if tokens.shape[1] > slots[1]:
                raise ValueError(
                    f"{tokens.shape[1]} tokens do not fit a KV cache of {slots[1]} slots; "
                    "allocate max_len >= prompt + new tokens."
                )
