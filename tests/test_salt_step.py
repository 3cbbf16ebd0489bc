"""Tests for ``grpo_step(state, batch, config, salt_estimator(SaltConfig(...)))``.

Reference (independent of the taps): per-rollout features of SPEC section 2's linear
surrogate ``l_i = -sum_t w_it active_it r_it`` built from the formulas here in NumPy
(``w`` per loss type, ``active`` from the clip rule at the original advantages) and a
batch-of-one forward per rollout, materialized with ``per_sample_grads``; the phase-1
``salt()`` transform reweights them with the same knobs and adds the KL gradient
(``residual_updates``). The optimizer is plain SGD with a large step (1e4) so that
``params_old - params_new`` carries the update to full float32 precision.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrl_geom.models import Decoder, ModelConfig, collect_qk_stats, set_qk_capture
from jaxrl_geom.rl import GrpoConfig, TrainState, grpo_step, make_rollout_batch
from jaxrl_geom.salt import SaltConfig, SaltKnobs, per_sample_grads, salt, salt_estimator
from jaxrl_geom.sharding import make_mesh, shard_batch, shard_model

V, N, P, L = 64, 8, 5, 6
MODEL = ModelConfig.tiny(V, hidden_size=32, num_hidden_layers=1)
# Tied head, q/k norms, remat: every kind of tap (dense, scale, lookup + head of a table).
TIED = dataclasses.replace(
    MODEL, model_type="qwen3", qk_norm=True, tie_word_embeddings=True, remat=True
)
KEEP, RECOMPUTE = float("inf"), 0.0  # SaltConfig.keep_budget_gib forcing each path
LR = 1e4
GROUPS = np.repeat(np.arange(2), 4).astype(np.int32)

TOKEN_KL = GrpoConfig(loss_type="grpo", beta=0.04)
SEQUENCE_KL_MICRO = GrpoConfig(
    loss_type="dr_grpo",
    importance_sampling_level="sequence",
    eps_high=0.28,
    beta=0.04,
    num_micro_batches=2,
    capture_activations=True,
)
TOKEN_MICRO = GrpoConfig(loss_type="bnpo", num_micro_batches=2)
# XLA:CPU compile time dominates these tests; backend optimization level 0 halves it
# (same HLO, so the same semantics; numerics are compared with tolerances anyway).
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# Fixed ranks (not the energy rule) so that float32 noise cannot move a rank boundary.
SALT_A = SaltConfig(SaltKnobs(gamma_max=2.0, rank=2))
SALT_B = SaltConfig(
    SaltKnobs(gamma_max=1.0, power=0.5, rank=3, recenter=True, renorm="coef_norm"),
    scope=r"mlp|lm_head",
)


def rel_err(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return np.linalg.norm(x - y) / np.linalg.norm(y)


def tree_rel_err(x, y):
    flat = lambda t: np.concatenate(
        [np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(t)]
    )
    return rel_err(flat(x), flat(y))


# --------------------------------------------------------------------------- fixtures


def completion_logprobs(model, tokens, positions, attention_mask, temperature=1.0):
    """log pi(o_t) of the completion tokens, [rows, L] (positions P-1 .. P+L-2 predict)."""
    logits, _ = model(tokens[:, :-1], positions[:, :-1], attention_mask[:, :-1])
    logp = jax.nn.log_softmax(logits[:, -L:] / temperature)
    return jnp.take_along_axis(logp, tokens[:, -L:, None], axis=-1)[..., 0]


def make_policy(config):
    model = Decoder(config, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    logprobs = jax.jit(lambda p, *b: completion_logprobs(nnx.merge(graphdef, p, rest), *b))
    return graphdef, params, rest, logprobs


@pytest.fixture(scope="module")
def policy():
    return make_policy(MODEL)


@pytest.fixture(scope="module")
def tied_policy():
    return make_policy(TIED)


def make_batch(policy, seed=0, *, duplicated=False):
    """Left-padded prompts, ragged completions, ratios spread over the clip range."""
    _, params, _, logprobs = policy
    rng = np.random.default_rng(seed)
    prompt_len = np.array([5, 3, 2, 4, 5, 1, 3, 2])
    completion_len = np.array([6, 3, 1, 6, 4, 2, 5, 6])
    tokens = rng.integers(0, V, (N, P + L))
    advantages = rng.normal(size=N)
    advantages[5] = 0.0  # A = 0: active only inside the trust region
    if duplicated:  # pairs of identical rollouts with opposite advantages
        tokens[1::2] = tokens[::2]
        prompt_len[1::2], completion_len[1::2] = prompt_len[::2], completion_len[::2]
        advantages = np.tile([1.0, -1.0], N // 2)
    prompt_mask = np.arange(P)[None, ::-1] < prompt_len[:, None]
    completion_mask = np.arange(L)[None] < completion_len[:, None]
    batch = make_rollout_batch(
        tokens, prompt_mask, completion_mask, np.zeros((N, L)), advantages, GROUPS
    )
    current = np.asarray(logprobs(params, batch.tokens, batch.positions, batch.attention_mask))
    noise = 0.0 if duplicated else 0.3
    old = current + noise * rng.normal(size=(N, L))
    ref = current + 0.5 * rng.normal(size=(N, L))
    return batch._replace(
        old_logprobs=jnp.asarray(old, jnp.float32), ref_logprobs=jnp.asarray(ref, jnp.float32)
    )


# --------------------------------------------------------------------------- reference


def spec_weights(mask: np.ndarray, loss_type: str) -> np.ndarray:
    """w_it of SPEC section 1 (normaliser included)."""
    m = mask.astype(np.float64)
    if loss_type == "grpo":
        return m / np.maximum(m.sum(1, keepdims=True), 1) / len(m)
    if loss_type in ("bnpo", "dapo"):
        return m / max(m.sum(), 1)
    return m / (len(m) * m.shape[1])  # dr_grpo, L_max = L


def spec_ratio(logp, old, mask, sequence):
    """r_it, or GSPO's s_i broadcast over tokens when ``sequence`` (may be traced)."""
    log_ratio = jnp.where(mask, logp - old, 0.0)
    lengths = jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1)
    seq = jnp.broadcast_to(jnp.sum(log_ratio, -1, keepdims=True) / lengths, log_ratio.shape)
    return jnp.exp(jnp.where(sequence, seq, log_ratio))


def spec_active(ratio, advantages, eps_low, eps_high):
    """The clip branch passes the gradient (SPEC section 2; ties count as active)."""
    a = advantages[:, None]
    up, down = ratio <= 1 + eps_high, ratio >= 1 - eps_low
    return np.where(a > 0, up, np.where(a < 0, down, up & down))


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "salt_config"))
def _reference_update(
    graphdef, params, rest, batch, weights, active, beta, sequence, temperature, salt_config
):
    """salt() over materialized per-rollout features of l_i plus the KL gradient, and
    the q/k statistics of a plain forward. ``beta`` and ``sequence`` are traced."""
    rows = (batch.tokens, batch.positions, batch.attention_mask, batch.completion_mask)
    rows += (batch.old_logprobs, weights, active)

    def row_loss(params, row):  # ONE rollout through a batch-of-one forward
        tokens, positions, attn, mask, old, w, act = row
        model = nnx.merge(graphdef, params, rest)
        logp = completion_logprobs(model, tokens[None], positions[None], attn[None], temperature)
        ratio = spec_ratio(logp, old[None], mask[None], sequence)[0]  # [L]
        return -jnp.sum(w * act * ratio)

    features = per_sample_grads(row_loss, params, rows)

    def kl_loss(params):  # beta sum_it w_it k3_it
        model = nnx.merge(graphdef, params, rest)
        logp = completion_logprobs(
            model, batch.tokens, batch.positions, batch.attention_mask, temperature
        )
        d = jnp.where(batch.completion_mask, batch.ref_logprobs - logp, 0.0)
        return beta * jnp.sum(weights * (jnp.exp(d) - d - 1.0))

    kl_grad = jax.grad(kl_loss)(params)
    tx = salt(salt_config.knobs, scope=salt_config.scope)
    update, state = tx.update(
        features,
        tx.init(params),
        params,
        coefficients=batch.advantages,
        group_ids=batch.group_ids,
        residual_updates=kl_grad,
    )
    model = nnx.merge(graphdef, params, rest)
    set_qk_capture(model, True)
    inputs = (batch.tokens[:, :-1], batch.positions[:, :-1], batch.attention_mask[:, :-1])
    _, intermediates = nnx.capture(model, nnx.Intermediate)(*inputs)
    return update, state.diagnostics, collect_qk_stats(intermediates)


def reference(policy, batch, config: GrpoConfig, salt_config: SaltConfig):
    """(update, diagnostics, plain loss, q/k stats) from the SPEC formulas + salt()."""
    graphdef, params, rest, logprobs = policy
    salt_config = SaltConfig(salt_config.knobs, scope=salt_config.scope)  # what salt() reads
    mask = np.asarray(batch.completion_mask)
    current = logprobs(params, batch.tokens, batch.positions, batch.attention_mask)
    sequence = config.importance_sampling_level == "sequence"
    ratio = np.asarray(spec_ratio(current, batch.old_logprobs, mask, sequence))
    eps_high = config.eps_low if config.eps_high is None else config.eps_high
    adv = np.asarray(batch.advantages, np.float64)
    active = spec_active(ratio, adv, config.eps_low, eps_high)
    weights = spec_weights(mask, config.loss_type)
    args = (graphdef, params, rest, batch, jnp.asarray(weights, jnp.float32))
    args += (jnp.asarray(active), jnp.float32(config.beta), jnp.asarray(sequence))
    static = dict(temperature=config.temperature, salt_config=salt_config)
    key = ("reference", graphdef, *static.values())
    if key not in _COMPILED:
        _COMPILED[key] = _reference_update.lower(*args, **static).compile(FAST_COMPILE)
    update, diagnostics, stats = _COMPILED[key](*args[1:])
    # The plain clipped loss at the original advantages (what grpo_step reports).
    psi = np.minimum(
        ratio * adv[:, None], np.clip(ratio, 1 - config.eps_low, 1 + eps_high) * adv[:, None]
    )
    d = np.where(mask, np.asarray(batch.ref_logprobs) - np.asarray(current), 0.0)
    loss = np.sum(weights * (-psi + config.beta * (np.exp(d) - d - 1.0)))
    return update, diagnostics, loss, stats


def record_activation_stats() -> optax.GradientTransformationExtraArgs:
    """Keeps the ``activation_stats=`` extra arg (q sums) in its state, for inspection."""

    def init(params):
        del params
        return jnp.zeros((MODEL.num_hidden_layers, MODEL.num_attention_heads * MODEL.head_dim))

    def update(updates, state, params=None, *, activation_stats=None, **extra):
        del state, params, extra
        return updates, activation_stats["q"].sum_abs

    return optax.GradientTransformationExtraArgs(init, update)


_COMPILED: dict = {}  # compiled once per static configuration (and input sharding)
SGD = optax.sgd(LR)  # ONE object: the optimizer is a static part of TrainState
FROZEN = optax.sgd(0.0)
RECORD_AND_SGD = optax.chain(record_activation_stats(), SGD)


def run_step(policy, batch, config, salt_config, *, mesh=None, tx=None):
    """grpo_step with SGD(LR): returns (grads as float64 arrays, metrics, new state)."""
    graphdef, params, rest, _ = policy
    model = nnx.merge(graphdef, params, rest, copy=True)  # shard_model must not touch `params`
    if mesh is not None:
        model, batch = shard_model(model, mesh), shard_batch(batch, mesh)
    state = TrainState.create(model, SGD if tx is None else tx)
    old = jax.tree.map(lambda a: np.asarray(a, np.float64), state.params)
    key = ("grpo_step", graphdef, config, salt_config, state.tx, mesh is not None)
    if key not in _COMPILED:
        estimator = None if salt_config is None else salt_estimator(salt_config)
        lowered = grpo_step.lower(state, batch, config, estimator)
        _COMPILED[key] = lowered.compile(FAST_COMPILE)
    estimator = None if salt_config is None else salt_estimator(salt_config)
    new_state, metrics = _COMPILED[key](state, batch, estimator)
    grads = jax.tree.map(lambda a, b: (a - np.asarray(b, np.float64)) / LR, old, new_state.params)
    return grads, metrics, new_state


def check_against_reference(policy, batch, config, salt_config, grads, metrics):
    update, diagnostics, loss, stats = reference(policy, batch, config, salt_config)
    assert tree_rel_err(grads, update) < 1e-5
    assert abs(float(metrics["salt/kappa_before"]) - float(diagnostics.kappa_before)) < 1e-5
    assert abs(float(metrics["salt/kappa_after"]) - float(diagnostics.kappa_after)) < 1e-5
    assert int(metrics["salt/rank"]) == int(diagnostics.rank)
    assert float(metrics["salt/ok"]) == 1.0
    # a' != a (a real test): amplified or re-centered (kappa moves well above rounding).
    assert abs(float(metrics["salt/kappa_after"]) - float(metrics["salt/kappa_before"])) > 1e-5
    assert float(metrics["salt/zero_adv_mass"]) == 0.0  # zero_advantage="exclude"
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5, atol=1e-7)
    return stats


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("budget", [KEEP, RECOMPUTE])
def test_token_level_with_kl_matches_vmap_reference(policy, budget):
    """Book-keeping (one backward, X^T a' D) or recompute (one forward, two backward)."""
    batch = make_batch(policy)
    salt_config = dataclasses.replace(SALT_A, keep_budget_gib=budget)
    grads, metrics, _ = run_step(policy, batch, TOKEN_KL, salt_config)
    check_against_reference(policy, batch, TOKEN_KL, salt_config, grads, metrics)
    assert float(metrics["salt/gamma"]) > 0
    assert 0 < float(metrics["salt/severity"]) < 1  # logged (item 3 of issue 11)


@pytest.mark.parametrize("budget", [KEEP, RECOMPUTE])
def test_eight_devices_sequence_level_kl_micro_batches_capture(policy, budget):
    """Params and batch sharded on 8 fake CPU devices; 2 micro-batches (book-keeping:
    X and D kept per micro-batch, Gram after the last; recompute: full-batch Gram pass,
    then the update accumulated); scope, re-centering; q/k statistics pass through."""
    assert jax.device_count() == 8
    batch = make_batch(policy, seed=2)
    config, mesh = SEQUENCE_KL_MICRO, make_mesh()
    salt_config = dataclasses.replace(SALT_B, keep_budget_gib=budget)
    grads, metrics, state = run_step(
        policy, batch, config, salt_config, mesh=mesh, tx=RECORD_AND_SGD
    )
    stats = check_against_reference(policy, batch, config, salt_config, grads, metrics)
    np.testing.assert_allclose(state.opt_state[0], stats["q"].sum_abs, rtol=1e-5)


def test_tied_head_gspo_kl_micro_batches_both_paths_agree(tied_policy):
    """Tied table (lookup + head + cross terms), q/k norms, remat: both paths equal the
    vmap reference and each other."""
    batch = make_batch(tied_policy, seed=6)
    config = GrpoConfig(importance_sampling_level="sequence", beta=0.04, num_micro_batches=2)
    out = {}
    for budget in (KEEP, RECOMPUTE):
        salt_config = dataclasses.replace(SALT_A, keep_budget_gib=budget)
        out[budget], metrics, _ = run_step(tied_policy, batch, config, salt_config)
        check_against_reference(tied_policy, batch, config, salt_config, out[budget], metrics)
    assert tree_rel_err(out[KEEP], out[RECOMPUTE]) < 1e-5


def test_bf16_compute_paths_agree_within_bf16_tolerance(tied_policy):
    """bf16 compute (float32 parameters): the Gram in bf16 with float32 accumulation.
    bf16 keeps 8 significant bits (eps 2^-8 = 3.9e-3); both paths share the bf16
    forward and D, and differ only in how the weight gradients are summed, so they
    agree to a few eps; against the float32 reference the whole bf16 forward
    differs, hence a few percent."""
    config16 = dataclasses.replace(TIED, dtype="bfloat16")
    graphdef, params, rest, logprobs = tied_policy
    policy16 = (nnx.split(Decoder(config16, rngs=nnx.Rngs(0)), nnx.Param, ...)[0], params, rest)
    policy16 += (logprobs,)
    batch = make_batch(tied_policy, seed=7)
    out = {}
    for budget in (KEEP, RECOMPUTE):
        salt_config = dataclasses.replace(SALT_A, keep_budget_gib=budget)
        out[budget], metrics, _ = run_step(policy16, batch, TOKEN_KL, salt_config)
        assert float(metrics["salt/ok"]) == 1.0
    reference_update = reference(tied_policy, batch, TOKEN_KL, SALT_A)[0]
    assert tree_rel_err(out[KEEP], out[RECOMPUTE]) < 4 * 2**-8  # measured 6e-3
    assert tree_rel_err(out[KEEP], reference_update) < 5e-2  # measured 1.6e-2


def test_knob_schedule_does_not_recompile(policy):
    """gamma_max, power, energy, renorm are traced: one compiled step for a schedule."""
    graphdef, params, rest, _ = policy
    batch = make_batch(policy, seed=8)
    state = TrainState.create(nnx.merge(graphdef, params, rest, copy=True), FROZEN)
    gammas = []
    schedule = [
        (0.5, 1.0, 0.9, "update_norm"),
        (1.0, 2.0, 0.5, "none"),
        (2.0, 0.5, 0.7, "coef_norm"),
    ]
    for gamma_max, power, energy, renorm in schedule:
        knobs = SaltKnobs(gamma_max=gamma_max, power=power, energy=energy, renorm=renorm)
        state, metrics = grpo_step(state, batch, TOKEN_KL, salt_estimator(SaltConfig(knobs)))
        severity = float(metrics["salt/severity"])
        np.testing.assert_allclose(
            float(metrics["salt/gamma"]), gamma_max * severity**power, rtol=1e-5
        )
        gammas.append(float(metrics["salt/gamma"]))
        if len(gammas) == 1:
            size = grpo_step._cache_size()
    assert grpo_step._cache_size() == size
    assert len(set(gammas)) == 3


def test_gamma_zero_is_plain_grpo_bit_for_bit(policy):
    """Through micro-batch accumulation (the scan of grpo_step) too."""
    batch = make_batch(policy, seed=3)
    _, plain_metrics, plain = run_step(policy, batch, TOKEN_MICRO, None)
    _, metrics, state = run_step(policy, batch, TOKEN_MICRO, SaltConfig(SaltKnobs(gamma_max=0.0)))
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)
    for key, value in plain_metrics.items():
        np.testing.assert_array_equal(metrics[key], value, err_msg=key)
    # The geometry is still logged: kappa of the plain advantages, no reweighting.
    assert float(metrics["salt/gamma"]) == 0.0
    assert float(metrics["salt/coef_norm_ratio"]) == 1.0
    assert 0.0 < float(metrics["salt/kappa_before"]) == float(metrics["salt/kappa_after"])


def test_shared_direction_cancellation_is_reported(policy):
    """Identical rollout pairs with advantages +1/-1: sum_i a_i g_i = 0, so kappa = 0."""
    batch = make_batch(policy, seed=4, duplicated=True)
    grads, metrics, _ = run_step(policy, batch, TOKEN_KL, SALT_A)
    assert float(metrics["salt/kappa_before"]) < 1e-3
    assert float(metrics["salt/gamma"]) > 0.99 * SALT_A.knobs.gamma_max
    assert float(metrics["salt/ok"]) == 1.0
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_salt_estimator_needs_a_salt_config():
    with pytest.raises(ValueError, match="SaltConfig"):
        salt_estimator("salt")


def test_chain_form_adds_residual_updates_unchanged():
    """salt() as the first link over per-sample features: the KL gradient (or any term
    outside Phi) enters as residual_updates, after the aggregation."""
    rng = np.random.default_rng(5)
    features = {"w": jnp.asarray(rng.normal(size=(4, 3, 2)), jnp.float32)}
    residual = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
    a = jnp.asarray([1.0, -0.5, 0.25, 2.0])
    tx = optax.chain(salt(gamma_max=0.0), optax.scale(-1.0))
    out, _ = tx.update(features, tx.init(residual), coefficients=a, residual_updates=residual)
    expected = -(np.einsum("i,ijk->jk", a, features["w"]) + residual["w"])
    np.testing.assert_allclose(out["w"], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="residual_updates must be"):
        tx.update(features, tx.init(residual), coefficients=a, residual_updates={"w": a})
