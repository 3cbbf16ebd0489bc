"""GRPO + SALT vs plain GRPO: step time and peak memory per SALT variant, side by side.

Variants (one jitted train step each, same AdamW optimizer, same batch):

* ``plain``: ``grpo_step(state, batch, config)``;
* ``vmap`` (``tiny``/``small`` only): the materialized reference, ``per_sample_grads`` of
  the per-rollout surrogate (``N x P`` features) then the ``salt()`` optax transform;
* ``auto`` / ``auto-recompute`` / ``ghost`` / ``sketch``: ``grpo_step(..., estimator)``
  with ``salt_estimator(SaltConfig(backend=...))``: Gram taps; ``auto`` (ghost, tiled or
  the table forms per op by FLOPs) forms the update by book-keeping (one backward),
  ``auto-recompute`` by a second backward (``keep_budget_gib=0``).

Timing: one warm-up call, then ``--repeats`` rounds that call every variant once in
turn (interleaved, so machine-load drift hits all of them alike), each call ending in
``block_until_ready``; the median is reported, with its ratio to ``plain``. Memory:
``compiled.memory_analysis()``: ``temp`` and ``peak = temp + arguments + outputs -
aliased``; ``extra`` is SALT's peak over plain's, as a fraction of plain's peak.
``FLOP x`` is the ratio expected from the FLOP model (SPEC section 2): plain ``6P`` per
token (matmuls only), book-keeping ``6P`` + the Gram blocks, recompute ``8P`` + the Gram
blocks (the Gram blocks of each op by the backend's FLOP count); ``XLA FLOP x`` and
``bytes x`` are the ratios of XLA's ``cost_analysis()`` of the compiled steps.

Sizes (``--size``): ``tiny`` (2 layers, hidden 64, vocab 256, N = 16), ``small`` (8
layers, hidden 128, N = 64), both with prompt 32 + completion 32; ``wide``: the widths
of Qwen3-0.6B (hidden 1024, 16 q / 8 kv heads of 128, MLP 3072, q/k norm, tied table) with
2 layers, vocab 8192, N = 8 and T = 63, float32 (what 2 CPU cores do in a minute);
``real``: the issue's GPU configuration, 8 such layers, vocab 151,936, N = 32 rollouts of
128 prompt + 256 completion tokens (T = 383), bfloat16 compute.

Usage::

    python benchmarks/bench_salt.py --size tiny            # ~1 min on 2 CPU cores
    python benchmarks/bench_salt.py --size wide --repeats 3
    python benchmarks/bench_salt.py --size real            # on an accelerator
"""

from __future__ import annotations

import argparse
import dataclasses
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
from jaxrl_geom.models.layers import Embedding, Linear
from jaxrl_geom.rl import GrpoConfig, TrainState, grpo_step, losses, make_rollout_batch
from jaxrl_geom.rl import logprobs as lp
from jaxrl_geom.rl.step import completion_logits
from jaxrl_geom.salt import SaltConfig, SaltKnobs, per_sample_grads, salt, salt_estimator
from jaxrl_geom.salt.gram import dense_costs
from jaxrl_geom.salt.table import lookup_cost, tied_costs


@dataclasses.dataclass(frozen=True)
class Size:
    model: ModelConfig
    n: int
    prompt: int
    completion: int
    variants: tuple[str, ...]


QWEN3_WIDTHS = dict(
    model_type="qwen3",
    hidden_size=1024,
    intermediate_size=3072,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    qk_norm=True,
    tie_word_embeddings=True,
)
TAPS = ("plain", "auto", "auto-recompute", "sketch")
SIZES = {
    "tiny": Size(
        ModelConfig.tiny(256, hidden_size=64, num_hidden_layers=2), 16, 32, 32,
        ("plain", "vmap", "ghost", *TAPS[1:]),
    ),
    "small": Size(
        ModelConfig.tiny(256, hidden_size=128, num_hidden_layers=8), 64, 32, 32,
        ("plain", "vmap", *TAPS[1:]),
    ),
    "wide": Size(
        dataclasses.replace(
            ModelConfig.tiny(8192, num_hidden_layers=2), **QWEN3_WIDTHS
        ), 8, 32, 32, TAPS,
    ),
    "real": Size(
        dataclasses.replace(
            ModelConfig.tiny(151_936, num_hidden_layers=8, dtype="bfloat16"), **QWEN3_WIDTHS
        ), 32, 128, 256, TAPS,
    ),
}  # fmt: skip
GROUP = 8
GRPO = GrpoConfig()  # grpo loss, token level, beta = 0
KNOBS = SaltKnobs(gamma_max=1.0, rank=4)
SALT_VARIANTS = {
    "ghost": SaltConfig(KNOBS, backend="ghost"),
    "auto": SaltConfig(KNOBS, backend="auto", keep_budget_gib=float("inf")),
    "auto-recompute": SaltConfig(KNOBS, backend="auto", keep_budget_gib=0.0),
    "sketch": SaltConfig(KNOBS, backend="sketch", sketch_dim=32, keep_budget_gib=float("inf")),
}
TX = optax.adamw(1e-5)


def make_batch(size: Size, seed: int = 0):
    rng = np.random.default_rng(seed)
    n, p, c, vocab = size.n, size.prompt, size.completion, size.model.vocab_size
    tokens = rng.integers(0, vocab, (n, p + c))
    prompt_mask = np.arange(p)[None, ::-1] < rng.integers(p // 2, p + 1, n)[:, None]
    lengths = rng.integers(c // 2, c + 1, n)
    completion_mask = np.arange(c)[None] < lengths[:, None]
    old = -np.log(vocab) + 0.1 * rng.normal(size=(n, c))
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
    tx = salt(salt_config.knobs, scope=salt_config.scope)
    grads, salt_state = tx.update(
        features, tx.init(state.params), coefficients=batch.advantages, group_ids=batch.group_ids
    )
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"salt/kappa_before": salt_state.diagnostics.kappa_before, "n": jnp.float32(n)}
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics


def flop_ratios(size: Size) -> dict[str, float]:
    """Expected step-time ratios from the FLOP model (module docstring)."""
    cfg, n = size.model, size.n
    t, comp = size.prompt + size.completion - 1, size.completion
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    gram = {"auto": 0, "sketch": 0, "ghost": 0}
    plain, k = 0, 32
    for path, module in nnx.iter_modules(model):
        if isinstance(module, Linear):
            d_in, d_out = module.kernel.shape
            rows = comp if path and path[-1] == "lm_head" else t
            plain += 6 * n * t * d_in * d_out
            cost = dense_costs(n, rows, d_in, d_out)
            gram["auto"] += min(cost.values())
            gram["ghost"] += cost["ghost"]
            gram["sketch"] += 2 * n * rows * (d_in + d_out) * k + 2 * n * rows * k * k
        elif isinstance(module, Embedding):
            vocab, dim = module.embedding.shape
            lookup = lookup_cost(n, t, dim, vocab)
            if cfg.tie_word_embeddings:
                plain += 6 * n * t * dim * vocab
                head = min(dense_costs(n, comp, dim, vocab).values())
                table = tied_costs(n, t, comp, dim, vocab, head)
                gram["auto"] += min(table.values())
                gram["ghost"] += table["split"]
                gram["sketch"] += 2 * n * (t + comp) * (dim + vocab) * k
            else:
                gram["auto"] += min(lookup.values())
                gram["ghost"] += lookup["ghost"]
                gram["sketch"] += min(lookup.values())
    return {
        "plain": 1.0,
        "auto": 1 + gram["auto"] / plain,
        "auto-recompute": (8 / 6) + gram["auto"] / plain,
        "ghost": 1 + gram["ghost"] / plain,
        "sketch": 1 + gram["sketch"] / plain,
        "vmap": float("nan"),
    }


def compile_variant(name: str, state: TrainState, batch):
    if name == "plain":
        lowered = grpo_step.lower(state, batch, GRPO)
    elif name == "vmap":
        lowered = vmap_salt_step.lower(state, batch, GRPO, SALT_VARIANTS["ghost"])
    else:
        lowered = grpo_step.lower(state, batch, GRPO, salt_estimator(SALT_VARIANTS[name]))
    start = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - start


def bench(size_name: str, repeats: int) -> None:
    size = SIZES[size_name]
    config, n = size.model, size.n
    batch = make_batch(size)
    model = Decoder(config, rngs=nnx.Rngs(0))
    num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    runs = {}
    for name in size.variants:
        state = TrainState.create(model, TX)
        compiled, compile_s = compile_variant(name, state, batch)
        args = () if name in ("plain", "vmap") else (salt_estimator(SALT_VARIANTS[name]),)
        state, metrics = compiled(state, batch, *args)  # warm-up
        jax.block_until_ready(metrics)
        runs[name] = dict(compiled=compiled, state=state, times=[], compile_s=compile_s, args=args)
    for _ in range(repeats):
        for run in runs.values():
            start = time.perf_counter()
            run["state"], metrics = run["compiled"](run["state"], batch, *run["args"])
            jax.block_until_ready(metrics)
            run["times"].append(time.perf_counter() - start)

    t = size.prompt + size.completion - 1
    print(
        f"\n== {size_name}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"vocab {config.vocab_size}, {config.dtype}, P = {num_params / 1e6:.2f}M params; "
        f"N = {n} rollouts x T = {t} tokens"
    )
    print(
        f"{'variant':15s} {'step ms':>9s} {'x plain':>8s} {'FLOP x':>7s} {'XLA FLOP x':>10s} "
        f"{'bytes x':>8s} {'compile s':>10s} {'temp MiB':>9s} {'peak MiB':>9s} {'extra':>6s}"
    )
    ratios = flop_ratios(size)
    base_time = statistics.median(runs["plain"]["times"])
    base_peak = _peak(runs["plain"]["compiled"].memory_analysis())
    base_flops, base_bytes = _cost(runs["plain"]["compiled"])
    for name, run in runs.items():
        mem = run["compiled"].memory_analysis()
        peak = _peak(mem)
        median = statistics.median(run["times"])
        flops, bytes_accessed = _cost(run["compiled"])
        print(
            f"{name:15s} {median * 1e3:9.1f} {median / base_time:8.2f} {ratios[name]:7.2f} "
            f"{flops / base_flops:10.2f} {bytes_accessed / base_bytes:8.2f} "
            f"{run['compile_s']:10.1f} {mem.temp_size_in_bytes / 2**20:9.1f} "
            f"{peak / 2**20:9.1f} {(peak - base_peak) / base_peak:6.2f}"
        )


def _cost(compiled) -> tuple[float, float]:
    """XLA's own count of the step's FLOPs and bytes accessed."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def _peak(mem) -> int:
    return (
        mem.temp_size_in_bytes
        + mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), nargs="+", default=["tiny"])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant")
    args = parser.parse_args()
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}; median of {args.repeats} interleaved calls"
    )
    start = time.perf_counter()
    for size_name in args.size:
        bench(size_name, args.repeats)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
