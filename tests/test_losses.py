"""Tests for jaxrl_geom.rl.losses (and rl.logprobs) against a float64 NumPy oracle of SPEC 1."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_f32_close

from jaxrl_geom.rl import logprobs as lp
from jaxrl_geom.rl import losses

# ---------------------------------------------------------------------------------------
# Independent oracle: SPEC section 1, line by line, float64, no shared code.
# ---------------------------------------------------------------------------------------


def oracle(
    logp,
    old,
    adv,
    mask,
    *,
    loss_type,
    eps_low,
    eps_high,
    beta,
    ref,
    level,
    l_max=None,
    n_total=None,
    tokens_total=None,
):
    """Returns (loss, metrics) of SPEC section 1 for the rows given."""
    logp, old, adv = (np.asarray(x, np.float64) for x in (logp, old, adv))
    m = np.asarray(mask, bool)
    n, length = m.shape
    eps_high = eps_low if eps_high is None else eps_high
    lengths = m.sum(1).astype(np.float64)
    r = np.ones((n, length))
    for i in range(n):
        valid = np.flatnonzero(m[i])
        if level == "token":
            r[i, valid] = np.exp(logp[i, valid] - old[i, valid])
        else:  # GSPO: s_i = exp(mean over the completion of the log-ratio)
            mean_lr = np.sum(logp[i, valid] - old[i, valid]) / max(len(valid), 1)
            r[i, :] = np.exp(mean_lr)
    a = adv[:, None]
    psi = np.minimum(r * a, np.clip(r, 1 - eps_low, 1 + eps_high) * a)
    kl = np.zeros((n, length))
    if ref is not None:
        d = np.asarray(ref, np.float64) - logp
        kl = np.where(m, np.exp(np.where(m, d, 0.0)) - np.where(m, d, 0.0) - 1, 0.0)
    per_token = -psi + beta * kl
    n_total = n if n_total is None else n_total
    tokens_total = lengths.sum() if tokens_total is None else tokens_total
    l_max = length if l_max is None else l_max
    if loss_type == "grpo":
        loss = sum(per_token[i, m[i]].sum() / max(lengths[i], 1.0) for i in range(n)) / n_total
    elif loss_type in ("bnpo", "dapo"):
        loss = per_token[m].sum() / max(tokens_total, 1.0)
    else:  # dr_grpo
        loss = per_token[m].sum() / (n_total * l_max)
    low = (r < 1 - eps_low) & (a < 0)
    high = (r > 1 + eps_high) & (a > 0)
    metrics = {
        "clip_ratio/low_mean": low[m].mean(),
        "clip_ratio/high_mean": high[m].mean(),
        "clip_ratio/region_mean": (low | high)[m].mean(),
        "ratio_mean": r[m].mean(),
        "completion_length/mean": lengths.mean(),
        "completion_length/min": lengths.min(),
        "completion_length/max": lengths.max(),
    }
    if ref is not None:
        metrics["kl"] = kl[m].mean()
    return loss, metrics


def oracle_grad(logp, *args, h=1e-6, **kwargs):
    """Central finite differences of the oracle loss w.r.t. logp (float64)."""
    logp = np.asarray(logp, np.float64)
    grad = np.zeros_like(logp)
    for idx in np.ndindex(logp.shape):
        up, down = logp.copy(), logp.copy()
        up[idx] += h
        down[idx] -= h
        grad[idx] = (oracle(up, *args, **kwargs)[0] - oracle(down, *args, **kwargs)[0]) / (2 * h)
    return grad


# ---------------------------------------------------------------------------------------
# Inputs: padding (garbage in the padded slots), a zero-length completion, a zero-std group.
# ---------------------------------------------------------------------------------------

N, L = 8, 7
LENGTHS = np.array([7, 3, 0, 5, 1, 7, 2, 4])


def loss_scale(logp, old, adv, mask, ref=None, beta=0.0, level="token"):
    """An upper bound of sum_it |w_it (-psi_it + beta kl_it)| (sum_it w_it <= 1 for every
    loss type): the magnitude a float32 loss sum cancels (tests/tolerances.py)."""
    m = np.asarray(mask, bool)
    lr = np.where(m, logp.astype(np.float64) - old, 0.0)
    if level == "sequence":
        lr = np.repeat(lr.sum(1, keepdims=True) / np.maximum(m.sum(1, keepdims=True), 1), L, 1)
    scale = float(np.max(np.exp(lr) * np.abs(adv)[:, None]))
    if ref is not None and beta > 0:
        d = np.where(m, ref.astype(np.float64) - logp, 0.0)
        scale += beta * float(np.max(np.exp(d) - d - 1.0))
    return max(scale, 1.0)


SUM_OPS = 8 * 8  # N x L tokens in a loss or metric sum (checked in make_inputs)


def make_inputs(seed=0):
    rng = np.random.default_rng(seed)
    mask = np.arange(L)[None, :] < LENGTHS[:, None]  # [N, L]
    old = rng.normal(-1.5, 0.5, (N, L))
    logp = old + 0.4 * rng.normal(size=(N, L))  # ratios straddle both clip bounds
    ref = logp + 0.2 * rng.normal(size=(N, L))
    # groups of 2; group 2 (rows 4, 5) has equal rewards -> zero advantages
    adv = np.abs(rng.normal(size=N)) * np.array([1, -1, 1, -1, 0, 0, 1, -1])
    # garbage where the mask is off: must never reach the loss
    logp = np.where(mask, logp, -30.0)
    old = np.where(mask, old, 25.0)
    ref = np.where(mask, ref, 40.0)
    f32 = lambda x: np.asarray(x, np.float32)
    assert mask.size <= SUM_OPS
    return f32(logp), f32(old), f32(adv), mask, f32(ref)


CLIPS = {"symmetric": (0.2, None), "clip_higher": (0.2, 0.28)}
CASES = list(itertools.product(losses.LOSS_TYPES, CLIPS, (0.0, 0.04), ("token", "sequence")))


def _case_kwargs(loss_type, clip, beta, level):
    eps_low, eps_high = CLIPS[clip]
    return dict(loss_type=loss_type, eps_low=eps_low, eps_high=eps_high, beta=beta, level=level)


def _loss_fn(old, adv, mask, ref, *, loss_type, eps_low, eps_high, beta, level, l_max=None):
    def f(logp):
        t = losses.policy_loss(
            logp,
            old,
            adv,
            mask,
            loss_type=loss_type,
            eps_low=eps_low,
            eps_high=eps_high,
            beta=beta,
            ref_logprobs=ref if beta > 0 else None,
            importance_sampling_level=level,
            max_completion_length=l_max,
        )
        return t.numerator / t.denominator, t.metrics

    return f


@jax.jit
def _all_cases(logp, old, adv, mask, ref):
    """(loss, metrics), grad for every case, in ONE compiled program (compiles dominate)."""
    out = {}
    for case in CASES:
        f = _loss_fn(old, adv, mask, ref, **_case_kwargs(*case))
        out[case] = jax.value_and_grad(f, has_aux=True)(logp)
    return out


@functools.cache
def all_cases():
    return jax.device_get(_all_cases(*make_inputs()))


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_policy_loss_matches_oracle(case):
    logp, old, adv, mask, ref = make_inputs()
    kw = _case_kwargs(*case)
    (loss, metrics), grad = all_cases()[case]
    ref_or_none = ref if kw["beta"] > 0 else None
    want_loss, want_metrics = oracle(logp, old, adv, mask, ref=ref_or_none, **kw)
    scale = loss_scale(logp, old, adv, mask, ref, kw["beta"], kw["level"])
    assert_f32_close(loss, want_loss, scale=scale, ops=SUM_OPS)
    assert set(metrics) == set(want_metrics)
    for k, v in want_metrics.items():  # means of non-negative terms: relative
        assert_f32_close(metrics[k], v, scale=abs(v), ops=SUM_OPS, err_msg=k)
    want_grad = oracle_grad(logp, old, adv, mask, ref=ref_or_none, **kw)
    # per token a few ops (exp, products, the weight), GSPO sums over the row (L)
    assert_f32_close(grad, want_grad, scale=np.abs(want_grad).max() + kw["beta"], ops=L + 4)
    assert np.all(grad[~mask] == 0.0)  # padded tokens get no gradient


def test_dr_grpo_uses_configured_max_completion_length():
    logp, old, adv, mask, ref = make_inputs(1)
    kw = dict(loss_type="dr_grpo", eps_low=0.2, eps_high=None, beta=0.0, level="token")
    loss, _ = jax.jit(_loss_fn(old, adv, mask, ref, l_max=32, **kw))(logp)
    want, _ = oracle(logp, old, adv, mask, ref=None, l_max=32, **kw)
    assert_f32_close(loss, want, scale=loss_scale(logp, old, adv, mask), ops=SUM_OPS)


def test_clip_ratio_metrics_are_nontrivial():
    # Guards the oracle comparison above against inputs that never clip.
    logp, old, adv, mask, ref = make_inputs()
    kw = dict(loss_type="grpo", eps_low=0.2, eps_high=None, beta=0.0, level="token")
    _, m = oracle(logp, old, adv, mask, ref=None, **kw)
    assert m["clip_ratio/low_mean"] > 0 and m["clip_ratio/high_mean"] > 0


@jax.jit
def _terms_all_types(logp, old, adv, mask, ref, num_sequences, num_tokens):
    return {
        (loss_type, level): losses.policy_loss(
            logp,
            old,
            adv,
            mask,
            loss_type=loss_type,
            eps_low=0.2,
            eps_high=0.28,
            beta=0.04,
            ref_logprobs=ref,
            importance_sampling_level=level,
            num_sequences=num_sequences,
            num_tokens=num_tokens,
        )
        for loss_type in losses.LOSS_TYPES
        for level in ("token", "sequence")
    }


def test_micro_batches_sum_to_full_batch():
    logp, old, adv, mask, ref = make_inputs(2)
    n_total = jnp.float32(N)
    tokens_total = jnp.float32(mask.sum())
    full = _terms_all_types(logp, old, adv, mask, ref, n_total, tokens_total)
    # micro-batches of one rollout: row 2 (zero-length completion) is a micro-batch
    # with no valid token at all
    micro = [
        _terms_all_types(logp[s], old[s], adv[s], mask[s], ref[s], n_total, tokens_total)
        for s in (slice(i, i + 1) for i in range(N))
    ]
    for key, terms in full.items():
        loss_type, level = key
        numerators = np.array([m[key].numerator for m in micro])
        denominators = {float(m[key].denominator) for m in micro}
        assert np.all(np.isfinite(numerators)) and numerators[2] == 0.0
        assert denominators == {float(terms.denominator)}
        scale = loss_scale(logp, old, adv, mask, ref, 0.04, level)
        assert_f32_close(
            numerators.sum() / terms.denominator,
            terms.numerator / terms.denominator,
            scale=scale,
            ops=SUM_OPS,
            err_msg=str(key),
        )
        want, _ = oracle(
            logp, old, adv, mask, loss_type=loss_type, eps_low=0.2, eps_high=0.28, beta=0.04,
            ref=ref, level=level,
        )  # fmt: skip
        assert_f32_close(terms.numerator / terms.denominator, want, scale=scale, ops=SUM_OPS)


@pytest.mark.parametrize("loss_type", losses.LOSS_TYPES)
def test_token_weights_and_clip_active_give_the_gradient(loss_type):
    # SPEC 2: grad of the policy part = -sum_t w_it active_it A_i grad r_it, and for
    # token level d r_it / d logp_it = r_it.
    logp, old, adv, mask, _ = make_inputs()
    eps_low, eps_high = CLIPS["clip_higher"]
    w = np.asarray(losses.token_weights(mask, loss_type))
    r = np.asarray(losses.importance_ratio(logp, old, mask, "token"))
    active = np.asarray(losses.clip_active(r, adv, eps_low, eps_high))
    (_, _), grad = all_cases()[(loss_type, "clip_higher", 0.0, "token")]
    assert_f32_close(grad, -w * active * adv[:, None] * r, ops=4)  # same product, float32
    # the weights carry the oracle's normalisation: loss == -sum(w * psi)
    r64 = np.where(mask, np.exp(logp.astype(np.float64) - old), 1.0)
    a = adv[:, None].astype(np.float64)
    psi = np.minimum(r64 * a, np.clip(r64, 1 - eps_low, 1 + eps_high) * a)
    want_loss, _ = oracle(
        logp, old, adv, mask, loss_type=loss_type, eps_low=eps_low, eps_high=eps_high,
        beta=0.0, ref=None, level="token",
    )  # fmt: skip
    np.testing.assert_allclose(-np.sum(w.astype(np.float64) * psi), want_loss, rtol=1e-6)


def test_clip_active_matches_the_min_branch():
    rng = np.random.default_rng(4)
    r = rng.uniform(0.5, 1.6, (6, 50)).astype(np.float32)
    adv = np.array([1.0, -1.0, 0.0, 2.0, -0.5, 0.0], np.float32)
    active = np.asarray(losses.clip_active(r, adv, 0.2, 0.28))
    # hand derivation: the unclipped branch r*A is the min iff r*A <= clip(r)*A
    a = adv[:, None]
    want = np.where(a > 0, r <= 1.28, np.where(a < 0, r >= 0.8, (r >= 0.8) & (r <= 1.28)))
    np.testing.assert_array_equal(active, want)
    assert np.all(r * a <= np.clip(r, 0.8, 1.28) * a + 1e-7, where=active)


def test_non_finite_padding_and_empty_rows_stay_finite():
    logp, old, adv, mask, ref = make_inputs()
    logp = np.where(mask, logp, np.nan).astype(np.float32)
    old = np.where(mask, old, np.inf).astype(np.float32)
    ref = np.where(mask, ref, -np.inf).astype(np.float32)

    @jax.jit
    def both_levels(logp):
        kw = dict(loss_type="grpo", eps_low=0.2, eps_high=None, beta=0.1)
        return [
            jax.value_and_grad(_loss_fn(old, adv, mask, ref, level=lv, **kw), has_aux=True)(logp)
            for lv in ("token", "sequence")
        ]

    for (loss, metrics), grad in both_levels(logp):
        assert np.isfinite(loss) and np.all(np.isfinite(grad))
        assert all(np.isfinite(v) for v in metrics.values())


def test_policy_loss_does_not_recompile():
    logp, old, adv, mask, ref = make_inputs()
    f = jax.jit(lambda *a: losses.policy_loss(*a, loss_type="dapo", eps_high=0.28).numerator)
    f(logp, old, adv, mask)
    f(logp + 0.1, old, adv, mask)
    assert f._cache_size() == 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(loss_type="ppo"), "Unknown loss_type"),
        (dict(eps_low=1.0), "eps_low must be in"),
        (dict(eps_low=-0.1), "eps_low must be in"),
        (dict(eps_high=-0.1), "eps_high must be >= 0"),
        (dict(beta=-1.0), "beta .* must be >= 0"),
        (dict(beta=0.1), "needs ref_logprobs"),
        (dict(importance_sampling_level="seq"), "importance_sampling_level"),
        (dict(max_completion_length=0), "max_completion_length must be >= 1"),
        (dict(num_sequences=2), "WHOLE batch"),
    ],
)
def test_bad_config_raises(kwargs, match):
    logp, old, adv, mask, _ = make_inputs()
    with pytest.raises(ValueError, match=match):
        losses.policy_loss(logp, old, adv, mask, **kwargs)


def test_bad_shapes_and_empty_batches_raise():
    logp, old, adv, mask, _ = make_inputs()
    with pytest.raises(ValueError, match="old_logprobs has shape"):
        losses.policy_loss(logp, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="advantages has shape"):
        losses.policy_loss(logp, old, adv[:3], mask)
    with pytest.raises(ValueError, match="Empty batch"):
        losses.policy_loss(logp[:0], old[:0], adv[:0], mask[:0])
    with pytest.raises(ValueError, match="no valid token"):
        losses.policy_loss(logp, old, adv, np.zeros_like(mask))


# ---------------------------------------------------------------------------------------
# rl.logprobs
# ---------------------------------------------------------------------------------------


def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_and_entropy_match_numpy(temperature):
    rng = np.random.default_rng(5)
    logits = (3 * rng.normal(size=(3, 5, 17))).astype(np.float32)
    targets = rng.integers(0, 17, (3, 5)).astype(np.int32)
    got = jax.jit(lp.token_logprobs, static_argnums=2)(logits, targets, temperature)
    logsm = _np_log_softmax(logits.astype(np.float64) / temperature)
    want = np.take_along_axis(logsm, targets[..., None], -1)[..., 0]
    assert got.dtype == jnp.float32
    # log-softmax cancels max |z| (z = logits / T); ~V terms in the log-sum-exp
    z = np.abs(logits).max() / temperature
    assert_f32_close(got, want, scale=z, ops=17)
    ent = jax.jit(lp.token_entropy, static_argnums=1)(logits, temperature)
    assert_f32_close(ent, -(np.exp(logsm) * logsm).sum(-1), scale=z, ops=2 * 17)
    # d/dlogits sum_t log p(y_t) = (onehot(y) - p) / T  (hand derivation)
    grad = jax.jit(jax.grad(lambda x: lp.token_logprobs(x, targets, temperature).sum()))(logits)
    onehot = np.eye(17)[targets]
    want_grad = (onehot - np.exp(logsm)) / temperature
    assert_f32_close(grad, want_grad, scale=z / temperature, ops=17)


def test_token_logprobs_accepts_bf16_and_returns_f32():
    logits = jnp.asarray(np.random.default_rng(6).normal(size=(2, 3, 11)), jnp.bfloat16)
    targets = jnp.zeros((2, 3), jnp.int32)
    out = lp.token_logprobs(logits, targets)
    want = np.take_along_axis(
        _np_log_softmax(np.asarray(logits, np.float64)), targets[..., None], -1
    )
    assert out.dtype == jnp.float32  # bf16 logits are exact in float32: f32 log-softmax
    assert_f32_close(out, want[..., 0], scale=np.abs(np.asarray(logits, np.float32)).max(), ops=11)


def test_completion_logits_slice_alignment():
    # A "model" whose logits at position t put all mass on token t+1: sliced logits
    # must then give log-prob 0 (the max) to every completion token.
    p, l_comp, v = 4, 3, 10
    tokens = np.array([[0, 0, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7]], np.int32)  # [N, P+L]
    nxt = np.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)  # token at t+1
    logits = 50.0 * np.eye(v, dtype=np.float32)[nxt]  # [N, P+L, V]
    for width in (p + l_comp, p + l_comp - 1):  # full forward and tokens[:, :-1]
        sl = lp.completion_logits_slice(jnp.asarray(logits[:, :width]), p, l_comp)
        assert sl.shape == (2, l_comp, v)
        # log(1 + 9 e^-50) rounds to 0; the log-softmax cancels the 50
        assert_f32_close(lp.token_logprobs(sl, tokens[:, p:]), 0.0, scale=50.0, ops=v)
    with pytest.raises(ValueError, match="prompt_length"):
        lp.completion_logits_slice(jnp.asarray(logits), 0, l_comp)
    with pytest.raises(ValueError, match="S >= P \\+ L - 1"):
        lp.completion_logits_slice(jnp.asarray(logits[:, :4]), p, l_comp)


def test_logprobs_bad_input_raises():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        lp.token_logprobs(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2), jnp.int32), 0.0)
    with pytest.raises(ValueError, match="disagree"):
        lp.token_logprobs(jnp.zeros((1, 2, 3)), jnp.zeros((1, 3), jnp.int32))
