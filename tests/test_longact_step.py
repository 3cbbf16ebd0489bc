"""LongAct inside ``grpo_step``: captured q/k statistics, exact sparse updates, metrics.

Independent references:
* q = x W_Q + b and k = x W_K + b recomputed in float64 NumPy from each layer's input x
  (the ``input_layernorm`` output, captured with ``nnx.capture(method_outputs=...)``),
  reduced over the valid tokens only;
* a NumPy top-k oracle of SPEC section 3 (stable argsort: ties -> lower index; RoPE pairs
  ``(j, j + hd/2)`` scored by their joint norm);
* plain GRPO without LongAct and without capture (keep_ratio=1 must reproduce it bit
  for bit), and the same run on 1 device vs 8 fake devices.

Every ``grpo_step`` compile is shared through the cached :func:`run` (the file's cost).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tolerances import bits, f32_atol

from jaxrl_geom.longact import (
    check_capture,
    longact,
    longact_metrics,
    longact_states,
    masked_optimizer,
)
from jaxrl_geom.models import Decoder, ModelConfig
from jaxrl_geom.models.taps import ChannelStats
from jaxrl_geom.rl import GrpoConfig, RolloutBatch, TrainState, grpo_step
from jaxrl_geom.salt import SaltConfig, salt_estimator
from jaxrl_geom.sharding import make_mesh, shard_batch, shard_model

# The same sizes as ModelConfig.tiny(48, hidden 32, 2 layers, 4 heads, 2 kv heads), as
# qwen2 so that q_proj / k_proj carry biases (masked like their kernel columns).
QWEN2 = ModelConfig(
    model_type="qwen2",
    vocab_size=48,
    hidden_size=32,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    attention_bias=True,
)
TINY = ModelConfig.tiny(
    48, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
NL, HD = 2, 8  # layers, head dim
HEADS = {"q": 4, "k": 2}
N, P, LC = 8, 6, 5  # rollouts, prompt length, completion length
KEEP = 0.3
CAPTURE = GrpoConfig(capture_activations=True)


# ------------------------------------------------------------------ fixtures


def initial_model(config: ModelConfig) -> nnx.Module:
    """Decoder with NumPy weights (abstract init: no per-op initializer compiles)."""
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Decoder(config)), nnx.Param, ...)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.3, x.dtype), params)
    return nnx.merge(graphdef, params, rest)


def make_batch(seed: int) -> RolloutBatch:
    """Left-padded prompts, right-padded completions (rows 0/1: longest/shortest)."""
    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(1, P + 1, N)
    prompt_len[:2] = P, 1
    comp_len = rng.integers(1, LC + 1, N)
    comp_len[:2] = LC, 1
    prompt_mask = np.arange(P)[None] >= P - prompt_len[:, None]  # [N, P]
    completion_mask = np.arange(LC)[None] < comp_len[:, None]  # [N, L]
    mask = np.concatenate([prompt_mask, completion_mask], 1)  # [N, P+L]
    tokens = np.where(mask, rng.integers(1, 48, mask.shape), 0)
    rewards = rng.normal(size=(N // 4, 4))
    advantages = (rewards - rewards.mean(1, keepdims=True)) / rewards.std(1, keepdims=True)
    return RolloutBatch(
        tokens=jnp.asarray(tokens, jnp.int32),
        positions=jnp.asarray(np.maximum(np.cumsum(mask, 1) - 1, 0), jnp.int32),
        attention_mask=jnp.asarray(mask),
        completion_mask=jnp.asarray(completion_mask),
        old_logprobs=jnp.asarray(rng.normal(-3.8, 0.3, (N, LC)), jnp.float32),
        ref_logprobs=jnp.zeros((N, LC), jnp.float32),
        advantages=jnp.asarray(advantages.reshape(N), jnp.float32),
        group_ids=jnp.repeat(jnp.arange(N // 4), 4).astype(jnp.int32),
    )


class SpyState(NamedTuple):
    grads: Any  # the gradient grpo_step handed the optimizer
    stats: dict[str, ChannelStats]  # its activation_stats= (zeros when absent)


def spy(config: ModelConfig) -> optax.GradientTransformationExtraArgs:
    """Identity link recording the gradient and ``activation_stats=`` it receives."""
    layers, hd = config.num_hidden_layers, config.head_dim
    widths = {"q": config.num_attention_heads * hd, "k": config.num_key_value_heads * hd}

    def init(params):
        zero = {
            t: ChannelStats(*(jnp.zeros((layers, c)),) * 3, jnp.zeros((layers,)))
            for t, c in widths.items()
        }
        return SpyState(jax.tree.map(jnp.zeros_like, params), zero)

    def update(updates, state, params=None, *, activation_stats=None, **extra):
        del params, extra
        return updates, SpyState(
            updates, state.stats if activation_stats is None else activation_stats
        )

    return optax.GradientTransformationExtraArgs(init, update)


def find(opt_state, cls):
    (found,) = [
        x
        for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, cls))
        if isinstance(x, cls)
    ]
    return found


def host_copy(tree):
    """A NumPy copy (grpo_step donates the state, so never keep views of its buffers)."""
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


class Run(NamedTuple):
    params: list[dict]  # per step (0 = start) nnx.to_pure_dict of the params, NumPy
    spies: list[SpyState]  # per step
    masks: list[dict[str, np.ndarray] | None]  # per step {t: bool [L, C]} (None: no longact)
    metrics: list[dict[str, np.ndarray]]
    opt_state: Any  # final


LR = 0.01


def _adamw() -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR, weight_decay=0.1))


class Recipe(NamedTuple):
    config: ModelConfig
    make_longact: Any  # () -> longact link, or None (plain chain)
    grpo: GrpoConfig
    mesh: tuple[int, int] | None = None  # (data, fsdp) on the fake devices
    steps: int = 1
    salt: SaltConfig | None = None


RECIPES = {
    "layer": Recipe(QWEN2, lambda: longact(keep_ratio=KEEP), CAPTURE, steps=3),
    "layer_8dev": Recipe(QWEN2, lambda: longact(keep_ratio=KEEP), CAPTURE, mesh=(2, 4), steps=3),
    "head_rope_pair_micro2": Recipe(
        QWEN2,
        lambda: longact(
            keep_ratio=KEEP,
            scope="head",
            granularity="rope_pair",
            num_heads=QWEN2.num_attention_heads,
            num_kv_heads=QWEN2.num_key_value_heads,
        ),
        GrpoConfig(capture_activations=True, num_micro_batches=2),
    ),
    "plain": Recipe(QWEN2, None, GrpoConfig(), steps=2),
    "keep_all": Recipe(QWEN2, lambda: longact(keep_ratio=1.0), CAPTURE, steps=2),
    "salt": Recipe(QWEN2, lambda: longact(keep_ratio=KEEP), CAPTURE, steps=2, salt=SaltConfig()),
}


@functools.cache
def run(name: str) -> Run:
    """``grpo_step`` on batches 0, 1, ... with chain(spy, clip, adamw[, longact])."""
    recipe = RECIPES[name]
    links = [spy(recipe.config), _adamw()]
    if recipe.make_longact is not None:
        links.append(recipe.make_longact())
    model = initial_model(recipe.config)
    mesh = None
    if recipe.mesh is not None:
        mesh = make_mesh(data=recipe.mesh[0], fsdp=recipe.mesh[1])
        shard_model(model, mesh)
    state = TrainState.create(model, optax.chain(*links))
    out = Run([host_copy(nnx.to_pure_dict(state.params))], [], [], [], None)
    for s in range(recipe.steps):
        batch = make_batch(s) if mesh is None else shard_batch(make_batch(s), mesh)
        estimator = None if recipe.salt is None else salt_estimator(recipe.salt)
        state, metrics = grpo_step(state, batch, recipe.grpo, estimator)
        opt_state = host_copy(state.opt_state)
        out.params.append(host_copy(nnx.to_pure_dict(state.params)))
        out.spies.append(find(opt_state, SpyState))
        la = longact_states(opt_state)
        out.masks.append(dict(la[0].masks) if la else None)
        out.metrics.append(host_copy(metrics))
    return out._replace(opt_state=opt_state)


def proj(params, layer, t):
    return params["layers"][layer]["self_attn"][f"{t}_proj"]


# ------------------------------------------------------------------ NumPy oracles


@functools.partial(jax.jit, static_argnames="graphdef")
def _layer_inputs(graphdef, state, tokens, positions, mask):
    model = nnx.merge(graphdef, state)
    capture = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)
    _, inter = capture(tokens, positions, mask)
    flat = dict(nnx.to_flat_state(inter))
    return [flat[("layers", i, "input_layernorm", "__call__")].get_value()[0] for i in range(NL)]


def oracle_stats(config: ModelConfig, batch: RolloutBatch, *, include_padding=False):
    """{t: (sum_abs, sum_sq, max_abs, count)} [L, C] from q/k recomputed in float64."""
    model = initial_model(config)
    # the training forward sees tokens[:, :-1] (logits at P-1 .. P+L-2 predict the completion)
    tokens, positions = batch.tokens[:, :-1], batch.positions[:, :-1]
    mask = np.asarray(batch.attention_mask[:, :-1])
    xs = _layer_inputs(*nnx.split(model), tokens, positions, jnp.asarray(mask))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    valid = np.ones_like(mask) if include_padding else mask
    out = {t: [[], [], [], []] for t in ("q", "k")}
    for i, x in enumerate(xs):
        x = np.asarray(x, np.float64)[valid]  # [n_valid, D]
        for t in ("q", "k"):
            p = proj(params, i, t)
            act = np.abs(x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"]))  # [n, C]
            reductions = (act.sum(0), (act**2).sum(0), act.max(0), len(act))
            for acc, v in zip(out[t], reductions, strict=True):
                acc.append(v)
    return {t: tuple(np.asarray(v) for v in vals) for t, vals in out.items()}


def np_select(stats: ChannelStats, t: str, scope="layer", granularity="channel") -> np.ndarray:
    """SPEC section 3 top-ceil(keep * n) per layer or head; mean_abs scores; pairs joint."""
    scores = np.asarray(stats.sum_abs, np.float64) / np.asarray(stats.count)[:, None]  # [L, C]
    heads = HEADS[t]
    s = scores.reshape(NL, heads, HD)
    if granularity == "rope_pair":
        s = np.sqrt(s[..., : HD // 2] ** 2 + s[..., HD // 2 :] ** 2)  # [L, H, hd/2]
    groups = s.reshape(NL, heads, -1) if scope == "head" else s.reshape(NL, 1, -1)
    k = math.ceil(KEEP * groups.shape[-1])
    chosen = np.zeros(groups.shape, bool)
    for idx in np.ndindex(groups.shape[:2]):
        chosen[idx][np.argsort(-groups[idx], kind="stable")[:k]] = True
    chosen = chosen.reshape(NL, heads, -1)
    if granularity == "rope_pair":
        chosen = np.concatenate([chosen, chosen], -1)  # channel j and j + hd/2
    return chosen.reshape(NL, heads * HD)


def assert_exact_step(before, after, masks):
    """Unselected q/k columns and bias entries bit-identical; every other entry moved."""
    for i in range(NL):
        for t in ("q", "k"):
            m = masks[t][i]
            kb, ka = proj(before, i, t)["kernel"], proj(after, i, t)["kernel"]
            bb, ba = proj(before, i, t)["bias"], proj(after, i, t)["bias"]
            assert np.array_equal(bits(kb[:, ~m]), bits(ka[:, ~m]))
            assert np.array_equal(bits(bb[~m]), bits(ba[~m]))
            assert np.all(kb[:, m] != ka[:, m]) and np.all(bb[m] != ba[m])
    rest = [
        (jax.tree_util.keystr(path), b, a)
        for (path, b), a in zip(
            jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(after), strict=True
        )
    ]
    rest = [(k, b, a) for k, b, a in rest if "q_proj" not in k and "k_proj" not in k]
    assert len(rest) > 10
    for key, b, a in rest:
        assert np.all(b != a), key


# ------------------------------------------------------------------ 1. captured statistics


@pytest.mark.parametrize("name", ["layer", "head_rope_pair_micro2"], ids=["one_batch", "micro2"])
def test_captured_stats_equal_explicit_activations(name):
    got = run(name).spies[0].stats  # what the optimizer received on batch 0
    want = oracle_stats(QWEN2, make_batch(0))
    with_padding = oracle_stats(QWEN2, make_batch(0), include_padding=True)
    for t in ("q", "k"):
        g = got[t]
        np.testing.assert_allclose(g.sum_abs, want[t][0], rtol=2e-5)
        np.testing.assert_allclose(g.sum_sq, want[t][1], rtol=2e-5)
        np.testing.assert_allclose(g.max_abs, want[t][2], rtol=1e-5)
        np.testing.assert_array_equal(g.count, want[t][3])
        assert g.sum_abs.shape == (NL, HEADS[t] * HD)
        # padding (prompt pads, completion tail, the unseen last column) is excluded
        assert not np.allclose(g.sum_abs, with_padding[t][0], rtol=1e-2)


# ------------------------------------------------------------------ 2. exact sparse updates


def test_unselected_columns_bit_identical_through_grpo_step():
    r = run("layer")
    never = {t: np.zeros((NL, HEADS[t] * HD), bool) for t in ("q", "k")}
    for s, masks in enumerate(r.masks):
        for t in ("q", "k"):  # the mask is this step's batch's top-k
            np.testing.assert_array_equal(masks[t], np_select(r.spies[s].stats[t], t))
            never[t] |= masks[t]
        assert_exact_step(r.params[s], r.params[s + 1], masks)
    for i in range(NL):  # never selected over 3 steps: still the start value
        for t in ("q", "k"):
            cols = ~never[t][i]
            start, end = proj(r.params[0], i, t)["kernel"], proj(r.params[-1], i, t)["kernel"]
            assert np.array_equal(bits(start[:, cols]), bits(end[:, cols]))
    assert any((m1["q"] != m0["q"]).any() for m0, m1 in zip(r.masks[:-1], r.masks[1:], strict=True))


def test_eight_devices_match_one_device():
    one, eight = run("layer"), run("layer_8dev")
    for s, masks in enumerate(eight.masks):
        for t in ("q", "k"):
            np.testing.assert_array_equal(masks[t], one.masks[s][t])
        assert_exact_step(eight.params[s], eight.params[s + 1], masks)
    for s in range(3):  # same gradients up to the order of the sharded sums
        for a, b in zip(
            jax.tree.leaves(one.spies[s].grads), jax.tree.leaves(eight.spies[s].grads), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    # Adam divides by sqrt(v): the rounding of near-zero gradient entries can flip part of
    # their step, so the params agree to a small fraction of one step (lr = 0.01)
    for a, b in zip(
        jax.tree.leaves(one.params[-1]), jax.tree.leaves(eight.params[-1]), strict=True
    ):
        # 1% of the 3 steps' movement (3 lr) on top of the float32 rounding of theta
        atol = 0.01 * 3 * LR + f32_atol(np.abs(b).max(), ops=3)
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)


def test_step_metrics_report_longact_diagnostics():
    r = run("layer")
    for s, metrics in enumerate(r.metrics):
        for t in ("q", "k"):
            c = HEADS[t] * HD
            mask, stats = r.masks[s][t], r.spies[s].stats[t]
            scores = np.asarray(stats.sum_abs) / np.asarray(stats.count)[:, None]
            prev = r.masks[s - 1][t] if s else np.ones_like(mask)
            np.testing.assert_allclose(
                metrics[f"longact/{t}_selected_fraction"], math.ceil(KEEP * c) / c
            )
            np.testing.assert_allclose(
                metrics[f"longact/{t}_overlap"],
                np.mean((prev & mask).sum(-1) / mask.sum(-1)),
                rtol=1e-6,
            )
            np.testing.assert_allclose(
                metrics[f"longact/{t}_concentration"],
                np.mean((scores * mask).sum(-1) / scores.sum(-1)),
                rtol=1e-5,
            )
    # the full [L] arrays stay in the optimizer state
    assert optax.tree.get(r.opt_state, "mask_overlap")["k"].shape == (NL,)
    assert not any(k.startswith("longact/") for k in run("plain").metrics[0])


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: optax.chain(optax.adamw(0.1), longact()),
        lambda: masked_optimizer(optax.adamw(0.1), longact(), mask_gradients=True),
        lambda: optax.chain(optax.clip(1.0), optax.chain(optax.adamw(0.1), longact())),
        lambda: optax.MultiSteps(optax.chain(optax.adamw(0.1), longact()), 2),
    ],
    ids=["chain_last", "wrapper", "nested_chain", "multi_steps"],
)
def test_longact_state_is_found_in_any_optimizer_nesting(make_tx):
    params = nnx.state(initial_model(TINY), nnx.Param)
    opt_state = make_tx().init(params)
    (state,) = longact_states(opt_state)
    assert state.masks["q"].shape == (NL, 4 * HD)
    metrics = longact_metrics(opt_state)
    assert sorted(metrics) == sorted(
        f"longact/{t}_{m}" for t in "qk" for m in ("selected_fraction", "overlap", "concentration")
    )
    assert all(np.shape(v) == () for v in metrics.values())
    with pytest.raises(ValueError, match=r"GrpoConfig\(capture_activations=True\)"):
        check_capture(opt_state, capture_activations=False)
    check_capture(opt_state, capture_activations=True)
    check_capture(optax.adamw(0.1).init(params), capture_activations=False)  # no longact: fine
    assert longact_metrics(optax.adamw(0.1).init(params)) == {}


# ------------------------------------------------------------------ 3. + 7. keep all == plain


def test_keep_ratio_one_reproduces_plain_grpo_and_capture_changes_nothing():
    plain, keep_all = run("plain"), run("keep_all")  # capture off / on
    for s in range(2):
        # the jitted loss forward + backward: same loss, bit-identical gradients
        assert bits(plain.metrics[s]["loss"]) == bits(keep_all.metrics[s]["loss"])
        for a, b in zip(
            jax.tree.leaves(plain.spies[s].grads),
            jax.tree.leaves(keep_all.spies[s].grads),
            strict=True,
        ):
            assert np.array_equal(bits(a), bits(b))
        for a, b in zip(
            jax.tree.leaves(plain.params[s + 1]),
            jax.tree.leaves(keep_all.params[s + 1]),
            strict=True,
        ):
            assert np.array_equal(bits(a), bits(b))
        assert keep_all.metrics[s]["longact/q_selected_fraction"] == 1.0
    assert np.all(plain.spies[0].stats["q"].count == 0)  # capture off: nothing received


# ------------------------------------------------------------------ 4. granularity and scope


def test_rope_pairs_are_selected_whole_and_head_scope_per_head():
    """scope="head", granularity="rope_pair": top ceil(0.3 * hd/2) pairs of every head."""
    r = run("head_rope_pair_micro2")
    for t in ("q", "k"):
        mask = r.masks[0][t]  # [L, C]
        pairs = mask.reshape(NL, HEADS[t], 2, HD // 2)  # channel j and j + hd/2
        np.testing.assert_array_equal(pairs[:, :, 0], pairs[:, :, 1])
        per_head = mask.reshape(NL, HEADS[t], HD).sum(-1)
        np.testing.assert_array_equal(per_head, 2 * math.ceil(KEEP * (HD // 2)))
        np.testing.assert_array_equal(mask, np_select(r.spies[0].stats[t], t, "head", "rope_pair"))
    assert_exact_step(r.params[0], r.params[1], r.masks[0])


# ------------------------------------------------------------------ 6. with SALT


def test_salt_then_longact_keeps_frozen_columns_and_logs_both():
    """grpo_step with salt_estimator(...) reweights the advantages; the LongAct link still masks the
    final update exactly, from statistics captured in SALT's own forward pass."""
    r, plain = run("salt"), run("layer")
    for s, masks in enumerate(r.masks):
        for t in ("q", "k"):
            np.testing.assert_array_equal(masks[t], np_select(r.spies[s].stats[t], t))
        assert_exact_step(r.params[s], r.params[s + 1], masks)
        metrics = r.metrics[s]
        assert {"salt/kappa_before", "salt/gamma", "salt/rank"} <= set(metrics)
        assert "longact/q_overlap" in metrics and float(metrics["salt/ok"]) == 1.0
    for t in ("q", "k"):  # batch 0, same start: the same statistics as the plain path
        for f in ("sum_abs", "sum_sq", "max_abs", "count"):
            np.testing.assert_allclose(
                getattr(r.spies[0].stats[t], f), getattr(plain.spies[0].stats[t], f), rtol=1e-6
            )
    # SALT did change the update (gamma > 0): not the plain GRPO gradient
    assert float(r.metrics[0]["salt/gamma"]) > 0
    g_salt, g_plain = (jax.tree.leaves(x.spies[0].grads) for x in (r, plain))
    assert any(not np.allclose(a, b, rtol=1e-3) for a, b in zip(g_salt, g_plain, strict=True))


# ------------------------------------------------------------------ 5. bad configuration


class _NoAttention(nnx.Module):
    def __init__(self):
        self.layers = nnx.List([nnx.Linear(4, 4, rngs=nnx.Rngs(0)) for _ in range(2)])


def test_bad_configuration_is_a_clear_error():
    for keep in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"keep_ratio=.* must be in \(0, 1\]"):
            longact(keep_ratio=keep)
    tx = optax.chain(optax.adamw(0.01), longact())
    with pytest.raises(ValueError, match="found no attention parameter for target 'q'"):
        TrainState.create(_NoAttention(), tx)
    nothing = r"(?:^|\.)blocks\.(?P<layer>\d+)\.attn\.(?P<target>q|k)\.(?P<kind>kernel|bias)$"
    with pytest.raises(ValueError, match="param_pattern"):
        TrainState.create(
            initial_model(TINY), optax.chain(optax.adamw(0.01), longact(param_pattern=nothing))
        )
    state = TrainState.create(initial_model(TINY), tx)
    with pytest.raises(ValueError, match=r"GrpoConfig\(capture_activations=True\)"):
        grpo_step(state, make_batch(0), GrpoConfig())


def test_longact_inside_multisteps_receives_activation_stats():
    """optax.MultiSteps forwards extra arguments; TrainState.create keeps them (a plain
    with_extra_args_support wrapper would drop activation_stats= and fail the step)."""
    inner = optax.chain(optax.adamw(1e-2), longact(keep_ratio=KEEP))
    state = TrainState.create(initial_model(QWEN2), optax.MultiSteps(inner, every_k_schedule=2))
    start = host_copy(nnx.to_pure_dict(state.params))
    state, _ = grpo_step(state, make_batch(0), CAPTURE)  # accumulates: nothing applied
    first = host_copy(nnx.to_pure_dict(state.params))
    state, _ = grpo_step(state, make_batch(1), CAPTURE)  # applies the masked AdamW update
    after = host_copy(nnx.to_pure_dict(state.params))
    assert np.array_equal(bits(proj(start, 0, "q")["kernel"]), bits(proj(first, 0, "q")["kernel"]))
    kept = math.ceil(KEEP * HEADS["q"] * HD)
    for i in range(NL):
        moved = np.any(proj(first, i, "q")["kernel"] != proj(after, i, "q")["kernel"], axis=0)
        assert 0 < moved.sum() <= kept  # only the selected W_Q columns move
