"""LongAct scores and channel selection against NumPy oracles written from SPEC section 3."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrl_geom.longact import (
    channel_scores,
    channels_kept_per_layer,
    mask_overlap,
    num_kept,
    saliency_concentration,
    select_channels,
    selected_fraction,
    update_ema,
)
from jaxrl_geom.models.taps import channel_stats

L, H, HD = 3, 4, 8  # layers, heads, head dim
C = H * HD


# ------------------------------------------------------------------ NumPy oracle


def np_select(scores, keep, hd, scope, granularity):
    """Oracle: stable argsort (ties -> lower index) inside each selection group."""
    scores = np.asarray(scores, np.float64)
    num_layers, c = scores.shape
    heads = c // hd
    out = np.zeros((num_layers, c), bool)
    for layer in range(num_layers):
        s = scores[layer]
        # candidates: (score, channels it covers, head), in index order
        cands = []
        for h in range(heads):
            if granularity == "channel":
                for j in range(hd):
                    cands.append((s[h * hd + j], [h * hd + j], h))
            else:
                for j in range(hd // 2):
                    a, b = h * hd + j, h * hd + j + hd // 2
                    cands.append((math.sqrt(s[a] ** 2 + s[b] ** 2), [a, b], h))
        groups = (
            [cands] if scope == "layer" else [[x for x in cands if x[2] == h] for h in range(heads)]
        )
        for group in groups:
            k = math.ceil(keep * len(group))
            order = np.argsort([-x[0] for x in group], kind="stable")
            for i in order[:k]:
                out[layer, group[i][1]] = True
    return out


def random_scores(seed, ties=False):
    rng = np.random.default_rng(seed)
    if ties:  # few distinct values: many exact ties
        return rng.integers(0, 3, size=(L, C)).astype(np.float32)
    return rng.gamma(2.0, size=(L, C)).astype(np.float32)


# ------------------------------------------------------------------ selection


@pytest.mark.parametrize("scope", ["layer", "head"])
@pytest.mark.parametrize("granularity", ["channel", "rope_pair"])
@pytest.mark.parametrize("keep", [0.3, 0.5, 0.05, 1.0])
@pytest.mark.parametrize("ties", [False, True])
def test_select_matches_numpy_oracle(scope, granularity, keep, ties):
    scores = random_scores(7, ties)
    got = select_channels(
        scores, keep_ratio=keep, num_heads=H, head_dim=HD, scope=scope, granularity=granularity
    )
    want = np_select(scores, keep, HD, scope, granularity)
    np.testing.assert_array_equal(np.asarray(got), want)
    # count rule, per layer
    expected = channels_kept_per_layer(
        C, keep_ratio=keep, head_dim=HD, scope=scope, granularity=granularity
    )
    np.testing.assert_array_equal(np.asarray(got).sum(-1), expected)


def test_rope_pair_keeps_whole_pairs():
    scores = random_scores(3)
    for scope in ("layer", "head"):
        m = np.asarray(
            select_channels(
                scores, keep_ratio=0.3, head_dim=HD, scope=scope, granularity="rope_pair"
            )
        ).reshape(L, H, 2, HD // 2)
        np.testing.assert_array_equal(m[:, :, 0], m[:, :, 1])


def test_rope_pair_uses_joint_norm_not_max():
    # head_dim 4: pairs (0, 2) and (1, 3). Channel 0 is the single largest, but pair
    # (1, 3) has the larger joint norm: sqrt(3^2 + 3^2) > sqrt(4^2 + 0^2).
    scores = np.array([[4.0, 3.0, 0.0, 3.0]], np.float32)
    m = select_channels(scores, keep_ratio=0.5, head_dim=4, granularity="rope_pair")
    np.testing.assert_array_equal(np.asarray(m), [[False, True, False, True]])


def test_head_scope_exact_count_per_head():
    scores = random_scores(11)
    for keep in (0.3, 0.2, 0.9):
        m = np.asarray(select_channels(scores, keep_ratio=keep, head_dim=HD, scope="head"))
        per_head = m.reshape(L, H, HD).sum(-1)
        np.testing.assert_array_equal(per_head, math.ceil(keep * HD))


def test_count_rule():
    # by hand: ceil(0.3 * 10) = 3, ceil(0.3 * 64) = ceil(19.2) = 20, ceil(0.01 * 8) = 1
    assert num_kept(10, 0.3) == 3
    assert num_kept(64, 0.3) == 20
    assert num_kept(8, 0.01) == 1
    assert num_kept(8, 1.0) == 8
    assert channels_kept_per_layer(32, keep_ratio=0.3) == 10
    assert channels_kept_per_layer(32, keep_ratio=0.3, head_dim=8, scope="head") == 4 * 3
    assert channels_kept_per_layer(32, keep_ratio=0.3, head_dim=8, granularity="rope_pair") == 10
    assert (
        channels_kept_per_layer(
            32, keep_ratio=0.3, head_dim=8, scope="head", granularity="rope_pair"
        )
        == 4 * 2 * 2
    )


def test_ties_go_to_lowest_index():
    m = select_channels(jnp.zeros((2, 10)), keep_ratio=0.3)
    np.testing.assert_array_equal(np.asarray(m), np.arange(10)[None].repeat(2, 0) < 3)
    # equal top values at 2, 5, 7; keep 2 -> {2, 5}
    s = np.array([[0, 1, 9, 0, 1, 9, 0, 9, 0, 0]], np.float32)
    m = np.asarray(select_channels(s, keep_ratio=0.2))
    np.testing.assert_array_equal(np.flatnonzero(m[0]), [2, 5])
    # NaN is never preferred
    s = np.array([[np.nan, 1.0, 2.0, 0.5]], np.float32)
    np.testing.assert_array_equal(np.asarray(select_channels(s, keep_ratio=0.5))[0], [0, 1, 1, 0])
    # ... and never selected, even when fewer finite candidates than k remain
    s = np.array([[np.nan, np.nan, np.nan, 0.5]], np.float32)
    np.testing.assert_array_equal(np.asarray(select_channels(s, keep_ratio=0.5))[0], [0, 0, 0, 1])


@pytest.mark.parametrize("scope", ["layer", "head"])
def test_rope_pair_with_a_nan_channel_is_never_selected(scope):
    # head_dim 4: pairs (0, 2), (1, 3) per head. A NaN channel used to become -inf,
    # whose square is +inf, so its pair always won.
    s = np.array([[np.nan, 1.0, 0.1, 1.0, 0.2, 0.3, 0.2, 0.3]], np.float32)  # 2 heads
    m = np.asarray(
        select_channels(s, keep_ratio=0.5, head_dim=4, scope=scope, granularity="rope_pair")
    )[0]
    assert not m[0] and not m[2]  # the NaN channel's pair (0, 2)
    assert m[1] and m[3]  # the other pair of head 0
    if scope == "head":
        np.testing.assert_array_equal(m[4:], [False, True, False, True])  # |(.3,.3)| > |(.2,.2)|


def test_select_under_jit_and_leading_dims():
    scores = random_scores(5)
    f = jax.jit(lambda s: select_channels(s, keep_ratio=0.3, head_dim=HD, scope="head"))
    np.testing.assert_array_equal(
        np.asarray(f(scores)), np_select(scores, 0.3, HD, "head", "channel")
    )
    batched = select_channels(np.stack([scores, scores[::-1]]), keep_ratio=0.3)  # [2, L, C]
    np.testing.assert_array_equal(
        np.asarray(batched[1]), np_select(scores[::-1], 0.3, HD, "layer", "channel")
    )


@settings(max_examples=25, deadline=None)
@given(
    values=st.lists(st.floats(0, 10, width=32), min_size=16, max_size=16),
    keep=st.sampled_from([0.1, 0.25, 0.3, 0.5, 0.75, 1.0]),
)
def test_selected_dominate_unselected(values, keep):
    s = np.asarray(values, np.float32)[None]
    m = np.asarray(select_channels(s, keep_ratio=keep))[0]
    assert m.sum() == math.ceil(keep * 16)
    if not m.all():
        assert s[0, m].min() >= s[0, ~m].max()


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5, float("nan")])
def test_bad_keep_ratio(keep):
    with pytest.raises(ValueError, match="keep_ratio"):
        select_channels(jnp.ones((1, 8)), keep_ratio=keep)


def test_bad_layout():
    with pytest.raises(ValueError, match="head_dim"):
        select_channels(jnp.ones((1, 8)), scope="head")
    with pytest.raises(ValueError, match="head_dim"):
        select_channels(jnp.ones((1, 8)), granularity="rope_pair")
    with pytest.raises(ValueError, match="whole number of heads"):
        select_channels(jnp.ones((1, 10)), head_dim=4, scope="head")
    with pytest.raises(ValueError, match="num_heads"):
        select_channels(jnp.ones((1, 8)), num_heads=4, head_dim=4, scope="head")
    with pytest.raises(ValueError, match="scope"):
        select_channels(jnp.ones((1, 8)), scope="model")


# ------------------------------------------------------------------ scores


@pytest.mark.parametrize("statistic", ["mean_abs", "rms", "max_abs"])
def test_channel_scores_match_numpy(statistic):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, L, 5, C)).astype(np.float32)  # [B, L, T, C]
    valid = rng.random((2, 5)) < 0.7
    valid[:, 0] = True
    stats = jax.vmap(lambda xl: channel_stats(xl, jnp.asarray(valid)), in_axes=1)(jnp.asarray(x))
    got = np.asarray(channel_scores(stats, statistic))  # [L, C]
    xv = np.abs(x.transpose(1, 0, 2, 3)[:, valid])  # [L, n, C]
    want = {
        "mean_abs": xv.mean(1),
        "rms": np.sqrt((xv**2).mean(1)),
        "max_abs": xv.max(1),
    }[statistic]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_channel_scores_zero_count_is_zero_not_nan():
    x = jnp.ones((1, 3, 4))
    stats = channel_stats(x, jnp.zeros((1, 3), bool))
    for statistic in ("mean_abs", "rms", "max_abs"):
        np.testing.assert_array_equal(np.asarray(channel_scores(stats, statistic)), 0.0)
    with pytest.raises(ValueError, match="statistic"):
        channel_scores(stats, "median")


def test_update_ema_formula():
    rng = np.random.default_rng(1)
    s0, s1, s2 = rng.random((3, L, C)).astype(np.float32)
    e = update_ema(jnp.zeros((L, C)), s0, 0.8, is_first=True)
    np.testing.assert_array_equal(np.asarray(e), s0)
    e = update_ema(e, s1, 0.8)
    e = update_ema(e, s2, 0.8, is_first=jnp.asarray(False))
    want = 0.8 * (0.8 * s0 + 0.2 * s1) + 0.2 * s2
    np.testing.assert_allclose(np.asarray(e), want, rtol=1e-6)


# ------------------------------------------------------------------ diagnostics


def test_diagnostics_match_numpy():
    rng = np.random.default_rng(2)
    prev = rng.random((L, C)) < 0.3
    cur = rng.random((L, C)) < 0.3
    scores = rng.random((L, C)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(mask_overlap(prev, cur)), (prev & cur).sum(-1) / cur.sum(-1), rtol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(saliency_concentration(scores, cur)),
        (scores * cur).sum(-1) / scores.sum(-1),
        rtol=1e-6,
    )
    np.testing.assert_allclose(np.asarray(selected_fraction(cur)), cur.mean(-1), rtol=1e-6)
    # identical masks overlap fully; flat scores concentrate exactly the kept fraction
    np.testing.assert_array_equal(np.asarray(mask_overlap(cur, cur)), 1.0)
    np.testing.assert_allclose(
        np.asarray(saliency_concentration(np.ones((L, C)), cur)), cur.mean(-1), rtol=1e-6
    )
    assert float(saliency_concentration(np.zeros((C,)), cur[0])) == 0.0
