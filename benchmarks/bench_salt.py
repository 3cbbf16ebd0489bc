"""GRPO + SALT vs plain GRPO: step time and peak memory per Gram backend, side by side.

Variants (one jitted train step each, same AdamW optimizer, same batch):

* ``plain``: ``grpo_step(state, batch, config)``;
* ``vmap``: the materialized reference, ``per_sample_grads`` of the per-rollout
  surrogate (``N x P`` features) then the ``salt()`` optax transform;
* ``ghost`` / ``auto`` / ``sketch``: ``grpo_step(..., salt=SaltConfig(backend=...))``,
  the scalable path (Gram taps; ``auto`` = ghost or tiled per layer by FLOPs).

Timing: one warm-up call, then ``--repeats`` rounds that call every variant once in
turn (interleaved, so machine-load drift hits all of them alike), each call ending in
``block_until_ready``; the median is reported, with its ratio to ``plain``. Memory:
``compiled.memory_analysis()`` of each step: ``temp`` (XLA scratch, where activations
and per-sample features live) and ``peak = temp + arguments + outputs - aliased``;
``extra / NP`` is ``(temp - temp_plain) / (N * P * 4 bytes)``, the size of the
materialized per-sample gradients: about 1 for ``vmap``, near 0 for the taps.

Shapes: prompt 32 + completion 32 tokens (the forward sees T = 63), vocab 256; models
``tiny`` (2 layers, hidden 64) and ``small`` (8 layers, hidden 128), N = 16 and 64
rollouts (groups of 8). About 5 minutes on 2 CPU cores (``--quick``: tiny, N = 16).

Usage::

    python benchmarks/bench_salt.py [--quick] [--repeats 5]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrl_geom.models import Decoder, ModelConfig
from jaxrl_geom.rl import GrpoConfig, TrainState, grpo_step, losses, make_rollout_batch
from jaxrl_geom.rl import logprobs as lp
from jaxrl_geom.rl.step import completion_logits
from jaxrl_geom.salt import SaltConfig, per_sample_grads, salt

VOCAB, PROMPT, COMPLETION, GROUP = 256, 32, 32, 8
MODELS = {
    "tiny": ModelConfig.tiny(VOCAB, hidden_size=64, num_hidden_layers=2),
    "small": ModelConfig.tiny(VOCAB, hidden_size=128, num_hidden_layers=8),
}
GRPO = GrpoConfig()  # grpo loss, token level, beta = 0 (the KL path is the same everywhere)
KNOBS = dict(gamma_max=1.0, rank=4)
SALT_VARIANTS = {
    "ghost": SaltConfig(**KNOBS, backend="ghost"),
    "auto": SaltConfig(**KNOBS, backend="auto"),
    "sketch": SaltConfig(**KNOBS, backend="sketch", sketch_dim=32),
}
TX = optax.adamw(1e-5)


def make_batch(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (n, PROMPT + COMPLETION))
    prompt_mask = np.arange(PROMPT)[None, ::-1] < rng.integers(PROMPT // 2, PROMPT + 1, n)[:, None]
    lengths = rng.integers(COMPLETION // 2, COMPLETION + 1, n)
    completion_mask = np.arange(COMPLETION)[None] < lengths[:, None]
    old = -np.log(VOCAB) + 0.1 * rng.normal(size=(n, COMPLETION))
    groups = np.repeat(np.arange(n // GROUP), GROUP)
    return make_rollout_batch(tokens, prompt_mask, completion_mask, old, rng.normal(size=n), groups)


@functools.partial(jax.jit, static_argnames=("config", "salt_config"), donate_argnums=(0,))
def vmap_salt_step(state: TrainState, batch, config: GrpoConfig, salt_config: SaltConfig):
    """The materialized path: per-sample features of the linear surrogate, then salt()."""
    n = batch.tokens.shape[0]
    mask = batch.completion_mask
    targets = batch.tokens[:, -mask.shape[1] :]
    weights = losses.token_weights(mask, config.loss_type)  # [N, L]
    model = nnx.merge(state.graphdef, state.params, state.rest)
    logp = lp.token_logprobs(completion_logits(model, batch), targets, config.temperature)
    ratio = losses.importance_ratio(logp, batch.old_logprobs, mask)
    active = losses.clip_active(ratio, batch.advantages, config.eps_low, config.eps_high)

    def row_loss(params, row):  # l_i of one rollout (batch of one)
        example, w, act = row
        example = jax.tree.map(lambda x: x[None], example)
        m = nnx.merge(state.graphdef, params, state.rest)
        logp_i = lp.token_logprobs(
            completion_logits(m, example), example.tokens[:, -mask.shape[1] :], config.temperature
        )
        r = losses.importance_ratio(logp_i, example.old_logprobs, example.completion_mask)
        return -jnp.sum(w * act * r[0])

    features = per_sample_grads(row_loss, state.params, (batch, weights, active))  # [N, ...]
    tx = salt(**salt_config.reweight_kwargs(), scope=salt_config.scope)
    grads, salt_state = tx.update(
        features, tx.init(state.params), coefficients=batch.advantages, group_ids=batch.group_ids
    )
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"salt/kappa_before": salt_state.diagnostics.kappa_before, "n": jnp.float32(n)}
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics


def compile_variant(name: str, state: TrainState, batch):
    if name == "plain":
        lowered = grpo_step.lower(state, batch, GRPO)
    elif name == "vmap":
        lowered = vmap_salt_step.lower(state, batch, GRPO, SALT_VARIANTS["ghost"])
    else:
        lowered = grpo_step.lower(state, batch, GRPO, salt=SALT_VARIANTS[name])
    start = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - start


def bench(model_name: str, n: int, variants: list[str], repeats: int) -> None:
    config = MODELS[model_name]
    batch = make_batch(n)
    model = Decoder(config, rngs=nnx.Rngs(0))
    num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    runs = {}
    for name in variants:
        state = TrainState.create(model, TX)
        compiled, compile_s = compile_variant(name, state, batch)
        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready(metrics)
        runs[name] = dict(compiled=compiled, state=state, times=[], compile_s=compile_s)
    for _ in range(repeats):
        for run in runs.values():
            start = time.perf_counter()
            run["state"], metrics = run["compiled"](run["state"], batch)
            jax.block_until_ready(metrics)
            run["times"].append(time.perf_counter() - start)

    t = PROMPT + COMPLETION - 1
    print(
        f"\n== {model_name}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"P = {num_params / 1e6:.2f}M params; N = {n} rollouts x T = {t} tokens "
        f"(N*P*4B = {n * num_params * 4 / 2**20:.0f} MiB)"
    )
    print(
        f"{'variant':8s} {'step ms':>9s} {'x plain':>8s} {'compile s':>10s} {'temp MiB':>9s} "
        f"{'peak MiB':>9s} {'x plain':>8s} {'extra/NP':>9s}"
    )
    base_time = statistics.median(runs["plain"]["times"])
    base_mem = runs["plain"]["compiled"].memory_analysis()
    for name, run in runs.items():
        mem = run["compiled"].memory_analysis()
        peak = (
            mem.temp_size_in_bytes
            + mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            - mem.alias_size_in_bytes
        )
        base_peak = (
            base_mem.temp_size_in_bytes
            + base_mem.argument_size_in_bytes
            + base_mem.output_size_in_bytes
            - base_mem.alias_size_in_bytes
        )
        extra = (mem.temp_size_in_bytes - base_mem.temp_size_in_bytes) / (n * num_params * 4)
        median = statistics.median(run["times"])
        print(
            f"{name:8s} {median * 1e3:9.1f} {median / base_time:8.2f} {run['compile_s']:10.1f} "
            f"{mem.temp_size_in_bytes / 2**20:9.1f} {peak / 2**20:9.1f} {peak / base_peak:8.2f} "
            f"{extra:9.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, N = 16 only")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant (>= 5)")
    args = parser.parse_args()
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}; median of {args.repeats} interleaved calls"
    )
    variants = ["plain", "vmap", "ghost", "auto", "sketch"]
    cases = [("tiny", 16)] if args.quick else [(m, n) for m in MODELS for n in (16, 64)]
    start = time.perf_counter()
    for model_name, n in cases:
        bench(model_name, n, variants, args.repeats)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
