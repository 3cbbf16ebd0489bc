"""Tests for jaxrl_geom.salt.ghost: Gram taps against materialized per-sample gradients.

Reference: ``per_sample_grads`` (``vmap`` of ``jax.grad`` of ONE row's loss through a
batch-of-one forward) and ``gram_from_features``: it never sees the taps, the carrier
or the closed forms. Tiny decoders (vocab 64, hidden 32, 2 layers, 4 heads, 2 kv
heads) cover every parameter kind: kernels, q/k/v biases (qwen2), q/k norms (qwen3,
here with remat), untied and tied LM heads; left-padded prompts.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_geom.models import Decoder, ModelConfig
from jaxrl_geom.salt import (
    SaltConfig,
    SaltKnobs,
    gram_from_features,
    gram_of_loss,
    per_sample_grads,
)
from jaxrl_geom.salt.blocks import tied_cross_gram
from jaxrl_geom.salt.ghost import attach_gram_taps

V, N, T = 64, 6, 9
BASE = ModelConfig.tiny(V, hidden_size=32, num_hidden_layers=2)
ONE_LAYER = dataclasses.replace(BASE, num_hidden_layers=1)
# Two models cover every parameter kind (compiles dominate the test time): llama
# kernels, qwen2 q/k/v biases + untied LM head; qwen3 q/k norms + tied table + remat.
CONFIGS = {
    "qwen2_bias_untied": dataclasses.replace(BASE, model_type="qwen2", attention_bias=True),
    "qwen3_qknorm_tied_remat": dataclasses.replace(
        BASE, model_type="qwen3", qk_norm=True, tie_word_embeddings=True, remat=True
    ),
}
# Per model, a scope: a regex that reads the same on module paths (per-op blocks) and
# on parameter paths (the reference, and attach_gram_taps).
SCOPES = {
    "qwen2_bias_untied": r"layers\.1\.(mlp|input_layernorm)|lm_head|q_proj",
    "qwen3_qknorm_tied_remat": r"embed_tokens|(q|k)_norm|layers\.0\.self_attn\.o_proj",
}


# XLA:CPU compile time dominates these tests; backend optimization level 0 halves it
# (same HLO, so the same semantics).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def run_once(fn, *args, **static):
    """``jax.jit(fn)(*args)``, compiled with FAST_COMPILE (each test calls it once)."""
    return (
        jax.jit(fn, static_argnames=tuple(static))
        .lower(*args, **static)
        .compile(FAST_COMPILE)(*args)
    )


def rel_err(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return np.linalg.norm(x - y) / np.linalg.norm(y)


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.array([9, 7, 4, 9, 2, 6])  # left padding
    mask = np.arange(T)[None, ::-1] < lengths[:, None]  # [N, T]
    tokens = np.where(mask, rng.integers(0, V, (N, T)), 0)  # pads are token 0 (also real)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    cot = rng.normal(size=(N, T, V))  # per-token, per-class loss weights
    return tuple(
        jnp.asarray(a, dt)
        for a, dt in ((tokens, jnp.int32), (positions, jnp.int32), (mask, bool), (cot, jnp.float32))
    )


def row_losses(model, tokens, positions, mask, cot):  # -> [rows]
    """A nonlinear per-row loss touching every position's logits and all parameters."""
    logits, _ = model(tokens, positions, mask)
    logp = jax.nn.log_softmax(logits)  # [rows, T, V]
    return jnp.sum(jnp.where(mask[..., None], cot * logp, 0.0), axis=(1, 2))


def make_params(config):
    model = Decoder(config, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # Move norm scales away from 1 and biases away from 0 so their gradients are generic.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    return graphdef, jax.tree.unflatten(treedef, leaves), rest


@pytest.fixture(scope="module", params=list(CONFIGS))
def problem(request):
    """Per model: reference features (materialized) and tap Grams, each jitted once."""
    name = request.param
    graphdef, params, rest = make_params(CONFIGS[name])
    batch = make_batch()

    def reference_features(params, batch):
        def one_row(params, row):
            model = nnx.merge(graphdef, params, rest)
            return row_losses(model, *(x[None] for x in row))[0]

        return per_sample_grads(one_row, params, batch)

    def tap_grams(params, batch):
        model = nnx.merge(graphdef, params, rest)
        out = {"blocks": gram_of_loss(row_losses, model, *batch, num_rows=N, per_op=True)}
        if name == "qwen3_qknorm_tied_remat":  # the tiled backend, scope through the taps
            kw = dict(backend="tiled", scope=SCOPES[name])
            out["tiled_scoped"] = gram_of_loss(row_losses, model, *batch, num_rows=N, **kw)
            tapped = nnx.merge(*nnx.split(model))
            attach_gram_taps(tapped, N)
            out["logits"] = model(*batch[:3])[0]
            out["tapped_logits"] = tapped(*batch[:3])[0]
        return out

    features = run_once(reference_features, params, batch)
    return name, features, run_once(tap_grams, params, batch)


def test_ghost_gram_equals_per_sample_gram(problem):
    name, features, out = problem
    gram = sum(out["blocks"].values())
    assert rel_err(gram, gram_from_features(features)) < 1e-5, name


def test_per_op_blocks_in_scope_equal_scoped_reference(problem):
    name, features, out = problem
    blocks = out["blocks"]
    selected = [k for k in blocks if re.search(SCOPES[name], k)]
    reference = gram_from_features(features, SCOPES[name])
    assert rel_err(sum(blocks[k] for k in selected), reference) < 1e-5, name
    assert rel_err(reference, gram_from_features(features)) > 1e-2  # a real restriction
    for block in blocks.values():  # each block is itself a Gram: symmetric PSD
        block = np.asarray(block, np.float64)
        np.testing.assert_allclose(block, block.T, rtol=1e-5, atol=1e-6 * np.abs(block).max())
        assert np.linalg.eigvalsh(block).min() > -1e-5 * np.trace(block)


def test_tiled_backend_and_scope_through_the_taps(problem):
    name, features, out = problem
    if "tiled_scoped" not in out:
        pytest.skip("checked on the tied model (tied head through the tiled backend)")
    reference = gram_from_features(features, SCOPES[name])
    assert rel_err(out["tiled_scoped"], reference) < 1e-5


def test_taps_do_not_change_the_forward(problem):
    _, _, out = problem
    if "logits" not in out:
        pytest.skip("checked on the tied model")
    np.testing.assert_array_equal(out["tapped_logits"], out["logits"])


def test_tied_cross_term_numpy_oracle():
    """C_ij = <lookup grad of i, head grad of j>, both as explicit [V, D] matrices."""
    rng = np.random.default_rng(3)
    n, t, s, d, v = 3, 4, 5, 6, 7
    tokens = rng.integers(-1, v + 1, (n, t))  # includes out-of-range ids (contribute 0)
    d_lookup, h = rng.normal(size=(n, t, d)), rng.normal(size=(n, s, d))
    d_logits = rng.normal(size=(n, s, v))
    lookup = np.zeros((n, v, d))
    for i in range(n):
        for k in range(t):
            if 0 <= tokens[i, k] < v:
                lookup[i, tokens[i, k]] += d_lookup[i, k]
    head = np.einsum("jsv,jsd->jvd", d_logits, h)
    expected = np.einsum("ivd,jvd->ij", lookup, head)
    got = tied_cross_gram(*(jnp.asarray(a) for a in (tokens, d_lookup, h, d_logits)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_sketch_error_shrinks_and_respects_bound():
    """Sketched dense blocks: unbiased Kronecker JL with per-entry
    std <= c(k) ||phi_i|| ||phi_j||, c(k) = sqrt(4/k + 4/k^2) (salt.gram.sketch_dense_gram
    with k_in = k_out = k). Summed over layers (triangle inequality, then Cauchy-Schwarz)
    E ||K_hat - K||_F^2 <= c(k)^2 trace(K)^2."""
    graphdef, params, rest = make_params(ONE_LAYER)
    batch = make_batch(1)
    scope = r"mlp|self_attn"  # dense kernels only: every block is sketched
    dims, seeds = (4, 64), (0, 1)

    def exact_gram(params, batch):
        model = nnx.merge(graphdef, params, rest)
        return gram_of_loss(row_losses, model, *batch, num_rows=N, scope=scope, backend="ghost")

    def sketch_gram(params, batch, seed, k):  # the seed is traced: one compile per k
        model = nnx.merge(graphdef, params, rest)
        kw = dict(scope=scope, backend="sketch", sketch_dim=k, seed=seed)
        return gram_of_loss(row_losses, model, *batch, num_rows=N, **kw)

    exact = run_once(exact_gram, params, batch)
    sketches = {}
    for k in dims:
        compiled = jax.jit(sketch_gram, static_argnames="k").lower(params, batch, 0, k=k)
        compiled = compiled.compile(FAST_COMPILE)
        sketches.update({(k, s): compiled(params, batch, s) for s in seeds})
    exact = np.asarray(exact, np.float64)
    errors = {
        k: [np.linalg.norm(sketches[k, s] - exact) / np.trace(exact) for s in seeds] for k in dims
    }
    for k in dims:
        bound = np.sqrt(4 / k + 4 / k**2)
        assert max(errors[k]) < 3 * bound, (k, errors[k], bound)
    assert np.mean(errors[64]) < 0.5 * np.mean(errors[4]), errors
    # Different seeds give different projections (not a cached constant).
    assert rel_err(sketches[64, 0], sketches[64, 1]) > 0


def test_attach_selects_the_scope_and_leaves_the_model_alone():
    model = Decoder(dataclasses.replace(ONE_LAYER, tie_word_embeddings=True), rngs=nnx.Rngs(0))
    tapped = nnx.merge(*nnx.split(model))
    paths = attach_gram_taps(tapped, N, scope=r"embed|layers\.0\.mlp\.up")
    assert paths == ("embed_tokens.embedding", "layers.0.mlp.up_proj.kernel")
    assert tapped.layers[0].mlp.gate_proj.gram_tap is None
    assert model.embed_tokens.gram_tap is None  # the original model is untouched


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scope=r"no_such_param"), "selects no parameter"),
        (dict(backend="exact"), "backend must be one of"),
        (dict(scope=3), "scope must be None"),
    ],
)
def test_bad_tap_arguments_are_clear_errors(kwargs, match):
    model = Decoder(BASE, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        attach_gram_taps(model, N, **kwargs)


def test_per_row_losses_are_required():
    model = Decoder(BASE, rngs=nnx.Rngs(0))
    tokens, positions, mask, cot = make_batch()
    summed = lambda m, *b: jnp.sum(row_losses(m, *b))
    with pytest.raises(ValueError, match="per-row losses"):
        gram_of_loss(summed, model, tokens, positions, mask, cot)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(backend="dense"), "backend must be one of"),
        (dict(sketch_dim=0), "sketch_dim must be a positive int"),
        (dict(scope="("), "not a valid regular expression"),
        (dict(scope=lambda p, x: True), "must be None or a regex"),
        (dict(knobs=dict(gamma_max=1.0)), "must be a jaxrl_geom.salt.SaltKnobs"),
        (dict(keep_budget_gib=-1.0), "keep_budget_gib"),
    ],
)
def test_salt_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SaltConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gamma_max=-1.0), "gamma_max"),
        (dict(rank=2, energy=0.5), "either rank"),
        (dict(zero_advantage="drop"), "zero_advantage must be one of"),
    ],
)
def test_salt_knobs_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SaltKnobs(**kwargs)


def test_salt_config_is_hashable_and_identity_flag():
    assert hash(SaltConfig()) == hash(SaltConfig())
    assert SaltKnobs(gamma_max=0.0).is_identity
    assert not SaltKnobs(gamma_max=0.0, recenter=True).is_identity
