"""Collect GRPO rollouts in one process or many: prompts in, a global rollout batch out.

One round, for the global batch of M prompts (the same list in every process)::

    prompts [M] --this process's rows--> [m, P] --repeat G--> [m*G, P]
      --generate(row_ids = global row index)--> tokens, logps    (jitted, global mesh)
      --decode + reward_fn--> R [m*G]                               (host, own rows only)
      --global array--> A = group_advantages(R) [N]                  (jitted, global)
      --> RolloutBatch of global arrays [N = M*G, ...] for grpo_step

Each process holds the contiguous block of rows :func:`jaxrl_geom.sharding.process_rows`
gives it, so all G rollouts of a prompt stay on one process; row ``r`` draws its tokens
with keys folded from ``r``, so a run's samples, rewards, advantages and updates do
not depend on how many processes run it. Metrics are reduced on the device and are
the same in every process (print or write them from process 0 only).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxrl_geom import sharding
from jaxrl_geom.rl import advantages as adv_lib
from jaxrl_geom.rl import dapo
from jaxrl_geom.rl.rollouts import make_rollout_batch
from jaxrl_geom.rl.step import RolloutBatch
from jaxrl_geom.sampling import Greedy, generate
from jaxrl_geom.sampling.methods import SamplingMethod

__all__ = ["Rollouts", "collect_rollouts", "encode_prompts", "evaluate_rewards", "global_means"]

_GREEDY = Greedy()
RewardFn = Callable[[str, Any], float]  # (completion text, example) -> reward


class Rollouts(NamedTuple):
    """What :func:`collect_rollouts` returns; ``n = rows.stop - rows.start`` local rows.

    Attributes:
      batch: the :class:`~jaxrl_geom.rl.step.RolloutBatch` of all ``N = M * G`` rows,
        global arrays sharded over the batch axes (ready for ``grpo_step``).
      rows: this process's rows of the global batch (``slice(0, N)`` with one process).
      completions: the decoded completions of those rows.
      rewards: f32 ``[n]`` their raw rewards (before any overlong penalty).
      advantages: f32 ``[n]`` their advantages.
      lengths: int32 ``[n]`` completion lengths; truncated: bool ``[n]``.
      metrics: global scalars, equal in every process.
    """

    batch: RolloutBatch
    rows: slice
    completions: list[str]
    rewards: np.ndarray
    advantages: np.ndarray
    lengths: np.ndarray
    truncated: np.ndarray
    metrics: dict[str, float]


def _bucket(n: int, minimum: int = 16) -> int:
    b = minimum
    while b < n:
        b *= 2
    return b


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad prompts to a power-of-two bucket of the longest (one compile per bucket);
    returns int32 ``[M, P]`` tokens and the bool mask from lengths."""
    longest = max(len(tokenizer.encode(p)) for p in prompts)
    return tokenizer.batch_encode(list(prompts), pad_to=_bucket(longest), left_pad=True)


def _generate_rows(
    model: Any,
    tokens: np.ndarray,
    mask: np.ndarray,
    key: jax.Array,
    rows: slice,
    tokenizer: Any,
    max_new_tokens: int,
    method: SamplingMethod,
    mesh: Mesh | None,
) -> tuple[Any, list[str]]:
    """This process's rows ``rows`` of the global batch: ``generate``'s output (stopping at
    EOS, padded with the pad id, each row's randomness from its global row id) and the
    decoded completions."""
    out = generate(
        model,
        tokens,
        mask,
        key,
        max_new_tokens=max_new_tokens,
        method=method,
        stop_tokens=(tokenizer.eos_id,),
        pad_id=tokenizer.pad_id,
        mesh=mesh,
        row_ids=np.arange(rows.start, rows.stop, dtype=np.int32),
    )
    texts = [
        tokenizer.decode(row[: int(n)].tolist())
        for row, n in zip(out.completion, out.lengths, strict=True)
    ]
    return out, texts


def global_means(values: dict[str, np.ndarray], mesh: Mesh | None) -> dict[str, float]:
    """Means over the global batch of per-row values each process holds for its rows.

    ``values[k]`` is ``[n]`` (this process's rows); the reduction runs on the device,
    and every process gets the same numbers.
    """
    if mesh is None:
        return {k: float(np.mean(v)) for k, v in values.items()}
    stacked = sharding.shard_batch({k: np.asarray(v, np.float32) for k, v in values.items()}, mesh)
    means = jax.jit(lambda t: {k: jnp.mean(v) for k, v in t.items()})(stacked)
    return {k: float(v) for k, v in means.items()}


@functools.partial(jax.jit, static_argnames=("num_groups", "scale"))
def _advantages(
    rewards: jax.Array, group_ids: jax.Array, *, num_groups: int, scale: str
) -> jax.Array:  # f32 [N]
    """Group advantages of the global batch, on the device (``"batch"`` scale sees all N)."""
    return adv_lib.group_advantages(rewards, group_ids, scale=scale, num_groups=num_groups)


def collect_rollouts(
    model: Any,
    *,
    examples: Sequence[Any],
    tokenizer: Any,
    reward_fn: RewardFn,
    key: jax.Array,
    num_generations: int,
    max_new_tokens: int,
    method: SamplingMethod,
    mesh: Mesh | None = None,
    scale_rewards: str = "group",
    overlong_buffer: int = 0,
    overlong_penalty: float = 1.0,
) -> Rollouts:
    """Sample ``G = num_generations`` completions of each of the M global ``examples``,
    score this process's rows and build the global rollout batch (module docstring).

    Args:
      model: a :class:`~jaxrl_geom.models.Decoder` on ``mesh`` or
        ``(graphdef, params, rest)`` (e.g. ``(state.graphdef, state.params, state.rest)``).
      examples: the M prompts of the round, each with a ``.prompt`` string; the same
        list in every process (each process samples its own block of them).
      tokenizer: ``encode``, ``batch_encode``, ``decode``, ``eos_id``, ``pad_id``.
      reward_fn: ``(completion, example) -> float`` (e.g. ``task.reward``).
      key: PRNG key of the round; row ``r`` samples with keys folded from ``r``.
      num_generations: G >= 2 rollouts per prompt.
      max_new_tokens, method: the sampler's completion length and ``Greedy``/``Sample``.
      mesh: the global mesh; None for one device.
      scale_rewards: ``"group"``, ``"batch"`` or ``"none"`` (SPEC section 1).
      overlong_buffer, overlong_penalty: DAPO's soft overlong punishment (0 = off).

    Raises:
      ValueError: ``num_generations < 2``, no examples, or ``M * G`` rows that do not
        split over the batch axes in whole groups per process.
    """
    g = int(num_generations)
    if g < 2:
        raise ValueError(
            f"num_generations={num_generations}: group advantages need at least 2 rollouts "
            "per prompt."
        )
    m = len(examples)
    if m == 0:
        raise ValueError("collect_rollouts(examples=[]): pass at least one prompt.")
    n = m * g
    rows = sharding.process_rows(n, mesh)
    if rows.start % g or rows.stop % g:
        raise ValueError(
            f"{m} prompts x {g} rollouts: this process holds rows [{rows.start}, {rows.stop}), "
            f"which splits a group of {g}. Choose prompts per step so that M * G / (batch "
            "shards) is a multiple of G, keeping every group on one process."
        )
    ptok, pmask = encode_prompts(tokenizer, [e.prompt for e in examples])  # global bucket
    local = slice(rows.start // g, rows.stop // g)
    rtok = np.repeat(ptok[local], g, axis=0)
    rmask = np.repeat(pmask[local], g, axis=0)
    out, texts = _generate_rows(
        model, rtok, rmask, key, rows, tokenizer, max_new_tokens, method, mesh
    )
    local_examples = examples[local]
    raw = np.array(
        [reward_fn(t, local_examples[i // g]) for i, t in enumerate(texts)], np.float32
    )  # [n]
    rewards = raw
    if overlong_buffer > 0:
        penalty = dapo.soft_overlong_punishment(
            jnp.asarray(out.lengths), max_new_tokens, overlong_buffer, overlong_penalty
        )
        rewards = raw + np.asarray(penalty, np.float32)
    group_ids = np.repeat(np.arange(local.start, local.stop, dtype=np.int32), g)
    grouped = raw.reshape(-1, g)
    all_equal = np.repeat(grouped.max(1) == grouped.min(1), g)
    if mesh is None:
        adv = _advantages(
            jnp.asarray(rewards), jnp.asarray(group_ids), num_groups=m, scale=scale_rewards
        )
    else:
        glob = sharding.shard_batch((rewards, group_ids), mesh)
        adv = _advantages(*glob, num_groups=m, scale=scale_rewards)
    advantages = sharding.local_rows(adv) if mesh is not None else np.asarray(adv)
    if advantages.shape[0] != rows.stop - rows.start:  # replicated result: take own rows
        advantages = advantages[rows]
    batch = make_rollout_batch(
        tokens=out.tokens,
        prompt_mask=rmask,
        completion_mask=out.completion_mask,
        old_logprobs=out.logprobs,
        advantages=advantages,
        group_ids=group_ids,
    )
    if mesh is not None:
        batch = sharding.shard_batch(jax.tree.map(np.asarray, batch), mesh)
    means = global_means(
        {
            "reward/mean": raw,
            "reward/mean_sq": raw.astype(np.float64) ** 2,
            "reward/zero_std_group_fraction": all_equal,
            "completion/length_mean": out.lengths,
            "completion/truncated_fraction": out.truncated,
        },
        mesh,
    )
    mean_sq = means.pop("reward/mean_sq")
    means["reward/std"] = float(np.sqrt(max(mean_sq - means["reward/mean"] ** 2, 0.0)))
    return Rollouts(
        batch=batch,
        rows=rows,
        completions=texts,
        rewards=raw,
        advantages=np.asarray(advantages, np.float32),
        lengths=np.asarray(out.lengths),
        truncated=np.asarray(out.truncated),
        metrics=means,
    )


def evaluate_rewards(
    model: Any,
    *,
    examples: Sequence[Any],
    tokenizer: Any,
    reward_fn: RewardFn,
    max_new_tokens: int,
    mesh: Mesh | None = None,
    method: SamplingMethod = _GREEDY,
    key: jax.Array | None = None,
) -> dict[str, float]:
    """Mean reward and accuracy (reward >= 1) of one completion per example (greedy by
    default), each process decoding its own block of the examples; same result in
    every process."""
    if not examples:
        raise ValueError("evaluate_rewards(examples=[]): pass at least one prompt.")
    shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))
    n = -(-len(examples) // shards) * shards  # padded with copies of the last example
    padded = list(examples) + [examples[-1]] * (n - len(examples))
    rows = sharding.process_rows(n, mesh)
    ptok, pmask = encode_prompts(tokenizer, [e.prompt for e in padded])
    key = jax.random.key(0) if key is None else key
    _, texts = _generate_rows(
        model, ptok[rows], pmask[rows], key, rows, tokenizer, max_new_tokens, method, mesh
    )
    local = padded[rows]
    rewards = np.array([reward_fn(t, e) for t, e in zip(texts, local, strict=True)], np.float32)
    weight = (np.arange(rows.start, rows.stop) < len(examples)).astype(np.float32)
    means = global_means({"w": weight, "r": rewards * weight, "a": (rewards >= 1) * weight}, mesh)
    return {
        "eval/reward_mean": means["r"] / means["w"],
        "eval/accuracy": means["a"] / means["w"],
    }
