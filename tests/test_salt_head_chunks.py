"""SALT's LM head in the plain step's chunks (``jaxrl_geom.salt.head``): exact, and no
``[N, T, V]`` logits in the step.

References, independent of the chunked head:

* the head's Gram block against today's full-logits taps (``gram_of_loss`` with
  ``head_positions=0``: the head tapped at every position of ``model(...)``, its
  cotangent ``[N, T, V]`` whole), for every backend, the sketch included (same
  projections: they are keyed by seed, step and module path);
* the SALT update of ``grpo_step`` against ``salt()`` over per-rollout features from
  ``vmap(grad)`` of the linear surrogate through a batch-of-one, unchunked forward.

The completion length (7) is no multiple of the logits chunk (3 positions at N = 8, 6 per
micro-batch of 4), and the Gram forms' own budgets are shrunk so that their vocabulary
tiles (24 columns of 64: the last one overlaps) and position chunks are several too.
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
from tolerances import assert_f32_close

from jaxrl_geom.models import Decoder, ModelConfig
from jaxrl_geom.rl import GrpoConfig, TrainState, grpo_step, losses, make_rollout_batch
from jaxrl_geom.rl import logprobs as lp
from jaxrl_geom.rl.rollouts import abstract_rollout_batch
from jaxrl_geom.rl.step import completion_logits
from jaxrl_geom.salt import (
    SaltConfig,
    SaltKnobs,
    gram_of_loss,
    head_gram,
    per_sample_grads,
    salt,
    salt_estimator,
)
from jaxrl_geom.salt.policy import _completion_logprobs

V, N, P, L = 64, 8, 5, 7
CHUNK_TOKENS = 24  # c = 3 positions at N = 8, 6 at N/2 = 4 (micro-batches)
UNTIED = dataclasses.replace(
    ModelConfig.tiny(V, hidden_size=32, num_hidden_layers=1),
    logits_chunk_tokens=CHUNK_TOKENS,
    scan_layers=False,
)
TIED = dataclasses.replace(UNTIED, model_type="qwen3", qk_norm=True, tie_word_embeddings=True)
KEEP, RECOMPUTE = float("inf"), 0.0  # SaltConfig.keep_budget_gib forcing each path
LR = 1e4  # SGD step: params_old - params_new carries the update to float32 precision
SGD = optax.sgd(LR)
KNOBS = SaltKnobs(gamma_max=2.0, rank=2)  # fixed rank: rounding cannot move it
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# The update passes the Gram through reweight's eigendecomposition, which amplifies its
# rounding by the spectrum's condition number: the same bound as test_salt_step.py.
UPDATE_RTOL = 1e-5


@pytest.fixture
def small_tiles(monkeypatch):
    """Several vocabulary tiles (24 of 64 columns, the last overlapping) inside the head's
    Gram forms, as at V = 151,936 (their position chunks are the logits' chunks)."""
    monkeypatch.setattr(head_gram, "_MIN_TILE", 24)
    monkeypatch.setattr(head_gram, "_TILE_ELEMENTS", 1)
    monkeypatch.setattr(head_gram, "_CHUNK_ELEMENTS", N * L * 24)  # the ghost form's tiles


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(tree)])


def rel_err(x, y) -> float:
    x, y = _flat(x), _flat(y)
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def make_policy(config):
    return nnx.split(Decoder(config, rngs=nnx.Rngs(0)), nnx.Param, ...)


def full_logprobs(model, batch, temperature):
    """Unchunked: the head at every position, then the completion slice."""
    logits = completion_logits(model, batch)  # [n, L, V]
    return lp.token_logprobs(logits, batch.tokens[:, -L:], temperature)


def make_batch(policy, temperature, seed=0):
    graphdef, params, rest = policy
    rng = np.random.default_rng(seed)
    prompt_len = np.array([5, 3, 2, 4, 5, 1, 3, 2])
    completion_len = np.array([7, 3, 1, 6, 7, 2, 5, 4])
    tokens = rng.integers(0, V, (N, P + L))
    prompt_mask = np.arange(P)[None, ::-1] < prompt_len[:, None]
    completion_mask = np.arange(L)[None] < completion_len[:, None]
    adv = rng.normal(size=N)
    groups = np.repeat(np.arange(2), 4).astype(np.int32)
    batch = make_rollout_batch(tokens, prompt_mask, completion_mask, np.zeros((N, L)), adv, groups)
    model = nnx.merge(graphdef, params, rest)
    current = np.asarray(jax.jit(full_logprobs, static_argnums=2)(model, batch, temperature))
    old = current + 0.3 * rng.normal(size=(N, L))  # ratios spread over the clip range
    ref = current + 0.5 * rng.normal(size=(N, L))
    return batch._replace(old_logprobs=jnp.float32(old), ref_logprobs=jnp.float32(ref))


# --------------------------------------------------------------------------- Gram block

BACKENDS = ("ghost", "tiled", "sketch")  # "auto" picks one of them (the step tests use it)


@functools.partial(jax.jit, static_argnums=(0,))
def _blocks(graphdef, params, rest, batch, coef):
    """Per-op Gram blocks of l_i = sum_t coef_it exp(log pi_it - old_it), chunked head vs
    today's full-logits taps, for every backend."""
    model = nnx.merge(graphdef, params, rest)

    def rows(logp_fn):
        def loss(m, b):
            logp = logp_fn(m, b)
            return jnp.sum(coef * jnp.exp(logp - b.old_logprobs), axis=1)  # [N]

        return loss

    chunked = rows(lambda m, b: _completion_logprobs(m, b, 0.7)[0])
    full = rows(lambda m, b: full_logprobs(m, b, 0.7))
    kw = dict(per_op=True, sketch_dim=8, num_rows=N)
    today = {  # the exact blocks (any exact backend) and the sketch (same projections)
        b: gram_of_loss(full, model, batch, head_positions=0, backend=b, **kw)
        for b in ("tiled", "sketch")
    }
    return {
        b: (
            gram_of_loss(chunked, model, batch, head_positions=L, backend=b, **kw),
            today["sketch" if b == "sketch" else "tiled"],
        )
        for b in BACKENDS
    }


@pytest.mark.parametrize("config", [UNTIED, TIED], ids=["untied", "tied"])
def test_head_gram_block_equals_the_full_logits_taps(config, small_tiles):
    policy = make_policy(config)
    batch = make_batch(policy, 0.7, seed=1)
    coef = jnp.where(batch.completion_mask, jax.random.normal(jax.random.key(0), (N, L)), 0.0)
    head = "embed_tokens" if config.tie_word_embeddings else "lm_head"
    for backend, (chunked, full) in _blocks(*policy, batch, coef).items():
        assert chunked.keys() == full.keys()
        scale = float(np.max(np.diag(np.asarray(full[head]))))
        # Sums of L positions per gradient entry, then of D (or N L) products per tile.
        assert_f32_close(chunked[head], full[head], scale=scale, ops=L + 32, err_msg=backend)
        for name in full:  # the trunk's blocks see the same cotangents
            s = float(np.max(np.abs(np.asarray(full[name]))))
            assert_f32_close(chunked[name], full[name], scale=s, ops=L + 32, err_msg=name)
        print(f"{head} {backend}: rel err {rel_err(chunked[head], full[head]):.2e}")


# --------------------------------------------------------------------------- the update


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _reference_update(graphdef, params, rest, batch, config, scope):
    """salt() over vmap per-rollout gradients of l_i = -sum_t w_it active_it r_it (clip
    indicators at the current parameters and the original advantages) + grad beta KL,
    every forward unchunked."""
    num_seq, num_tok = jnp.float32(N), jnp.sum(batch.completion_mask.astype(jnp.float32))
    tau, mask = config.temperature, batch.completion_mask

    def logp_of(params, b):
        return full_logprobs(nnx.merge(graphdef, params, rest), b, tau)

    def ratio_of(logp, b):
        level = config.importance_sampling_level
        return losses.importance_ratio(logp, b.old_logprobs, b.completion_mask, level)

    weights = losses.token_weights(
        mask, config.loss_type, max_completion_length=None, num_sequences=num_seq,
        num_tokens=num_tok,
    )  # fmt: skip
    ratio = ratio_of(logp_of(params, batch), batch)
    active = losses.clip_active(ratio, batch.advantages, config.eps_low, config.eps_high)

    def row_loss(params, row):
        b, w, act = row
        one = jax.tree.map(lambda a: a[None], b)
        return -jnp.sum(w * act * ratio_of(logp_of(params, one), one)[0])

    features = per_sample_grads(row_loss, params, (batch, weights, active))

    def kl(params):
        logp = logp_of(params, batch)
        return config.beta * jnp.sum(weights * losses.kl_k3(logp, batch.ref_logprobs, mask))

    tx = salt(KNOBS, scope=scope)
    update, _ = tx.update(
        features,
        tx.init(params),
        params,
        coefficients=batch.advantages,
        group_ids=batch.group_ids,
        residual_updates=jax.grad(kl)(params),
    )
    return update


def run_step(policy, batch, config, salt_config):
    graphdef, params, rest = policy
    state = TrainState.create(nnx.merge(graphdef, params, rest, copy=True), SGD)
    old = jax.tree.map(lambda a: np.asarray(a, np.float64), state.params)
    estimator = salt_estimator(salt_config)
    step = grpo_step.lower(state, batch, config, estimator).compile(FAST_COMPILE)
    new_state, metrics = step(state, batch, estimator)
    assert float(metrics["salt/ok"]) == 1.0 and float(metrics["skipped"]) == 0.0
    return jax.tree.map(lambda a, b: (a - np.asarray(b, np.float64)) / LR, old, new_state.params)


# GSPO + KL + 2 micro-batches (book-keeping keeps 4 rows each: 2 logits chunks of 6 and 1
# positions; the recompute Gram pass runs all 8 rows: 3 chunks of 3, 3, 1). The head sees
# the loss only through g = dL/dlog pi, so the token-level loss types add nothing here.
GSPO_KL_MICRO = GrpoConfig(
    loss_type="dr_grpo",
    importance_sampling_level="sequence",
    beta=0.04,
    num_micro_batches=2,
    temperature=0.7,
)
CASES = {  # (model, scope, [(budget, backend), ...]): one vmap reference per case
    "untied": (UNTIED, r"mlp|lm_head", [(KEEP, "ghost"), (RECOMPUTE, "tiled")]),
    "tied": (TIED, None, [(KEEP, "auto"), (RECOMPUTE, "auto")]),
}


@pytest.mark.parametrize("case", CASES)
def test_salt_step_with_chunked_head_equals_the_unchunked_reference(case, small_tiles):
    model_config, scope, runs = CASES[case]
    config = GSPO_KL_MICRO
    policy = make_policy(model_config)
    batch = make_batch(policy, config.temperature, seed=2)
    reference = _reference_update(*policy, batch, config, scope)
    for budget, backend in runs:
        salt_config = SaltConfig(KNOBS, scope=scope, backend=backend, keep_budget_gib=budget)
        grads = run_step(policy, batch, config, salt_config)
        err = rel_err(grads, reference)
        print(f"{case} {backend} budget={budget}: rel err {err:.2e}")
        assert err < UPDATE_RTOL, (budget, err)


# --------------------------------------------------------------------------- memory


def salt_step_temp_bytes(vocab: int, t: int, budget: float) -> int:
    """XLA temp bytes of a SALT grpo_step compiled on abstract shapes (nothing allocated)."""
    config = dataclasses.replace(
        ModelConfig.tiny(vocab, hidden_size=32, num_hidden_layers=1),
        tie_word_embeddings=True,
        remat=True,
        attention_impl="blockwise",
        attention_block_size=64,
        logits_chunk_tokens=64,
        scan_layers=False,
    )
    state = jax.eval_shape(lambda: TrainState.create(Decoder(config), optax.adamw(1e-3)))
    batch = abstract_rollout_batch(4, t, t // 2)
    estimator = salt_estimator(SaltConfig(KNOBS, keep_budget_gib=budget))
    compiled = grpo_step.lower(state, batch, GrpoConfig(), estimator).compile(FAST_COMPILE)
    return compiled.memory_analysis().temp_size_in_bytes


def test_salt_step_holds_no_whole_logits():
    """A tied table (the carrier path) on the recompute path (where the budget routes long
    context): the step's scratch memory stays below half of ONE [N, T, V] float32 tensor
    (27 MiB against 64 MiB); the unchunked head held the logits and their cotangent,
    167 MiB (book-keeping: 24 MiB now, 181 MiB before), on this CPU compiler."""
    n, t, v, budget = 4, 512, 8192, RECOMPUTE
    temp = salt_step_temp_bytes(v, t, budget)
    logits = n * t * v * 4
    print(f"budget={budget}: temp {temp / 2**20:.1f} MiB, [N, T, V] f32 {logits / 2**20:.0f} MiB")
    assert temp < 0.5 * logits, (temp, logits)
