"""SALT's estimator with scanned layers (``ModelConfig.scan_layers``) equals the unrolled
model: the same ``grpo_step`` update and ``salt/*`` metrics on both update paths
(book-keeping, recompute), the ghost and sketch backends, tied and untied heads, a KL
term, micro-batches, 8 fake devices, and a scope that selects only some layers of a
stack; the same per-layer Gram blocks under the same names.

The reference is the unrolled model, itself checked against a materialized per-sample
reference in test_salt_step.py. Both models hold the same weights (the unrolled
parameters stacked on a leading ``[L]`` axis). Sketch projections are drawn per layer
under the unrolled names, so the sketched Gram is the same too (not only in law).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tolerances import assert_f32_close, depth_ops, f32_atol

from jaxrl_geom.models import Decoder, ModelConfig
from jaxrl_geom.rl import GrpoConfig, RolloutBatch, TrainState, grpo_step
from jaxrl_geom.rl.step import completion_logits
from jaxrl_geom.salt import SaltConfig, SaltKnobs, gram_of_loss, per_sample_grads, salt_estimator
from jaxrl_geom.salt.ghost import attach_gram_taps
from jaxrl_geom.salt.gram import gram_from_features
from jaxrl_geom.sharding import make_mesh, shard_batch, shard_model

NL, V, N, P, LC = 2, 48, 8, 6, 5
QWEN2 = ModelConfig(  # untied head, q/k/v biases
    model_type="qwen2",
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=NL,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    attention_bias=True,
    scan_layers=False,
)
TIED = dataclasses.replace(  # tied table (lookup + head + cross terms), q/k norms, remat
    QWEN2, model_type="qwen3", attention_bias=False, qk_norm=True, tie_word_embeddings=True
)
TIED = dataclasses.replace(TIED, remat=True)
KNOBS = SaltKnobs(gamma_max=2.0, rank=2)  # fixed rank: no energy boundary to cross
KEEP, RECOMPUTE = float("inf"), 0.0
SPLIT = r"layers\.0\.|lm_head|embed"  # selects layer 0 of every stack, not layer 1
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # as in test_salt_step
LR = 1e4  # SGD: (old - new) / LR is the update to full float32 precision


def models(config: ModelConfig) -> tuple[Decoder, Decoder]:
    """An unrolled model and the scanned model with the same (stacked) weights."""
    unrolled = Decoder(config, rngs=nnx.Rngs(0))
    pure = nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))
    pure["layers"] = jax.tree.map(lambda *x: jnp.stack(x), *(pure["layers"][i] for i in range(NL)))
    scanned = Decoder(dataclasses.replace(config, scan_layers=True), rngs=nnx.Rngs(1))
    params = nnx.state(scanned, nnx.Param)
    nnx.replace_by_pure_dict(params, pure)
    nnx.update(scanned, params)
    return unrolled, scanned


def unstack(pure: dict) -> dict:
    return {
        **pure,
        "layers": {i: jax.tree.map(lambda x, i=i: x[i], pure["layers"]) for i in range(NL)},
    }


def rollout_batch(model: Decoder, seed: int) -> RolloutBatch:
    """Groups of 4 rollouts sharing prompt and completion but their first completion
    token (strong cancellation, so SALT acts: severity > 0), ragged lengths, old and
    reference log-probs near the current ones (most tokens inside the clip range)."""
    rng = np.random.default_rng(seed)
    prompt_len = np.repeat(rng.integers(1, P + 1, N // 4), 4)
    comp_len = np.repeat(rng.integers(1, LC + 1, N // 4), 4)
    mask = np.concatenate(
        [np.arange(P)[None] >= P - prompt_len[:, None], np.arange(LC)[None] < comp_len[:, None]], 1
    )
    tokens = np.repeat(rng.integers(1, V, (N // 4, P + LC)), 4, axis=0)
    tokens[:, P] = rng.integers(1, V, N)
    rewards = rng.normal(size=(N // 4, 4))
    adv = (rewards - rewards.mean(1, keepdims=True)) / rewards.std(1, keepdims=True)
    batch = RolloutBatch(
        tokens=jnp.asarray(np.where(mask, tokens, 0), jnp.int32),
        positions=jnp.asarray(np.maximum(np.cumsum(mask, 1) - 1, 0), jnp.int32),
        attention_mask=jnp.asarray(mask),
        completion_mask=jnp.asarray(mask[:, P:]),
        old_logprobs=jnp.zeros((N, LC), jnp.float32),
        ref_logprobs=jnp.zeros((N, LC), jnp.float32),
        advantages=jnp.asarray(adv.reshape(N), jnp.float32),
        group_ids=jnp.repeat(jnp.arange(N // 4), 4).astype(jnp.int32),
    )
    logp = jax.nn.log_softmax(completion_logits(model, batch))
    current = np.asarray(jnp.take_along_axis(logp, batch.tokens[:, P:, None], -1)[..., 0])
    return batch._replace(
        old_logprobs=jnp.asarray(current + 0.1 * rng.normal(size=(N, LC)), jnp.float32),
        ref_logprobs=jnp.asarray(current + 0.3 * rng.normal(size=(N, LC)), jnp.float32),
    )


def record_q_stats() -> optax.GradientTransformationExtraArgs:
    """Keeps the ``activation_stats=`` q sums ``[L, C]`` in its state, for inspection."""

    def init(params):
        del params
        return jnp.zeros((NL, QWEN2.num_attention_heads * QWEN2.head_dim))

    def update(updates, state, params=None, *, activation_stats=None, **extra):
        del params, extra
        return updates, state if activation_stats is None else activation_stats["q"].sum_abs

    return optax.GradientTransformationExtraArgs(init, update)


TX = optax.chain(record_q_stats(), optax.sgd(LR))  # one object: a static part of the state


def salt_update(model, batch, config, salt_config, mesh):
    """(update in the unrolled layout as float64, metrics, recorded q sums) of one
    SGD(LR) grpo_step."""
    model = nnx.merge(*nnx.split(model))
    if mesh is not None:
        model, batch = shard_model(model, mesh), shard_batch(batch, mesh)
    state = TrainState.create(model, TX)
    old = jax.device_get(nnx.to_pure_dict(state.params))  # the step donates `state`
    estimator = salt_estimator(salt_config)
    step = grpo_step.lower(state, batch, config, estimator).compile(FAST_COMPILE)
    new, metrics = step(state, batch, estimator)
    q_sums = np.asarray(new.opt_state[0])
    new = jax.device_get(nnx.to_pure_dict(new.params))
    update = jax.tree.map(lambda a, b: (np.float64(a) - np.float64(b)) / LR, old, new)
    update = unstack(update) if model.config.scanned else update
    return update, jax.device_get(metrics), q_sums


@pytest.mark.parametrize(
    "config, grpo, salt_config, devices",
    [
        pytest.param(  # X and D kept per micro-batch, stacked [m, L, N/m, ...]; q/k
            QWEN2,  # statistics sown in the same scan
            GrpoConfig(beta=0.04, num_micro_batches=2, capture_activations=True),
            SaltConfig(KNOBS, backend="sketch", sketch_dim=4, scope=SPLIT, keep_budget_gib=KEEP),
            8,
            id="bookkeeping-sketch-split-scope-untied-kl-2micro-8devices",
        ),
        pytest.param(  # one forward, two backward passes; Gram blocks in the scan's vjp
            TIED,
            GrpoConfig(beta=0.04, importance_sampling_level="sequence"),
            SaltConfig(KNOBS, keep_budget_gib=RECOMPUTE),
            1,
            id="recompute-auto-tied-kl-gspo",
        ),
    ],
)
def test_salt_step_scanned_equals_unrolled(config, grpo, salt_config, devices):
    unrolled, scanned = models(config)
    batch = rollout_batch(unrolled, seed=1)
    mesh = make_mesh(data=2, fsdp=4) if devices == 8 else None
    want, want_metrics, want_q = salt_update(unrolled, batch, grpo, salt_config, mesh)
    got, metrics, q = salt_update(scanned, batch, grpo, salt_config, mesh)
    assert float(want_metrics["salt/gamma"]) > 0.1  # SALT really reweights
    assert float(want_metrics["salt/ok"]) == 1.0
    # Same math, other fusions and summation orders through the depth (and the Gram's
    # per-op sum): float32 differences of depth_ops roundings of the largest entry.
    ops = depth_ops(NL)
    leaves = jax.tree_util.tree_leaves_with_path(want)
    for (path, b), a in zip(leaves, jax.tree.leaves(got), strict=True):
        assert_f32_close(a, b, scale=np.abs(b).max(), ops=ops, err_msg=jax.tree_util.keystr(path))
    assert sorted(metrics) == sorted(want_metrics)
    for key in (k for k in want_metrics if k.startswith("salt/") or k == "loss"):
        assert_f32_close(metrics[key], want_metrics[key], scale=1.0, ops=ops, err_msg=key)
    if grpo.capture_activations:  # sown in the scan next to SALT's kept X
        assert np.all(want_q > 0)
        assert_f32_close(q, want_q, scale=np.abs(want_q).max(), ops=ops, err_msg="q stats")


def test_per_layer_gram_blocks_scanned_equal_unrolled():
    """gram_of_loss(per_op=True): the same blocks under the same (unrolled) names, the
    layers of a stack outside the scope left out; tied head, sketch backend through the
    taps' backward inside the scan (the same projections), q/k norms, remat."""
    unrolled, scanned = models(TIED)
    batch = rollout_batch(unrolled, seed=2)

    def per_row(model, tokens, positions, mask):  # [N] sum of squared logits
        logits, _ = model(tokens, positions, mask)
        return jnp.sum(jnp.where(mask[..., None], logits, 0.0) ** 2, axis=(1, 2)) * 1e-2

    def blocks(model):
        kw = dict(scope=SPLIT, backend="sketch", sketch_dim=4, seed=3, step=5, per_op=True)
        args = (batch.tokens, batch.positions, batch.attention_mask)
        fn = jax.jit(lambda *a: gram_of_loss(per_row, model, *a, **kw))
        return fn.lower(*args).compile(FAST_COMPILE)(*args)

    want, got = blocks(unrolled), blocks(scanned)
    assert list(got) == list(want)  # names and order
    assert any(k.startswith("layers.0.") for k in want)
    assert not any(k.startswith("layers.1.") for k in want)  # outside SPLIT
    scale = max(float(np.abs(b).max()) for b in want.values())
    for name, b in want.items():
        assert_f32_close(got[name], b, scale=scale, ops=depth_ops(NL), err_msg=name)


def test_scope_splitting_kernel_and_bias_of_a_stack_is_refused():
    """One factor per layer: a scope taking the kernel of layer 0 and the bias of
    layer 1 of the same stacked Linear has no stacked equivalent."""
    scanned = Decoder(dataclasses.replace(QWEN2, scan_layers=True))
    scope = r"layers\.0\.self_attn\.q_proj\.kernel|layers\.1\.self_attn\.q_proj\.bias"
    with pytest.raises(ValueError, match="scan_layers=False"):
        attach_gram_taps(scanned, N, scope=scope)
    # Taking whole layers (kernel and bias together) is fine, with per-layer names.
    covered = attach_gram_taps(scanned, N, scope=r"layers\.1\.self_attn\.q_proj")
    assert covered == ("layers.1.self_attn.q_proj.bias", "layers.1.self_attn.q_proj.kernel")


def test_scope_names_the_same_layers_in_salt_and_in_the_taps():
    """On scanned layers a scope is judged on unrolled names (``layers.<i>.<...>``) by the
    Gram taps AND by ``gram_from_features`` (what ``salt()`` reweights with): a scope
    taking layer 1 and the head gives the same Gram both ways (it took the head alone in
    ``gram_from_features`` when that judged the stacked name ``layers.mlp...``)."""
    cfg = ModelConfig.tiny(32, hidden_size=16, num_hidden_layers=2)
    model = Decoder(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(0))
    n, t = 4, 6
    tokens = jax.random.randint(jax.random.key(1), (n, t), 0, 32)
    pos, mask = jnp.broadcast_to(jnp.arange(t), (n, t)), jnp.ones((n, t), bool)

    def per_row(m, tokens, pos, mask):
        return jnp.sum(jnp.sin(m(tokens, pos, mask)[0]), axis=(1, 2))

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def row_loss(p, row):
        return per_row(nnx.merge(graphdef, p, rest), *(a[None] for a in row))[0]

    feats = per_sample_grads(row_loss, params, (tokens, pos, mask))
    scope = r"layers\.1\.|lm_head"
    k_taps = gram_of_loss(per_row, model, tokens, pos, mask, scope=scope, backend="tiled")
    k_salt = gram_from_features(feats, scope)
    head_only = gram_from_features(feats, r"lm_head")
    scale = float(jnp.max(jnp.abs(k_taps)))
    assert_f32_close(k_salt, k_taps, scale=scale, ops=depth_ops(2), err_msg="scoped Gram")
    assert float(jnp.max(jnp.abs(k_salt - head_only))) > 1e3 * f32_atol(scale, depth_ops(2))
