"""LongAct optax transform: exact masking of W_Q/W_K columns, refresh modes, placement.

References: a NumPy top-k oracle (stable argsort, ties -> lower index) and the SPEC
section 3 formulas; exactness is checked bit for bit (``tolerances.bits``: uint32 views,
so -0.0 != 0.0).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tolerances import bits

from jaxrl_geom.longact import LongActState, check_chain, longact, masked_optimizer
from jaxrl_geom.models import Decoder, ModelConfig, collect_qk_stats, set_qk_capture
from jaxrl_geom.models.taps import ChannelStats

L, D, H, K, HD = 2, 8, 4, 2, 4  # layers, hidden, q heads, kv heads, head dim
CQ, CK = H * HD, K * HD


# ------------------------------------------------------------------ fixtures


def make_params(seed=0):
    """Plain nested dict with the Decoder's parameter names (q/k/v biases, qwen2-like)."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    layers = {}
    for i in range(L):
        layers[str(i)] = {
            "self_attn": {
                "q_proj": {"kernel": w(D, CQ), "bias": w(CQ)},
                "k_proj": {"kernel": w(D, CK), "bias": w(CK)},
                "v_proj": {"kernel": w(D, CK), "bias": w(CK)},
                "o_proj": {"kernel": w(CQ, D)},
            },
            "mlp": {"up_proj": {"kernel": w(D, 16)}},
            "input_layernorm": {"scale": w(D)},
        }
    return {"embed_tokens": {"embedding": w(CQ, D)}, "layers": layers, "norm": {"scale": w(D)}}


def make_stats(seed):
    rng = np.random.default_rng(100 + seed)
    out = {}
    for t, c in (("q", CQ), ("k", CK)):
        n = rng.integers(5, 20, size=L).astype(np.float32)
        sum_abs = rng.gamma(2.0, size=(L, c)).astype(np.float32) * n[:, None]
        out[t] = ChannelStats(
            sum_abs=jnp.asarray(sum_abs),
            sum_sq=jnp.asarray(sum_abs**2 / n[:, None]),
            max_abs=jnp.asarray(sum_abs / n[:, None] * 2),
            count=jnp.asarray(n),
        )
    return out


def np_scores(stats):  # mean_abs oracle
    return {t: np.asarray(s.sum_abs) / np.asarray(s.count)[:, None] for t, s in stats.items()}


def np_topk(scores, keep):  # [L, C] scope=layer, granularity=channel oracle
    k = math.ceil(keep * scores.shape[-1])
    out = np.zeros(scores.shape, bool)
    for i, row in enumerate(scores):
        out[i, np.argsort(-row, kind="stable")[:k]] = True
    return out


def grads_like(params, seed):
    rng = np.random.default_rng(200 + seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


def attn(tree, i, t):
    return tree["layers"][str(i)]["self_attn"][f"{t}_proj"]


def run(tx, params, steps, stats_seeds=None, **extra):
    """``steps`` optimizer steps; returns the params after each step and the final state."""
    state = tx.init(params)
    history = [params]
    for s in range(steps):
        stats = make_stats(s if stats_seeds is None else stats_seeds[s])
        updates, state = tx.update(
            grads_like(params, s), state, params, activation_stats=stats, **extra
        )
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history, state


# ------------------------------------------------------------------ exactness


def assert_exact_masking(before, after, masks):
    """Unselected q/k columns and bias entries bit-identical; everything else moved."""
    for i in range(L):
        for t in ("q", "k"):
            m = masks[t][i]
            kb, ka = (
                np.asarray(attn(before, i, t)["kernel"]),
                np.asarray(attn(after, i, t)["kernel"]),
            )
            bb, ba = np.asarray(attn(before, i, t)["bias"]), np.asarray(attn(after, i, t)["bias"])
            assert np.array_equal(bits(kb[:, ~m]), bits(ka[:, ~m]))
            assert np.array_equal(bits(bb[~m]), bits(ba[~m]))
            assert np.all(kb[:, m] != ka[:, m]) and np.all(bb[m] != ba[m])
    others = [
        (path, b, a)
        for (path, b), a in zip(
            jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(after), strict=True
        )
        if "q_proj" not in jax.tree_util.keystr(path) and "k_proj" not in jax.tree_util.keystr(path)
    ]
    assert others and all(np.all(np.asarray(b) != np.asarray(a)) for _, b, a in others)


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.adamw(0.05, weight_decay=0.1),
            longact(keep_ratio=0.3),
        ),
        lambda: optax.chain(optax.adamw(0.05, weight_decay=0.1), longact(keep_ratio=0.3)),
        lambda: masked_optimizer(optax.adamw(0.05, weight_decay=0.1), longact(keep_ratio=0.3)),
        lambda: masked_optimizer(
            optax.adamw(0.05, weight_decay=0.1), longact(keep_ratio=0.3), mask_gradients=True
        ),
    ],
    ids=["clip_adamw_longact", "adamw_longact", "masked_optimizer", "masked_mask_gradients"],
)
def test_frozen_columns_bit_identical(make_tx):
    tx = make_tx()
    params = make_params()
    check_chain(tx, params)
    state, update = tx.init(params), tx.update
    for step in range(3):
        stats = make_stats(step)
        expected = {t: np_topk(s, 0.3) for t, s in np_scores(stats).items()}
        updates, state = update(grads_like(params, step), state, params, activation_stats=stats)
        new = optax.apply_updates(params, updates)
        assert_exact_masking(params, new, expected)
        params = new


def test_gradient_only_masking_is_not_exact_and_is_caught():
    # longact FIRST masks only the gradient: AdamW's weight decay still moves the
    # "frozen" columns (SPEC section 3), so placement validation must reject it.
    tx = optax.chain(longact(keep_ratio=0.3), optax.adamw(0.05, weight_decay=0.1))
    params = make_params()
    history, _ = run(tx, params, 1)
    mask = np_topk(np_scores(make_stats(0))["q"], 0.3)[0]
    before, after = (
        np.asarray(attn(params, 0, "q")["kernel"]),
        np.asarray(attn(history[1], 0, "q")["kernel"]),
    )
    assert not np.array_equal(before[:, ~mask], after[:, ~mask])
    np.testing.assert_allclose(after[:, ~mask], before[:, ~mask] * (1 - 0.05 * 0.1), rtol=1e-6)
    with pytest.raises(ValueError, match="longact link is link 0 of 2 .* must be the last link"):
        check_chain(tx, params)
    with pytest.raises(ValueError, match="link 1 of 3"):  # anything after longact
        check_chain(optax.chain(optax.adam(0.1), longact(), optax.add_decayed_weights(0.1)), params)
    with pytest.raises(ValueError, match="link 0 of 2"):  # masked_optimizer not last either
        wrapped = masked_optimizer(optax.adam(0.1), longact())
        check_chain(optax.chain(wrapped, optax.add_decayed_weights(0.1)), params)
    with pytest.raises(ValueError, match=r"link 0 of 2 of the chain at opt_state\[1\]"):  # nested
        check_chain(optax.chain(optax.adam(0.1), optax.chain(longact(), optax.sgd(0.1))), params)
    with pytest.raises(ValueError, match="no longact"):
        check_chain(optax.adamw(0.1), params)
    # accepted: nested chains, wrappers, inject_hyperparams
    check_chain(optax.chain(optax.clip(1.0), masked_optimizer(optax.adamw(0.1), longact())), params)
    check_chain(optax.chain(optax.inject_hyperparams(optax.adamw)(0.1), longact()), params)
    check_chain(optax.MultiSteps(optax.chain(optax.adam(0.1), longact()), 2), params)
    check_chain(optax.apply_if_finite(optax.chain(optax.adam(0.1), longact()), 3), params)
    # named_chain: application order is the dict's insertion order, not jax's sorted keys
    check_chain(optax.named_chain(("z_adam", optax.adam(0.1)), ("a_longact", longact())), params)
    with pytest.raises(ValueError, match=r"link 0 of 2 of the chain at opt_state"):
        check_chain(
            optax.named_chain(("a_longact", longact()), ("z_adam", optax.adam(0.1))), params
        )


def test_wrapper_matches_chain_and_mask_gradients_keeps_moments_zero():
    params = make_params()
    adamw = lambda: optax.adamw(0.05, weight_decay=0.1)  # noqa: E731
    same = [make_stats(0)] * 3  # constant stats: the step-refresh mask is constant
    outs = []
    for tx in (
        optax.chain(adamw(), longact()),
        masked_optimizer(adamw(), longact()),
        masked_optimizer(adamw(), longact(), mask_gradients=True),
    ):
        state, p = tx.init(params), params
        for step in range(3):
            u, state = tx.update(grads_like(p, step), state, p, activation_stats=same[step])
            p = optax.apply_updates(p, u)
        outs.append((p, state))
    for a, b in zip(jax.tree.leaves(outs[0][0]), jax.tree.leaves(outs[1][0]), strict=True):
        assert np.array_equal(bits(a), bits(b))
    mask = np_topk(np_scores(same[0])["q"], 0.3)[0]
    mu = np.asarray(attn(optax.tree.get(outs[2][1], "mu"), 0, "q")["kernel"])
    assert np.all(mu[:, ~mask] == 0) and np.all(mu[:, mask] != 0)
    mu_plain = np.asarray(attn(optax.tree.get(outs[1][1], "mu"), 0, "q")["kernel"])
    assert np.all(mu_plain[:, ~mask] != 0)  # without gradient masking the moments accumulate


# ------------------------------------------------------------------ keep ratio semantics


def test_keep_ratio_one_is_exact_identity():
    params = make_params()
    stats = make_stats(0)
    g = grads_like(params, 0)
    u, state = longact(keep_ratio=1.0).update(
        g, longact(1.0).init(params), params, activation_stats=stats
    )
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(g), strict=True):
        assert np.array_equal(bits(a), bits(b))
    np.testing.assert_array_equal(np.asarray(state.diagnostics.selected_fraction["q"]), 1.0)
    u0, _ = run(optax.adamw(0.05, weight_decay=0.1), params, 2)
    u1, _ = run(optax.chain(optax.adamw(0.05, weight_decay=0.1), longact(1.0)), params, 2)
    for a, b in zip(jax.tree.leaves(u0[-1]), jax.tree.leaves(u1[-1]), strict=True):
        assert np.array_equal(bits(a), bits(b))


@pytest.mark.parametrize("sparsity, keep", [(0.3, 0.7), (0.7, 0.3), (0.0, 1.0)])
def test_sparsity_is_the_complement_of_keep_ratio(sparsity, keep):
    params, stats = make_params(), make_stats(0)
    g = grads_like(params, 0)
    a = longact(sparsity=sparsity)
    b = longact(keep_ratio=keep)
    ua, sa = a.update(g, a.init(params), params, activation_stats=stats)
    ub, sb = b.update(g, b.init(params), params, activation_stats=stats)
    for t in ("q", "k"):
        np.testing.assert_array_equal(np.asarray(sa.masks[t]), np.asarray(sb.masks[t]))
        np.testing.assert_array_equal(np.asarray(sa.masks[t]), np_topk(np_scores(stats)[t], keep))
    for x, y in zip(jax.tree.leaves(ua), jax.tree.leaves(ub), strict=True):
        assert np.array_equal(bits(x), bits(y))


# ------------------------------------------------------------------ refresh modes + diagnostics


def test_refresh_step_fixed_ema_and_diagnostics():
    params = make_params()
    stats = [make_stats(s) for s in range(3)]
    scores = [np_scores(s) for s in stats]
    g = grads_like(params, 0)
    for refresh in ("step", "fixed", "ema"):
        tx = longact(keep_ratio=0.3, refresh=refresh, ema_decay=0.6)
        state = tx.init(params)
        prev = {t: np.ones((L, c), bool) for t, c in (("q", CQ), ("k", CK))}
        ema = {}
        for s in range(3):
            _, state = tx.update(g, state, params, activation_stats=stats[s])
            for t in ("q", "k"):
                ema[t] = scores[s][t] if s == 0 else 0.6 * ema[t] + 0.4 * scores[s][t]
                want = {
                    "step": np_topk(scores[s][t], 0.3),
                    "fixed": np_topk(scores[0][t], 0.3),
                    "ema": np_topk(ema[t], 0.3),
                }[refresh]
                got = np.asarray(state.masks[t])
                np.testing.assert_array_equal(got, want, err_msg=f"{refresh} step {s} {t}")
                if refresh == "ema":
                    np.testing.assert_allclose(np.asarray(state.ema_scores[t]), ema[t], rtol=1e-5)
                d = state.diagnostics
                c = want.shape[-1]
                np.testing.assert_allclose(
                    np.asarray(d.selected_fraction[t]), math.ceil(0.3 * c) / c
                )
                np.testing.assert_allclose(
                    np.asarray(d.mask_overlap[t]),
                    (prev[t] & want).sum(-1) / want.sum(-1),
                    rtol=1e-6,
                )
                np.testing.assert_allclose(
                    np.asarray(d.saliency_concentration[t]),
                    (scores[s][t] * want).sum(-1) / scores[s][t].sum(-1),
                    rtol=1e-5,
                )
                prev[t] = want
        assert int(state.count) == 3
    # the step masks do change between these batches (so "fixed" is a real test)
    assert not np.array_equal(np_topk(scores[0]["q"], 0.3), np_topk(scores[1]["q"], 0.3))


def test_fixed_needs_stats_only_on_the_calibration_call():
    params, g = make_params(), grads_like(make_params(), 0)
    tx = longact(refresh="fixed")
    state = tx.init(params)
    with pytest.raises(ValueError, match="calibration"):
        tx.update(g, state, params)
    _, state = tx.update(g, state, params, activation_stats=make_stats(0))
    u, state2 = tx.update(g, state, params)  # frozen mask, no stats needed
    np.testing.assert_array_equal(np.asarray(state2.masks["q"]), np.asarray(state.masks["q"]))
    m = np.asarray(state.masks["q"][1])
    assert np.all(np.asarray(attn(u, 1, "q")["kernel"])[:, ~m] == 0)


def test_diagnostics_readable_from_chain_state_and_extra_args_ignored():
    params = make_params()
    tx = optax.chain(optax.adamw(0.05), longact(scope="head", num_heads=H, num_kv_heads=K))
    _, state = run(tx, params, 1, coefficients=jnp.ones(4), group_ids=jnp.zeros(4, jnp.int32))
    frac = optax.tree.get(state, "selected_fraction")
    np.testing.assert_allclose(np.asarray(frac["q"]), math.ceil(0.3 * HD) / HD)
    assert optax.tree.get(state, "saliency_concentration")["k"].shape == (L,)
    assert isinstance(optax.tree.get(state, "LongActState"), LongActState)


# ------------------------------------------------------------------ jit, nnx, real model


def test_jit_no_recompile():
    params = make_params()
    tx = optax.chain(
        optax.adamw(0.05, weight_decay=0.1), longact(granularity="rope_pair", head_dim=HD)
    )
    step = jax.jit(tx.update)
    state = tx.init(params)
    for s in range(2):
        stats = make_stats(s)
        u, state = step(grads_like(params, s), state, params, activation_stats=stats)
        m = np.asarray(state[-1].masks["k"]).reshape(L, K, 2, HD // 2)
        np.testing.assert_array_equal(m[:, :, 0], m[:, :, 1])
    assert step._cache_size() == 1


class _Attn(nnx.Module):  # stand-in with the Decoder's attribute names
    def __init__(self, rngs):
        self.q_proj = nnx.Linear(D, CQ, rngs=rngs)
        self.k_proj = nnx.Linear(D, CK, rngs=rngs)
        self.o_proj = nnx.Linear(CQ, D, use_bias=False, rngs=rngs)


class _Layer(nnx.Module):
    def __init__(self, rngs):
        self.self_attn = _Attn(rngs)
        self.mlp = nnx.Linear(D, D, rngs=rngs)


class _Model(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(CQ, D, rngs=rngs)
        self.layers = nnx.List([_Layer(rngs) for _ in range(L)])


def test_nnx_state_matches_plain_dict():
    params = nnx.state(nnx.eval_shape(lambda: _Model(nnx.Rngs(0))), nnx.Param)
    params = jax.tree.map(lambda x: jnp.full(x.shape, 0.5, x.dtype), params)
    plain = nnx.to_pure_dict(params)
    stats = make_stats(0)
    g_state = jax.tree.map(jnp.ones_like, params)
    g_plain = jax.tree.map(jnp.ones_like, plain)
    tx = longact(keep_ratio=0.3)
    u_state, _ = tx.update(g_state, tx.init(params), params, activation_stats=stats)
    u_plain, _ = tx.update(g_plain, tx.init(plain), plain, activation_stats=stats)
    np.testing.assert_array_equal(
        np.asarray(nnx.to_pure_dict(u_state)["layers"][1]["self_attn"]["k_proj"]["kernel"]),
        np.asarray(u_plain["layers"][1]["self_attn"]["k_proj"]["kernel"]),
    )
    kernel = np.asarray(u_plain["layers"][1]["self_attn"]["k_proj"]["kernel"])
    mask = np_topk(np_scores(stats)["k"], 0.3)[1]
    np.testing.assert_array_equal(kernel, np.broadcast_to(mask, kernel.shape).astype(np.float32))
    assert np.all(np.asarray(u_plain["layers"][0]["mlp"]["kernel"]) == 1)


def test_real_decoder_end_to_end():
    """capture -> collect_qk_stats -> chain(adamw, longact) on the real Decoder, one jit."""
    cfg = ModelConfig.tiny(
        32, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    # Abstract init + NumPy weights: no per-op compiles of the initializers.
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Decoder(cfg)), nnx.Param, ...)
    assert not jax.tree.leaves(rest)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.3, x.dtype), params)
    model = nnx.merge(graphdef, params, rest)
    set_qk_capture(model, True)
    graphdef = nnx.graphdef(model)
    tokens = jnp.asarray(rng.integers(1, 32, (2, 6)), jnp.int32)
    mask = jnp.ones((2, 6), bool).at[0, :2].set(False)
    positions = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
    tx = longact(
        keep_ratio=0.3,
        scope="head",
        granularity="rope_pair",
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
    )
    tx = optax.chain(optax.adamw(0.05, weight_decay=0.1), tx)
    check_chain(tx, params)

    def loss(p):
        m = nnx.merge(graphdef, p, rest)
        logits, _ = m(tokens, positions, mask)
        return jnp.mean(logits**2), collect_qk_stats(m)

    @jax.jit
    def step(p, opt_state):
        grads, stats = jax.grad(loss, has_aux=True)(p)
        updates, opt_state = tx.update(grads, opt_state, p, activation_stats=stats)
        return optax.apply_updates(p, updates), opt_state

    new, state = step(params, tx.init(params))
    for t, heads in (("q", 4), ("k", 2)):
        m = np.asarray(state[-1].masks[t])  # [L, C]
        # head scope, rope pairs: ceil(0.3 * 2 pairs) = 1 pair = 2 channels per head
        assert m.reshape(2, heads, 2, -1).sum((-2, -1)).tolist() == [[2] * heads] * 2
        for i in range(2):
            before = np.asarray(params["layers"][i]["self_attn"][f"{t}_proj"]["kernel"][...])
            after = np.asarray(new["layers"][i]["self_attn"][f"{t}_proj"]["kernel"][...])
            assert np.array_equal(bits(before[:, ~m[i]]), bits(after[:, ~m[i]]))
            assert np.all(before[:, m[i]] != after[:, m[i]])


# ------------------------------------------------------------------ bad configuration


def test_bad_configuration_errors():
    params, stats = make_params(), make_stats(0)
    g = grads_like(params, 0)
    for keep in (0.0, 1.2, -0.3):
        with pytest.raises(ValueError, match="keep_ratio"):
            longact(keep_ratio=keep)
    with pytest.raises(ValueError, match="sparsity"):
        longact(sparsity=1.0)
    with pytest.raises(ValueError, match="not both"):
        longact(keep_ratio=0.3, sparsity=0.7)
    with pytest.raises(ValueError, match="targets"):
        longact(targets=("v",))
    with pytest.raises(ValueError, match="refresh"):
        longact(refresh="sometimes")
    with pytest.raises(ValueError, match="ema_decay"):
        longact(ema_decay=1.0)
    with pytest.raises(ValueError, match="statistic"):
        longact(statistic="median")
    with pytest.raises(ValueError, match=r"layers\.<i>\.self_attn\.q_proj\.kernel"):
        longact().init({"dense": {"kernel": jnp.ones((4, 4))}})
    with pytest.raises(ValueError, match="head_dim"):
        longact(scope="head").init(params)
    tx = longact()
    state = tx.init(params)
    with pytest.raises(ValueError, match="set_qk_capture"):
        tx.update(g, state, params)
    with pytest.raises(ValueError, match="set_qk_capture"):
        tx.update(g, state, params, activation_stats={"q": stats["q"]})
    short = {t: jax.tree.map(lambda x: x[:1], s) for t, s in stats.items()}
    with pytest.raises(ValueError, match="L=2 layers.*set_qk_capture"):
        tx.update(g, state, params, activation_stats=short)
    narrow = {
        t: ChannelStats(s.sum_abs[:, :4], s.sum_sq[:, :4], s.max_abs[:, :4], s.count)
        for t, s in stats.items()
    }
    with pytest.raises(ValueError, match="C=16 channels"):
        tx.update(g, state, params, activation_stats=narrow)
    with pytest.raises(ValueError, match="masked_optimizer"):
        masked_optimizer(optax.adam(0.1), optax.identity())
