"""Decoder vs Hugging Face torch (logit parity), KV cache vs full forward, q/k capture
vs hand-computed activations, remat, config mapping.

References are independent: HF torch models (random weights, left-padded batches,
explicit position ids) and NumPy re-derivations from the HF weights.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tolerances import assert_f32_close, depth_ops

from jaxrl_geom.models import (
    Decoder,
    ModelConfig,
    RopeScaling,
    collect_qk_stats,
    init_cache,
    load_pretrained,
    set_qk_capture,
)

VOCAB = 96
LENGTHS = (7, 4, 1)  # left-padded to T = 7


def hf_config(model_type: str, **overrides) -> transformers.PretrainedConfig:
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return transformers.AutoConfig.for_model(model_type, **kw)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights large enough that any wrong sign, transpose or missing term shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # [out, in]
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[1]))
    return model.eval()


def make_pair(tmp_path, model_type: str, seed: int = 0, **overrides):
    """(HF torch model, our Decoder loaded from its save_pretrained directory)."""
    config = hf_config(model_type, **overrides)
    hf = randomize_(transformers.AutoModelForCausalLM.from_config(config), seed)
    hf.save_pretrained(tmp_path)
    return hf, load_pretrained(tmp_path)


def left_padded(lengths=LENGTHS, seed=0, offset=0):
    rng = np.random.default_rng(seed)
    t = max(lengths)
    mask = np.arange(t)[None, :] >= t - np.asarray(lengths)[:, None]  # [B, T]
    tokens = np.where(mask, rng.integers(0, VOCAB, mask.shape), 0).astype(np.int32)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32) + offset
    return tokens, positions, mask


@functools.partial(jax.jit, static_argnames=("graphdef", "logits_slice"))
def _forward(graphdef, state, tokens, positions, mask, cache=None, logits_slice=None):
    return nnx.merge(graphdef, state)(tokens, positions, mask, cache, logits_slice)


def forward(model, tokens, positions, mask, cache=None, logits_slice=None):
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, tokens, positions, mask, cache, logits_slice=logits_slice)


def hf_logits(hf, tokens, positions, mask) -> np.ndarray:
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(positions, dtype=torch.long),
        )
    return out.logits.float().numpy()


# --------------------------------------------------------------------------- HF parity

LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # all three llama3 bands occur at hd = 16
}
PARITY_CASES = {
    "llama-gqa2-untied": ("llama", {}),
    "llama-kv1-tied-llama3": (
        "llama",
        dict(num_key_value_heads=1, tie_word_embeddings=True, rope_parameters=LLAMA3),
    ),
    "llama-mha-bias-linear": (
        "llama",
        dict(
            num_key_value_heads=4,
            attention_bias=True,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
        ),
    ),
    "qwen2-gqa2-untied": ("qwen2", {}),
    "qwen2-kv1-tied": ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen3-gqa2-headdim32": ("qwen3", dict(head_dim=32)),
    "qwen3-bias-tied": ("qwen3", dict(attention_bias=True, tie_word_embeddings=True)),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_logits_match_hf_on_left_padded_batches(tmp_path, case):
    model_type, overrides = PARITY_CASES[case]
    hf, model = make_pair(tmp_path, model_type, **overrides)
    offset = 29 if "llama3" in case else 0  # long angles: RoPE scaling matters
    tokens, positions, mask = left_padded(offset=offset)

    ours, cache = forward(model, tokens, positions, mask)
    ref = hf_logits(hf, tokens, positions, mask)

    assert cache is None and ours.dtype == jnp.float32 and ours.shape == ref.shape
    assert np.all(np.isfinite(ours))  # padded rows too
    ops = depth_ops(model.config.num_hidden_layers)
    assert_f32_close(np.asarray(ours)[mask], ref[mask], scale=np.abs(ref[mask]).max(), ops=ops)
    assert np.abs(ref[mask]).max() > 1.0  # the comparison is not between near-zero logits


def test_config_maps_hf_fields(tmp_path):
    hf, model = make_pair(tmp_path, "llama", num_key_value_heads=1, rope_parameters=LLAMA3)
    c = model.config
    assert (c.model_type, c.num_key_value_heads, c.head_dim) == ("llama", 1, 16)
    assert c.rope_scaling == RopeScaling("llama3", 4.0, 1.0, 4.0, 16)
    assert ModelConfig.from_hf(c.to_hf()) == c
    # transformers v4-style dict: rope_theta / rope_scaling at the top level.
    legacy = {**hf.config.to_dict(), "rope_theta": 10000.0, "rope_scaling": dict(LLAMA3)}
    legacy.pop("rope_parameters")
    assert ModelConfig.from_hf(legacy).rope_scaling == c.rope_scaling
    for model_type in ("qwen2", "qwen3"):
        c = ModelConfig.from_hf(hf_config(model_type, head_dim=8))
        assert c.head_dim == 8 and c.attention_bias == (model_type == "qwen2")
        assert c.qk_norm == (model_type == "qwen3")
        assert ModelConfig.from_hf(c.to_hf()) == c


def test_config_rejects_unsupported():
    with pytest.raises(ValueError, match="supported model types.*llama"):
        ModelConfig.from_hf(transformers.GPT2Config())
    with pytest.raises(ValueError, match="rope_type"):
        ModelConfig.from_hf(
            hf_config("llama", rope_parameters={"rope_type": "yarn", "factor": 2.0})
        )
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        dataclasses.replace(ModelConfig.tiny(32), num_key_value_heads=3)
    tiny = ModelConfig.tiny(50)
    assert (tiny.hidden_size, tiny.num_hidden_layers, tiny.intermediate_size) == (128, 4, 384)
    assert (tiny.num_attention_heads, tiny.num_key_value_heads, tiny.model_type) == (4, 2, "llama")


# --------------------------------------------------------------------------- KV cache


def test_cache_decode_equals_full_forward():
    """Prefill (last logits only), a 2-token chunk, then single tokens, with a row that
    stops being valid mid-way, equals one full cache-free forward (qwen3 with q/k norm,
    qkv bias and a single kv head: every switch that touches the cached k/v)."""
    config = ModelConfig.from_hf(
        hf_config("qwen3", hidden_size=32, num_key_value_heads=1, attention_bias=True)
    )
    model = Decoder(config, rngs=nnx.Rngs(1))
    prompt_tokens, _, prompt_mask = left_padded(seed=1)
    b, p = prompt_tokens.shape
    new = 5
    rng = np.random.default_rng(2)
    new_tokens = rng.integers(0, VOCAB, (b, new)).astype(np.int32)
    new_mask = np.ones((b, new), bool)
    new_mask[1, 3:] = False  # row 1 finished after 3 new tokens
    tokens = np.concatenate([prompt_tokens, new_tokens], axis=1)
    mask = np.concatenate([prompt_mask, new_mask], axis=1)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)

    full, _ = forward(model, tokens, positions, mask)

    cache = init_cache(config, b, p + new + 3)
    steps = [(0, p), (p, p + 2)] + [(s, s + 1) for s in range(p + 2, p + new)]
    for i, (lo, hi) in enumerate(steps):
        if i == 3:
            compiled = _forward._cache_size()
        logits, cache = forward(
            model,
            tokens[:, lo:hi],
            positions[:, lo:hi],
            mask[:, lo:hi],
            cache,
            logits_slice="last" if i == 0 else None,
        )
        assert int(cache.index) == hi
        got = np.asarray(logits)
        want = np.asarray(full)[:, hi - got.shape[1] : hi]
        rows = mask[:, hi - got.shape[1] : hi]
        scale = np.abs(want[rows]).max()
        assert_f32_close(
            got[rows], want[rows], scale=scale, ops=depth_ops(config.num_hidden_layers)
        )
        assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(np.asarray(cache.valid)[:, : p + new], mask)
    assert cache.k[0].shape == (b, p + new + 3, config.num_key_value_heads, config.head_dim)
    assert _forward._cache_size() == compiled  # decode steps reuse one executable


# --------------------------------------------------------------------------- capture


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return w * x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps)


def _stats(x: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    a = np.abs(x[mask])  # [n_valid, C]
    return {"sum_abs": a.sum(0), "sum_sq": (a**2).sum(0), "max_abs": a.max(0), "count": len(a)}


@pytest.mark.parametrize(
    "model_type,overrides", [("qwen2", {}), ("qwen3", dict(attention_bias=True))]
)
def test_qk_capture_matches_hand_computed_activations(tmp_path, model_type, overrides):
    hf, model = make_pair(tmp_path, model_type, seed=3, **overrides)
    tokens, positions, mask = left_padded(seed=4)
    with torch.no_grad():
        hidden = hf(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(positions, dtype=torch.long),
            output_hidden_states=True,
        ).hidden_states  # [L + 1] x [B, T, D]; entry l is the input of layer l
    c = model.config

    graphdef, state = nnx.split(model)

    @jax.jit
    def captured(state, tokens, positions, mask):
        m = nnx.merge(graphdef, state)
        set_qk_capture(m, True)
        _, intermediates = nnx.capture(m, nnx.Intermediate)(tokens, positions, mask)
        return collect_qk_stats(intermediates)

    stats = captured(state, tokens, positions, mask)
    for layer in range(c.num_hidden_layers):
        attn = hf.model.layers[layer].self_attn
        x = _rms(
            hidden[layer].numpy(),
            hf.model.layers[layer].input_layernorm.weight.detach().numpy(),
            c.rms_norm_eps,
        )
        for name, proj, norm in (("q", attn.q_proj, "q_norm"), ("k", attn.k_proj, "k_norm")):
            act = x @ proj.weight.detach().numpy().T + proj.bias.detach().numpy()  # [B, T, C]
            if c.qk_norm:
                heads = act.reshape(*act.shape[:2], -1, c.head_dim)
                w = getattr(attn, norm).weight.detach().numpy()
                act = _rms(heads, w, c.rms_norm_eps).reshape(act.shape)
            want = _stats(act, mask)
            got = stats[name]
            for field, value in want.items():
                np.testing.assert_allclose(
                    np.asarray(getattr(got, field))[layer], value, rtol=1e-4, atol=1e-4
                )
    assert stats["q"].sum_abs.shape == (c.num_hidden_layers, c.num_attention_heads * c.head_dim)
    assert stats["k"].sum_abs.shape == (c.num_hidden_layers, c.num_key_value_heads * c.head_dim)


def test_capture_is_off_by_default_and_refused_with_a_cache():
    model = Decoder(ModelConfig.tiny(VOCAB, hidden_size=32, num_hidden_layers=2), rngs=nnx.Rngs(0))
    tokens, positions, mask = left_padded()
    plain, _ = forward(model, tokens, positions, mask)
    assert len(jax.tree.leaves(nnx.state(model, nnx.Intermediate))) == 0

    @jax.jit
    def captured(state):
        m = nnx.merge(graphdef, state)
        (logits, _), intermediates = nnx.capture(m, nnx.Intermediate)(tokens, positions, mask)
        return logits, collect_qk_stats(intermediates)

    set_qk_capture(model, True)
    graphdef, state = nnx.split(model)
    logits, stats = captured(state)
    np.testing.assert_array_equal(logits, plain)
    np.testing.assert_array_equal(stats["q"].count, [mask.sum()] * 2)
    with pytest.raises(ValueError, match="cache-free"):
        model(tokens, positions, mask, cache=init_cache(model.config, 3, 16))
    set_qk_capture(model, False)
    assert not model.layers[1].self_attn.capture_qk
    with pytest.raises(ValueError, match="Decoder"):
        set_qk_capture(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), True)
    with pytest.raises(ValueError, match="set_qk_capture"):
        collect_qk_stats(model)


# --------------------------------------------------------------------------- numerics


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logits_and_grad(graphdef, state, tokens, positions, mask):
    def loss(state):
        logits, _ = nnx.merge(graphdef, state)(tokens, positions, mask)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 3]), logits

    return jax.grad(loss, has_aux=True)(state)


def test_remat_and_fully_padded_rows():
    """Remat gives the same gradients; a row with no real token gives finite logits and
    finite (zero-NaN) gradients."""
    config = ModelConfig.tiny(VOCAB, hidden_size=32, num_hidden_layers=2)
    tokens, positions, mask = left_padded(lengths=(5, 0, 2))
    results = []
    for remat in (False, True):
        model = Decoder(dataclasses.replace(config, remat=remat), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        results.append(_logits_and_grad(graphdef, state, tokens, positions, mask))
    (g_plain, logits), (g_remat, _) = results
    assert np.all(np.isfinite(logits))
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat), strict=True):
        assert np.all(np.isfinite(a))
        assert_f32_close(a, b, scale=np.abs(b).max(), ops=depth_ops(2))  # remat: same math


def test_bfloat16_compute_is_close_to_float32():
    config = ModelConfig.tiny(VOCAB, hidden_size=32, num_hidden_layers=2)
    f32 = Decoder(config, rngs=nnx.Rngs(0))
    bf16 = Decoder(dataclasses.replace(config, dtype="bfloat16"), rngs=nnx.Rngs(0))
    tokens, positions, mask = left_padded()
    a, _ = forward(f32, tokens, positions, mask)
    b, _ = forward(bf16, tokens, positions, mask)
    assert b.dtype == jnp.float32 and bf16.layers[0].mlp.up_proj.kernel.dtype == jnp.float32
    assert np.abs(np.asarray(a - b))[mask].max() < 0.1 * np.abs(np.asarray(a))[mask].max()


def test_bad_forward_inputs():
    model = Decoder(ModelConfig.tiny(VOCAB, hidden_size=32, num_hidden_layers=1), rngs=nnx.Rngs(0))
    tokens, positions, mask = left_padded()
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(tokens, positions[:, 1:], mask)
    with pytest.raises(ValueError, match="logits_slice"):
        model(tokens, positions, mask, logits_slice="first")
    with pytest.raises(ValueError, match="init_cache"):
        model(tokens, positions, mask, cache=init_cache(model.config, 2, 16))
    with pytest.raises(ValueError, match="max_len"):
        model(tokens, positions, mask, cache=init_cache(model.config, 3, 4))
