"""Sampler throughput: ``jaxrl_geom.sampling.generate`` vs Hugging Face ``generate``.

Builds a tiny random Llama checkpoint locally with transformers (nothing is
downloaded), loads it in both frameworks and decodes the same prompts with the
same settings:

* model: hidden 256, 4 layers, 8 heads (4 KV heads, head dim 32), MLP 768,
  vocab 1024, untied embeddings, fp32 (~3.4M parameters);
* batch 16, 32-token prompts, exactly 64 new tokens (no stop token: both run the
  full 64 steps), KV cache on both sides (``use_cache=True``);
* torch under ``torch.inference_mode()`` with 2 threads; JAX with its default CPU
  thread pool (2 cores here);
* 2 warm-up calls (the first JAX one compiles), then the median (and IQR) of
  ``--runs`` timed calls each, alternating between the two so that load drifts on
  a shared machine hit both alike (jax ``docs/benchmarking.md``).

Run::

    python benchmarks/bench_sampler.py            # greedy
    python benchmarks/bench_sampler.py --sample   # temperature 1, top-k 50, top-p 0.95

Prints tokens/s for both and the ratio (goal: ours >= 3x transformers).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM

from jaxrl_geom.models import load_pretrained
from jaxrl_geom.sampling import Greedy, Sample, generate

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
    initializer_range=0.1,  # sharper than 0.02 so greedy is not decided by rounding
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def timed_interleaved(
    fns: dict, warmup: int, runs: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Warm each function up, then time them in alternation so that drifts in machine
    load hit all of them alike. A short pause before each call lets the other
    framework's worker threads go idle (spinning pools would steal the 2 cores).
    Returns wall and process-CPU seconds per call."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            time.sleep(0.2)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return times, cpu


def summary(name: str, times: list[float], cpu: list[float], tokens: int) -> float:
    q1, med, q3 = np.percentile(times, [25, 50, 75])
    print(
        f"{name:>13}: median {med * 1e3:8.1f} ms  (IQR {q1 * 1e3:.1f}-{q3 * 1e3:.1f} ms)  "
        f"{tokens / med:9.0f} tokens/s   CPU time {np.median(cpu) * 1e3:8.1f} ms"
    )
    return tokens / med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy")
    parser.add_argument(
        "--torch-threads", type=int, default=2, help="1 is fairer to torch on a busy machine"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    hf_config = LlamaConfig(**CONFIG)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, CONFIG["vocab_size"], (args.batch, args.prompt_len), dtype=np.int32)
    mask = np.ones_like(prompts, dtype=bool)
    n_tokens = args.batch * args.new_tokens

    with tempfile.TemporaryDirectory() as path:
        LlamaForCausalLM(hf_config).save_pretrained(path)
        hf_model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        model = load_pretrained(path)
    n_params = sum(p.numel() for p in hf_model.parameters())

    if args.sample:
        method = Sample(temperature=1.0, top_k=50, top_p=0.95)
        hf_kwargs = dict(do_sample=True, temperature=1.0, top_k=50, top_p=0.95)
    else:
        method = Greedy()
        hf_kwargs = dict(do_sample=False)
    hf_model.generation_config.eos_token_id = None  # never stop early: exactly new_tokens
    hf_input = torch.from_numpy(prompts.astype(np.int64))
    hf_mask = torch.from_numpy(mask.astype(np.int64))

    def run_hf():
        with torch.inference_mode():
            return hf_model.generate(
                hf_input,
                attention_mask=hf_mask,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                use_cache=True,
                pad_token_id=0,
                **hf_kwargs,
            )

    graph_and_state = nnx.split(model)  # split once, as a training loop would
    keys = iter(jax.random.split(jax.random.key(0), 10_000))

    def run_ours():
        return generate(
            graph_and_state,
            prompts,
            mask,
            next(keys),
            max_new_tokens=args.new_tokens,
            method=method,
        )

    print(
        f"tiny Llama: {n_params / 1e6:.2f}M params, hidden {CONFIG['hidden_size']}, "
        f"{CONFIG['num_hidden_layers']} layers, {CONFIG['num_attention_heads']} heads / "
        f"{CONFIG['num_key_value_heads']} kv heads, vocab {CONFIG['vocab_size']}; "
        f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
        f"{'sample (T=1, top-k 50, top-p 0.95)' if args.sample else 'greedy'}; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )
    start = time.perf_counter()
    ours_out = run_ours()
    print(f"first call of ours (trace + compile + run): {time.perf_counter() - start:.2f} s")
    hf_out = run_hf().numpy()
    assert hf_out.shape[1] == args.prompt_len + args.new_tokens, hf_out.shape
    assert ours_out.lengths.min() == args.new_tokens
    if not args.sample:
        agree = np.mean(hf_out[:, args.prompt_len :] == ours_out.completion)
        print(f"greedy tokens agreeing with transformers: {agree:.1%}")

    times, cpu = timed_interleaved({"ours": run_ours, "hf": run_hf}, 2, args.runs)
    ours = summary("jaxrl_geom", times["ours"], cpu["ours"], n_tokens)
    theirs = summary("transformers", times["hf"], cpu["hf"], n_tokens)
    print(f"ratio ours / transformers: {ours / theirs:.2f}x")
    load = os.getloadavg()[0]
    print(f"1-min load average {load:.1f} on {os.cpu_count()} cores", end="")
    print(" (busy machine: torch's spinning OpenMP threads suffer most)" if load > 1.5 else "")
    print(f"decode step (ours): {args.batch / ours * 1e3:.2f} ms for {args.batch} rows")


if __name__ == "__main__":
    main()
