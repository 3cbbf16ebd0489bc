"""Tests for jaxrl_geom.sampling: methods (vs HF warpers and a NumPy oracle) and generate()."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
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
    covered = bool(method._candidates_cover(jnp.asarray(logits)))
    assert covered == (scale > 1.0)  # both branches of the lax.cond are exercised


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
