"""Tests for jaxrl_geom.salt.reweight against a float64 NumPy oracle written from SPEC 2."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_f32_close

from jaxrl_geom.salt import cancellation, reweight
from jaxrl_geom.salt.reweight import DEFAULT_ENERGY, _reweight

# ---------------------------------------------------------------------------------------
# Independent oracle: SPEC section 2, line by line, float64, no shared code.
# ---------------------------------------------------------------------------------------


def oracle(
    gram,
    a,
    group_ids=None,
    *,
    gamma_max=1.0,
    power=1.0,
    rank=None,
    energy=None,
    max_rank=None,
    renorm="update_norm",
    recenter=False,
):
    k = np.asarray(gram, np.float64)
    k = (k + k.T) / 2
    a = np.asarray(a, np.float64)
    n = a.shape[0]

    def kappa(x):  # a^T K a / (a^T diag(K) a)
        den = x @ np.diag(np.diag(k)) @ x
        return 1.0 if den == 0 else (x @ k @ x) / den

    lam, v = np.linalg.eigh(k)
    order = np.argsort(lam)[::-1]  # descending
    lam, v = np.clip(lam[order], 0, None), v[:, order]
    trace = lam.sum()
    if rank is not None:
        r = rank
    else:
        tau = DEFAULT_ENERGY if energy is None else energy
        r = min(q for q in range(n + 1) if lam[:q].sum() >= tau * trace)
    r = min(r, n if max_rank is None else max_rank, n)
    proj = v[:, :r] @ v[:, :r].T  # P = V_r V_r^T
    kb = kappa(a)
    severity = float(np.clip(1 - kb, 0, 1))
    gamma = gamma_max * severity**power
    a_sh = proj @ a
    a_res = (np.eye(n) - proj) @ a
    a_new = a_sh + (1 + gamma) * a_res
    if recenter:
        ids = np.zeros(n, int) if group_ids is None else np.asarray(group_ids)
        for g in np.unique(ids):
            a_new[ids == g] -= a_new[ids == g].mean()
    if renorm == "update_norm":
        a_new = a_new * np.sqrt((a @ k @ a) / (a_new @ k @ a_new))
    elif renorm == "coef_norm":
        a_new = a_new * np.linalg.norm(a) / np.linalg.norm(a_new)
    p = lam / trace
    p = p[p > 0]
    diag = dict(
        kappa_before=kb,
        kappa_after=kappa(a_new),
        rank=r,
        gamma=gamma,
        severity=severity,
        effective_rank=np.exp(-(p * np.log(p)).sum()),
        top_eig_share=lam[0] / trace,
        coef_norm_ratio=np.linalg.norm(a_new) / np.linalg.norm(a),
    )
    # Conditioning of this draw: float32 cannot resolve an energy rank whose cumulative
    # sum sits on the threshold, nor a projector across a tiny eigen-gap.
    cums = np.concatenate([[0.0], np.cumsum(lam)])
    tau = DEFAULT_ENERGY if energy is None else energy
    energy_margin = np.min(np.abs(cums[:-1] - tau * trace)) / trace  # cums[-1] always passes
    gap = (lam[r - 1] - lam[r]) / lam[0] if 0 < r < n else 1.0
    return a_new, diag, (energy_margin if rank is None else 1.0, gap)


def cancelling_problem(seed, n=8, p=24, m=2):
    """Features with a low-rank signed shared part and group-centered coefficients."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(3, p))
    phi = rng.normal(size=(n, 3)) * [3.0, 1.5, 0.7] @ basis + rng.normal(size=(n, p))
    phi *= rng.uniform(0.5, 2.0, size=(n, 1))  # unequal per-sample norms
    group_ids = np.repeat(np.arange(m), n // m)
    a = rng.normal(size=n)
    for g in range(m):
        a[group_ids == g] -= a[group_ids == g].mean()  # group-relative
    return (phi @ phi.T).astype(np.float32), a.astype(np.float32), group_ids.astype(np.int32)


def well_conditioned(seed, **kwargs):
    """First seed >= seed whose draw float32 can resolve (see oracle's margin)."""
    for s in range(seed, seed + 200):
        gram, a, ids = cancelling_problem(s)
        _, ref, (energy_margin, gap) = oracle(gram, a, ids, **kwargs)
        if energy_margin > 1e-3 and gap > 0.02 and ref["severity"] > 0.05:
            return gram, a, ids
    raise AssertionError("no well-conditioned draw")


def rel_err(x, y):
    return np.linalg.norm(np.asarray(x, np.float64) - y) / max(np.linalg.norm(y), 1e-30)


CONFIGS = [
    dict(),
    dict(rank=1),
    dict(rank=3, renorm="coef_norm"),
    dict(energy=0.6, renorm="none"),
    dict(energy=0.99, max_rank=2),
    dict(energy=1.0, gamma_max=2.5, power=0.5),
    dict(rank=2, recenter=True),
    dict(energy=0.8, recenter=True, renorm="coef_norm", power=2.0),
    dict(rank=12),  # capped by N: P = I, a' = a up to rounding
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=[str(c) for c in CONFIGS])
@pytest.mark.parametrize("seed", [0, 100])
def test_matches_numpy_oracle(kwargs, seed):
    gram, a, ids = well_conditioned(seed, **kwargs)
    ref_a, ref, _ = oracle(gram, a, ids, **kwargs)
    got_a, got = reweight(gram, a, ids, **kwargs)
    assert rel_err(got_a, ref_a) <= 1e-5
    assert int(got.rank) == ref["rank"]
    for name in ("kappa_before", "kappa_after", "gamma", "severity", "effective_rank"):
        np.testing.assert_allclose(float(getattr(got, name)), ref[name], rtol=1e-5, atol=1e-6)
    for name in ("top_eig_share", "coef_norm_ratio"):
        np.testing.assert_allclose(float(getattr(got, name)), ref[name], rtol=1e-5, atol=1e-6)
    assert bool(got.ok)


def test_recenter_num_groups_and_none_group_ids():
    gram, a, ids = well_conditioned(3, rank=2, recenter=True)
    ref_a, _, _ = oracle(gram, a, ids, rank=2, recenter=True)
    got_seg, _ = reweight(gram, a, ids, rank=2, recenter=True, num_groups=2)
    assert rel_err(got_seg, ref_a) <= 1e-5
    ref_one, _, _ = oracle(gram, a, None, rank=2, recenter=True)  # one group
    got_one, _ = reweight(gram, a, None, rank=2, recenter=True)
    assert rel_err(got_one, ref_one) <= 1e-5
    for g in range(2):  # recentered, then uniformly scaled: group means stay zero
        assert abs(float(jnp.mean(got_seg[ids == g]))) < 1e-5


def test_jit_matches_eager_and_knobs_do_not_recompile():
    gram, a, ids = well_conditioned(5)
    f = jax.jit(lambda k, c, g: reweight(k, c, g, gamma_max=1.5, rank=2)[0])
    eager, _ = reweight(gram, a, ids, gamma_max=1.5, rank=2)
    np.testing.assert_allclose(f(gram, a, ids), eager, rtol=1e-6, atol=1e-7)
    reweight(gram, a, ids, gamma_max=1.0)
    size = _reweight._cache_size()
    other, _ = reweight(gram, a, ids, gamma_max=2.0, power=0.5, energy=0.7)
    reweight(gram, a, None, rank=3, max_rank=2, renorm="none", recenter=True)
    assert _reweight._cache_size() == size  # knobs are traced, not static
    assert not np.allclose(other, eager)


# ---------------------------------------------------------------------------------------
# Exact identities and invariances
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("renorm", ["update_norm", "coef_norm", "none"])
def test_gamma_zero_is_exact_identity(renorm):
    gram, a, ids = cancelling_problem(7)
    got, diag = reweight(gram, a, ids, gamma_max=0.0, renorm=renorm)
    np.testing.assert_array_equal(np.asarray(got), a)  # bit-for-bit
    assert float(diag.gamma) == 0.0 and float(diag.coef_norm_ratio) == 1.0
    got_jit, _ = jax.jit(lambda k, c: reweight(k, c, gamma_max=0.0, renorm=renorm))(gram, a)
    np.testing.assert_array_equal(np.asarray(got_jit), a)


@pytest.mark.parametrize("recenter", [False, True])
def test_permutation_equivariance(recenter):
    gram, a, ids = well_conditioned(11, rank=2)
    perm = np.random.default_rng(0).permutation(a.shape[0])
    base, d0 = reweight(gram, a, ids, rank=2, recenter=recenter)
    permuted, d1 = reweight(gram[perm][:, perm], a[perm], ids[perm], rank=2, recenter=recenter)
    assert rel_err(permuted, np.asarray(base)[perm]) <= 1e-5
    np.testing.assert_allclose(float(d1.kappa_after), float(d0.kappa_after), rtol=1e-5)


@pytest.mark.parametrize("scale", [1e-6, 3.0, 1e6])
def test_gram_scale_invariance(scale):
    gram, a, ids = well_conditioned(13)
    base, _ = reweight(gram, a, ids)
    scaled, _ = reweight(gram * np.float32(scale), a, ids)
    assert rel_err(scaled, np.asarray(base, np.float64)) <= 1e-5


@pytest.mark.parametrize("recenter", [False, True])
def test_renormalization_holds(recenter):
    gram, a, ids = well_conditioned(17)
    k = gram.astype(np.float64)
    new, diag = reweight(gram, a, ids, renorm="update_norm", recenter=recenter)
    new = np.asarray(new, np.float64)
    assert float(diag.gamma) > 0
    np.testing.assert_allclose(new @ k @ new, a @ k @ a, rtol=1e-5)
    new, diag = reweight(gram, a, ids, renorm="coef_norm", recenter=recenter)
    np.testing.assert_allclose(np.linalg.norm(new), np.linalg.norm(a), rtol=1e-6)
    np.testing.assert_allclose(float(diag.coef_norm_ratio), 1.0, rtol=1e-6)


def test_channels_shared_kept_residual_amplified():
    """P a' = c P a and (I - P) a' = c (1 + gamma) (I - P) a, with P from the Gram."""
    gram, a, ids = well_conditioned(19, rank=2)
    new, diag = reweight(gram, a, ids, rank=2, renorm="none")
    lam, v = np.linalg.eigh(gram.astype(np.float64))
    proj = v[:, -2:] @ v[:, -2:].T  # top-2 eigenvectors
    g = float(diag.gamma)
    assert g > 0.05
    # float32 eigh: projector error ~ eps32 * lambda_max / gap (Davis-Kahan), times ||a||
    scale = 2 * np.linalg.norm(a) * lam[-1] / (lam[-2] - lam[-3])
    assert_f32_close(proj @ new, proj @ a, scale=scale, ops=4 * len(a))
    assert_f32_close(new - proj @ new, (1 + g) * (a - proj @ a), scale=scale, ops=4 * len(a))


def test_constructed_shared_direction_cancels_and_residual_grows():
    """phi_i = s_i u + noise_i with mixed signs: kappa < 1 and SALT boosts the part of the
    update orthogonal to the shared direction u relative to the part along u."""
    rng = np.random.default_rng(0)
    n, p = 8, 32
    u = rng.normal(size=p)
    u /= np.linalg.norm(u)
    s = rng.uniform(1.0, 2.0, size=n) * np.array([1, -1] * (n // 2))
    phi = s[:, None] * u + 0.15 * rng.normal(size=(n, p))
    a = np.array([1.0, 1.0, -0.5, 0.8, -1.0, 0.3, 0.6, -1.2], np.float32)
    gram = (phi @ phi.T).astype(np.float32)
    new, diag = reweight(gram, a, rank=1, gamma_max=1.0)
    assert float(diag.kappa_before) < 1.0 and float(diag.gamma) > 0.1

    def off_over_along(coef):
        update = np.asarray(coef, np.float64) @ phi
        along = update @ u
        return np.linalg.norm(update - along * u) / abs(along)

    growth = off_over_along(new) / off_over_along(a)
    assert growth > 1 + 0.5 * float(diag.gamma)
    # Note: SPEC's kappa does NOT rise here: the residual channel is the low-eigenvalue
    # (cancelling) part of sample space, so amplifying it lowers kappa(a').
    assert float(diag.kappa_after) <= float(diag.kappa_before) + 1e-6


# ---------------------------------------------------------------------------------------
# Degenerate inputs
# ---------------------------------------------------------------------------------------


def _all_finite(a_new, diag):
    return bool(np.all(np.isfinite(a_new))) and all(
        bool(np.all(np.isfinite(np.asarray(x)))) for x in diag
    )


def test_zero_gram_is_noop():
    a = np.array([1.0, -2.0, 0.5], np.float32)
    new, diag = reweight(np.zeros((3, 3), np.float32), a, gamma_max=3.0)
    np.testing.assert_array_equal(np.asarray(new), a)
    assert float(diag.kappa_before) == 1.0 and float(diag.gamma) == 0.0
    assert int(diag.rank) == 0 and float(diag.effective_rank) == 0.0
    assert _all_finite(new, diag)


def test_rank_deficient_gram():
    rng = np.random.default_rng(2)
    phi = rng.normal(size=(6, 2)) @ rng.normal(size=(2, 10))  # rank 2
    gram = (phi @ phi.T).astype(np.float32)
    a = rng.normal(size=6).astype(np.float32)
    new, diag = reweight(gram, a, energy=0.999)
    assert int(diag.rank) <= 2 and _all_finite(new, diag)
    ref_effective_rank = oracle(gram, a)[1]["effective_rank"]
    np.testing.assert_allclose(float(diag.effective_rank), ref_effective_rank, rtol=1e-3)
    # a' = a + gamma (I-P) a with P spanning the range of K: Phi^T a' == c Phi^T a.
    upd_new, upd = np.asarray(new) @ phi, a @ phi
    np.testing.assert_allclose(np.linalg.norm(upd_new), np.linalg.norm(upd), rtol=1e-4)


def test_zero_coefficients():
    gram, _, _ = cancelling_problem(0)
    for renorm in ("update_norm", "coef_norm", "none"):
        new, diag = reweight(gram, np.zeros(8, np.float32), renorm=renorm, recenter=True)
        np.testing.assert_array_equal(np.asarray(new), 0.0)
        assert float(diag.kappa_before) == 1.0 and _all_finite(new, diag)


def test_single_sample():
    new, diag = reweight(np.array([[4.0]], np.float32), np.array([-1.5], np.float32))
    np.testing.assert_array_equal(np.asarray(new), [-1.5])
    assert float(diag.kappa_before) == 1.0 and int(diag.rank) == 1
    assert float(diag.effective_rank) == pytest.approx(1.0)


def test_eigenvalue_ties():
    """K = I (all eigenvalues tied): every split of the tie is a valid P; kappa = 1 for
    equal norms and orthogonal features, so nothing moves, and nothing is NaN."""
    a = np.array([1.0, -1.0, 2.0, 0.5], np.float32)
    new, diag = reweight(np.eye(4, dtype=np.float32), a, rank=2)
    np.testing.assert_array_equal(np.asarray(new), a)
    assert float(diag.effective_rank) == pytest.approx(4.0)
    # Two tied pairs with a gap between them: the boundary r=2 does not split a tie.
    block = np.kron(np.diag([3.0, 1.0]), np.eye(2)).astype(np.float32)
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))
    gram = (q @ block @ q.T).astype(np.float32)
    new, diag = reweight(gram, a, rank=2)
    ref, _, _ = oracle(gram, a, rank=2)
    assert rel_err(new, ref) <= 1e-5 and _all_finite(new, diag)


@pytest.mark.parametrize("where", ["gram", "coefficients"])
def test_non_finite_raises_eagerly_and_flags_under_jit(where):
    gram, a, _ = cancelling_problem(1)
    if where == "gram":
        gram = gram.copy()
        gram[0, 1] = np.nan
    else:
        a = a.copy()
        a[2] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        reweight(gram, a)
    new, diag = jax.jit(reweight)(gram, a)
    assert not bool(diag.ok)
    np.testing.assert_array_equal(np.asarray(new), a)  # flagged no-op
    assert all(bool(np.all(np.isfinite(np.asarray(x)))) for x in diag)


def test_bad_arguments():
    gram, a, ids = cancelling_problem(0)
    with pytest.raises(ValueError, match=r"gram must be \[N, N\]"):
        reweight(gram[:4], a)
    with pytest.raises(ValueError, match="not both"):
        reweight(gram, a, rank=2, energy=0.9)
    with pytest.raises(ValueError, match="energy"):
        reweight(gram, a, energy=1.5)
    with pytest.raises(ValueError, match="renorm"):
        reweight(gram, a, renorm="l2")
    with pytest.raises(ValueError, match="group_ids"):
        reweight(gram, a, ids[:3])
    with pytest.raises(ValueError, match="num_groups"):
        reweight(gram, a, ids, num_groups=1)
    with pytest.raises(ValueError, match="power"):
        reweight(gram, a, power=0.0)


def test_cancellation_helper():
    gram, a, _ = cancelling_problem(4)
    ref_kappa = oracle(gram, a)[1]["kappa_before"]
    np.testing.assert_allclose(float(cancellation(gram, a)), ref_kappa, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Properties (hypothesis)
# ---------------------------------------------------------------------------------------


@st.composite
def problems(draw):
    n = draw(st.sampled_from([1, 2, 5, 8]))
    p = draw(st.sampled_from([1, 3, 16]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=(n, p)) * rng.uniform(0.1, 3.0, size=(n, 1))
    a = rng.normal(size=n) * draw(st.sampled_from([0.0, 1e-3, 1.0, 50.0]))
    return (phi @ phi.T).astype(np.float32), a.astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(problems(), st.sampled_from(["update_norm", "coef_norm", "none"]), st.booleans())
def test_property_gamma_zero_identity_and_finite(problem, renorm, recenter):
    gram, a = problem
    new, diag = reweight(gram, a, gamma_max=0.0, renorm=renorm)
    np.testing.assert_array_equal(np.asarray(new), a)
    new, diag = reweight(gram, a, gamma_max=2.0, renorm=renorm, recenter=recenter)
    assert _all_finite(new, diag) and bool(diag.ok)
    assert 0.0 <= float(diag.severity) <= 1.0 and 0 <= int(diag.rank) <= a.shape[0]


@settings(max_examples=40, deadline=None)
@given(problems())
def test_property_update_norm_preserved(problem):
    gram, a = problem
    k = gram.astype(np.float64)
    new, diag = reweight(gram, a, gamma_max=2.0)
    new = np.asarray(new, np.float64)
    scale = a.astype(np.float64) ** 2 @ np.diag(k)  # a^T diag(K) a
    # Equal up to float32 rounding of quadratic forms (relative to their natural scale).
    assert abs(new @ k @ new - a @ k @ a) <= 1e-4 * (scale + 1e-30)


@settings(max_examples=30, deadline=None)
@given(problems())
def test_property_equal_norms_kappa_never_rises(problem):
    """With equal feature norms (diag K = c I) kappa is a Rayleigh quotient, and the
    residual channel holds its smallest values: SPEC's SALT cannot raise kappa."""
    gram, a = problem
    d = np.sqrt(np.clip(np.diag(gram), 1e-12, None))
    gram = (gram / d[:, None] / d[None, :]).astype(np.float32)  # unit-norm features
    _, diag = reweight(gram, a, gamma_max=2.0)
    assert float(diag.kappa_after) <= float(diag.kappa_before) + 1e-4
