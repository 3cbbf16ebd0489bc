"""Tests for jaxrl_geom.rl.step.grpo_step: the update it makes is the SPEC section 1 one.

References, all independent of ``rl.losses`` / ``rl.step``:

* a float64 NumPy oracle of SPEC section 1 evaluated on the model's logits (loss,
  clip fractions, ratio, entropy, k3 KL), the logits sliced from a forward pass over
  the FULL rows (``logits[:, P-1 : P+L-1]``), not the step's ``tokens[:, :-1]`` pass;
* central finite differences of that oracle w.r.t. single parameters;
* ``jax.grad`` of a direct JAX transcription of the formula (``min(rA, clip(r)A)``,
  not the step's ``where(active, ...)`` form) whose loss-type normalisation comes in as
  NumPy-built token weights, so one compiled reference serves every configuration;
* AdamW written out in NumPy (Loshchilov & Hutter, arXiv:1711.05101) for the sharded
  steps; per-channel q/k statistics recomputed by hand from the residual stream.

The model is ``ModelConfig.tiny`` (hidden 32, 2 layers, 4 heads, 2 kv heads, vocab 64).
XLA compilation dominates the run time (5-9 s of CPU per step variant on the CI
machine), so the tests share one optimizer object per kind (the optimizer is static
in ``TrainState``: a new object recompiles) and keep the number of step variants small.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tolerances import assert_f32_close, f32_atol

from jaxrl_geom.models import Decoder, ModelConfig
from jaxrl_geom.models.taps import ChannelStats
from jaxrl_geom.rl.advantages import group_advantages
from jaxrl_geom.rl.rollouts import make_rollout_batch, repeat_prompts
from jaxrl_geom.rl.step import GrpoConfig, RolloutBatch, TrainState, grpo_step, policy_logprobs
from jaxrl_geom.sharding import make_mesh, param_shardings, shard_batch, shard_model

VOCAB = 64
N, P, L = 8, 6, 5  # 4 prompts x 2 rollouts; prompt and completion buffer widths
PROMPT_LENGTHS = np.array([6, 6, 3, 3, 1, 1, 4, 4])  # left padding, one length per group
COMPLETION_LENGTHS = np.array([5, 2, 1, 4, 3, 5, 2, 3])
REWARDS = np.array([1.0, 0.0, 0.5, 0.5, 0.0, 1.0, 0.2, 0.9])  # group 1 has zero std
LR = 0.5
SGD = optax.sgd(LR)
ADAMW_ARGS = dict(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1)
ADAMW = optax.adamw(**ADAMW_ARGS)

CONFIGS = {
    "grpo": GrpoConfig(loss_type="grpo"),
    "bnpo": GrpoConfig(loss_type="bnpo"),
    "dr_grpo": GrpoConfig(loss_type="dr_grpo", max_completion_length=8),
    # DAPO clip-higher, GSPO sequence-level ratio and a sampling temperature at once.
    "dapo_gspo_tau": GrpoConfig(
        loss_type="dapo", eps_high=0.28, importance_sampling_level="sequence", temperature=0.7
    ),
}
# Float32 tolerances (tests/tolerances.py): the step and the references run different
# kernels over the same 2-layer model, ~4 reductions per layer plus the head, so logits
# differ by ~MODEL_OPS ulps of max|logit|; a loss or metric then sums N x L tokens.
MODEL_OPS = 4 * 2 + 1
SUM_OPS = N * L
FD_LEAVES = (  # parameter tensors probed by finite differences (path substrings)
    ("embed_tokens",),
    ("[0]", "q_proj"),
    ("[1]", "down_proj"),
    ("lm_head",),
    ("[0]", "input_layernorm"),
)


# ---------------------------------------------------------------------------------------
# Independent references.
# ---------------------------------------------------------------------------------------


def log_softmax_np(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def loss_weights_np(mask: np.ndarray, config: GrpoConfig) -> np.ndarray:
    """w_it of SPEC section 1: grpo 1/(N |o_i|), bnpo/dapo 1/sum|o|, dr_grpo 1/(N L_max)."""
    m = mask.astype(np.float64)
    n, width = m.shape
    if config.loss_type == "grpo":
        return m / np.maximum(m.sum(1, keepdims=True), 1.0) / n
    if config.loss_type in ("bnpo", "dapo"):
        return m / max(m.sum(), 1.0)
    return m / (n * (config.max_completion_length or width))


def spec_oracle(logits: np.ndarray, b: dict[str, np.ndarray], config: GrpoConfig):
    """(loss, metrics, logp) of SPEC section 1 from the completion logits [N, L, V]."""
    m = b["completion_mask"]
    logz = log_softmax_np(logits.astype(np.float64) / config.temperature)  # [N, L, V]
    logp = np.take_along_axis(logz, b["targets"][..., None], -1)[..., 0]  # [N, L]
    lengths = m.sum(1)
    log_ratio = np.where(m, logp - b["old_logprobs"], 0.0)
    if config.importance_sampling_level == "sequence":  # GSPO: s_i = exp(mean log-ratio)
        log_ratio = np.repeat(log_ratio.sum(1, keepdims=True) / lengths[:, None], L, 1)
    r = np.exp(log_ratio)
    a = b["advantages"].astype(np.float64)[:, None]
    eps_low = config.eps_low
    eps_high = eps_low if config.eps_high is None else config.eps_high
    psi = np.minimum(r * a, np.clip(r, 1 - eps_low, 1 + eps_high) * a)
    d = np.where(m, b["ref_logprobs"] - logp, 0.0)
    kl = np.exp(d) - d - 1.0  # k3
    per_token = loss_weights_np(m, config) * (-psi + config.beta * kl)
    loss = np.sum(per_token)
    low, high = (r < 1 - eps_low) & (a < 0), (r > 1 + eps_high) & (a > 0)
    entropy = -np.sum(np.exp(logz) * logz, -1)
    metrics = {
        "loss": loss,
        "clip_ratio/low_mean": low[m].mean(),
        "clip_ratio/high_mean": high[m].mean(),
        "clip_ratio/region_mean": (low | high)[m].mean(),
        "ratio_mean": r[m].mean(),
        "entropy": entropy[m].mean(),
        "kl": kl[m].mean(),
        "completion_length/mean": lengths.mean(),
        "completion_length/min": lengths.min(),
        "completion_length/max": lengths.max(),
        "loss_abs": np.sum(np.abs(per_token)),  # the magnitude the loss sum cancels
    }
    return loss, metrics, logp


def spec_loss_jax(params, graphdef, rest, b: RolloutBatch, weights, hyper):
    """Direct JAX transcription of SPEC section 1 (shares no code with rl.losses)."""
    logits, _ = nnx.merge(graphdef, params, rest)(b.tokens, b.positions, b.attention_mask)
    z = logits[:, P - 1 : P + L - 1] / hyper["temperature"]  # [N, L, V] from full rows
    logp = jnp.take_along_axis(jax.nn.log_softmax(z), b.tokens[:, P:, None], -1)[..., 0]
    m = b.completion_mask.astype(jnp.float32)
    log_ratio = (logp - b.old_logprobs) * m
    seq = jnp.sum(log_ratio, 1, keepdims=True) / jnp.maximum(jnp.sum(m, 1, keepdims=True), 1.0)
    r = jnp.exp(jnp.where(hyper["sequence"] > 0, seq * jnp.ones_like(log_ratio), log_ratio))
    a = b.advantages[:, None]
    psi = jnp.minimum(r * a, jnp.clip(r, 1 - hyper["eps_low"], 1 + hyper["eps_high"]) * a)
    d = (b.ref_logprobs - logp) * m
    return jnp.sum(weights * (-psi + hyper["beta"] * (jnp.exp(d) - d - 1.0)))


def hyper_of(config: GrpoConfig) -> dict[str, jax.Array]:
    values = dict(
        temperature=config.temperature,
        eps_low=config.eps_low,
        eps_high=config.eps_low if config.eps_high is None else config.eps_high,
        beta=config.beta,
        sequence=float(config.importance_sampling_level == "sequence"),
    )
    return {k: jnp.float32(v) for k, v in values.items()}


def adamw_np(params, grads, mu, nu, t, learning_rate, b1, b2, eps, weight_decay):
    """One decoupled-weight-decay Adam step (optax.adamw defaults: no eps_root, no mask)."""
    mu = [b1 * m + (1 - b1) * g for m, g in zip(mu, grads, strict=True)]
    nu = [b2 * v + (1 - b2) * g * g for v, g in zip(nu, grads, strict=True)]
    new = [
        p
        - learning_rate * ((m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + weight_decay * p)
        for p, m, v in zip(params, mu, nu, strict=True)
    ]
    return new, mu, nu


# ---------------------------------------------------------------------------------------
# Fixtures: one tiny model, one hand-built batch, compiled references.
# ---------------------------------------------------------------------------------------


class Setup(NamedTuple):
    model: nnx.Module
    graphdef: Any
    params: Any  # nnx.State of nnx.Param
    rest: Any
    batch: RolloutBatch
    np_batch: dict[str, np.ndarray]  # the batch as NumPy, plus "targets" [N, L]
    logits: np.ndarray  # f32 [N, L, V] at the initial params
    completion_logits: Any  # jitted params -> [N, L, V]
    reference_grad: Any  # jitted (params, batch, weights, hyper) -> grad of spec_loss_jax

    def with_batch(self, batch: RolloutBatch) -> dict[str, np.ndarray]:
        return {
            **{k: np.asarray(v) for k, v in batch._asdict().items()},
            "targets": self.np_batch["targets"],
        }


@pytest.fixture(scope="module")
def setup() -> Setup:
    """Left-padded prompts of 4 lengths, completions of 5 lengths (1 to L), a zero-std
    group; old log-probs = current ones + noise (some ratios leave the clip range) and
    garbage in every masked slot (it must never reach the loss)."""
    config = ModelConfig.tiny(
        VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    model = Decoder(config, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)

    prompt_mask = np.arange(P)[None, :] >= (P - PROMPT_LENGTHS)[:, None]  # [N, P]
    completion_mask = np.arange(L)[None, :] < COMPLETION_LENGTHS[:, None]  # [N, L]
    prompts = rng.integers(3, VOCAB, (N // 2, P)).repeat(2, 0)  # one prompt per group
    tokens = np.concatenate([prompts, rng.integers(3, VOCAB, (N, L))], 1).astype(np.int32)
    tokens[:, :P][~prompt_mask] = 0  # pad id
    tokens[:, P:][~completion_mask] = 0
    groups = REWARDS.reshape(-1, 2)
    std = groups.std(1, ddof=1, keepdims=True)
    advantages = np.where(std > 0, (groups - groups.mean(1, keepdims=True)) / (std + 1e-4), 0.0)
    batch = make_rollout_batch(
        tokens,
        prompt_mask,
        completion_mask,
        np.zeros((N, L), np.float32),
        advantages.reshape(-1).astype(np.float32),
        np.repeat(np.arange(N // 2), 2).astype(np.int32),
    )

    @jax.jit
    def completion_logits(params):
        logits, _ = nnx.merge(graphdef, params, rest)(
            batch.tokens, batch.positions, batch.attention_mask
        )
        return logits[:, P - 1 : P + L - 1]  # [N, L, V]

    logits = np.asarray(completion_logits(params))
    logp = np.take_along_axis(log_softmax_np(logits.astype(np.float64)), tokens[:, P:, None], -1)
    old = np.where(completion_mask, logp[..., 0] + rng.normal(0.0, 0.3, (N, L)), 30.0)
    ref = np.where(completion_mask, 0.0, -30.0)
    batch = batch._replace(
        old_logprobs=jnp.asarray(old, jnp.float32), ref_logprobs=jnp.asarray(ref, jnp.float32)
    )
    np_batch = {k: np.asarray(v) for k, v in batch._asdict().items()}
    np_batch["targets"] = tokens[:, P:]
    reference_grad = jax.jit(jax.grad(lambda p, b, w, h: spec_loss_jax(p, graphdef, rest, b, w, h)))
    return Setup(
        model, graphdef, params, rest, batch, np_batch, logits, completion_logits, reference_grad
    )


def run_step(setup: Setup, config: GrpoConfig, tx=SGD, batch: RolloutBatch | None = None):
    """One step from a fresh TrainState (a copy: the model's arrays are never donated)."""
    state = TrainState.create(setup.model, tx)
    return grpo_step(state, setup.batch if batch is None else batch, config)


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def step_gradient(setup: Setup, new_params) -> list[np.ndarray]:
    """With sgd(LR): grad = (theta - theta') / LR."""
    return [(a - b) / LR for a, b in zip(leaves(setup.params), leaves(new_params), strict=True)]


def reference_gradient(setup: Setup, config: GrpoConfig, batch=None, params=None):
    batch = setup.batch if batch is None else batch
    weights = jnp.asarray(loss_weights_np(np.asarray(batch.completion_mask), config), jnp.float32)
    params = setup.params if params is None else params
    return leaves(setup.reference_grad(params, batch, weights, hyper_of(config)))


def zmax(setup: Setup, config: GrpoConfig) -> float:
    """max |logit / T|: the scale of the log-prob rounding (log-softmax cancels it)."""
    return max(1.0, float(np.abs(setup.logits).max()) / config.temperature)


def assert_loss_close(setup, config, got, loss, expected):
    """Loss vs the float64 oracle: log-probs off by ~MODEL_OPS ulps of zmax, weighted by
    sum |w (-psi + beta kl)|, plus the rounding of the N x L sum."""
    scale = expected["loss_abs"] * zmax(setup, config)
    assert_f32_close(float(got), loss, scale=scale, ops=MODEL_OPS + SUM_OPS)


def assert_leaves_close(actual, expected, scales, ops, what=""):
    """Leaf i within ``ulps * eps32 * (|y| + ops * scales[i])`` (tests/tolerances.py)."""
    for i, (x, y, s) in enumerate(zip(actual, expected, scales, strict=True)):
        assert_f32_close(x, y, scale=s, ops=ops, err_msg=f"{what} leaf {i}")


def assert_grads_close(setup, config, grads, reference, what):
    """Gradients recovered from an SGD step, (theta - theta') / LR, vs the reference:
    the recovery costs ~2 ulps of |theta| / LR, the kernels ~zmax ulps of max|g|."""
    scales = [
        2 * np.abs(p).max() / LR + np.abs(r).max() * zmax(setup, config)
        for p, r in zip(leaves(setup.params), reference, strict=True)
    ]
    assert_leaves_close(grads, reference, scales, MODEL_OPS + SUM_OPS, what)


def param_scales(params) -> list[float]:
    """Per-leaf max |theta|: two compilations of one update round theta' differently."""
    return [float(np.abs(p).max()) for p in leaves(params)]


# ---------------------------------------------------------------------------------------
# 1-2. Loss, metrics, gradient and the update path.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_metrics_gradient_and_sgd_update(setup, name):
    config = CONFIGS[name]
    new_state, metrics = run_step(setup, config)
    loss, expected, _ = spec_oracle(setup.logits, setup.np_batch, config)

    # The loss the step optimises is SPEC section 1 of the model's logits.
    assert_loss_close(setup, config, metrics["loss"], loss, expected)
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert_f32_close(float(metrics[key]), expected[key], ops=2, err_msg=key)  # count/count
    for key in ("ratio_mean", "entropy") + tuple(k for k in expected if "length" in k):
        scale = (1.0 + abs(expected[key])) * zmax(setup, config)  # exp / log-softmax of logp
        assert_f32_close(float(metrics[key]), expected[key], scale=scale, ops=MODEL_OPS + SUM_OPS)
    assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
    if config.importance_sampling_level == "token":  # the batch hits both clip branches
        assert expected["clip_ratio/low_mean"] > 0 and expected["clip_ratio/high_mean"] > 0

    # sgd: theta' - theta = -LR * grad, grad of the independent JAX transcription.
    grads = step_gradient(setup, new_state.params)
    reference = reference_gradient(setup, config)
    assert_grads_close(setup, config, grads, reference, "step grad vs reference")
    grad_norm = np.sqrt(sum(np.sum(np.square(r.astype(np.float64))) for r in reference))
    ops = MODEL_OPS + SUM_OPS
    scale = grad_norm * zmax(setup, config)
    assert_f32_close(float(metrics["grad_norm"]), grad_norm, scale=scale, ops=ops)
    assert_f32_close(float(metrics["update_norm"]), LR * grad_norm, scale=LR * scale, ops=ops)
    assert int(new_state.step) == 1

    # Central differences of the NumPy oracle at the largest-gradient entry of five
    # parameter tensors (float32 forward, h = 1e-3: round-off ~1e-4 absolute).
    flat, treedef = jax.tree.flatten(setup.params)
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree.leaves_with_path(setup.params)]
    h = 1e-3
    for needle in FD_LEAVES:
        leaf = next(i for i, p in enumerate(paths) if all(s in p for s in needle))
        idx = np.unravel_index(np.argmax(np.abs(grads[leaf])), grads[leaf].shape)
        values = []
        for sign in (1.0, -1.0):
            moved = list(flat)
            moved[leaf] = flat[leaf].at[idx].add(sign * h)
            logits = np.asarray(setup.completion_logits(jax.tree.unflatten(treedef, moved)))
            values.append(spec_oracle(logits, setup.np_batch, config)[0])
        fd = (values[0] - values[1]) / (2 * h)
        assert grads[leaf][idx] == pytest.approx(fd, rel=2e-2, abs=3e-4), (paths[leaf], idx)


def test_second_call_does_not_recompile(setup):
    config = CONFIGS["grpo"]
    state, _ = run_step(setup, config)
    size = grpo_step._cache_size()
    state, _ = grpo_step(state, setup.batch, config)  # a state the step returned
    state, _ = run_step(setup, config)  # a freshly created state
    assert grpo_step._cache_size() == size


# ---------------------------------------------------------------------------------------
# 3. Micro-batch accumulation: global denominators make it exact.
# ---------------------------------------------------------------------------------------


# One micro-batch count per loss type keeps the compile count down; 2 and 4 both occur,
# and bnpo / dapo share the token-level denominator that 2 and 4 both exercise.
@pytest.mark.parametrize(
    "name, num_micro_batches",
    [("grpo", 4), ("bnpo", 2), ("dr_grpo", 4), ("dapo_gspo_tau", 2)],
)
def test_micro_batches_equal_one_batch(setup, name, num_micro_batches):
    config = CONFIGS[name]
    one, metrics_one = run_step(setup, config)
    many, metrics_many = run_step(
        setup, dataclasses.replace(config, num_micro_batches=num_micro_batches)
    )
    # Same math summed in another order: theta' = theta - LR g rounds at |theta| and the
    # gradient sums (over N x L tokens) at max|g|.
    grads = step_gradient(setup, one.params)
    scales = [
        p + LR * np.abs(g).max() for p, g in zip(param_scales(setup.params), grads, strict=True)
    ]
    assert_leaves_close(leaves(many.params), leaves(one.params), scales, SUM_OPS, "params")
    loss_abs = spec_oracle(setup.logits, setup.np_batch, config)[1]["loss_abs"]
    for key, value in metrics_one.items():
        scale = loss_abs if key == "loss" else abs(float(value))
        assert_f32_close(metrics_many[key], value, scale=scale, ops=SUM_OPS, err_msg=key)


# ---------------------------------------------------------------------------------------
# 4. Eight fake CPU devices: the single-device AdamW update, shardings kept.
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adamw_two_steps(setup) -> list[np.ndarray]:
    """Two AdamW steps in NumPy on the reference gradients (one device, no grpo_step)."""
    config = CONFIGS["grpo"]
    params = leaves(setup.params)
    mu = [np.zeros_like(p) for p in params]
    nu = [np.zeros_like(p) for p in params]
    treedef = jax.tree.structure(setup.params)
    for t in (1, 2):
        grads = reference_gradient(setup, config, params=jax.tree.unflatten(treedef, params))
        params, mu, nu = adamw_np(params, grads, mu, nu, t, **ADAMW_ARGS)
    return params


@pytest.mark.parametrize("data, fsdp, tensor", [(2, 4, 1), (2, 2, 2)])
def test_sharded_step_equals_single_device(setup, adamw_two_steps, data, fsdp, tensor):
    assert jax.device_count() == 8
    mesh = make_mesh(data, fsdp, tensor)
    model = shard_model(nnx.clone(setup.model), mesh)
    expected_shardings = jax.tree.leaves(
        param_shardings(nnx.state(model, nnx.Param), mesh),
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    )
    assert any(not s.is_fully_replicated for s in expected_shardings), "nothing is sharded"
    batch = shard_batch(setup.batch, mesh)
    config = CONFIGS["grpo"]

    state, metrics = grpo_step(TrainState.create(model, ADAMW), batch, config)
    loss, expected, _ = spec_oracle(setup.logits, setup.np_batch, config)
    assert_loss_close(setup, config, metrics["loss"], loss, expected)  # loss ~1e-4: cancels
    size = grpo_step._cache_size()
    state, metrics = grpo_step(state, batch, config)
    assert grpo_step._cache_size() == size, "the second sharded step recompiled"

    # AdamW's step m / sqrt(v) is ~sign(g) * lr: gradients equal up to rounding can still
    # move a near-zero entry's step, so allow 1% of the two steps' movement (2 lr) on top
    # of the float32 rounding of theta.
    lr = ADAMW_ARGS["learning_rate"]
    scales = [p + 0.01 * 2 * lr / f32_atol(1.0) for p in param_scales(setup.params)]
    assert_leaves_close(leaves(state.params), adamw_two_steps, scales, 1, "params")
    for x, s in zip(jax.tree.leaves(state.params), expected_shardings, strict=True):
        assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)


# ---------------------------------------------------------------------------------------
# 6. Bad input fails eagerly with a message naming the fix.
# ---------------------------------------------------------------------------------------


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="num_generations"):
        repeat_prompts(np.ones((2, 3), np.int32), np.ones((2, 3), bool), num_generations=1)
    with pytest.raises(ValueError, match="single rollout"):
        group_advantages(jnp.array([1.0, 0.0, 1.0]), jnp.array([0, 0, 1]))
    with pytest.raises(ValueError, match="eps_low"):
        GrpoConfig(eps_low=1.0)
    with pytest.raises(ValueError, match="eps_low"):
        GrpoConfig(eps_low=-0.1)
    with pytest.raises(ValueError, match="eps_high"):
        GrpoConfig(eps_high=-0.1)
    with pytest.raises(ValueError, match="Unknown loss_type"):
        GrpoConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="num_micro_batches"):
        GrpoConfig(num_micro_batches=0)


def _completion_as_wide_as_tokens(b: RolloutBatch) -> RolloutBatch:
    wide = jnp.zeros(b.tokens.shape, jnp.float32)
    return b._replace(completion_mask=b.attention_mask, old_logprobs=wide, ref_logprobs=wide)


@pytest.mark.parametrize(
    "change, config, match",
    [
        (lambda b: jax.tree.map(lambda x: x[:0], b), GrpoConfig(), "Empty rollout batch"),
        (lambda b: b, GrpoConfig(num_micro_batches=3), "must divide the number of rollouts"),
        (lambda b: b._replace(advantages=b.advantages[:-1]), GrpoConfig(), "advantages"),
        (lambda b: b._replace(group_ids=b.group_ids[:-1]), GrpoConfig(), "group_ids"),
        (lambda b: b._replace(positions=b.positions[:, 1:]), GrpoConfig(), "positions"),
        (lambda b: b._replace(old_logprobs=b.old_logprobs[:, :-1]), GrpoConfig(), "old_logprobs"),
        (_completion_as_wide_as_tokens, GrpoConfig(), "shorter than the sequence length"),
    ],
)
def test_grpo_step_rejects_bad_batches(setup, change, config, match):
    state = TrainState.create(setup.model, SGD)
    with pytest.raises(ValueError, match=match):
        grpo_step(state, change(setup.batch), config)


# ---------------------------------------------------------------------------------------
# 7. KL to a reference policy (k3).
# ---------------------------------------------------------------------------------------


def test_kl_term(setup):
    config = GrpoConfig(beta=0.1)
    m = setup.np_batch["completion_mask"]
    _, _, logp = spec_oracle(setup.logits, setup.np_batch, config)

    # Reference == current policy: KL 0 and its gradient 0, so the update is beta=0's.
    same = setup.batch._replace(ref_logprobs=jnp.asarray(np.where(m, logp, 0.0), jnp.float32))
    state, metrics = run_step(setup, config, batch=same)
    plain, _ = run_step(setup, CONFIGS["grpo"])
    # k3(d) ~ d^2 / 2 with d the log-prob rounding: far below its first-order bound
    assert abs(float(metrics["kl"])) <= f32_atol(zmax(setup, config), MODEL_OPS)
    scales = param_scales(setup.params)
    assert_leaves_close(leaves(state.params), leaves(plain.params), scales, MODEL_OPS, "beta>0")

    # A different reference: the KL metric, the loss and the gradient follow NumPy k3.
    noise = np.random.default_rng(1).normal(0.0, 0.5, m.shape)
    other = same._replace(ref_logprobs=jnp.asarray(np.where(m, logp + noise, 0.0), jnp.float32))
    state, metrics = run_step(setup, config, batch=other)
    loss, expected, _ = spec_oracle(setup.logits, setup.with_batch(other), config)
    assert expected["kl"] > 0.05  # a real KL, not round-off
    kl_scale = (1.0 + expected["kl"]) * zmax(setup, config)  # k3 of log-probs off by zmax ulps
    assert_f32_close(float(metrics["kl"]), expected["kl"], scale=kl_scale, ops=MODEL_OPS + SUM_OPS)
    assert_loss_close(setup, config, metrics["loss"], loss, expected)
    reference = reference_gradient(setup, config, batch=other)
    assert_grads_close(setup, config, step_gradient(setup, state.params), reference, "KL grad")


# ---------------------------------------------------------------------------------------
# 8. capture_activations: the optimizer receives the q/k channel statistics.
# ---------------------------------------------------------------------------------------


class RecordState(NamedTuple):
    stats: dict[str, ChannelStats]  # {"q": [L, Cq] ..., "k": [L, Ck] ...}
    coefficients: jax.Array  # f32 [N]
    group_ids: jax.Array  # int32 [N]


def record_extra_args(
    num_layers: int, q_channels: int, k_channels: int, n: int
) -> optax.GradientTransformationExtraArgs:
    """Keeps the extra arguments grpo_step passes (it requires all three) in its state
    and leaves the updates alone."""

    def zeros(c: int) -> ChannelStats:
        z = jnp.zeros((num_layers, c), jnp.float32)
        return ChannelStats(z, z, z, jnp.zeros((num_layers,), jnp.float32))

    def init_fn(params):
        del params
        stats = {"q": zeros(q_channels), "k": zeros(k_channels)}
        return RecordState(stats, jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.int32))

    def update_fn(updates, state, params=None, *, activation_stats, coefficients, group_ids, **_):
        del state, params
        return updates, RecordState(activation_stats, coefficients, group_ids)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def hand_qk_stats(setup: Setup) -> dict[str, dict[str, np.ndarray]]:
    """Per-layer sums of |q|, q^2, max |q| and the token count for q = rms(h) W_q (and
    k likewise) over the valid tokens of the step's forward (``tokens[:, :-1]``); the
    residual stream h entering each layer comes from the model's own layers."""
    b, model = setup.batch, setup.model
    positions, mask = b.positions[:, :-1], b.attention_mask[:, :-1]

    @jax.jit
    def residual_streams(params):  # [layers, N, T, D]: the input of every layer
        policy = nnx.merge(setup.graphdef, params, setup.rest)
        h, streams = policy.embed_tokens(b.tokens[:, :-1]), []
        for layer in policy.layers:
            streams.append(h)
            h = layer(h, positions, mask, mask, None, 0)[0]
        return jnp.stack(streams)

    m = np.asarray(mask)
    out: dict[str, dict[str, list]] = {"q": {}, "k": {}}
    for h, layer in zip(np.asarray(residual_streams(setup.params)), model.layers, strict=True):
        x = h.astype(np.float64)
        x = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + model.config.rms_norm_eps)
        x = x * np.asarray(layer.input_layernorm.scale[...])
        for name, proj in (("q", layer.self_attn.q_proj), ("k", layer.self_attn.k_proj)):
            a = np.abs(x @ np.asarray(proj.kernel[...]))[m]  # [valid tokens, C]
            stats = dict(sum_abs=a.sum(0), sum_sq=(a**2).sum(0), max_abs=a.max(0), count=m.sum())
            for stat, value in stats.items():
                out[name].setdefault(stat, []).append(value)
    return {t: {s: np.stack(v) for s, v in d.items()} for t, d in out.items()}


def test_capture_activations_reach_extra_args_transform(setup):
    """Two micro-batches: the statistics must be the sums over the whole batch."""
    c = setup.model.config
    record = record_extra_args(
        c.num_hidden_layers,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
        N,
    )
    config = GrpoConfig(capture_activations=True, num_micro_batches=2)
    state, _ = run_step(setup, config, tx=optax.chain(record, SGD))
    recorded = state.opt_state[0]
    for target, expected in hand_qk_stats(setup).items():
        for stat, value in expected.items():
            got = np.asarray(getattr(recorded.stats[target], stat))
            # sums of positive terms over tokens of D-long products: no cancellation
            ops = c.hidden_size + N * (P + L)
            scale = np.abs(value).max()
            assert_f32_close(got, value, scale=scale, ops=ops, err_msg=f"{target}.{stat}")
    np.testing.assert_array_equal(recorded.coefficients, setup.np_batch["advantages"])
    np.testing.assert_array_equal(recorded.group_ids, setup.np_batch["group_ids"])
    # The recording link leaves the update alone: the plain GRPO step's params.
    plain, _ = run_step(setup, CONFIGS["grpo"])
    scales = param_scales(setup.params)
    assert_leaves_close(leaves(state.params), leaves(plain.params), scales, MODEL_OPS, "capture")


# ---------------------------------------------------------------------------------------
# 9. End to end: GRPO learns what the warm-up could not teach.
# ---------------------------------------------------------------------------------------

LETTERS = "abcd"


class CopyTask:
    """Prompt: 0-3 digits then a target letter; reward 1 iff the completion starts with
    that letter (decoded text, as a verifiable reward is)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.letter_ids = np.array([tokenizer.encode(c, add_bos=False)[0] for c in LETTERS])

    def prompts(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, list]:
        targets = list(rng.choice(list(LETTERS), n))
        noise = ["".join(rng.choice(list("0123456789"), rng.integers(0, 4))) for _ in range(n)]
        tokens, mask = self.tok.batch_encode(
            [z + c for z, c in zip(noise, targets, strict=True)], pad_to=8
        )
        return tokens, mask, targets

    def rewards(self, completion: np.ndarray, lengths: np.ndarray, targets: list) -> np.ndarray:
        texts = [
            self.tok.decode(row[:n].tolist()) for row, n in zip(completion, lengths, strict=True)
        ]
        return np.array(
            [float(t[:1] == c) for t, c in zip(texts, targets, strict=True)], np.float32
        )

    def batch(self, tokens, mask, letter_ids, old_logprobs=None, advantages=None):
        """Rows [prompt | letter, EOS] (teacher-forced)."""
        n = len(letter_ids)
        completion = np.stack([letter_ids, np.full(n, self.tok.eos_id)], 1).astype(np.int32)
        return make_rollout_batch(
            np.concatenate([tokens, completion], 1),
            mask,
            np.ones((n, 2), bool),
            np.zeros((n, 2), np.float32) if old_logprobs is None else old_logprobs,
            np.zeros(n, np.float32) if advantages is None else advantages,
            np.arange(n, dtype=np.int32),
        )


def logprobs_of(state: TrainState, batch: RolloutBatch) -> jax.Array:  # [n, 2]
    return policy_logprobs(state.graphdef, state.params, state.rest, batch)


def test_grpo_learns_copy_task():
    """Warm-up on the answer format with letters drawn independently of the prompt puts
    the policy at chance (1/4); only the reward can teach it to copy the letter.

    The warm-up runs through grpo_step as well (one compilation for both phases): with
    advantages 1 and old log-probs equal to the current ones the ratio is 1, nothing is
    clipped, and the grpo gradient is that of the per-sequence mean log-likelihood (SFT).
    The score is the exact expected reward of temperature-1 sampling on 64 held-out
    prompts, ``mean_i pi(target_i | prompt_i)``, so it carries no sampling noise.
    """
    from jaxrl_geom.sampling import Sample, generate
    from jaxrl_geom.tokenizers import CharTokenizer

    tok = CharTokenizer()
    task = CopyTask(tok)
    model_config = ModelConfig.tiny(
        tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    num_prompts, group = 16, 4
    rows = num_prompts * group  # the warm-up, GRPO and evaluation batches share shapes
    config, tx = GrpoConfig(), optax.adam(1e-2)
    rng = np.random.default_rng(0)
    held_tokens, held_mask, held_targets = task.prompts(np.random.default_rng(123), rows)
    held_ids = task.letter_ids[[LETTERS.index(c) for c in held_targets]]
    held_out = task.batch(held_tokens, held_mask, held_ids)

    def score(state: TrainState) -> float:
        return float(np.mean(np.exp(np.asarray(logprobs_of(state, held_out))[:, 0])))

    state = TrainState.create(Decoder(model_config, rngs=nnx.Rngs(0)), tx)
    for _ in range(60):
        tokens, mask, _ = task.prompts(rng, rows)
        demo = task.batch(tokens, mask, task.letter_ids[rng.integers(0, 4, rows)])
        demo = demo._replace(old_logprobs=logprobs_of(state, demo), advantages=jnp.ones(rows))
        state, _ = grpo_step(state, demo, config)
    start = score(state)
    assert 0.15 < start < 0.35, start  # the format is learnt, the copying is not

    state = TrainState.create(state.model(), tx)
    method, key = Sample(temperature=1.0), jax.random.key(0)
    train_rewards = []
    for _ in range(40):
        tokens, mask, targets = task.prompts(rng, num_prompts)
        tokens, mask, group_ids = repeat_prompts(tokens, mask, group)
        key, sub = jax.random.split(key)
        out = generate(
            (state.graphdef, state.params, state.rest),
            tokens,
            mask,
            sub,
            max_new_tokens=2,
            method=method,
            stop_tokens=(tok.eos_id,),
            pad_id=tok.pad_id,
        )
        rewards = task.rewards(out.completion, out.lengths, list(np.repeat(targets, group)))
        advantages = group_advantages(rewards, group_size=group)
        batch = make_rollout_batch(
            out.tokens, mask, out.completion_mask, out.logprobs, advantages, group_ids
        )
        state, metrics = grpo_step(state, batch, config)
        assert np.isfinite(float(metrics["loss"]))
        train_rewards.append(rewards.mean())
    end = score(state)
    assert end > start + 0.2, (start, end)
    assert np.mean(train_rewards[-10:]) > np.mean(train_rewards[:10]) + 0.1, train_rewards
