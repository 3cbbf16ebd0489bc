"""Tests for jaxrl_geom.sampling: methods (vs HF warpers and a NumPy oracle) and generate()."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tolerances import assert_f32_close
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from jaxrl_geom.sampling import Greedy, Sample

# --------------------------------------------------------------------------- methods


def numpy_support(logits: np.ndarray, temperature: float, top_k, top_p) -> np.ndarray:
    """NumPy oracle of the truncated distribution, written from the definition.

    top-k: the k largest logits. top-p: within the (renormalised) top-k distribution,
    the smallest prefix by decreasing probability whose mass is >= p.
    Returns the probabilities [B, V] (zeros outside the support).
    """
    z = logits.astype(np.float64) / temperature
    out = np.zeros_like(z)
    for b, row in enumerate(z):
        order = np.argsort(-row, kind="stable")
        keep = order[: (top_k or len(row))]
        p = np.exp(row[keep] - row[keep].max())
        p /= p.sum()
        if top_p is not None and top_p < 1.0:
            n = 1
            while p[:n].sum() < top_p:
                n += 1
            keep, p = keep[:n], p[:n] / p[:n].sum()
        out[b, keep] = p
    return out


def hf_filtered(logits: np.ndarray, temperature: float, top_k, top_p) -> np.ndarray:
    """Hugging Face generate's warper chain (temperature, top-k, top-p) on torch."""
    scores = torch.from_numpy(logits.astype(np.float32))
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p is not None and top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return scores.numpy()


def random_logits(seed: int, batch: int, vocab: int, scale: float) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, vocab)).astype(np.float32) * scale


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 5, None), (0.7, None, 0.9), (1.3, 10, 0.6), (1.0, 1, None), (1.0, None, 0.01),
     (0.5, 100, 1.0), (2.0, 3, 0.999)],
)  # fmt: skip
def test_filtered_logits_match_hf_warpers_and_numpy(temperature, top_k, top_p):
    logits = random_logits(0, 6, 40, scale=3.0)
    method = Sample(temperature=temperature, top_k=top_k, top_p=top_p)
    ours = np.asarray(jax.jit(method.filtered_logits)(jnp.asarray(logits)))
    hf = hf_filtered(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(hf))
    np.testing.assert_allclose(ours[np.isfinite(ours)], hf[np.isfinite(hf)], rtol=1e-6)
    oracle = numpy_support(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(ours), oracle > 0)


@pytest.mark.parametrize("scale", [0.05, 8.0])  # flat logits -> exact fallback; peaked -> fast path
def test_top_p_bounded_candidates_is_exact(scale):
    logits = random_logits(1, 4, 64, scale=scale)
    method = Sample(top_p=0.9, candidates=4)
    ours = np.asarray(jax.jit(method.filtered_logits)(jnp.asarray(logits)))
    hf = hf_filtered(logits, 1.0, None, 0.9)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(hf))
    # Both branches of the lax.cond are exercised: do the 4 candidates hold 90%?
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    covered = (np.sort(probs, axis=-1)[:, -4:].sum(-1) >= 0.9).all()
    assert covered == (scale > 1.0)


@pytest.mark.parametrize(
    "method", [Sample(0.8, top_k=4, top_p=0.85), Sample(1.0, top_p=0.7, candidates=2)]
)
def test_sample_frequencies_match_filtered_distribution(method):
    logits = np.array([[2.0, 1.5, 1.0, 0.7, 0.3, 0.0, -0.5, -1.0]], np.float32)
    n = 20_000
    keys = jax.random.split(jax.random.key(0), n)
    draw = jax.jit(jax.vmap(lambda k: method.sample(jnp.asarray(logits), k)[0]))
    freq = np.bincount(np.asarray(draw(keys)), minlength=logits.shape[1]) / n
    expected = numpy_support(logits, method.temperature, method.top_k, method.top_p)[0]
    assert np.all(freq[expected == 0] == 0)
    np.testing.assert_allclose(freq, expected, atol=0.015)  # ~4 sigma at n = 20k


def test_greedy_is_argmax_and_plain_sample_follows_softmax():
    logits = random_logits(2, 5, 16, scale=2.0)
    np.testing.assert_array_equal(Greedy().sample(jnp.asarray(logits)), logits.argmax(-1))
    assert Greedy().temperature == 1.0
    row = np.array([[1.0, 0.0, -1.0, 0.5]], np.float32)
    keys = jax.random.split(jax.random.key(1), 20_000)
    draw = jax.jit(jax.vmap(lambda k: Sample(temperature=2.0).sample(jnp.asarray(row), k)[0]))
    freq = np.bincount(np.asarray(draw(keys)), minlength=4) / len(keys)
    p = np.exp(row[0] / 2.0) / np.exp(row[0] / 2.0).sum()
    np.testing.assert_allclose(freq, p, atol=0.015)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": 0.0}, "temperature must be"),
        ({"temperature": -1.0}, "temperature must be"),
        ({"temperature": float("inf")}, "temperature must be"),
        ({"top_k": 0}, "top_k must be"),
        ({"top_k": 2.5}, "top_k must be"),
        ({"top_p": 0.0}, "top_p must be"),
        ({"top_p": 1.5}, "top_p must be"),
        ({"candidates": 0}, "candidates must be"),
    ],
)
def test_sample_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sample(**kwargs)


# --------------------------------------------------------------------------- generate

VOCAB = 97
PROMPT_LENGTHS = (5, 3, 7, 1)  # left-padded to P = 7 (bucket 8)
MAX_NEW = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama saved by transformers, loaded by both frameworks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from jaxrl_geom.models import load_pretrained

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        initializer_range=0.3,  # peaked logits: greedy is not decided by rounding
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    path = tmp_path_factory.mktemp("tiny_llama")
    hf_model = LlamaForCausalLM(config).eval()
    hf_model.save_pretrained(path)
    return hf_model, load_pretrained(str(path)), path


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    p = max(PROMPT_LENGTHS)
    tokens = np.zeros((len(PROMPT_LENGTHS), p), np.int32)
    mask = np.zeros((len(PROMPT_LENGTHS), p), bool)
    for b, n in enumerate(PROMPT_LENGTHS):
        tokens[b, p - n :] = rng.integers(3, VOCAB, n)
        mask[b, p - n :] = True
    return tokens, mask


@nnx.jit
def _forward(model, tokens, positions, mask):
    return model(tokens, positions, mask)[0]


def full_forward_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """No-cache forward over the whole sequence: float32 [B, T, V]."""
    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int32)
    return np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(positions), mask))


def teacher_forced_logprobs(model, out, prompt_mask, temperature: float) -> np.ndarray:
    """log softmax(logits / T) of the completion tokens under a full forward, [B, L]."""
    mask = np.concatenate([prompt_mask, out.completion_mask], axis=1)
    logits = full_forward_logits(model, out.tokens, mask)
    p = out.prompt_len
    logits = logits[:, p - 1 : -1]  # positions P-1 .. P+L-2 predict tokens P .. P+L-1
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits) / temperature, axis=-1))
    return np.take_along_axis(logp, out.completion[..., None], axis=-1)[..., 0]


def assert_logprobs_close(actual, model, out, prompt_mask, temperature: float, want=None):
    """Two float32 kernel paths through the same layers (KV cache vs full forward, or
    sharded vs single-device GEMMs), compared against ``want`` (default: teacher-forced).
    Scale: the largest |logit / T| (the log-softmax cancels it); ops: ~4 reductions per
    layer (q/k/v, attention, output, MLP) plus the head."""
    mask = np.concatenate([prompt_mask, out.completion_mask], axis=1)
    z = full_forward_logits(model, out.tokens, mask)[:, out.prompt_len - 1 : -1] / temperature
    if want is None:
        want = teacher_forced_logprobs(model, out, prompt_mask, temperature)
    ops = 4 * model.config.num_hidden_layers + 1
    assert_f32_close(actual, want, scale=np.abs(z).max(), ops=ops)


def test_greedy_matches_stepwise_full_forward_argmax(checkpoint, prompts):
    from jaxrl_geom.sampling import generate

    _, model, _ = checkpoint
    tokens, mask = prompts
    out = generate(model, tokens, mask, None, max_new_tokens=MAX_NEW)

    # Reference: argmax of a full no-cache forward, one step at a time. The sequence
    # buffer has its final length from the start (one compile); causality makes the
    # not-yet-written columns irrelevant to the logits at column p + t - 1.
    p = tokens.shape[1]
    seq = np.concatenate([tokens, np.zeros((len(tokens), MAX_NEW), np.int32)], axis=1)
    seq_mask = np.concatenate([mask, np.ones((len(tokens), MAX_NEW), bool)], axis=1)
    for t in range(MAX_NEW):
        seq[:, p + t] = full_forward_logits(model, seq, seq_mask)[:, p + t - 1].argmax(-1)
    np.testing.assert_array_equal(out.tokens, seq)
    assert out.tokens.shape == (len(tokens), tokens.shape[1] + MAX_NEW)
    assert out.prompt_len == tokens.shape[1]
    assert out.completion_mask.all() and out.truncated.all()
    np.testing.assert_array_equal(out.lengths, MAX_NEW)
    assert_logprobs_close(out.logprobs, model, out, mask, 1.0)


def test_greedy_matches_transformers_generate(checkpoint, prompts):
    from jaxrl_geom.sampling import generate

    hf_model, model, _ = checkpoint
    tokens, mask = prompts
    out = generate(model, tokens, mask, None, max_new_tokens=MAX_NEW)
    # No stop token on either side (min_new_tokens would instead mask EOS logits).
    config = copy.deepcopy(hf_model.generation_config)
    config.eos_token_id = None
    with torch.inference_mode():
        hf = hf_model.generate(
            torch.from_numpy(tokens.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            generation_config=config,
            do_sample=False,
            max_new_tokens=MAX_NEW,
            pad_token_id=0,
        )
    np.testing.assert_array_equal(out.tokens, hf.numpy())


@pytest.mark.parametrize(
    "method", [Sample(temperature=0.7), Sample(temperature=1.5, top_k=20, top_p=0.9)]
)
def test_sampled_logprobs_equal_teacher_forced(checkpoint, prompts, method):
    from jaxrl_geom.sampling import generate

    _, model, _ = checkpoint
    tokens, mask = prompts
    out = generate(model, tokens, mask, jax.random.key(3), max_new_tokens=MAX_NEW, method=method)
    assert_logprobs_close(out.logprobs, model, out, mask, method.temperature)
    assert np.all(out.logprobs <= 0)


def test_fixed_key_reproduces_and_different_key_differs(checkpoint, prompts):
    from jaxrl_geom.sampling import generate

    _, model, _ = checkpoint
    tokens, mask = prompts
    method = Sample(temperature=0.7)

    def run(seed):
        return generate(model, tokens, mask, jax.random.key(seed), max_new_tokens=MAX_NEW,
                        method=method)  # fmt: skip

    a, b, c = run(3), run(3), run(4)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert (a.completion != c.completion).any()


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_stop_tokens_end_rows_independently(checkpoint, prompts, pad_is_eos):
    from jaxrl_geom.sampling import generate

    _, model, _ = checkpoint
    tokens, mask = prompts
    free = generate(model, tokens, mask, None, max_new_tokens=MAX_NEW)  # greedy, no stop
    stops = (int(free.completion[0, 2]), int(free.completion[1, 4]))
    pad_id = stops[0] if pad_is_eos else 0
    out = generate(model, tokens, mask, None, max_new_tokens=MAX_NEW, stop_tokens=stops,
                   pad_id=pad_id)  # fmt: skip

    # Reference: each row ends at its first stop token in the unconstrained greedy run.
    for b, row in enumerate(free.completion):
        hits = np.flatnonzero(np.isin(row, stops))
        n = hits[0] + 1 if hits.size else MAX_NEW
        assert out.lengths[b] == n
        assert out.truncated[b] == (hits.size == 0)
        np.testing.assert_array_equal(out.completion_mask[b], np.arange(MAX_NEW) < n)
        np.testing.assert_array_equal(out.completion[b, :n], row[:n])
        np.testing.assert_array_equal(out.completion[b, n:], pad_id)
        np.testing.assert_array_equal(out.logprobs[b, n:], 0.0)
        # Same kernels, another stop rule: equal up to a rounding of the log-softmax.
        scale = np.abs(free.logprobs).max()
        assert_f32_close(out.logprobs[b, :n], free.logprobs[b, :n], scale=scale)
    assert len(set(out.lengths.tolist())) > 1  # rows really ended at different steps


def test_no_recompile_within_a_bucket(checkpoint, prompts):
    from jaxrl_geom.sampling import generate
    from jaxrl_geom.sampling.generate import _generate_jit

    _, model, _ = checkpoint
    tokens, mask = prompts
    generate(model, tokens, mask, None, max_new_tokens=MAX_NEW)
    size = _generate_jit._cache_size()
    generate(model, tokens, mask, None, max_new_tokens=MAX_NEW)  # same shapes
    generate(model, tokens[:, 1:], mask[:, 1:], None, max_new_tokens=MAX_NEW - 3)  # same buckets
    generate(model, tokens[:3], mask[:3], None, max_new_tokens=MAX_NEW)  # batch 3 -> bucket 4
    assert _generate_jit._cache_size() == size


def test_eight_devices_match_one(checkpoint, prompts):
    from jax.sharding import Mesh

    from jaxrl_geom.models import load_pretrained
    from jaxrl_geom.sampling import generate

    _, model, path = checkpoint
    tokens, mask = prompts
    devices = np.array(jax.devices()[:8]).reshape(2, 4, 1)
    mesh = Mesh(devices, ("data", "fsdp", "tensor"))
    sharded = load_pretrained(str(path), mesh=mesh)
    method = Sample(temperature=0.9, top_k=30)
    key = jax.random.key(5)
    one = generate(model, tokens, mask, key, max_new_tokens=MAX_NEW, method=method)
    eight = generate(sharded, tokens, mask, key, max_new_tokens=MAX_NEW, method=method, mesh=mesh)
    np.testing.assert_array_equal(eight.tokens, one.tokens)
    # Sharded GEMMs sum in another order: equal up to fp32 rounding of the logits.
    assert_logprobs_close(eight.logprobs, model, one, mask, method.temperature, one.logprobs)


def test_generate_rejects_bad_input(checkpoint, prompts):
    from jaxrl_geom.sampling import generate

    _, model, _ = checkpoint
    tokens, mask = prompts
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, tokens, mask[:, ::-1].copy(), None, max_new_tokens=4)
    with pytest.raises(ValueError, match="must both be"):
        generate(model, tokens[0], mask[0], None, max_new_tokens=4)
    with pytest.raises(ValueError, match="stop_tokens"):
        generate(model, tokens, mask, None, max_new_tokens=4, stop_tokens=(VOCAB,))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tokens, mask, None, max_new_tokens=0)
    with pytest.raises(ValueError, match="PRNG key"):
        generate(model, tokens, mask, None, max_new_tokens=4, method=Sample())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, np.where(mask, VOCAB + 1, 0), mask, None, max_new_tokens=4)
    with pytest.raises(ValueError, match="shards the batch"):
        bad_mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
        generate(model, tokens, mask, None, max_new_tokens=4, mesh=bad_mesh)
