"""Hypothesis property tests: advantages, policy losses and ``salt.reweight``.

Properties (each against an independent statement, not a stored number):

* advantages: a zero-std group gets exactly 0; finite for every finite reward
  (|R| <= 1e18: the squares summed over a group stay finite in float32); shift
  invariance and, with ``eps=0``, scale invariance, bit for bit where the arithmetic is
  exact (quarter-integer rewards, power-of-two scales, G = 4) and within the float32
  tolerance of ``tests/tolerances.py`` otherwise; each group sums to ~0; permuting the
  rows (``group_ids`` layout) permutes the advantages exactly.
* losses: the numerators of two micro-batches sum to the full batch's (global
  denominators); ratio 1 gives ``-sum_i,t w_it A_i`` (float64 oracle); finite for
  log-probs in [-30, 0]; garbage (NaN) in padded slots changes nothing, bit for bit.
* ``salt.reweight``: ``gamma_max=0`` returns ``a`` exactly (up to the sign of
  zeros); permutation
  equivariance; invariance to ``K -> cK``; ``a -> c a`` gives ``c a'``.

Cost: fixed shapes per test, so every jitted function compiles once; modest
``max_examples``. Drawn floats exclude subnormals: XLA on CPU flushes them to zero
(FTZ), so no float32 property can hold for them bit for bit.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tolerances import EPS32, assert_bits_equal, assert_f32_close

from jaxrl_geom.rl import advantages as adv_lib
from jaxrl_geom.rl import losses
from jaxrl_geom.salt import reweight

# float32 draws without subnormals (see the module docstring)
f32 = functools.partial(st.floats, width=32, allow_subnormal=False)

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
M, G = 3, 4  # groups x rollouts (G a power of two: group means of quarter-integers are exact)
N = M * G
SCALES = ("group", "batch", "none")

BIG = float(np.float32(1e18))  # the largest |R| with finite group sums of squares (x 1e2)
quarter_rewards = hnp.arrays(np.float32, (N,), elements=st.integers(-40, 40).map(lambda k: k / 4))
finite_rewards = hnp.arrays(np.float32, (N,), elements=f32(-BIG, BIG))


def advantages(rewards, scale="group", eps=1e-4, group_ids=None):
    if group_ids is None:
        return np.asarray(adv_lib.group_advantages(rewards, group_size=G, scale=scale, eps=eps))
    return np.asarray(adv_lib.group_advantages(rewards, group_ids, scale=scale, eps=eps))


# ------------------------------------------------------------------------- advantages


@SETTINGS
@given(rewards=quarter_rewards, group=st.integers(0, M - 1), value=f32(-1e6, 1e6))
def test_zero_std_group_is_exactly_zero(rewards, group, value):
    rewards = rewards.copy()
    rewards[group * G : (group + 1) * G] = value
    for scale in SCALES:
        a = advantages(rewards, scale)[group * G : (group + 1) * G]
        assert_bits_equal(a, np.zeros(G, np.float32), err_msg=scale)  # +0.0, never NaN


@SETTINGS
@given(rewards=finite_rewards)
def test_advantages_are_finite_for_finite_rewards(rewards):
    for scale in SCALES:
        assert np.all(np.isfinite(advantages(rewards, scale))), scale


@SETTINGS
@given(rewards=quarter_rewards, shift=st.integers(-400, 400).map(lambda k: k / 4))
def test_shift_invariance(rewards, shift):
    shifted = (rewards + np.float32(shift)).astype(np.float32)  # exact: quarter-integers
    for scale in ("group", "none"):  # group means of G = 4 quarter-integers are exact
        assert_bits_equal(advantages(shifted, scale), advantages(rewards, scale), scale)
    # batch scale: the std over N = 12 rows rounds differently after the shift; the
    # advantage is centered / (std + eps) with |centered| <= 2 * max|R| (exact), so the
    # error is that of std, relative eps32 * (max|R| + |shift|) / std per op.
    want = advantages(rewards, "batch")
    std = float(np.std(rewards.astype(np.float64), ddof=1))
    assume(std > 0.1)
    scale = np.abs(want).max() * (np.abs(rewards).max() + abs(shift)) / std
    assert_f32_close(advantages(shifted, "batch"), want, scale=scale, ops=2 * N)


@SETTINGS
@given(rewards=quarter_rewards, k=st.integers(-6, 6), factor=st.floats(0.1, 10.0))
def test_scale_invariance_without_eps(rewards, k, factor):
    two_k = np.float32(2.0**k)  # powers of two scale every float32 op exactly
    for scale in ("group", "batch"):
        want = advantages(rewards, scale, eps=0.0)
        assert_bits_equal(advantages(rewards * two_k, scale, eps=0.0), want, scale)
        # any positive factor: the inputs round once (relative eps32) and that rounding
        # is amplified by |R| / std in the centered value
        scaled = (rewards * np.float32(factor)).astype(np.float32)
        r64 = rewards.astype(np.float64)
        std = np.append(np.std(r64.reshape(M, G), axis=1, ddof=1), np.std(r64, ddof=1))
        assume(np.all((std == 0) | (std > 0.1)))
        amp = np.abs(rewards).max() / std[std > 0].min() if np.any(std > 0) else 0.0
        assert_f32_close(advantages(scaled, scale, eps=0.0), want, scale=amp, ops=2 * G)


@SETTINGS
@given(rewards=quarter_rewards)
def test_each_group_sums_to_zero(rewards):
    a = advantages(rewards, "group").reshape(M, G).astype(np.float64)
    # |A| <= (G - 1) / sqrt(G) for a group standardized by its ddof=1 std
    assert_f32_close(a.sum(1), np.zeros(M), scale=G * (G - 1) / np.sqrt(G), ops=G)


@SETTINGS
@given(rewards=quarter_rewards, perm=st.permutations(list(range(N))))
def test_permuting_rows_permutes_advantages(rewards, perm):
    perm = np.asarray(perm)
    ids = np.repeat(np.arange(M, dtype=np.int32), G)
    want = advantages(rewards, "group", group_ids=ids)
    got = advantages(rewards[perm], "group", group_ids=ids[perm])
    assert_bits_equal(got, want[perm])  # quarter-integer sums: no rounding to reorder
    # the contiguous layout divides by G - 1 where the ids layout divides by count - 1
    assert_f32_close(want, advantages(rewards, "group"), ops=2)


# ------------------------------------------------------------------------- losses

B, T = 6, 5  # rows x completion width
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@st.composite
def loss_inputs(draw):
    lengths = draw(hnp.arrays(np.int32, (B,), elements=st.integers(1, T)))
    mask = np.arange(T)[None] < lengths[:, None]
    logp = draw(hnp.arrays(np.float32, (B, T), elements=f32(-30, 0)))
    old = draw(hnp.arrays(np.float32, (B, T), elements=f32(-30, 0)))
    adv = draw(hnp.arrays(np.float32, (B,), elements=f32(-5, 5)))
    return logp, old, adv, mask


def numerator_scale(logp, old, adv, mask, loss_type):
    """sum_i,t |u_it psi_it| in float64: the magnitude that the numerator's sum cancels."""
    w = np.asarray(losses.token_weights(mask, loss_type), np.float64)
    _, denominator = loss_terms(logp, old, adv, mask, loss_type)
    r = np.exp(np.where(mask, logp.astype(np.float64) - old, 0.0))
    return float(np.sum(np.abs(w * float(denominator) * r * adv[:, None])))


@functools.partial(jax.jit, static_argnames=("loss_type", "max_completion_length"))
def _loss_terms(logp, old, adv, mask, num_sequences, num_tokens, loss_type, max_completion_length):
    t = losses.policy_loss(
        logp,
        old,
        adv,
        mask,
        loss_type=loss_type,
        eps_high=0.28,
        num_sequences=num_sequences,
        num_tokens=num_tokens,
        max_completion_length=max_completion_length,
    )
    return t.numerator, t.denominator


def loss_terms(logp, old, adv, mask, loss_type, num_sequences=None, num_tokens=None):
    """(numerator, denominator); one compile per loss type and shape."""
    n = len(mask) if num_sequences is None else num_sequences
    tokens = int(np.sum(mask)) if num_tokens is None else num_tokens
    return _loss_terms(logp, old, adv, mask, n, tokens, loss_type, T)


@SETTINGS
@given(inputs=loss_inputs(), perm=st.permutations(list(range(B))))
def test_micro_batch_numerators_sum_to_the_full_batch(inputs, perm):
    logp, old, adv, mask = inputs
    glob = dict(num_sequences=B, num_tokens=int(mask.sum()))
    rows = (np.asarray(perm[: B // 2]), np.asarray(perm[B // 2 :]))  # any split of the rows
    for loss_type in LOSS_TYPES:
        full_num, full_den = loss_terms(logp, old, adv, mask, loss_type, **glob)
        parts = [loss_terms(logp[r], old[r], adv[r], mask[r], loss_type, **glob) for r in rows]
        assert all(float(d) == float(full_den) for _, d in parts), loss_type
        scale = numerator_scale(logp, old, adv, mask, loss_type)
        got = float(parts[0][0]) + float(parts[1][0])
        assert_f32_close(got, float(full_num), scale=scale, ops=B * T, err_msg=loss_type)


@SETTINGS
@given(inputs=loss_inputs())
def test_ratio_one_gives_minus_weighted_advantages(inputs):
    logp, _, adv, mask = inputs
    for loss_type in LOSS_TYPES:
        num, den = loss_terms(logp, logp, adv, mask, loss_type)
        w = np.asarray(losses.token_weights(mask, loss_type), np.float64)  # w_it, float32 math
        m = mask.astype(np.float64)
        n_tok, lengths = m.sum(), m.sum(1, keepdims=True)
        w_ref = {  # SPEC section 1 weights, float64
            "grpo": m / lengths / B,
            "bnpo": m / n_tok,
            "dapo": m / n_tok,
            "dr_grpo": m / (B * T),
        }[loss_type]
        assert_f32_close(w, w_ref, ops=3, err_msg=loss_type)
        want = -np.sum(w_ref * adv[:, None].astype(np.float64))
        scale = np.sum(np.abs(w_ref * adv[:, None]))
        assert_f32_close(float(num) / float(den), want, scale=scale, ops=B * T, err_msg=loss_type)


@SETTINGS
@given(inputs=loss_inputs(), garbage=st.sampled_from([np.nan, np.inf, -np.inf, 1e30]))
def test_loss_is_finite_and_padding_is_never_read(inputs, garbage):
    logp, old, adv, mask = inputs
    for loss_type in LOSS_TYPES:
        num, den = loss_terms(logp, old, adv, mask, loss_type)
        assert np.isfinite(float(num)) and float(den) > 0, loss_type
        dirty = [np.where(mask, x, np.float32(garbage)).astype(np.float32) for x in (logp, old)]
        num2, den2 = loss_terms(*dirty, adv, mask, loss_type)
        assert_bits_equal(np.asarray(num2), np.asarray(num), loss_type)
        assert_bits_equal(np.asarray(den2), np.asarray(den), loss_type)


# ------------------------------------------------------------------------- salt.reweight

NS, D = 8, 5  # samples x feature dim (rank-deficient Gram: D < N)


@st.composite
def gram_inputs(draw):
    phi = draw(hnp.arrays(np.float32, (NS, D), elements=f32(-2, 2)))
    a = draw(hnp.arrays(np.float32, (NS,), elements=f32(-3, 3)))
    ids = np.repeat(np.arange(NS // 2, dtype=np.int32), 2)
    return phi, a, ids


def gap_ok(k: np.ndarray, rank: int) -> tuple[bool, float]:
    """A well-separated rank-``rank`` subspace; returns (ok, lambda_max / gap)."""
    lam = np.linalg.eigvalsh(k.astype(np.float64))[::-1]
    gap = lam[rank - 1] - lam[rank]
    return bool(lam[0] > 1e-3 and gap > 0.05 * lam[0]), float(lam[0] / max(gap, 1e-30))


@SETTINGS
@given(inputs=gram_inputs(), renorm=st.sampled_from(["update_norm", "coef_norm", "none"]))
def test_gamma_max_zero_returns_a_bit_for_bit(inputs, renorm):
    phi, a, ids = inputs
    out, _ = reweight(phi @ phi.T, a, ids, gamma_max=0.0, renorm=renorm, rank=2)
    # Exact values; not bits: reweight computes a + 0 * a_res, which turns -0.0 into
    # +0.0 (reported; salt/reweight.py is not this test's module to change).
    np.testing.assert_array_equal(np.asarray(out), a)


@SETTINGS
@given(inputs=gram_inputs(), perm=st.permutations(list(range(NS))))
def test_reweight_is_permutation_equivariant(inputs, perm):
    phi, a, ids = inputs
    k = (phi @ phi.T).astype(np.float32)
    ok, cond = gap_ok(k, 2)
    assume(ok and np.linalg.norm(a) > 0.1)
    perm = np.asarray(perm)
    want, _ = reweight(k, a, ids, rank=2)
    got, _ = reweight(k[perm][:, perm], a[perm], ids[perm], rank=2)
    # eigh's projector error ~ eps32 * lambda_max / gap per sweep (Davis-Kahan); the
    # renormalized a' is O(||a||) so the absolute error scales with ||a|| * cond.
    scale = 2.0 * np.linalg.norm(a) * cond
    assert_f32_close(np.asarray(got), np.asarray(want)[perm], scale=scale, ops=4 * NS)


@SETTINGS
@given(inputs=gram_inputs(), c=st.floats(0.01, 100.0), k=st.integers(-4, 4))
def test_reweight_is_invariant_to_gram_scale_and_linear_in_a(inputs, c, k):
    phi, a, ids = inputs
    gram = (phi @ phi.T).astype(np.float32)
    ok, cond = gap_ok(gram, 2)
    assume(ok and np.linalg.norm(a) > 0.1)
    want, _ = reweight(gram, a, ids, rank=2)
    scale = 2.0 * np.linalg.norm(a) * cond
    got, _ = reweight((gram * np.float32(c)).astype(np.float32), a, ids, rank=2)
    assert_f32_close(np.asarray(got), np.asarray(want), scale=scale, ops=4 * NS)
    two_k = np.float32(2.0**k)  # a -> 2^k a: every float32 op scales exactly
    got, _ = reweight(gram, a * two_k, ids, rank=2)
    assert_f32_close(np.asarray(got), np.asarray(want) * two_k, scale=scale * two_k, ops=4 * NS)


def test_eps32_is_one_ulp_at_one():
    assert np.float32(1.0) + np.float32(EPS32) > np.float32(1.0)
    assert np.float32(1.0) + np.float32(EPS32 / 2) == np.float32(1.0)
