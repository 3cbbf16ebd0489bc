"""Hugging Face checkpoint I/O: our save loads in transformers with the same logits,
our load of our save is bit-identical, sharded indexes, dtypes, and clear errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file
from tolerances import assert_bits_equal, assert_f32_close, depth_ops

from jaxrl_geom.models import Decoder, ModelConfig, load_pretrained, save_pretrained

VOCAB = 80


def hf_config(model_type: str, **overrides) -> transformers.PretrainedConfig:
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        eos_token_id=2,
    )
    kw.update(overrides)
    return transformers.AutoConfig.for_model(model_type, **kw)


def random_decoder(config: ModelConfig, seed: int = 0) -> Decoder:
    """A Decoder whose every parameter (norms and biases too) is far from its init."""
    model = Decoder(config, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        z = rng.standard_normal(var.shape).astype(np.float32)
        kind = path[-1]
        value = {"scale": 1 + 0.5 * z, "bias": 0.5 * z, "embedding": z}.get(
            kind, z / np.sqrt(var.shape[0])
        )
        flat.append((path, var.replace(jnp.asarray(value, var.dtype))))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def left_padded(lengths=(6, 3, 1), seed=0):
    rng = np.random.default_rng(seed)
    t = max(lengths)
    mask = np.arange(t)[None, :] >= t - np.asarray(lengths)[:, None]
    tokens = np.where(mask, rng.integers(0, VOCAB, mask.shape), 0).astype(np.int32)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return tokens, positions, mask


def hf_logits(hf, tokens, positions, mask) -> np.ndarray:
    with torch.no_grad():
        return (
            hf(
                input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(positions, dtype=torch.long),
            )
            .logits.float()
            .numpy()
        )


def params_of(model: Decoder) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


ROUND_TRIP = {
    "llama-llama3-untied": (
        "llama",
        dict(
            num_key_value_heads=1,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3-bias-untied": ("qwen3", dict(attention_bias=True, head_dim=16)),
}


@pytest.mark.parametrize("case", list(ROUND_TRIP))
def test_save_loads_in_transformers_and_round_trips(tmp_path, case):
    model_type, overrides = ROUND_TRIP[case]
    config = ModelConfig.from_hf(hf_config(model_type, **overrides))
    model = random_decoder(config)
    save_pretrained(model, tmp_path)

    stored = load_file(str(tmp_path / "model.safetensors"))
    assert ("lm_head.weight" in stored) == (not config.tie_word_embeddings)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, dtype=torch.float32
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert (
        type(hf).__name__ == json.loads((tmp_path / "config.json").read_text())["architectures"][0]
    )
    tokens, positions, mask = left_padded()
    graphdef, state = nnx.split(model)
    ours = jax.jit(lambda s: nnx.merge(graphdef, s)(tokens, positions, mask)[0])(state)
    ref = hf_logits(hf.eval(), tokens, positions, mask)
    ops = depth_ops(config.num_hidden_layers)
    assert_f32_close(np.asarray(ours)[mask], ref[mask], scale=np.abs(ref[mask]).max(), ops=ops)

    again = load_pretrained(tmp_path)
    assert again.config == config
    before, after = params_of(model), params_of(again)
    assert before.keys() == after.keys()
    for path in before:
        assert_bits_equal(after[path], before[path], err_msg=str(path))


def test_sharded_index_checkpoint_equals_single_file(tmp_path):
    hf = transformers.AutoModelForCausalLM.from_config(hf_config("qwen3")).eval()
    hf.save_pretrained(tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    single, sharded = (
        params_of(load_pretrained(tmp_path / "single")),
        params_of(load_pretrained(tmp_path / "sharded")),
    )
    for path in single:
        assert_bits_equal(sharded[path], single[path], err_msg=str(path))
    # and the values are HF's, transposed into [in, out] kernels
    assert_bits_equal(
        single[("layers", 1, "self_attn", "k_proj", "kernel")],
        hf.model.layers[1].self_attn.k_proj.weight.detach().numpy().T,
    )


def test_dtypes(tmp_path):
    config = ModelConfig.from_hf(hf_config("llama"))
    save_pretrained(random_decoder(config), tmp_path / "f32")

    compute_bf16 = load_pretrained(tmp_path / "f32", dtype=jnp.bfloat16)
    assert compute_bf16.config.dtype == "bfloat16"
    assert compute_bf16.layers[0].self_attn.q_proj.kernel.dtype == jnp.float32

    stored_bf16 = load_pretrained(tmp_path / "f32", dtype="bfloat16", param_dtype="bfloat16")
    assert stored_bf16.layers[0].self_attn.q_proj.kernel.dtype == jnp.bfloat16
    save_pretrained(stored_bf16, tmp_path / "bf16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert hf.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    reloaded = load_pretrained(tmp_path / "bf16", param_dtype="bfloat16")
    np.testing.assert_array_equal(
        np.asarray(reloaded.embed_tokens.embedding.get_value()).view(np.uint16),
        np.asarray(stored_bf16.embed_tokens.embedding.get_value()).view(np.uint16),
    )


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    hf = transformers.AutoModelForCausalLM.from_config(hf_config("llama")).eval()

    pickle_dir = tmp_path / "pickle"  # what older transformers wrote by default
    hf.config.save_pretrained(pickle_dir)
    torch.save(hf.state_dict(), pickle_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only safetensors"):
        load_pretrained(pickle_dir)

    gpt2 = tmp_path / "gpt2"
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(gpt2)
    with pytest.raises(ValueError, match=r"supported model types: \('llama', 'qwen2', 'qwen3'\)"):
        load_pretrained(gpt2)

    with pytest.raises(ValueError, match="no config.json"):
        load_pretrained(tmp_path / "nowhere")

    good = tmp_path / "good"
    hf.save_pretrained(good)
    tensors = load_file(str(good / "model.safetensors"))

    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_file(missing, str(good / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        load_pretrained(good)

    extra = {**tensors, "model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}
    save_file(extra, str(good / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.0.self_attn.q_proj.bias'\]"):
        load_pretrained(good)

    wrong = {**tensors, "model.norm.weight": np.ones(16, np.float32)}
    save_file(wrong, str(good / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.norm.weight: checkpoint shape"):
        load_pretrained(good)

    with pytest.raises(ValueError, match="Decoder"):
        save_pretrained(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), tmp_path / "x")


def test_loading_places_params_on_a_mesh(tmp_path):
    from jaxrl_geom.sharding import make_mesh

    save_pretrained(random_decoder(ModelConfig.from_hf(hf_config("qwen2"))), tmp_path)
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    model = load_pretrained(tmp_path, mesh=mesh)
    kernel = model.layers[0].mlp.gate_proj.kernel.get_value()  # [D, F] = [embed, mlp]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (32 // 4, 64 // 2)
    assert_bits_equal(
        kernel, params_of(load_pretrained(tmp_path))[("layers", 0, "mlp", "gate_proj", "kernel")]
    )


@pytest.mark.parametrize("scan_layers", [False, True])
def test_mesh_loading_reads_only_shard_regions(tmp_path, monkeypatch, scan_layers):
    """With a mesh, every read is one device shard's region of a tensor (safetensors
    slices), never the whole tensor of a sharded parameter: a process reads only what it
    holds, so a model larger than one host's memory loads."""
    from jaxrl_geom.models import hf_io
    from jaxrl_geom.sharding import make_mesh

    save_pretrained(random_decoder(ModelConfig.from_hf(hf_config("qwen2"))), tmp_path)
    reads: dict[str, list[tuple[int, ...]]] = {}
    real = hf_io._read_slice

    def spy(handles, file, name, transpose, index, dtype):
        part = real(handles, file, name, transpose, index, dtype)
        reads.setdefault(name, []).append(part.shape)
        return part

    monkeypatch.setattr(hf_io, "_read_slice", spy)
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    model = load_pretrained(tmp_path, mesh=mesh, scan_layers=scan_layers)
    name = "model.layers.0.mlp.gate_proj.weight"  # ours [D, F] = [32, 64] over (fsdp, tensor)
    assert set(reads[name]) == {(32 // 4, 64 // 2)}
    assert len(reads[name]) == 8  # one region per device
    want = params_of(load_pretrained(tmp_path))
    got = params_of(model)
    if scan_layers:
        got = {("layers", 0, *k[1:]): v[0] for k, v in got.items() if k[0] == "layers"}
        want = {k: v for k, v in want.items() if k[:2] == ("layers", 0)}
    for key, value in want.items():
        assert_bits_equal(got[key], value)
