"""The chunked LM head (log-probs, entropy) equals the whole-logits computation, alone
and inside ``grpo_step`` / ``policy_logprobs`` (every loss type, KL, GSPO, temperature);
the MLP run over token chunks (``ModelConfig.mlp_chunk_tokens``) equals whole rows
(scanned, unrolled, sharded); the step's compiled temp memory is linear in ``T``.

References: :func:`token_logprobs` / :func:`token_entropy` on whole ``[N, L, V]``
logits (themselves checked against a float64 oracle in test_losses.py), and a
``jax.grad`` of ``losses.policy_loss`` on those whole logits.
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
from tolerances import assert_f32_close, depth_ops

from jaxrl_geom.models import Decoder, ModelConfig
from jaxrl_geom.rl import abstract_rollout_batch, losses
from jaxrl_geom.rl import logprobs as lp
from jaxrl_geom.rl.step import (
    GrpoConfig,
    RolloutBatch,
    TrainState,
    completion_logits,
    grpo_step,
    policy_logprobs,
)
from jaxrl_geom.sharding import make_mesh, shard_batch, shard_model

TOL = 1e-6  # relative to the largest magnitude: same float32 ops, reordered sums only


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("chunk_tokens", [1, 9, 10_000])  # c = 1, c = 3 (padded), whole
def test_chunked_logprobs_equal_whole_logits_values_and_grads(chunk_tokens):
    n, length, d, v, tau = 3, 7, 16, 50, 0.7
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(n, length, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (n, length)), jnp.int32)
    coef = jnp.asarray(rng.normal(size=(n, length)), jnp.float32)

    def head(w, h):
        return jnp.einsum("ntd,dv->ntv", h, w)

    def chunked(w, h):
        logp, ent = lp.chunked_logprobs(
            lambda x: head(w, x), h, targets, tau, chunk_tokens=chunk_tokens
        )
        return jnp.sum(coef * logp), (logp, ent)

    def whole(w, h):
        logits = head(w, h)
        logp = lp.token_logprobs(logits, targets, tau)
        return jnp.sum(coef * logp), (logp, lp.token_entropy(jax.lax.stop_gradient(logits), tau))

    grad = jax.value_and_grad
    (_, (lp_c, ent_c)), g_c = jax.jit(grad(chunked, argnums=(0, 1), has_aux=True))(w, hidden)
    (_, (lp_w, ent_w)), g_w = jax.jit(grad(whole, argnums=(0, 1), has_aux=True))(w, hidden)
    assert rel_err(lp_c, lp_w) < TOL and rel_err(ent_c, ent_w) < TOL
    for a, b in zip(g_c, g_w, strict=True):
        assert rel_err(a, b) < TOL
    # The entropy is a metric: it must not feed the gradient.
    g_ent = jax.grad(lambda h: jnp.sum(chunked(w, h)[1][1]))(hidden)
    assert not np.any(np.asarray(g_ent))


def test_chunked_logprobs_bad_inputs():
    h, y = jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match="hidden"):
        lp.chunked_logprobs(lambda x: x, h, y)
    with pytest.raises(ValueError, match="chunk_tokens"):
        lp.chunked_logprobs(lambda x: x, h, y[:, :3], chunk_tokens=0)


# --------------------------------------------------------------------------- in the step

N, P, L = 4, 5, 6
# The loss type only weighs the log-probs after the (chunked) head: two configurations
# cover token/sequence ratios, KL and temperature; every loss type is checked against a
# float64 oracle in test_grpo_step.py (through the same chunked head).
CONFIGS = {
    "grpo_kl": GrpoConfig(loss_type="grpo", beta=0.05),
    "dr_grpo_gspo_tau": GrpoConfig(
        loss_type="dr_grpo",
        max_completion_length=8,
        eps_high=0.28,
        importance_sampling_level="sequence",
        temperature=0.7,
    ),
}


def keep_gradient() -> optax.GradientTransformationExtraArgs:
    """A no-op update whose state is the last gradient (read the step's grads exactly)."""

    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(updates, state, params=None, **extra):
        del state, params, extra
        return jax.tree.map(jnp.zeros_like, updates), updates

    return optax.GradientTransformationExtraArgs(init, update)


KEEP = keep_gradient()


def make_batch(seed: int = 0) -> RolloutBatch:
    rng = np.random.default_rng(seed)
    prompt_len = np.array([5, 3, 1, 4])
    comp_len = np.array([6, 2, 4, 1])
    p_mask = np.arange(P)[None] >= P - prompt_len[:, None]
    c_mask = np.arange(L)[None] < comp_len[:, None]
    mask = np.concatenate([p_mask, c_mask], 1)
    tokens = np.where(mask, rng.integers(0, 64, mask.shape), 0).astype(np.int32)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    return RolloutBatch(
        tokens=jnp.asarray(tokens),
        positions=jnp.asarray(positions),
        attention_mask=jnp.asarray(mask),
        completion_mask=jnp.asarray(c_mask),
        old_logprobs=jnp.asarray(-3.0 - rng.random((N, L)), jnp.float32),
        ref_logprobs=jnp.asarray(-3.0 - rng.random((N, L)), jnp.float32),
        advantages=jnp.asarray([1.0, -0.5, 0.3, -0.8], jnp.float32),
        group_ids=jnp.asarray([0, 0, 1, 1], jnp.int32),
    )


def whole_logits_reference(model: Decoder, batch: RolloutBatch, config: GrpoConfig):
    """(loss, grads, entropy mean) from whole [N, L, V] logits and ``losses.policy_loss``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    num_tokens = jnp.sum(batch.completion_mask.astype(jnp.float32))

    def loss_fn(params):
        logits = completion_logits(nnx.merge(graphdef, params, rest), batch)  # [N, L, V]
        targets = batch.tokens[:, -L:]
        logp = lp.token_logprobs(logits, targets, config.temperature)
        terms = losses.policy_loss(
            logp,
            batch.old_logprobs,
            batch.advantages,
            batch.completion_mask,
            loss_type=config.loss_type,
            eps_low=config.eps_low,
            eps_high=config.eps_high,
            beta=config.beta,
            ref_logprobs=batch.ref_logprobs if config.beta > 0 else None,
            importance_sampling_level=config.importance_sampling_level,
            max_completion_length=config.max_completion_length,
            num_sequences=jnp.float32(N),
            num_tokens=num_tokens,
        )
        ent = lp.token_entropy(logits, config.temperature)
        return terms.numerator / terms.denominator, jnp.sum(ent * batch.completion_mask)

    (loss, ent_sum), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return loss, grads, ent_sum / num_tokens


@pytest.mark.parametrize("name", list(CONFIGS))
def test_grpo_step_with_chunked_head_equals_whole_logits(name):
    """Chunks of one position (c = N // N = 1, six chunks) in grpo_step and
    policy_logprobs give the loss, entropy, update and log-probs of whole logits."""
    config = CONFIGS[name]
    model_config = dataclasses.replace(
        ModelConfig.tiny(64, hidden_size=32, num_hidden_layers=2), logits_chunk_tokens=N
    )
    model = Decoder(model_config, rngs=nnx.Rngs(3))
    batch = make_batch()
    loss, grads, entropy = whole_logits_reference(model, batch, config)

    state = TrainState.create(model, KEEP)
    ref_lp = policy_logprobs(state.graphdef, state.params, state.rest, batch, config.temperature)
    whole_lp = lp.token_logprobs(
        completion_logits(model, batch), batch.tokens[:, -L:], config.temperature
    )
    assert rel_err(ref_lp, whole_lp) < TOL

    new_state, metrics = grpo_step(state, batch, config)
    assert rel_err(metrics["loss"], loss) < TOL
    assert rel_err(metrics["entropy"], entropy) < TOL
    step_grads = jax.tree.leaves(new_state.opt_state)
    assert len(step_grads) == len(jax.tree.leaves(grads))
    for a, b in zip(step_grads, jax.tree.leaves(grads), strict=True):
        assert rel_err(a, b) < TOL


# --------------------------------------------------------------------------- sampler prefill


def test_chunked_prefill_generate_matches_transformers(tmp_path):
    """Prefill in chunks of 2 tokens with blockwise attention (blocks of 2) over a
    left-padded batch: greedy tokens equal transformers' generate, and the sampled
    log-probs equal teacher-forced ones under the unchunked xla model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jaxrl_geom.models import load_pretrained
    from jaxrl_geom.sampling import generate

    torch.manual_seed(0)
    hf_config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,  # peaked logits: greedy is not decided by rounding
        tie_word_embeddings=False,
    )
    hf = LlamaForCausalLM(hf_config).eval()
    hf.save_pretrained(tmp_path)
    chunked = load_pretrained(
        tmp_path, attention_impl="blockwise", attention_block_size=2, prefill_chunk_tokens=2
    )
    lengths = np.array([7, 3, 5, 1])
    mask = np.arange(7)[None] >= 7 - lengths[:, None]
    tokens = np.where(mask, np.random.default_rng(0).integers(3, 64, mask.shape), 0)
    tokens = tokens.astype(np.int32)
    new = 6
    out = generate(chunked, tokens, mask, None, max_new_tokens=new)
    with torch.inference_mode():
        want = hf.generate(
            torch.from_numpy(tokens.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=0,
            eos_token_id=None,
        )
    np.testing.assert_array_equal(out.tokens, want.numpy())

    full_mask = np.concatenate([mask, out.completion_mask], 1)
    positions = np.maximum(np.cumsum(full_mask, 1) - 1, 0).astype(np.int32)
    logits, _ = load_pretrained(tmp_path, attention_impl="xla")(out.tokens, positions, full_mask)
    logp = jax.nn.log_softmax(logits[:, 6:-1], axis=-1)
    ref = np.take_along_axis(np.asarray(logp), out.completion[..., None], -1)[..., 0]
    assert rel_err(out.logprobs, ref) < 1e-5


# --------------------------------------------------------------------------- memory in T


def step_temp_bytes(config: ModelConfig, t: int) -> int:
    """XLA temp bytes of grpo_step compiled on abstract state and batch (nothing allocated)."""
    n, completion = 2, t // 2
    state = jax.eval_shape(lambda: TrainState.create(Decoder(config), optax.adamw(1e-3)))

    batch = abstract_rollout_batch(n, t, completion)
    compiled = grpo_step.lower(state, batch, GrpoConfig(), None).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_step_temp_memory_is_linear_in_sequence_length():
    """Blockwise attention + chunked head + chunked MLP + remat: doubling T at most
    doubles the step's scratch memory (+10%), and the MLP chunks hold less than whole
    rows; the XLA attention on the same model grows faster (the [N, H, T, T] scores),
    which shows the measurement can tell the two apart."""
    base = dataclasses.replace(
        ModelConfig.tiny(256, hidden_size=64, num_hidden_layers=1),  # compile time ~ layers
        remat=True,
        attention_block_size=64,
        logits_chunk_tokens=128,
        max_position_embeddings=4096,
    )
    blockwise = dataclasses.replace(base, attention_impl="blockwise", mlp_chunk_tokens=256)
    temps = [step_temp_bytes(blockwise, t) for t in (512, 1024, 2048)]
    assert temps[1] / temps[0] <= 2.2 and temps[2] / temps[1] <= 2.2, temps
    # MLP over 256-token chunks: at least two f32 [N, T, F] arrays fewer than whole rows
    # (the CPU backend holds the SwiGLU tensors in f32; N = 2 rows of T - 1 positions).
    whole = step_temp_bytes(dataclasses.replace(blockwise, mlp_chunk_tokens=None), 2048)
    assert whole - temps[2] >= 2 * 2 * 2047 * base.intermediate_size * 4, (whole, temps[2])
    xla = dataclasses.replace(base, attention_impl="xla")
    quadratic = [step_temp_bytes(xla, t) for t in (1024, 2048)]
    assert quadratic[1] / quadratic[0] > 2.5, quadratic
    assert quadratic[1] > 2 * temps[2]


# --------------------------------------------------------------------------- MLP chunks

MLP_QWEN3 = ModelConfig(
    model_type="qwen3",
    vocab_size=48,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    qk_norm=True,
    mlp_chunk_tokens=None,
)


@functools.partial(jax.jit, static_argnames="graphdef")
def decoder_logits_and_grads(graphdef, params, rest, tokens, positions, mask):
    def loss(params):
        logits, _ = nnx.merge(graphdef, params, rest)(tokens, positions, mask)
        return jnp.sum(jnp.where(mask[..., None], logits, 0.0) ** 2) * 1e-3, logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return logits, grads


@pytest.mark.parametrize("layout", ["unrolled", "scanned+remat+sharded"])
def test_mlp_token_chunks_equal_whole_rows(layout):
    """Decoder logits and parameter gradients with the MLP over chunks of 5 positions
    (T = 13: two full chunks and a 3-token tail, left padding) equal the unchunked
    model's: per-token math, only the weight gradients' sums over tokens regroup."""
    scan, remat = layout != "unrolled", layout != "unrolled"
    whole = dataclasses.replace(MLP_QWEN3, scan_layers=scan, remat=remat)
    chunked = dataclasses.replace(whole, mlp_chunk_tokens=5)
    lengths = np.array([13, 9, 4, 1, 13, 7, 2, 11])
    t = int(lengths.max())
    mask = np.arange(t)[None, :] >= t - lengths[:, None]
    tokens = np.where(mask, np.random.default_rng(0).integers(0, 48, mask.shape), 0)
    args = (
        jnp.asarray(tokens, jnp.int32),
        jnp.asarray(np.maximum(np.cumsum(mask, 1) - 1, 0), jnp.int32),
        jnp.asarray(mask),
    )
    g, p, r = nnx.split(Decoder(whole, rngs=nnx.Rngs(0)), nnx.Param, ...)
    want_logits, want_grads = decoder_logits_and_grads(g, p, r, *args)
    model = Decoder(chunked, rngs=nnx.Rngs(0))  # the same parameters
    if layout.endswith("sharded"):  # rows over data x fsdp, F over tensor
        mesh = make_mesh(data=2, fsdp=2, tensor=2)
        shard_model(model, mesh)
        args = shard_batch(args, mesh)
    g, p, r = nnx.split(model, nnx.Param, ...)
    logits, grads = decoder_logits_and_grads(g, p, r, *args)
    ops = depth_ops(whole.num_hidden_layers)
    scale = float(np.abs(np.asarray(want_logits)[mask]).max())
    assert_f32_close(np.asarray(logits)[mask], np.asarray(want_logits)[mask], scale=scale, ops=ops)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        # weight gradients sum N T token terms: chunking regroups that sum
        b = np.asarray(b)
        assert_f32_close(a, b, scale=float(np.abs(b).max()), ops=ops + tokens.size)


def test_mlp_chunk_config_is_checked():
    with pytest.raises(ValueError, match="mlp_chunk_tokens"):
        dataclasses.replace(MLP_QWEN3, mlp_chunk_tokens=0)
