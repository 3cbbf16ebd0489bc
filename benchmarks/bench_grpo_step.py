"""GRPO train-step time: ``jaxrl_geom.rl.grpo_step`` vs the same update in PyTorch.

Builds a tiny random Llama checkpoint locally with transformers (nothing is
downloaded), loads it in both frameworks (``jaxrl_geom.models.load_pretrained``), and
times one full update on the same rollout batch:

* model: hidden 256, 4 layers, 8 heads (4 KV heads, head dim 32), MLP 768, vocab 1024,
  untied embeddings, fp32 (~3.7M parameters);
* batch: 16 rollouts x 96 tokens = 32 left-padded prompt columns (8-32 real tokens)
  + 64 completion columns (16-64 real tokens), 4 groups of 4;
* loss: the token-level clipped surrogate of SPEC section 1, ``loss_type="grpo"``
  (``-(1/N) sum_i (1/|o_i|) sum_t min(r A, clip(r, 0.8, 1.2) A)``), old log-probs =
  current ones + noise so that some tokens are clipped, no KL;
* optimizer: AdamW (lr 1e-5, betas 0.9/0.999, eps 1e-8, weight decay 0.01) on both;
* a step is forward + backward + AdamW update; ours is the jitted ``grpo_step`` with
  donation; torch runs ``LlamaForCausalLM`` (default attention implementation) with
  2 threads, the same loss written in torch, ``loss.backward()`` and
  ``torch.optim.AdamW.step()``;
* 2 warm-up steps (the first JAX one compiles; its time is printed), then the median
  (and IQR) of ``--runs`` timed steps each, alternating between the two frameworks,
  each step ending in ``block_until_ready`` (JAX; torch on CPU is synchronous).

The first step of each framework starts from identical weights on identical inputs:
the script prints the absolute difference of the two losses (and of the gradient
norms) as a parity check.

Run::

    python benchmarks/bench_grpo_step.py [--runs 10]
    python benchmarks/bench_grpo_step.py --torch-threads 1     # busy machine
    taskset -c 0 python benchmarks/bench_grpo_step.py --torch-threads 1  # one core each

On a shared machine (1-min load above the core count) torch's 2 OpenMP threads
collapse (steps 3-10x slower, huge IQR) while XLA's pool degrades gracefully, so read
the 2-thread ratio together with the 1-thread and pinned runs; the CPU time column
shows how much work each framework does per step.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from jaxrl_geom.models import load_pretrained
from jaxrl_geom.rl import (
    GrpoConfig,
    TrainState,
    grpo_step,
    make_rollout_batch,
    policy_logprobs,
)

CONFIG = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
ADAMW = dict(lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
EPS_CLIP = 0.2


def rollout_arrays(batch: int, prompt_len: int, completion_len: int, group: int, seed: int = 0):
    """Left-padded prompts and right-padded completions of random lengths (NumPy)."""
    rng = np.random.default_rng(seed)
    vocab = CONFIG["vocab_size"]
    prompt_lengths = rng.integers(prompt_len // 4, prompt_len + 1, batch // group).repeat(group)
    completion_lengths = rng.integers(completion_len // 4, completion_len + 1, batch)
    completion_lengths[0] = completion_len  # one row uses the whole buffer
    prompt_mask = np.arange(prompt_len)[None] >= (prompt_len - prompt_lengths)[:, None]
    completion_mask = np.arange(completion_len)[None] < completion_lengths[:, None]
    prompts = rng.integers(3, vocab, (batch // group, prompt_len)).repeat(group, 0)
    tokens = np.concatenate([prompts, rng.integers(3, vocab, (batch, completion_len))], 1)
    tokens[:, :prompt_len][~prompt_mask] = 0
    tokens[:, prompt_len:][~completion_mask] = 0
    rewards = rng.random(batch).reshape(-1, group)
    advantages = (rewards - rewards.mean(1, keepdims=True)) / (
        rewards.std(1, ddof=1, keepdims=True) + 1e-4
    )
    group_ids = np.repeat(np.arange(batch // group), group).astype(np.int32)
    return tokens.astype(np.int32), prompt_mask, completion_mask, advantages.reshape(-1), group_ids


def torch_grpo_loss(model, tokens, positions, attention_mask, completion_mask, old, adv):
    """The same loss in torch: logits at P-1 .. P+L-2 predict the completion tokens."""
    l_comp = completion_mask.shape[1]
    logits = (
        model(
            input_ids=tokens[:, :-1],
            attention_mask=attention_mask[:, :-1],
            position_ids=positions[:, :-1],
        )
        .logits[:, -l_comp:]
        .float()
    )  # [N, L, V]
    targets = tokens[:, -l_comp:]
    logp = logits.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(logits, -1)  # [N, L]
    mask = completion_mask.float()
    ratio = torch.exp(torch.where(completion_mask, logp - old, 0.0))
    a = adv[:, None]
    psi = torch.minimum(ratio * a, torch.clamp(ratio, 1 - EPS_CLIP, 1 + EPS_CLIP) * a)
    per_seq = (psi * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return -per_seq.mean()


def timed_interleaved(fns: dict, warmup: int, runs: int) -> tuple[dict, dict]:
    """Warm up, then time the functions in alternation (load drifts hit both alike). A
    short pause before each call lets the other framework's worker threads go idle.
    Returns wall and process-CPU seconds per call."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            time.sleep(0.2)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def summary(name: str, wall: list[float], cpu: list[float], flops: float) -> float:
    q1, med, q3 = np.percentile(wall, [25, 50, 75])
    print(
        f"{name:>13}: median {med * 1e3:8.1f} ms  (IQR {q1 * 1e3:.1f}-{q3 * 1e3:.1f} ms)  "
        f"{flops / med / 1e9:6.1f} GF/s   CPU time {np.median(cpu) * 1e3:8.1f} ms"
    )
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--completion-len", type=int, default=64)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--torch-threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as path:
        LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(path)
        hf_model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).train()
        model = load_pretrained(path)
    n_params = sum(p.numel() for p in hf_model.parameters())

    tokens, prompt_mask, completion_mask, advantages, group_ids = rollout_arrays(
        args.batch, args.prompt_len, args.completion_len, args.group
    )
    batch = make_rollout_batch(
        tokens,
        prompt_mask,
        completion_mask,
        np.zeros(completion_mask.shape, np.float32),
        advantages.astype(np.float32),
        group_ids,
    )
    tx = optax.adamw(
        learning_rate=ADAMW["lr"],
        b1=ADAMW["betas"][0],
        b2=ADAMW["betas"][1],
        eps=ADAMW["eps"],
        weight_decay=ADAMW["weight_decay"],
    )
    state = TrainState.create(model, tx)
    current = np.asarray(policy_logprobs(state.graphdef, state.params, state.rest, batch))
    noise = np.random.default_rng(1).normal(0.0, 0.2, current.shape)
    old = np.where(completion_mask, current + noise, 0.0).astype(np.float32)
    batch = batch._replace(old_logprobs=jnp.asarray(old))
    config = GrpoConfig(loss_type="grpo", eps_low=EPS_CLIP)

    t_tokens = torch.from_numpy(np.asarray(batch.tokens).astype(np.int64))
    t_positions = torch.from_numpy(np.asarray(batch.positions).astype(np.int64))
    t_attention = torch.from_numpy(np.asarray(batch.attention_mask).astype(np.int64))
    t_completion = torch.from_numpy(completion_mask)
    t_old = torch.from_numpy(old)
    t_adv = torch.from_numpy(advantages.astype(np.float32))
    optimizer = torch.optim.AdamW(hf_model.parameters(), **ADAMW)

    def run_torch() -> tuple[float, float]:
        optimizer.zero_grad(set_to_none=True)
        loss = torch_grpo_loss(
            hf_model, t_tokens, t_positions, t_attention, t_completion, t_old, t_adv
        )
        loss.backward()
        grad_norm = torch.sqrt(sum(torch.sum(p.grad**2) for p in hf_model.parameters()))
        optimizer.step()
        return loss.item(), grad_norm.item()

    holder = {"state": state}

    def run_ours() -> tuple[float, float]:
        holder["state"], metrics = grpo_step(holder["state"], batch, config)
        jax.block_until_ready((holder["state"], metrics))
        return float(metrics["loss"]), float(metrics["grad_norm"])

    tokens_per_step = int(np.asarray(batch.attention_mask[:, :-1]).size)
    matmul_params = n_params - CONFIG["vocab_size"] * CONFIG["hidden_size"]  # the lookup is free
    seq = tokens.shape[1] - 1
    head_dim = CONFIG["hidden_size"] // CONFIG["num_attention_heads"]
    attn_dim = CONFIG["num_attention_heads"] * head_dim
    # PERF.md section 5: training FLOPs per token = 6 N + 12 L S d_attn.
    flops = tokens_per_step * (
        6 * matmul_params + 12 * CONFIG["num_hidden_layers"] * seq * attn_dim
    )
    print(
        f"tiny Llama: {n_params / 1e6:.2f}M params, hidden {CONFIG['hidden_size']}, "
        f"{CONFIG['num_hidden_layers']} layers, {CONFIG['num_attention_heads']} heads / "
        f"{CONFIG['num_key_value_heads']} kv heads, vocab {CONFIG['vocab_size']}; batch "
        f"{args.batch} x {tokens.shape[1]} tokens ({args.prompt_len} prompt + "
        f"{args.completion_len} completion, {int(completion_mask.sum())} real completion "
        f"tokens); grpo loss, clip {EPS_CLIP}, AdamW; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads, attention {hf_model.config._attn_implementation}); ~{flops / 1e9:.1f} GFLOP/step"
    )
    start = time.perf_counter()
    ours_loss, ours_norm = run_ours()
    print(f"first step of ours (trace + compile + run): {time.perf_counter() - start:.2f} s")
    torch_loss, torch_norm = run_torch()
    print(
        f"first-step parity: loss ours {ours_loss:.8f} torch {torch_loss:.8f} |diff| "
        f"{abs(ours_loss - torch_loss):.2e}; grad norm ours {ours_norm:.6f} torch "
        f"{torch_norm:.6f} |diff| {abs(ours_norm - torch_norm):.2e}"
    )

    wall, cpu = timed_interleaved({"ours": run_ours, "torch": run_torch}, 1, args.runs)
    ours = summary("jaxrl_geom", wall["ours"], cpu["ours"], flops)
    theirs = summary("torch", wall["torch"], cpu["torch"], flops)
    print(f"ratio torch / ours (speed-up of ours): {theirs / ours:.2f}x")
    load = os.getloadavg()[0]
    print(f"1-min load average {load:.1f} on {os.cpu_count()} cores", end="")
    busy = load > os.cpu_count() - 0.5 and torch.get_num_threads() > 1
    print(" (busy machine: rerun with --torch-threads 1, see the docstring)" if busy else "")


if __name__ == "__main__":
    main()
