"""Tests for jaxrl_geom.rl.dapo on hand-made cases (DAPO arXiv:2503.14476)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from tolerances import assert_f32_close

from jaxrl_geom.rl import dapo

# ---------------------------------------------------------------------------------------
# dynamic_sampling_filter
# ---------------------------------------------------------------------------------------


def test_filter_keeps_only_groups_with_unequal_rewards():
    rewards = np.array([1, 1, 1, 0, 1, 0, 2, 2, 2, 0, 0, 0.5], np.float32)
    want = np.repeat([False, True, False, True], 3)
    f = jax.jit(functools.partial(dapo.dynamic_sampling_filter, group_size=3))
    np.testing.assert_array_equal(f(rewards), want)
    ids = np.repeat(np.arange(4, dtype=np.int32), 3)
    perm = np.array([5, 0, 11, 3, 7, 1, 9, 2, 4, 10, 6, 8])
    g = jax.jit(functools.partial(dapo.dynamic_sampling_filter, num_groups=4))
    np.testing.assert_array_equal(g(rewards[perm], ids[perm]), want[perm])


def test_filter_rejects_groups_of_one():
    with pytest.raises(ValueError, match="num_generations >= 2"):
        dapo.dynamic_sampling_filter(np.zeros(3, np.float32), group_size=1)


# ---------------------------------------------------------------------------------------
# fill_batch
# ---------------------------------------------------------------------------------------


def scripted_sampler(rounds):
    """sample_fn returning the given rounds of (names, rewards) one call at a time."""
    calls = []

    def sample_fn(num_missing):
        calls.append(num_missing)
        names, rewards = rounds[len(calls) - 1]
        return names, np.asarray(rewards, np.float32)

    return sample_fn, calls


def test_fill_batch_refills_until_full():
    sample_fn, calls = scripted_sampler(
        [
            (["a", "b", "c"], [[1, 1], [0, 1], [0, 0]]),  # keeps b
            (["d", "e"], [[1, 0], [1, 1]]),  # keeps d
            (["f", "g", "h"], [[0.5, 0], [1, 0], [0, 1]]),  # keeps f (g, h surplus)
        ]
    )
    out = dapo.fill_batch(sample_fn, target_groups=3, max_tries=5)
    assert calls == [3, 2, 1]  # asks for the missing groups each time
    assert out.groups == ["b", "d", "f"]
    np.testing.assert_array_equal(out.rewards, [[0, 1], [1, 0], [0.5, 0]])
    np.testing.assert_array_equal(out.informative, [True, True, True])
    assert out.metrics == {
        "dynamic_sampling/tries": 3.0,
        "dynamic_sampling/groups_sampled": 8.0,
        "dynamic_sampling/groups_dropped": 3.0,
        "dynamic_sampling/groups_surplus": 2.0,
        "dynamic_sampling/padded_groups": 0.0,
        "dynamic_sampling/filled_fraction": 1.0,
        "dynamic_sampling/gave_up": 0.0,
    }


def test_fill_batch_gives_up_and_pads_with_dropped_groups():
    rounds = [
        (["a", "b", "c"], [[1, 1, 1], [0, 1, 1], [0, 0, 0]]),
        (["d", "e"], [[2, 2, 2], [3, 3, 3]]),
    ]
    out = dapo.fill_batch(scripted_sampler(rounds)[0], target_groups=3, max_tries=2)
    assert out.groups == ["b", "a", "c"]  # informative first, then dropped in order
    np.testing.assert_array_equal(out.informative, [True, False, False])
    assert out.rewards.shape == (3, 3)
    assert out.metrics["dynamic_sampling/gave_up"] == 1.0
    assert out.metrics["dynamic_sampling/filled_fraction"] == pytest.approx(1 / 3)
    assert out.metrics["dynamic_sampling/padded_groups"] == 2.0
    assert out.metrics["dynamic_sampling/tries"] == 2.0

    short = dapo.fill_batch(scripted_sampler(rounds)[0], 3, 2, on_short="truncate")
    assert short.groups == ["b"] and short.rewards.shape == (1, 3)
    assert short.metrics["dynamic_sampling/padded_groups"] == 0.0


def test_fill_batch_bad_input_raises():
    ok = scripted_sampler([(["a"], [[0, 1]])])[0]
    with pytest.raises(ValueError, match="target_groups must be >= 1"):
        dapo.fill_batch(ok, 0, 1)
    with pytest.raises(ValueError, match="max_tries must be >= 1"):
        dapo.fill_batch(ok, 1, 0)
    with pytest.raises(ValueError, match="on_short"):
        dapo.fill_batch(ok, 1, 1, on_short="drop")
    with pytest.raises(ValueError, match="one row per group"):
        dapo.fill_batch(scripted_sampler([(["a", "b"], [[0, 1]])])[0], 1, 1)
    with pytest.raises(ValueError, match="num_generations >= 2"):
        dapo.fill_batch(scripted_sampler([(["a"], [[1.0]])])[0], 1, 1)


# ---------------------------------------------------------------------------------------
# soft_overlong_punishment: DAPO eq. 13 by hand with L_max = 10, L_cache = 4
# ---------------------------------------------------------------------------------------


def test_soft_overlong_punishment_hand_values():
    lengths = np.array([0, 5, 6, 7, 8, 9, 10, 11, 30])
    # |y| <= 6: 0; 6 < |y| <= 10: (6 - |y|) / 4; |y| > 10: -1
    want = np.array([0, 0, 0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0])
    f = jax.jit(dapo.soft_overlong_punishment, static_argnums=(1, 2, 3))
    # a difference, a division and a scaling of values <= 1 (tests/tolerances.py)
    assert_f32_close(f(lengths, 10, 4, 1.0), want, scale=1.0, ops=3)
    assert_f32_close(f(lengths, 10, 4, 0.5), 0.5 * want, scale=1.0, ops=3)
    # buffer == L_max: the ramp starts at length 0
    assert_f32_close(f(np.array([0, 5, 10]), 10, 10, 1.0), [0, -0.5, -1.0], scale=1.0, ops=3)


@pytest.mark.parametrize(
    "args,match",
    [
        ((10, 0, 1.0), "buffer_length=0 must be in"),
        ((10, 11, 1.0), "buffer_length=11 must be in"),
        ((0, 1, 1.0), "max_completion_length must be >= 1"),
        ((10, 4, -1.0), "penalty_factor must be >= 0"),
    ],
)
def test_soft_overlong_punishment_bad_config(args, match):
    with pytest.raises(ValueError, match=match):
        dapo.soft_overlong_punishment(np.array([1, 2]), *args)
