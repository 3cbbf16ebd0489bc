"""Every attention implementation equals the XLA reference (values and gradients),
alone and inside the Decoder (left padding, GQA, qwen3 q/k norm, KV cache prefill +
decode, LongAct capture); the blockwise form's memory is linear in T.

The XLA form is itself checked against Hugging Face torch in test_models.py; here a
NumPy float64 oracle pins it once more on a case with a cache offset.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_geom.models import Decoder, ModelConfig, collect_qk_stats, init_cache, set_qk_capture
from jaxrl_geom.models.attention import attend, attend_xla

RTOL = 1e-5  # relative to the largest magnitude; f32 with O(S) accumulations of O(1) terms


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def inputs(b=3, t=19, s=None, h=4, kvh=2, hd=8, seed=0):
    rng = np.random.default_rng(seed)
    s = t if s is None else s
    q = rng.normal(size=(b, t, h, hd)).astype(np.float32)
    k = rng.normal(size=(b, s, kvh, hd)).astype(np.float32)
    v = rng.normal(size=(b, s, kvh, hd)).astype(np.float32)
    return q, k, v


def numpy_attention(q, k, v, valid, offset):
    """Float64 oracle: repeat k/v per query head, mask, softmax, weighted sum."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # [B, S, H, hd]
    sc = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    slot = offset + np.arange(q.shape[1])
    allowed = (np.arange(k.shape[1])[None, :] <= slot[:, None])[None] & valid[:, None, :]
    sc = np.where(allowed[:, None], sc, -np.inf)
    with np.errstate(invalid="ignore"):  # rows without an allowed key: NaN, never compared
        p = np.exp(sc - sc.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def left_right_padded(b, t, lengths, completion_stop):
    """Left-padded prompts, then completions that stop early (a contiguous valid span)."""
    valid = np.arange(t)[None, :] >= t - np.asarray(lengths)[:, None]
    for row, stop in enumerate(completion_stop):
        if stop is not None:
            valid[row, stop:] = False
    return valid


@pytest.mark.parametrize("block", [7, 64])  # 3 blocks (T = 19 padded to 21), one block
def test_blockwise_equals_xla_values_and_grads(block):
    """Training shape (S = T) with left padding, early-stopping rows and GQA; blocks
    that do and do not divide T, and one block covering everything."""
    q, k, v = inputs()
    valid = left_right_padded(3, 19, (19, 11, 3), (15, None, None))
    w = np.random.default_rng(1).normal(size=q.shape).astype(np.float32) * valid[..., None, None]

    def loss(impl, q, k, v):
        out = attend(q, k, v, jnp.asarray(valid), 0, impl=impl, block=block)
        return jnp.sum(out * w), out

    grads = {}
    outs = {}
    for impl in ("xla", "blockwise"):
        (_, outs[impl]), grads[impl] = jax.jit(
            jax.value_and_grad(functools.partial(loss, impl), argnums=(0, 1, 2), has_aux=True)
        )(q, k, v)
    assert rel_err(np.asarray(outs["blockwise"])[valid], np.asarray(outs["xla"])[valid]) < RTOL
    assert np.all(np.isfinite(outs["blockwise"]))
    for a, b in zip(grads["blockwise"], grads["xla"], strict=True):
        assert rel_err(a, b) < RTOL
    oracle = numpy_attention(q, k, v, valid, 0)
    assert rel_err(np.asarray(outs["xla"])[valid], oracle[valid]) < RTOL


@pytest.mark.parametrize("t,offset", [(5, 10), (1, 13), (1, 23)])
def test_blockwise_with_cache_offset_equals_xla(t, offset):
    """Prefill chunks and single-token decode against a longer cache with holes, the
    offset traced (as in the sampler's loop)."""
    q, k, v = inputs(t=t, s=24, kvh=1, seed=2)
    valid = np.random.default_rng(3).random((3, 24)) > 0.3
    valid[:, 0] = True
    run = jax.jit(
        lambda impl, off: attend(q, k, v, valid, off, impl=impl, block=4), static_argnums=0
    )
    want = numpy_attention(q, k, v, valid, offset)
    got_xla = run("xla", jnp.int32(offset))
    got_blk = run("blockwise", jnp.int32(offset))
    assert rel_err(got_xla, want) < RTOL
    assert rel_err(got_blk, got_xla) < RTOL


def test_auto_picks_by_key_length_and_bad_impl_raises():
    q, k, v = inputs(t=9)
    valid = np.ones((3, 9), bool)
    ref = attend_xla(q, k, v, valid, 0)
    for block in (4, 16):  # blockwise, then xla
        got = attend(q, k, v, valid, 0, impl="auto", block=block)
        assert rel_err(got, ref) < RTOL
    with pytest.raises(ValueError, match="attention_impl"):
        attend(q, k, v, valid, 0, impl="flash")
    with pytest.raises(ValueError, match="attention_impl"):
        ModelConfig.tiny(32, hidden_size=32).__class__(
            **{**dataclasses.asdict(ModelConfig.tiny(32, hidden_size=32)), "attention_impl": "x"}
        )


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_equals_xla_on_gpu():
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in inputs(t=64, h=8, hd=64))
    valid = left_right_padded(3, 64, (64, 40, 9), (50, None, None))
    a = attend(q, k, v, valid, 0, impl="cudnn").astype(jnp.float32)
    b = attend(q, k, v, valid, 0, impl="xla").astype(jnp.float32)
    assert rel_err(np.asarray(a)[valid], np.asarray(b)[valid]) < 2e-2  # bf16


# --------------------------------------------------------------------------- in the Decoder


def qwen3_config(impl: str) -> ModelConfig:
    """qwen3 (q/k RMSNorm), qkv bias, one kv head (GQA 4:1), 2 layers."""
    return ModelConfig(
        model_type="qwen3",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        attention_bias=True,
        qk_norm=True,
        attention_impl=impl,
        attention_block_size=4,
    )


def batch(lengths=(11, 6, 2), seed=0):
    t = max(lengths)
    mask = np.arange(t)[None, :] >= t - np.asarray(lengths)[:, None]
    tokens = np.where(mask, np.random.default_rng(seed).integers(0, 64, mask.shape), 0)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return tokens.astype(np.int32), positions.astype(np.int32), mask


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logits_grads_stats(graphdef, params, rest, tokens, positions, mask):
    def loss(params):
        model = nnx.merge(graphdef, params, rest)
        (logits, _), inter = nnx.capture(model, nnx.Intermediate)(tokens, positions, mask)
        return jnp.sum(jnp.where(mask[..., None], logits, 0.0) ** 2), (logits, inter)

    (_, (logits, inter)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return logits, grads, collect_qk_stats(inter)


def test_decoder_blockwise_equals_xla_logits_grads_capture_and_cache():
    tokens, positions, mask = batch()
    results = {}
    for impl in ("xla", "blockwise"):
        model = Decoder(qwen3_config(impl), rngs=nnx.Rngs(0))
        set_qk_capture(model, True)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        results[impl] = _logits_grads_stats(graphdef, params, rest, tokens, positions, mask)
        set_qk_capture(model, False)
        results[impl + "_model"] = model
    (la, ga, sa), (lb, gb, sb) = results["xla"], results["blockwise"]
    assert rel_err(np.asarray(lb)[mask], np.asarray(la)[mask]) < RTOL
    for a, b in zip(jax.tree.leaves(gb), jax.tree.leaves(ga), strict=True):
        assert rel_err(a, b) < RTOL
    for a, b in zip(jax.tree.leaves(sb), jax.tree.leaves(sa), strict=True):
        assert rel_err(a, b) < RTOL

    # Prefill in two chunks, then decode one token at a time, blockwise with a cache
    # of 16 slots (4 key blocks), equals the cache-free xla forward.
    model = results["blockwise_model"]
    b, t = tokens.shape
    cache = init_cache(model.config, b, 16)
    graphdef, state = nnx.split(model)
    step = jax.jit(
        lambda st, tk, ps, mk, c: nnx.merge(graphdef, st)(tk, ps, mk, cache=c),
    )
    for lo, hi in [(0, 6), (6, 8)] + [(i, i + 1) for i in range(8, t)]:
        logits, cache = step(state, tokens[:, lo:hi], positions[:, lo:hi], mask[:, lo:hi], cache)
        rows = mask[:, lo:hi]
        assert rel_err(np.asarray(logits)[rows], np.asarray(la)[:, lo:hi][rows]) < RTOL
