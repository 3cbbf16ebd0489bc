"""Tests for jaxrl_geom.salt.transform: salt() as the first link of an optax chain."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_geom.salt import SaltState, per_sample_grads, reweight, salt

N = 6


@pytest.fixture(scope="module")
def problem():
    """Per-sample features of a tiny two-layer model, with group-relative coefficients."""
    rng = np.random.default_rng(0)
    params = {
        "mlp": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
        "head": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
    }
    batch = {
        "x": jnp.asarray(rng.normal(size=(N, 5, 4)), jnp.float32),
        "c": jnp.asarray(rng.normal(size=(N, 5, 2)), jnp.float32),
    }

    def loss_per_unit_coefficient(params, ex):  # one rollout, no advantage
        h = jnp.tanh(ex["x"] @ params["mlp"]["kernel"])
        return -jnp.mean(jax.nn.log_softmax(h @ params["head"]["kernel"]) * ex["c"])

    feats = per_sample_grads(loss_per_unit_coefficient, params, batch)  # leaves [N, ...]
    coefficients = jnp.asarray([-0.7, -0.1, 0.8, 0.93, -1.87, 0.93], jnp.float32)  # kappa < 0.5
    group_ids = jnp.asarray([0, 0, 0, 1, 1, 1], jnp.int32)
    return params, feats, coefficients, group_ids


def numpy_gram(feats, keys):
    phi = np.concatenate(
        [np.reshape(np.asarray(feats[k]["kernel"], np.float64), (N, -1)) for k in keys], axis=1
    )
    return phi @ phi.T


def numpy_combine(feats, a):
    return jax.tree_util.tree_map(
        lambda g: np.tensordot(np.asarray(a, np.float64), np.asarray(g, np.float64), axes=1), feats
    )


@pytest.mark.parametrize("scope", [None, "mlp", lambda path, leaf: path.startswith("head")])
def test_output_is_reweighted_sum_over_all_leaves(problem, scope):
    params, feats, a, ids = problem
    tx = salt(gamma_max=1.5, rank=1, recenter=True, scope=scope)
    state = tx.init(params)
    out, state = tx.update(feats, state, params, coefficients=a, group_ids=ids)
    keys = {None: ["mlp", "head"], "mlp": ["mlp"]}.get(scope, ["head"])
    gram = numpy_gram(feats, keys)  # scope restricts the Gram only
    a_new, diag = reweight(gram.astype(np.float32), a, ids, gamma_max=1.5, rank=1, recenter=True)
    assert float(diag.gamma) > 0
    expected = numpy_combine(feats, a_new)  # over ALL leaves
    for k in ("mlp", "head"):
        assert out[k]["kernel"].shape == params[k]["kernel"].shape
        np.testing.assert_allclose(out[k]["kernel"], expected[k]["kernel"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(optax.tree.get(state, "kappa_before"), diag.kappa_before, rtol=1e-5)
    assert int(state.count) == 1 and int(optax.tree.get(state, "rank")) == 1


def test_gamma_zero_gives_plain_gradient(problem):
    params, feats, a, ids = problem
    tx = salt(gamma_max=0.0)
    out, _ = tx.update(feats, tx.init(params), params, coefficients=a, group_ids=ids)
    expected = numpy_combine(feats, a)
    for k in ("mlp", "head"):
        np.testing.assert_allclose(out[k]["kernel"], expected[k]["kernel"], rtol=1e-5, atol=1e-7)


def test_chain_with_clip_and_adamw_under_jit(problem):
    params, feats, a, ids = problem
    tx = optax.chain(salt(gamma_max=1.0), optax.clip_by_global_norm(1.0), optax.adamw(1e-3))

    @jax.jit
    def step(params, opt_state, feats, a, ids):
        updates, opt_state = tx.update(
            feats, opt_state, params, coefficients=a, group_ids=ids, activation_stats={}
        )
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    new_params, opt_state = step(params, opt_state, feats, a, ids)
    new_params, opt_state = step(new_params, opt_state, feats, -a, ids)
    assert step._cache_size() == 1  # the second step does not recompile

    # Independent replay: reweight -> sum -> the plain optax chain, two steps.
    plain = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    ref_params, ref_state = params, plain.init(params)
    gram = numpy_gram(feats, ["mlp", "head"]).astype(np.float32)
    for coef in (a, -a):
        a_new, _ = reweight(gram, coef, ids)
        grads = jax.tree_util.tree_map(jnp.asarray, numpy_combine(feats, a_new))
        grads = jax.tree_util.tree_map(lambda g: g.astype(jnp.float32), grads)
        upd, ref_state = plain.update(grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, upd)
    for k in ("mlp", "head"):
        np.testing.assert_allclose(
            new_params[k]["kernel"], ref_params[k]["kernel"], rtol=1e-5, atol=1e-6
        )
    salt_state = opt_state[0]
    assert isinstance(salt_state, SaltState) and int(salt_state.count) == 2
    assert bool(optax.tree.get(opt_state, "ok"))


def test_non_finite_features_flagged_under_jit(problem):
    params, feats, a, ids = problem
    bad = jax.tree_util.tree_map(lambda g: g.at[0].set(jnp.nan), feats)
    tx = salt()
    _, state = jax.jit(lambda f, s: tx.update(f, s, coefficients=a))(bad, tx.init(params))
    assert not bool(state.diagnostics.ok)


def test_wrong_leading_axis_raises(problem):
    params, feats, a, _ = problem
    tx = salt()
    state = tx.init(params)
    with pytest.raises(ValueError, match="must come FIRST"):
        tx.update(params, state, params, coefficients=a)  # an ordinary gradient
    with pytest.raises(ValueError, match="must come FIRST"):
        tx.update(feats, state, params, coefficients=a[:4])
    with pytest.raises(ValueError, match="coefficients="):
        tx.update(feats, state, params)
    chained = optax.chain(optax.clip_by_global_norm(1.0), salt())
    with pytest.raises(ValueError, match="must come FIRST"):
        chained.update(params, chained.init(params), params, coefficients=a)


def test_bad_knobs_raise_at_construction():
    with pytest.raises(ValueError, match="renorm"):
        salt(renorm="l2")
    with pytest.raises(ValueError, match="scope"):
        salt(scope=3)
    with pytest.raises(ValueError, match="not both"):
        salt(rank=2, energy=0.5)
    with pytest.raises(ValueError, match="gamma_max"):
        salt(gamma_max=-1.0)
