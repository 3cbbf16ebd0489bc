"""Mesh construction, logical-axis shardings, and 8 fake devices == 1 for the decoder."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from tolerances import assert_f32_close, depth_ops

from jaxrl_geom import sharding
from jaxrl_geom.models import Decoder, ModelConfig, init_cache

VOCAB = 96


def config(**overrides) -> ModelConfig:
    kw = dict(
        model_type="qwen2",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        attention_bias=True,
    )
    return ModelConfig(**{**kw, **overrides})


def test_make_mesh_sizes():
    assert len(jax.devices()) == 8  # tests/conftest.py
    assert dict(sharding.make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(sharding.make_mesh(data=2, fsdp=-1, tensor=2).shape) == {
        "data": 2,
        "fsdp": 2,
        "tensor": 2,
    }
    assert sharding.make_mesh(data=2, fsdp=1, tensor=1).devices.size == 2
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.make_mesh(data=3, fsdp=-1)
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh(data=4, fsdp=4, tensor=1)


def test_param_shardings_follow_the_logical_rules():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    abstract = nnx.eval_shape(lambda: Decoder(config(num_key_value_heads=1), rngs=nnx.Rngs(0)))
    specs = {
        path: var.get_value().spec
        for path, var in nnx.to_flat_state(sharding.param_shardings(abstract, mesh))
    }
    attn = ("layers", 0, "self_attn")
    assert specs[("embed_tokens", "embedding")] == P("tensor", "fsdp")  # [V, D]
    assert specs[(*attn, "q_proj", "kernel")] == P("fsdp", "tensor")  # [D, H*hd]
    assert specs[(*attn, "q_proj", "bias")] == P("tensor")
    assert specs[(*attn, "k_proj", "kernel")] == P("fsdp", "tensor")  # [D, 1*16]
    assert specs[(*attn, "o_proj", "kernel")] == P("tensor", "fsdp")  # [H*hd, D]
    assert specs[("layers", 1, "mlp", "down_proj", "kernel")] == P("tensor", "fsdp")  # [F, D]
    assert specs[("layers", 1, "input_layernorm", "scale")] == P(None)
    assert specs[("lm_head", "kernel")] == P("fsdp", "tensor")  # [D, V]
    # A dimension that does not divide its mesh axis is an error, not silent replication.
    mesh4 = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    with pytest.raises(ValueError, match="kv=6 .* not divisible by mesh axis tensor=4"):
        sharding.logical_to_spec(("embed", "kv"), (64, 6), mesh4)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward(graphdef, state, tokens, positions, mask):
    return nnx.merge(graphdef, state)(tokens, positions, mask)[0]


def _batch(b=8, t=6, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, b)
    mask = np.arange(t)[None, :] >= t - lengths[:, None]
    tokens = np.where(mask, rng.integers(0, VOCAB, (b, t)), 0).astype(np.int32)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return tokens, positions, mask


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 1, 8)])  # (2, 4, 1): test_sampling
def test_eight_devices_match_one(shape):
    model = Decoder(config(tie_word_embeddings=shape == (2, 2, 2)), rngs=nnx.Rngs(0))
    tokens, positions, mask = _batch()
    graphdef, state = nnx.split(model)
    single = _forward(graphdef, state, tokens, positions, mask)

    mesh = sharding.make_mesh(*shape)
    sharded_state = sharding.shard_params(state, mesh)
    batch = sharding.shard_batch((tokens, positions, mask), mesh)
    kernel = sharded_state["layers"][0]["mlp"]["up_proj"]["kernel"].get_value()
    assert kernel.sharding.spec == sharding.logical_to_spec(("embed", "mlp"), kernel.shape, mesh)
    assert len(kernel.sharding.device_set) == 8
    assert batch[0].sharding.spec == P(("data", "fsdp"))
    out = _forward(graphdef, sharded_state, *batch)
    assert_f32_close(out, single, scale=np.abs(single).max(), ops=depth_ops(2))


def test_shard_model_and_cache_prefill_on_a_mesh():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    model = Decoder(config(), rngs=nnx.Rngs(1))
    tokens, positions, mask = _batch(seed=1)
    graphdef, state = nnx.split(model)
    ref = _forward(graphdef, state, tokens, positions, mask)

    sharding.shard_model(model, mesh)
    assert model.layers[0].self_attn.o_proj.kernel.get_value().sharding.spec == P("tensor", "fsdp")

    @nnx.jit
    def prefill(model, tokens, positions, mask):
        cache = init_cache(model.config, tokens.shape[0], 16)
        return model(tokens, positions, mask, cache=cache, logits_slice="last")

    logits, cache = prefill(model, *sharding.shard_batch((tokens, positions, mask), mesh))
    assert_f32_close(logits[:, 0], ref[:, -1], scale=np.abs(ref).max(), ops=depth_ops(2))
    assert int(cache.index) == tokens.shape[1]


def test_shard_batch_rejects_indivisible_batches():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    placed = sharding.shard_batch({"x": jnp.ones((4, 3)), "n": 3}, mesh)
    assert placed["n"].sharding.spec == P()
    with pytest.raises(ValueError, match="data\\*fsdp = 4"):
        sharding.shard_batch({"x": jnp.ones((6, 3))}, mesh)
