"""Compiler memory of ``grpo_step`` at long context vs the memory model of docs/MEMORY.md.

Ahead-of-time compile only: the model, optimizer state and batch are abstract
(``nnx.eval_shape`` / ``jax.eval_shape``), nothing is allocated. For each variant
and each ``T`` it prints XLA's ``memory_analysis()`` (``temp``: scratch, where
activations, gradients and transients live; ``args``: params + AdamW state + batch),
the first-call compile time, and :func:`predict`'s figures for the same shapes.

Variants: ``plain`` GRPO; ``longact`` (q/k capture + ``longact()`` link);
``salt`` (``salt_estimator(SaltConfig())``, scanned layers, the LM head in chunks);
``unrolled`` (plain with ``scan_layers=False``: the compile-time comparison);
``micro2``, ``micro4`` (plain with ``GrpoConfig(num_micro_batches=2 / 4)``: the same
update, N split into micro-batches whose gradients are accumulated).

Sizes: ``0.6b`` is the Qwen3-0.6B shape (28 layers, D 1024, F 3072, 16 q / 8 kv heads
of 128, vocab 151,936, tied) in bf16 compute with fp32 params + AdamW and
``remat=True``; ``small`` is a 4-layer, D 256, vocab 8k model that compiles in
seconds on a laptop CPU.

Usage::

    python benchmarks/bench_memory.py --size small --T 1024,2048,4096
    python benchmarks/bench_memory.py --size 0.6b --T 2048,8192,16384,32768 \\
        --variants plain,longact,micro2,micro4,unrolled

The CPU compiler's figures differ from a GPU's where it up-casts bf16 work to f32
(its dots and reductions run in f32, and it keeps an f32 copy of the scan's saved
layer inputs): the ``model`` column predicts the CPU figure, ``gpu pred`` is the
memory model's prediction for a GPU (not a measurement); docs/MEMORY.md explains both.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxrl_geom.longact import longact
from jaxrl_geom.models import Decoder, ModelConfig
from jaxrl_geom.rl import GrpoConfig, TrainState, abstract_rollout_batch, grpo_step

GIB = 2.0**30

SIZES = {
    "0.6b": ModelConfig(
        model_type="qwen3",
        vocab_size=151_936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        qk_norm=True,
        tie_word_embeddings=True,
        max_position_embeddings=40_960,
        dtype="bfloat16",
        remat=True,
    ),
    "small": ModelConfig(
        model_type="qwen3",
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        qk_norm=True,
        tie_word_embeddings=True,
        max_position_embeddings=40_960,
        dtype="bfloat16",
        remat=True,
        scan_layers=True,
    ),
}


# --------------------------------------------------------------------------- memory model


def param_count(c: ModelConfig) -> int:
    d, f, hd = c.hidden_size, c.intermediate_size, c.head_dim
    qo = 2 * d * c.num_attention_heads * hd
    kv = 2 * d * c.num_key_value_heads * hd
    bias = (c.num_attention_heads + 2 * c.num_key_value_heads) * hd if c.attention_bias else 0
    per_layer = qo + kv + 3 * d * f + 2 * d + (2 * hd if c.qk_norm else 0) + bias
    head = 0 if c.tie_word_embeddings else c.vocab_size * d
    return c.vocab_size * d + head + c.num_hidden_layers * per_layer + d


def predict(
    c: ModelConfig,
    n: int,
    t: int,
    completion: int,
    longact_on: bool = False,
    work_bytes: int | None = None,
    micro_batches: int = 1,
) -> dict:
    """Bytes by term (docs/MEMORY.md): n rows, forward over t - 1 tokens, L completion.

    ``work_bytes``: bytes per element of a layer's transient tensors; the compute
    dtype's on a GPU, 4 on the CPU backend (it runs bf16 dots and reductions in f32).
    ``micro_batches``: ``GrpoConfig.num_micro_batches``; activations scale with the
    n / micro_batches rows of one micro-batch, plus an fp32 gradient accumulator.
    """
    b = jnp.dtype(c.dtype).itemsize  # compute bytes (saved activations)
    w = b if work_bytes is None else work_bytes
    d, f, v, nl = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    h, k, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    n = n // micro_batches
    tokens = n * (t - 1)
    p = param_count(c)
    out = {"params": 4 * p, "adam": 8 * p, "grads": (4 if micro_batches == 1 else 8) * p}
    if c.remat and c.remat_policy == "nothing_saveable":
        per_layer_saved = d * b  # the layer input
    elif c.remat:  # save_dots: the matmul outputs too
        per_layer_saved = (d + (h + 2 * k) * hd + h * hd + d + 2 * f + d) * b
    else:  # everything the backward reads (approximate)
        per_layer_saved = (6 * d + 3 * (h + 2 * k) * hd + 4 * f) * b + 2 * h * 4
    out["saved_activations"] = nl * tokens * per_layer_saved
    if w > b and c.remat and c.scanned:
        # CPU only: float-normalization-bf16 turns the backward scan's bf16 dynamic-slice
        # of the saved inputs into one of an f32 convert of the whole stack, which
        # while-loop-invariant-code-motion then hoists out of the loop: an f32 copy.
        out["saved_activations"] += nl * tokens * d * w
    # One layer's backward working set (recomputed forward + cotangents): the f32
    # residual-stream copies of the norms, q/k/v/o, the blockwise attention residuals
    # (out + m, l), and the SwiGLU tensors: whole rows, or one chunk of
    # ``mlp_chunk_tokens`` positions per row (gate, up, product and two cotangents).
    qkv = (h + 2 * k) * hd
    layer = tokens * ((4 * d + 2 * qkv + h * hd) * w + 2 * d * 4 + 2 * h * 4)
    mlp_rows = t - 1 if c.mlp_chunk_tokens is None else min(c.mlp_chunk_tokens, t - 1)
    mlp = (3 if mlp_rows == t - 1 else 5) * n * mlp_rows * f * w
    blk = min(c.attention_block_size, t)
    attn_block = 4 * n * h * blk * blk * 4  # scores, probs, dP, dS of one block pair
    out["layer_transient"] = layer + mlp + attn_block
    chunk = min(c.logits_chunk_tokens, n * completion)
    out["logits_chunk"] = 3 * chunk * v * 4  # z, exp(z - lse), dz of one chunk in f32
    out["hidden_and_cotangent"] = 2 * tokens * d * 4
    if longact_on:  # [L, C] statistics and masks: negligible next to the rest
        out["longact"] = nl * 8 * (h + k) * hd * 4
    # Peak: gradients and saved activations live throughout the backward; the head's
    # chunk and one layer's working set are live at different times. After the
    # backward, the AdamW update holds the gradients and a new mu, nu and update per
    # parameter (fp32) before they land in the donated buffers: the peak at short T.
    backward = (
        out["grads"]
        + out["saved_activations"]
        + out["hidden_and_cotangent"]
        + max(out["layer_transient"], out["logits_chunk"])
        + out.get("longact", 0)
    )
    out["optimizer_update"] = 4 * 4 * p
    out["temp"] = max(backward, out["optimizer_update"])
    out["args"] = out["params"] + out["adam"]
    return out


# --------------------------------------------------------------------------- compile


def compile_step(config: ModelConfig, variant: str, n: int, t: int, completion: int) -> dict:
    """AOT-compile grpo_step on abstract state and batch; memory and compile time."""
    links = [optax.adamw(1e-6)]
    grpo = GrpoConfig()
    salt = None
    if variant == "longact":
        links.append(longact(keep_ratio=0.3))
        grpo = GrpoConfig(capture_activations=True)
    if variant == "salt":
        from jaxrl_geom.salt import SaltConfig, salt_estimator

        salt = salt_estimator(SaltConfig())
    if variant.startswith("micro"):  # micro<m>: plain with num_micro_batches=m
        grpo = GrpoConfig(num_micro_batches=int(variant[5:]))
    if variant == "unrolled":
        config = dataclasses.replace(config, scan_layers=False)
    tx = optax.chain(*links) if len(links) > 1 else links[0]
    state = jax.eval_shape(lambda: TrainState.create(Decoder(config, rngs=nnx.Rngs(0)), tx))
    batch = abstract_rollout_batch(n, t, completion)
    start, cpu_start = time.perf_counter(), time.process_time()
    lowered = grpo_step.lower(state, batch, grpo, salt)
    compiled = lowered.compile()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    mem = compiled.memory_analysis()
    return {
        "temp": mem.temp_size_in_bytes,
        "args": mem.argument_size_in_bytes,
        "out": mem.output_size_in_bytes,
        "alias": mem.alias_size_in_bytes,
        "compile_s": seconds,
        "compile_cpu_s": cpu_seconds,  # all threads of this process: robust to machine load
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--T", default="1024,2048,4096", help="comma-separated sequence lengths")
    parser.add_argument("--N", type=int, default=8, help="rollouts per step")
    parser.add_argument("--completion-frac", type=float, default=0.5, help="L / T")
    parser.add_argument("--variants", default="plain,longact,salt,unrolled")
    args = parser.parse_args()
    config = SIZES[args.size]
    print(
        f"# {args.size}: {param_count(config) / 1e6:.0f}M params, N={args.N}, "
        f"L={args.completion_frac:g} T, bf16 compute, remat {config.remat_policy}, "
        f"attention {config.attention_impl} (block {config.attention_block_size}), "
        f"logits chunk {config.logits_chunk_tokens} tokens, MLP chunk {config.mlp_chunk_tokens}; "
        f"backend {jax.default_backend()}"
    )
    cpu = jax.default_backend() == "cpu"
    print(
        f"{'variant':9s} {'T':>6s} {'temp GiB':>9s} {'model':>6s} {'ratio':>6s} "
        f"{'gpu pred':>9s} {'args GiB':>9s} {'model':>6s} {'compile s':>9s} {'cpu s':>6s}"
    )
    for variant in args.variants.split(","):
        for t in (int(x) for x in args.T.split(",")):
            completion = max(1, int(t * args.completion_frac))
            got = compile_step(config, variant, args.N, t, completion)
            la, m = variant == "longact", int(variant[5:]) if variant.startswith("micro") else 1
            want = predict(config, args.N, t, completion, la, 4 if cpu else None, m)
            gpu = predict(config, args.N, t, completion, la, micro_batches=m)
            print(
                f"{variant:9s} {t:6d} {got['temp'] / GIB:9.2f} {want['temp'] / GIB:6.2f} "
                f"{got['temp'] / want['temp']:6.2f} {gpu['temp'] / GIB:9.2f} "
                f"{got['args'] / GIB:9.2f} {want['args'] / GIB:6.2f} {got['compile_s']:9.1f} "
                f"{got['compile_cpu_s']:6.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
