"""Tests for jaxrl_geom.rl.advantages against a float64 NumPy oracle of SPEC 1 / TRL."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_f32_close

from jaxrl_geom.rl import advantages as adv_lib

# ---------------------------------------------------------------------------------------
# Independent oracle (float64): A_i = (R_i - mean_g) / (std + eps), torch.std is ddof=1.
# ---------------------------------------------------------------------------------------


def oracle(rewards, group_ids, scale, eps=1e-4):
    r = np.asarray(rewards, np.float64)
    ids = np.asarray(group_ids)
    out = np.zeros_like(r)
    batch_std = r.std(ddof=1)
    for g in np.unique(ids):
        rows = ids == g
        x = r[rows]
        if np.all(x == x[0]):  # zero-std group: exactly 0 (SPEC 1)
            continue
        centered = x - x.mean()
        std = {"group": x.std(ddof=1), "batch": batch_std, "none": None}[scale]
        out[rows] = centered if std is None else centered / (std + eps)
    return out


def assert_adv_close(got, rewards, ids, scale, want=None):
    """float32 advantages vs the float64 oracle (tests/tolerances.py): the centering
    cancels values up to max|R| over a group of n, and the divisor sigma + eps carries
    a relative error of the same size, so the error is ~ (1 + max|A|) max|R| / divisor."""
    r = np.asarray(rewards, np.float64)
    ids = np.asarray(ids)
    want = oracle(rewards, ids, scale) if want is None else want
    sizes = np.bincount(ids)
    divisors = {
        "group": [r[ids == g].std(ddof=1) for g in np.unique(ids) if np.ptp(r[ids == g]) > 0],
        "batch": [r.std(ddof=1)],
        "none": [1.0],
    }[scale]
    divisor = min(divisors, default=1.0) + 1e-4
    tol_scale = (1.0 + np.abs(want).max()) * np.abs(r).max() / divisor
    ops = int(sizes.max()) + (len(r) if scale == "batch" else 0)
    assert_f32_close(got, want, scale=tol_scale, ops=ops)


SCALES = ("group", "batch", "none")
G, M = 4, 5
N = G * M


def make_rewards(seed=0):
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(M, G))
    r[1] = 0.7  # zero-std group with a value whose fp32 mean is not exact
    r[3] = [1.0, 0.0, 0.0, 0.0]  # 0/1 accuracy-style group
    return r.reshape(-1).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("scale", "num_groups"))
def adv_ids(rewards, group_ids, *, scale, num_groups):
    return adv_lib.group_advantages(rewards, group_ids, scale=scale, num_groups=num_groups)


@functools.partial(jax.jit, static_argnames=("scale", "group_size"))
def adv_contiguous(rewards, *, scale, group_size):
    return adv_lib.group_advantages(rewards, group_size=group_size, scale=scale)


@pytest.mark.parametrize("scale", SCALES)
def test_group_advantages_match_oracle_in_both_layouts(scale):
    rewards = make_rewards()
    ids = np.repeat(np.arange(M, dtype=np.int32), G)
    want = oracle(rewards, ids, scale)
    got_contig = adv_contiguous(rewards, scale=scale, group_size=G)
    assert_adv_close(got_contig, rewards, ids, scale, want)
    # the same groups, rows shuffled: group_ids layout through segment_sum
    perm = np.random.default_rng(1).permutation(N)
    got_ids = adv_ids(rewards[perm], ids[perm], scale=scale, num_groups=M)
    assert_adv_close(got_ids, rewards[perm], ids[perm], scale, want[perm])
    # eager, num_groups inferred from concrete ids
    got_eager = adv_lib.group_advantages(rewards[perm], ids[perm], scale=scale)
    assert_adv_close(got_eager, rewards[perm], ids[perm], scale, want[perm])
    for got in (got_contig, got_ids[np.argsort(perm)], got_eager[np.argsort(perm)]):
        assert np.all(np.asarray(got)[G : 2 * G] == 0.0)  # zero-std group: exactly 0


def test_unequal_group_sizes_and_unused_ids():
    rewards = np.array([1.0, 2.0, 4.0, 0.5, 0.5, 3.0, -1.0], np.float32)
    ids = np.array([0, 0, 0, 2, 2, 3, 3], np.int32)  # group 1 empty, sizes 3/2/2
    for scale in SCALES:
        got = adv_ids(rewards, ids, scale=scale, num_groups=5)
        assert_adv_close(got, rewards, ids, scale)
        assert np.all(np.asarray(got)[3:5] == 0.0)


def test_equal_groups_exactly_zero_where_round_off_would_not_be():
    # fp32: mean([1.1] * 3) != 1.1, so the plain formula gives (R - mean) / eps ~ -1e-3.
    rewards = np.array([1.1, 1.1, 1.1, 0.0, 1.0, 0.0], np.float32)
    x = jnp.asarray(rewards[:3])
    assert np.all(np.asarray((x - jnp.mean(x)) / 1e-4) != 0.0)  # the test has teeth
    ids = np.array([0, 0, 0, 1, 1, 1], np.int32)
    for scale in SCALES:
        for got in (
            adv_contiguous(rewards, scale=scale, group_size=3),
            adv_ids(rewards, ids, scale=scale, num_groups=2),
        ):
            assert np.all(np.asarray(got)[:3] == 0.0)
            assert_adv_close(got, rewards, ids, scale)


def test_batch_scale_uses_whole_batch_std_and_group_mean():
    rewards = make_rewards(2)
    got = np.asarray(adv_contiguous(rewards, scale="batch", group_size=G), np.float64)
    r = rewards.astype(np.float64).reshape(M, G)
    want = (r - r.mean(1, keepdims=True)) / (rewards.astype(np.float64).std(ddof=1) + 1e-4)
    want[1] = 0.0
    ids = np.repeat(np.arange(M, dtype=np.int32), G)
    assert_adv_close(got, rewards, ids, "batch", want.reshape(-1))


def test_group_advantages_does_not_recompile():
    rewards = make_rewards()
    f = jax.jit(functools.partial(adv_lib.group_advantages, group_size=G))
    f(rewards)
    f(rewards + 1)
    assert f._cache_size() == 1


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=N, max_size=N),
    equal_groups=st.lists(st.booleans(), min_size=M, max_size=M),
    scale=st.sampled_from(SCALES),
)
def test_property_finite_and_equal_groups_exactly_zero(values, equal_groups, scale):
    r = np.asarray(values, np.float32).reshape(M, G)
    for g, eq in enumerate(equal_groups):
        if eq:
            r[g] = r[g, 0]
    rewards = r.reshape(-1)
    ids = np.repeat(np.arange(M, dtype=np.int32), G)
    for got in (
        adv_contiguous(rewards, scale=scale, group_size=G),
        adv_ids(rewards, ids, scale=scale, num_groups=M),
    ):
        got = np.asarray(got).reshape(M, G)
        assert np.all(np.isfinite(got))
        assert np.all(got[np.asarray(equal_groups)] == 0.0)
        # any group whose values happen to coincide is zero as well
        assert np.all(got[np.all(r == r[:, :1], axis=1)] == 0.0)


def test_combine_rewards_nansum_like_trl():
    rewards = np.array([[1.0, np.nan, 2.0], [np.nan, np.nan, np.nan], [0.5, 1.0, -1.0]])
    weights = np.array([1.0, 0.5, 2.0])
    got = jax.jit(adv_lib.combine_rewards)(rewards, weights)
    # NaN -> 0; all-NaN -> 0. Sums of F = 3 products: ~F ulps of sum |w r| (<= 5)
    assert_f32_close(got, [5.0, 0.0, -1.0], scale=5.0, ops=3)
    assert_f32_close(adv_lib.combine_rewards(rewards), [3.0, 0.0, 0.5], scale=3.0, ops=3)
    with pytest.raises(ValueError, match="rewards\\[:, None\\]"):
        adv_lib.combine_rewards(np.ones(3))
    with pytest.raises(ValueError, match="one weight per column"):
        adv_lib.combine_rewards(rewards, np.ones(2))


def test_group_stats_match_numpy():
    rewards = np.array([1.0, 2.0, 4.0, 0.5, 0.5, 3.0, -1.0], np.float32)
    ids = np.array([0, 0, 0, 2, 2, 3, 3], np.int32)  # group 1 is empty
    stats = jax.jit(adv_lib.group_stats, static_argnums=2)(rewards, ids, 4)
    np.testing.assert_allclose(stats.mean, [7 / 3, 0.0, 0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(
        stats.std, [np.std([1, 2, 4], ddof=1), 0.0, 0.0, np.std([3, -1], ddof=1)], rtol=1e-6
    )
    np.testing.assert_array_equal(stats.count, [3, 0, 2, 2])
    np.testing.assert_allclose(stats.zero_std_fraction, 1 / 3)  # empty group left out


def test_equal_reward_groups():
    rewards = np.array([1.0, 1.0, 0.0, 1.0, 2.0, 2.0], np.float32)
    got = adv_lib.equal_reward_groups(rewards, group_size=2)
    np.testing.assert_array_equal(got, [True, True, False, False, True, True])


def test_bad_input_raises():
    r = np.array([1.0, 0.0, 1.0], np.float32)
    with pytest.raises(ValueError, match="num_generations >= 2"):
        adv_lib.group_advantages(r, np.array([0, 0, 1]))
    with pytest.raises(ValueError, match="num_generations >= 2"):
        adv_lib.group_advantages(r, group_size=1)
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        adv_lib.group_advantages(r, group_size=2)
    with pytest.raises(ValueError, match="exactly one of group_ids"):
        adv_lib.group_advantages(r)
    with pytest.raises(ValueError, match="exactly one of group_ids"):
        adv_lib.group_advantages(r, np.zeros(3, np.int32), group_size=3)
    with pytest.raises(ValueError, match="Unknown scale"):
        adv_lib.group_advantages(r, group_size=3, scale="std")
    with pytest.raises(ValueError, match="eps must be >= 0"):
        adv_lib.group_advantages(r, group_size=3, eps=-1.0)
    with pytest.raises(ValueError, match="ids must lie"):
        adv_lib.group_advantages(r, np.array([0, 0, 2]), num_groups=2)
    with pytest.raises(ValueError, match="must be >= 0"):
        adv_lib.group_advantages(r, np.array([0, 0, -1]))
    with pytest.raises(ValueError, match="Empty batch"):
        adv_lib.group_advantages(np.zeros(0, np.float32), group_size=2)
    with pytest.raises(ValueError, match="combine_rewards"):
        adv_lib.group_advantages(np.zeros((4, 2), np.float32), group_size=2)
    with pytest.raises(ValueError, match="pass num_groups as a static"):
        jax.jit(adv_lib.group_advantages)(jnp.asarray(r), jnp.array([0, 0, 1]))
