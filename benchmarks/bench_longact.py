"""Step time of GRPO + LongAct over plain GRPO, side by side in one run.

Three variants of the same jitted ``grpo_step`` on the same rollout batch:

* ``grpo``: ``chain(clip_by_global_norm(1), adamw(1e-5, weight_decay=0.1))``, capture off;
* ``capture``: the same optimizer, ``GrpoConfig(capture_activations=True)``: the q/k
  statistics are reduced in the loss forward and handed to the optimizer, which
  ignores them (the capture-only overhead);
* ``longact``: capture on and ``longact(keep_ratio=0.3)`` as the last link (scores,
  top-k selection, masking of the final W_Q/W_K update, diagnostics, step metrics).

Models (random weights, fp32, built locally): ``tiny`` = 2 layers, hidden 64, 4 heads
(2 kv heads); ``small`` = 8 layers, hidden 256, 4 heads (2 kv heads), MLP 768. Batch:
N = 16 rollouts of a 32-token left-padded prompt and a 64-token completion (96
tokens). Each step is one jitted call on a donated state; 2 warm-up calls (the first
compiles), then ``--runs`` timed calls of each variant, interleaved (the order rotates
every round) so that load drifts on a shared machine hit all alike, each ending in
``block_until_ready``. Prints median and IQR of the wall time, its minimum and the
median process CPU time (both less sensitive to other jobs on a shared machine), and
the ratios of each (goal: longact / grpo <= 1.05). The breakdown then times the two parts LongAct
touches, jitted alone: the loss forward+backward with capture off / on, and the
optimizer update without / with the LongAct link.

Run::

    python benchmarks/bench_longact.py                 # tiny and small
    python benchmarks/bench_longact.py --models small --runs 30
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrl_geom.longact import longact
from jaxrl_geom.models import Decoder, ModelConfig
from jaxrl_geom.rl import GrpoConfig, RolloutBatch, TrainState, grpo_step
from jaxrl_geom.rl import step as step_lib

MODELS = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2),
    "small": dict(hidden_size=256, num_hidden_layers=8),
}
VOCAB = 128


def make_model(name: str) -> nnx.Module:
    config = ModelConfig.tiny(VOCAB, num_attention_heads=4, num_key_value_heads=2, **MODELS[name])
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Decoder(config)), nnx.Param, ...)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.05, x.dtype), params)
    return nnx.merge(graphdef, params, rest)


def make_batch(n: int, prompt: int, completion: int) -> RolloutBatch:
    """Left-padded prompts (lengths 8..P), completions of 16..L tokens, groups of 4."""
    rng = np.random.default_rng(0)
    prompt_len = rng.integers(8, prompt + 1, n)
    comp_len = rng.integers(16, completion + 1, n)
    mask = np.concatenate(
        [
            np.arange(prompt)[None] >= prompt - prompt_len[:, None],
            np.arange(completion)[None] < comp_len[:, None],
        ],
        axis=1,
    )  # [N, P+L]
    tokens = np.where(mask, rng.integers(1, VOCAB, mask.shape), 0)
    return RolloutBatch(
        tokens=jnp.asarray(tokens, jnp.int32),
        positions=jnp.asarray(np.maximum(np.cumsum(mask, 1) - 1, 0), jnp.int32),
        attention_mask=jnp.asarray(mask),
        completion_mask=jnp.asarray(mask[:, prompt:]),
        old_logprobs=jnp.asarray(rng.normal(-4.8, 0.1, (n, completion)), jnp.float32),
        ref_logprobs=jnp.zeros((n, completion), jnp.float32),
        advantages=jnp.asarray(rng.normal(size=n), jnp.float32),
        group_ids=jnp.repeat(jnp.arange(n // 4), 4).astype(jnp.int32),
    )


def optimizer(with_longact: bool) -> optax.GradientTransformation:
    links = [optax.clip_by_global_norm(1.0), optax.adamw(1e-5, weight_decay=0.1)]
    if with_longact:
        links.append(longact(keep_ratio=0.3))
    return optax.chain(*links)


VARIANTS = {  # name -> (with longact link, GrpoConfig)
    "grpo": (False, GrpoConfig()),
    "capture": (False, GrpoConfig(capture_activations=True)),
    "longact": (True, GrpoConfig(capture_activations=True)),
}


def bench_model(
    name: str, batch: RolloutBatch, runs: int, warmup: int, breakdown: bool
) -> dict[str, tuple[float, float, float]]:
    """Time the three step variants on one model; optionally the parts they differ in."""
    model = make_model(name)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    states, configs = {}, {}
    for variant, (with_longact, config) in VARIANTS.items():
        states[variant] = TrainState.create(model, optimizer(with_longact))
        configs[variant] = config

    def step(variant: str) -> None:
        states[variant], metrics = grpo_step(states[variant], batch, configs[variant])
        jax.block_until_ready((states[variant].params, metrics))

    compile_s = {}
    for variant in VARIANTS:
        start = time.perf_counter()
        step(variant)
        compile_s[variant] = time.perf_counter() - start
        for _ in range(warmup - 1):
            step(variant)
    times, cpu = interleaved({v: functools.partial(step, v) for v in VARIANTS}, runs)

    print(f"\n{name}: {n_params / 1e6:.2f}M params, {MODELS[name]}")
    medians = report(times, cpu, first_call=compile_s)
    print(
        f"  step ratios (median | min | CPU): capture / grpo {ratio(medians, 'capture', 'grpo')}   "
        f"longact / grpo {ratio(medians, 'longact', 'grpo')}   "
        f"longact / capture {ratio(medians, 'longact', 'capture')}"
    )
    if breakdown:
        print("  breakdown (the two parts LongAct touches, jitted alone):")
        times, cpu = interleaved(parts(model, batch), runs)
        parts_medians = report(times, cpu)
        print(
            f"  loss fwd+bwd capture on / off {ratio(parts_medians, 'loss+capture', 'loss')}   "
            f"optimizer +longact / plain {ratio(parts_medians, 'adamw+longact', 'adamw')}"
        )
    return medians


def parts(model: nnx.Module, batch: RolloutBatch) -> dict[str, Callable[[], None]]:
    """The loss forward+backward (capture off / on) and the optimizer update (without /
    with the LongAct link), each jitted alone on the same inputs as the step."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    num_tokens = jnp.sum(batch.completion_mask).astype(jnp.float32)
    fns, stats, grads = {}, None, None
    for name, capture in (("loss", False), ("loss+capture", True)):
        loss = functools.partial(
            step_lib.micro_batch_loss,
            graphdef=graphdef,
            config=GrpoConfig(capture_activations=capture),
            num_sequences=jnp.float32(batch.tokens.shape[0]),
            num_tokens=num_tokens,
        )
        fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
        (_, (_, stats)), grads = fn(params, rest, batch)
        fns[name] = functools.partial(lambda f: jax.block_until_ready(f(params, rest, batch)), fn)
    for name, with_longact in (("adamw", False), ("adamw+longact", True)):
        tx = optimizer(with_longact)
        fn = jax.jit(functools.partial(tx.update, activation_stats=stats))
        opt_state = tx.init(params)
        fns[name] = functools.partial(
            lambda f, s: jax.block_until_ready(f(grads, s, params)), fn, opt_state
        )
    for fn in fns.values():
        fn()  # compile
    return fns


def interleaved(
    fns: dict[str, Callable[[], None]], runs: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds of ``runs`` calls each, in rotating order."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for r in range(runs):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return times, cpu


def report(
    times: dict[str, list[float]],
    cpu: dict[str, list[float]],
    first_call: dict[str, float] | None = None,
) -> dict[str, tuple[float, float]]:
    """Print median (IQR) and min wall time and median CPU time.

    Returns ``{name: (median wall, min wall, median CPU)}``.
    """
    out = {}
    for name, ts in times.items():
        q1, med, q3 = np.percentile(ts, [25, 50, 75])
        out[name] = (med, float(np.min(ts)), float(np.median(cpu[name])))
        extra = f"  first call {first_call[name]:.1f} s" if first_call else ""
        print(
            f"  {name:>14}: median {med * 1e3:8.2f} ms (IQR {q1 * 1e3:.2f}-{q3 * 1e3:.2f})  "
            f"min {out[name][1] * 1e3:8.2f} ms  CPU {out[name][2] * 1e3:8.2f} ms{extra}"
        )
    return out


def ratio(stats: dict[str, tuple[float, float, float]], num: str, den: str) -> str:
    """``median wall | min wall | median CPU`` ratios."""
    return " | ".join(f"{a / b:.3f}x" for a, b in zip(stats[num], stats[den], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,small", help="comma-separated: tiny,small")
    parser.add_argument("--rollouts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--completion-len", type=int, default=64)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-breakdown", action="store_true", help="step times only")
    args = parser.parse_args()
    batch = make_batch(args.rollouts, args.prompt_len, args.completion_len)
    print(
        f"GRPO step, N={args.rollouts} rollouts x {args.prompt_len}+{args.completion_len} "
        f"tokens; median of {args.runs} interleaved calls after {args.warmup} warm-up; "
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores)"
    )
    for name in args.models.split(","):
        bench_model(name, batch, args.runs, args.warmup, breakdown=not args.no_breakdown)
    print(f"\n1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
