"""Tests for jaxrl_geom.salt.gram: every backend against explicit per-sample gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_geom.param_paths import path_to_str
from jaxrl_geom.salt.gram import (
    choose_backend,
    dense_ghost_gram,
    dense_gram,
    dense_tiled_gram,
    embedding_ghost_gram,
    gram_from_features,
    per_sample_grads,
    scale_gram,
    sketch_dense_gram,
    sketch_variance,
)

N, T, D_IN, D_OUT = 5, 6, 7, 10


def explicit_gram(loss_fn, params, batch):
    """Reference: one jax.grad per sample in a Python loop, Gram in float64 NumPy."""
    rows = []
    for i in range(N):
        example = jax.tree_util.tree_map(lambda x, i=i: x[i], batch)
        grads = jax.grad(loss_fn)(params, example)
        rows.append(np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(grads)]))
    phi = np.asarray(rows, np.float64)  # [N, P]
    return phi @ phi.T


def rel_err(x, y):
    return np.linalg.norm(np.asarray(x, np.float64) - y) / np.linalg.norm(y)


@pytest.fixture(scope="module")
def dense_problem():
    """A tiny dense layer with a padded, nonlinear per-sample loss."""
    rng = np.random.default_rng(0)
    params = {
        "kernel": jnp.asarray(rng.normal(size=(D_IN, D_OUT)) / 3, jnp.float32),
        "bias": jnp.asarray(rng.normal(size=(D_OUT,)), jnp.float32),
    }
    lengths = np.array([6, 3, 1, 5, 4])
    batch = {
        "x": jnp.asarray(rng.normal(size=(N, T, D_IN)), jnp.float32),
        "mask": jnp.asarray(np.arange(T)[None, :] < lengths[:, None], jnp.float32),
        "c": jnp.asarray(rng.normal(size=(N, T, D_OUT)), jnp.float32),
    }

    def forward(params, x):  # [T, d_in] -> [T, d_out]
        return x @ params["kernel"] + params["bias"]

    def readout(y, ex):  # masked nonlinear loss of one sample
        return jnp.sum(ex["mask"][:, None] * jnp.tanh(y) * ex["c"])

    def loss_fn(params, ex):
        return readout(forward(params, ex["x"]), ex)

    # Output cotangent d = dloss/dy, per sample (what a layer tap sees in its backward).
    y = jax.vmap(forward, in_axes=(None, 0))(params, batch["x"])  # [N, T, d_out]
    d = jax.vmap(jax.grad(readout))(y, batch)  # [N, T, d_out]
    return params, batch, loss_fn, d


def test_per_sample_grads_vmap_and_chunked_match_loop(dense_problem):
    params, batch, loss_fn, _ = dense_problem
    full = per_sample_grads(loss_fn, params, batch)
    chunked = per_sample_grads(loss_fn, params, batch, chunk_size=2)  # 5 = 2 + 2 + 1
    for i in range(N):
        ex = jax.tree_util.tree_map(lambda x, i=i: x[i], batch)
        one = jax.grad(loss_fn)(params, ex)
        for key in params:
            np.testing.assert_allclose(full[key][i], one[key], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(chunked[key][i], one[key], rtol=1e-5, atol=1e-6)
    ref = explicit_gram(loss_fn, params, batch)
    assert rel_err(gram_from_features(full), ref) <= 1e-5


@pytest.mark.parametrize("bias", [False, True])
def test_dense_ghost_and_tiled_match_explicit(dense_problem, bias):
    params, batch, loss_fn, d = dense_problem
    sub = params if bias else {"kernel": params["kernel"]}
    full = lambda p, ex: loss_fn({**params, **p}, ex)
    ref = explicit_gram(full, sub, batch)
    x = batch["x"]
    assert rel_err(dense_ghost_gram(x, d, bias), ref) <= 1e-5
    assert rel_err(dense_ghost_gram(x, d, bias, chunk_size=2), ref) <= 1e-5  # lax.map path
    assert rel_err(dense_tiled_gram(x, d, 4, bias=bias), ref) <= 1e-5  # 10 = 4 + 4 + 2(pad)
    assert rel_err(dense_tiled_gram(x, d, 64, bias=bias), ref) <= 1e-5  # one tile
    for backend in ("auto", "ghost", "tiled"):
        assert rel_err(dense_gram(x, d, bias=bias, backend=backend, tile=3), ref) <= 1e-5


def test_ghost_under_jit(dense_problem):
    _, batch, _, d = dense_problem
    eager = dense_ghost_gram(batch["x"], d)
    jitted = jax.jit(dense_ghost_gram, static_argnames=("bias", "chunk_size"))
    np.testing.assert_allclose(jitted(batch["x"], d, chunk_size=3), eager, rtol=1e-5)


def test_embedding_ghost_matches_explicit():
    rng = np.random.default_rng(1)
    vocab, dim = 7, 4
    table = jnp.asarray(rng.normal(size=(vocab, dim)), jnp.float32)
    tokens = rng.integers(0, vocab, size=(N, T))
    tokens[1, 2] = -1  # out of range (e.g. a -1 pad id): contributes nothing
    tokens[3, 0] = vocab
    batch = {
        "tokens": jnp.asarray(tokens, jnp.int32),
        "c": jnp.asarray(rng.normal(size=(N, T, dim)), jnp.float32),
    }

    def lookup(table, tok):  # one_hot semantics: rows for out-of-range ids are zero
        return jax.nn.one_hot(tok, vocab) @ table  # [T, D]

    def readout(y, ex):
        return jnp.sum(jnp.sin(y) * ex["c"])

    loss_fn = lambda table, ex: readout(lookup(table, ex["tokens"]), ex)
    ref = explicit_gram(loss_fn, table, batch)
    y = jax.vmap(lookup, in_axes=(None, 0))(table, batch["tokens"])
    d = jax.vmap(jax.grad(readout))(y, batch)  # [N, T, D]
    assert rel_err(embedding_ghost_gram(batch["tokens"], d, vocab), ref) <= 1e-5
    chunked = embedding_ghost_gram(batch["tokens"], d, vocab, chunk_size=2)
    assert rel_err(chunked, ref) <= 1e-5


def test_scale_gram_matches_explicit():
    rng = np.random.default_rng(2)
    dim = 8
    scale = jnp.asarray(rng.normal(size=(dim,)), jnp.float32)
    raw = rng.normal(size=(N, T, dim))
    xhat = raw / np.sqrt(np.mean(raw**2, axis=-1, keepdims=True) + 1e-6)  # RMS-normalized
    batch = {
        "xhat": jnp.asarray(xhat, jnp.float32),
        "c": jnp.asarray(rng.normal(size=(N, T, dim)), jnp.float32),
    }
    readout = lambda y, ex: jnp.sum(jnp.tanh(y) * ex["c"])
    loss_fn = lambda scale, ex: readout(ex["xhat"] * scale, ex)
    ref = explicit_gram(loss_fn, scale, batch)
    d = jax.vmap(jax.grad(readout))(batch["xhat"] * scale, batch)
    assert rel_err(scale_gram(batch["xhat"], d), ref) <= 1e-5


def test_choose_backend_rule():
    # Hand-evaluated: ghost iff N T^2 (d_in + d_out) < d_in d_out (T + N).
    assert choose_backend(4, 8, 512, 512) == "ghost"  # 262,144 < 3,145,728
    assert choose_backend(16, 256, 2048, 2048) == "tiled"  # 4.29e9 > 1.14e9
    assert choose_backend(1, 2, 1, 2) == "tiled"  # 1*4*3 = 12 > 2*3 = 6
    assert choose_backend(2, 2, 4, 4) == "tiled"  # 2*4*8 = 64 == 16*4 = 64: not strictly less
    assert choose_backend(2, 2, 5, 4) == "ghost"  # 2*4*9 = 72 < 20*4 = 80


def test_gram_from_features_scope_and_paths():
    rng = np.random.default_rng(3)
    feats = {
        "layers": [
            {
                "mlp": {"kernel": rng.normal(size=(N, 3, 2))},
                "attn": {"kernel": rng.normal(size=(N, 4))},
            },
        ],
        "head": rng.normal(size=(N, 2)),
    }
    flat = lambda *leaves: np.concatenate([np.reshape(x, (N, -1)) for x in leaves], axis=1)
    mlp = feats["layers"][0]["mlp"]["kernel"]
    attn = feats["layers"][0]["attn"]["kernel"]
    every = flat(mlp, attn, feats["head"])
    np.testing.assert_allclose(gram_from_features(feats), every @ every.T, rtol=1e-5)
    only = flat(mlp, attn)
    np.testing.assert_allclose(gram_from_features(feats, r"^layers\."), only @ only.T, rtol=1e-5)
    picked = gram_from_features(feats, lambda path, leaf: path == "layers.0.mlp.kernel")
    np.testing.assert_allclose(picked, flat(mlp) @ flat(mlp).T, rtol=1e-5)
    paths = [path_to_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(feats)]
    assert paths == ["head", "layers.0.attn.kernel", "layers.0.mlp.kernel"]
    state = nnx.split(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Param)[1]
    assert sorted(path_to_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)) == [
        "bias",
        "kernel",
    ]
    with pytest.raises(ValueError, match="selects no parameter"):
        gram_from_features(feats, "lm_head")
    with pytest.raises(ValueError, match="same leading"):
        gram_from_features({"a": np.ones((N, 2)), "b": np.ones((N + 1, 2))})
    with pytest.raises(ValueError, match="x \\[N, T, d_in\\]"):
        dense_ghost_gram(jnp.ones((N, D_IN)), jnp.ones((N, D_OUT)))


# ---------------------------------------------------------------------------------------
# Sketch: unbiased, variance as derived, error shrinks with k and stays within the bound
# ---------------------------------------------------------------------------------------


def test_sketch_unbiased_with_stated_variance(dense_problem):
    _, batch, _, d = dense_problem
    x, d = batch["x"][:3], d[:3]  # [3, T, 7], [3, T, 10]
    k_in, k_out, draws = 3, 2, 10000
    exact = np.asarray(dense_ghost_gram(x, d), np.float64)
    keys = jax.random.split(jax.random.key(0), draws)
    sketches = np.asarray(
        jax.jit(jax.vmap(lambda key: sketch_dense_gram(x, d, key, k_in, k_out)))(keys), np.float64
    )  # [draws, 3, 3]
    phi = np.einsum("ntd,nte->nde", x, d)  # [3, d_in, d_out]
    var = np.array(
        [[float(sketch_variance(phi[i], phi[j], k_in, k_out)) for j in range(3)] for i in range(3)]
    )
    # Unbiased: the mean is within 5 standard errors of the exact Gram.
    assert np.all(np.abs(sketches.mean(0) - exact) <= 5 * np.sqrt(var / draws))
    # The derived variance matches the empirical one (sampling error of a variance ~5%).
    np.testing.assert_allclose(sketches.var(0), var, rtol=0.2)
    # Stated bound: Var <= ||phi_i||^2 ||phi_j||^2 (2/k_in + 2/k_out + 4/(k_in k_out)).
    norms = np.linalg.norm(phi.reshape(3, -1), axis=1)
    bound = np.outer(norms, norms) ** 2 * (2 / k_in + 2 / k_out + 4 / (k_in * k_out))
    assert np.all(var <= bound)


def test_sketch_error_shrinks_with_k_and_respects_bound():
    rng = np.random.default_rng(4)
    n, t, dim = 4, 8, 48
    x = jnp.asarray(rng.normal(size=(n, t, dim)), jnp.float32)
    d = jnp.asarray(rng.normal(size=(n, t, dim)), jnp.float32)
    exact = np.asarray(dense_ghost_gram(x, d), np.float64)
    norms = np.sqrt(np.diag(exact))
    keys = jax.random.split(jax.random.key(1), 16)
    errors = []
    for k in (2, 8, 32):
        sketches = jax.jit(jax.vmap(lambda key, k=k: sketch_dense_gram(x, d, key, k, k)))(keys)
        mse = np.mean((np.asarray(sketches, np.float64) - exact) ** 2, axis=0)  # [n, n]
        bound = np.outer(norms, norms) ** 2 * (4 / k + 4 / k**2)
        assert np.all(mse <= 2.0 * bound)  # 16 draws: a 2x allowance for sampling noise
        errors.append(np.sqrt(mse.sum()) / np.linalg.norm(exact))
    assert errors[0] > 1.5 * errors[1] > 2.25 * errors[2]  # ~ 1/sqrt(k): 2x per 4x in k


def test_sketch_bias_term_is_exact(dense_problem):
    _, batch, _, d = dense_problem
    key = jax.random.key(2)
    with_bias = sketch_dense_gram(batch["x"], d, key, 4, 4, bias=True)
    without = sketch_dense_gram(batch["x"], d, key, 4, 4)
    sums = np.asarray(d, np.float64).sum(1)
    np.testing.assert_allclose(with_bias - without, sums @ sums.T, rtol=1e-4, atol=1e-4)
