"""Scanned layers (``ModelConfig.scan_layers``) equal the unrolled model: logits,
gradients, remat policies, KV-cache decode, HF checkpoint load/save, sharding, and the
``grpo_step`` update with LongAct on 8 fake devices (with SALT: test_salt_scan.py).

The reference is the unrolled Decoder, itself checked against Hugging Face torch in
test_models.py; both models load the same ``save_pretrained`` directory, so the
scanned HF loader (stacking on the host) is part of what is tested.
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
from safetensors.numpy import load_file

from jaxrl_geom.longact import longact
from jaxrl_geom.models import Decoder, ModelConfig, init_cache, load_pretrained, save_pretrained
from jaxrl_geom.rl import GrpoConfig, RolloutBatch, TrainState, grpo_step
from jaxrl_geom.sharding import make_mesh, param_shardings, shard_batch, shard_model

NL = 3
QWEN2 = ModelConfig(  # biases on q/k/v: LongAct masks kernels and biases
    model_type="qwen2",
    vocab_size=48,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=NL,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    attention_bias=True,
    scan_layers=False,
)
TOL = 1e-5  # relative to the largest magnitude: same ops, one layer compiled vs three


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def unstack(params: dict) -> dict:
    """Scanned pure-dict params -> the unrolled layout (``layers.<i>``)."""
    out = dict(params)
    out["layers"] = {i: jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(NL)}
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An unrolled model with NumPy weights, saved in HF format."""
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Decoder(QWEN2)), nnx.Param, ...)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.3, x.dtype), params)
    path = tmp_path_factory.mktemp("qwen2_3l")
    save_pretrained(nnx.merge(graphdef, params, rest), path)
    return path


def batch(lengths=(7, 4, 1), seed=0):
    t = max(lengths)
    mask = np.arange(t)[None, :] >= t - np.asarray(lengths)[:, None]
    tokens = np.where(mask, np.random.default_rng(seed).integers(0, 48, mask.shape), 0)
    return tokens.astype(np.int32), np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32), mask


@functools.partial(jax.jit, static_argnames="graphdef")
def logits_and_grads(graphdef, params, rest, tokens, positions, mask):
    def loss(params):
        logits, _ = nnx.merge(graphdef, params, rest)(tokens, positions, mask)
        return jnp.sum(jnp.where(mask[..., None], logits, 0.0) ** 2) * 1e-3, logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return logits, grads


def test_scanned_equals_unrolled_logits_grads_remat_cache_and_checkpoint(checkpoint, tmp_path):
    unrolled = load_pretrained(checkpoint, scan_layers=False)
    tokens, positions, mask = batch()
    g, p, r = nnx.split(unrolled, nnx.Param, ...)
    want_logits, want_grads = logits_and_grads(g, p, r, tokens, positions, mask)
    want_grads = nnx.to_pure_dict(want_grads)

    for policy in ("nothing_saveable", "save_dots"):
        scanned = load_pretrained(checkpoint, scan_layers=True, remat=True, remat_policy=policy)
        assert scanned.config.scanned
        g, p, r = nnx.split(scanned, nnx.Param, ...)
        assert p["layers"]["self_attn"]["q_proj"]["kernel"].shape == (NL, 32, 32)
        logits, grads = logits_and_grads(g, p, r, tokens, positions, mask)
        assert rel_err(np.asarray(logits)[mask], np.asarray(want_logits)[mask]) < TOL
        got = unstack(nnx.to_pure_dict(grads))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want_grads), strict=True):
            assert rel_err(a, b) < TOL

    # Save: the same HF tensors, bit for bit.
    save_pretrained(scanned, tmp_path)
    a, b = load_file(tmp_path / "model.safetensors"), load_file(checkpoint / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name].view(np.uint32), b[name].view(np.uint32))

    # KV cache: prefill then one token at a time equals the cache-free forward.
    scanned = load_pretrained(checkpoint, scan_layers=True)
    cache = init_cache(scanned.config, tokens.shape[0], 12)
    assert cache.k.shape == (NL, 3, 12, 2, 8)
    graphdef, state = nnx.split(scanned)
    step = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a[:3], cache=a[3]))
    for lo, hi in [(0, 4), (4, 5), (5, 6), (6, 7)]:
        logits, cache = step(state, tokens[:, lo:hi], positions[:, lo:hi], mask[:, lo:hi], cache)
        rows = mask[:, lo:hi]
        assert rel_err(np.asarray(logits)[rows], np.asarray(want_logits)[:, lo:hi][rows]) < TOL

    # Sharding: the stacked axis is never sharded, the others as in the unrolled model.
    mesh = make_mesh(fsdp=4, tensor=2)
    specs = nnx.to_pure_dict(param_shardings(nnx.state(scanned, nnx.Param), mesh))
    want = nnx.to_pure_dict(param_shardings(nnx.state(unrolled, nnx.Param), mesh))
    for t in ("q_proj", "o_proj"):
        got_spec = specs["layers"]["self_attn"][t]["kernel"].spec
        assert tuple(got_spec) == (None, *want["layers"][0]["self_attn"][t]["kernel"].spec)


# --------------------------------------------------------------------------- grpo_step


N, P, LC = 8, 6, 5


def rollout_batch(seed: int) -> RolloutBatch:
    rng = np.random.default_rng(seed)
    prompt_len, comp_len = rng.integers(1, P + 1, N), rng.integers(1, LC + 1, N)
    prompt_mask = np.arange(P)[None] >= P - prompt_len[:, None]
    completion_mask = np.arange(LC)[None] < comp_len[:, None]
    mask = np.concatenate([prompt_mask, completion_mask], 1)
    rewards = rng.normal(size=(N // 4, 4))
    adv = (rewards - rewards.mean(1, keepdims=True)) / rewards.std(1, keepdims=True)
    return RolloutBatch(
        tokens=jnp.asarray(np.where(mask, rng.integers(1, 48, mask.shape), 0), jnp.int32),
        positions=jnp.asarray(np.maximum(np.cumsum(mask, 1) - 1, 0), jnp.int32),
        attention_mask=jnp.asarray(mask),
        completion_mask=jnp.asarray(completion_mask),
        old_logprobs=jnp.asarray(rng.normal(-3.8, 0.3, (N, LC)), jnp.float32),
        ref_logprobs=jnp.zeros((N, LC), jnp.float32),
        advantages=jnp.asarray(adv.reshape(N), jnp.float32),
        group_ids=jnp.repeat(jnp.arange(N // 4), 4).astype(jnp.int32),
    )


def two_steps(path, scan: bool):
    model = load_pretrained(path, scan_layers=scan)
    mesh = make_mesh(data=2, fsdp=4)
    shard_model(model, mesh)
    tx = optax.chain(optax.adamw(1e-2, weight_decay=0.1), longact(keep_ratio=0.3))
    state = TrainState.create(model, tx)
    metrics = []
    for s in range(2):  # the second step uses the first step's mask (overlap metric)
        state, m = grpo_step(
            state, shard_batch(rollout_batch(s), mesh), GrpoConfig(capture_activations=True)
        )
        metrics.append(jax.device_get(m))
    return jax.device_get(nnx.to_pure_dict(state.params)), metrics


def test_grpo_step_with_longact_scanned_equals_unrolled_on_8_devices(checkpoint):
    want_params, want_metrics = two_steps(checkpoint, scan=False)
    got_params, got_metrics = two_steps(checkpoint, scan=True)
    for a, b in zip(
        jax.tree.leaves(unstack(got_params)), jax.tree.leaves(want_params), strict=True
    ):
        assert rel_err(a, b) < TOL
    # LongAct really masked the stacked kernels: ~30% of the q channels moved per layer.
    initial = load_file(checkpoint / "model.safetensors")
    for i in range(NL):
        w0 = initial[f"model.layers.{i}.self_attn.q_proj.weight"].T  # [D, C]
        moved = np.any(got_params["layers"]["self_attn"]["q_proj"]["kernel"][i] != w0, axis=0)
        assert 0 < moved.sum() < 32  # two steps: the union of two masks of ~0.3 C each
    for got, want in zip(got_metrics, want_metrics, strict=True):
        assert sorted(got) == sorted(want)
        assert any(k.startswith("longact/") for k in got)
        for k in want:
            assert rel_err(got[k], want[k]) < TOL, k


def test_scan_by_default_above_eight_layers():
    base = dataclasses.replace(QWEN2, scan_layers=None)
    assert not dataclasses.replace(base, num_hidden_layers=8).scanned
    assert dataclasses.replace(base, num_hidden_layers=9).scanned
    with pytest.raises(ValueError, match="remat_policy"):
        dataclasses.replace(base, remat_policy="everything")


def test_generate_with_scanned_layers_on_8_devices_equals_unrolled(checkpoint):
    """The sampler with a stacked cache (batch on axis 1, sharded over 8 devices) draws
    the same greedy tokens with the same log-probs as the unrolled model on one."""
    from jaxrl_geom.sampling import generate

    tokens, _, mask = batch(lengths=(7, 4, 1, 6, 2))
    want = generate(
        load_pretrained(checkpoint, scan_layers=False), tokens, mask, None, max_new_tokens=5
    )
    got = generate(
        load_pretrained(checkpoint, scan_layers=True),
        tokens,
        mask,
        None,
        max_new_tokens=5,
        mesh=make_mesh(),
    )
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert rel_err(got.logprobs, want.logprobs) < TOL
