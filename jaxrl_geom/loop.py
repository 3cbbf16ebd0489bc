"""The training loop's parts as public functions, for ``train.py`` and for notebooks.

A loop written by hand (one process or many; every process runs the same code)::

    cfg = load_config(None, ["steps=20"])
    task, tok = get_task(cfg.task.name, **cfg.task.kwargs), CharTokenizer()
    model = build_policy(cfg, tokenizer=tok)  # or any nnx Decoder
    held_out = held_out_examples(cfg, task=task)
    exclude = {e.prompt for e in held_out}
    rng = np.random.default_rng(0)
    sft = TrainState.create(model, optax.adamw(1e-3))
    batches = (sample_examples(task, rng=rng, n=8, exclude=exclude) for _ in range(50))
    sft, _ = warmup_steps(sft, batches=batches, task=task, tokenizer=tok, max_new_tokens=8)
    tx = build_optimizer(cfg, model_config=model.config)  # or any optax chain
    state = TrainState.create(sft.model(), tx)
    for r in range(cfg.steps):
        examples = sample_examples(task, rng=rng, n=16, exclude=exclude)
        ro = collect_rollouts((state.graphdef, state.params, state.rest), examples=examples,
                              tokenizer=tok, reward_fn=my_reward, key=jax.random.key(r),
                              num_generations=8, max_new_tokens=8,
                              method=Sample(temperature=1.0))
        state, metrics = grpo_step(state, ro.batch, GrpoConfig())
    print(evaluate_rewards(state.model(), examples=held_out, tokenizer=tok,
                           reward_fn=task.reward, max_new_tokens=8))

:func:`~jaxrl_geom.rollout.collect_rollouts`, :func:`~jaxrl_geom.rollout.evaluate_rewards`
and :func:`~jaxrl_geom.rl.step.grpo_step` are re-exported here. The example stream
(:func:`sample_examples`) is the same in every process; each process works on its own
rows of it, so results do not depend on the number of processes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxrl_geom import sharding
from jaxrl_geom.config import TrainConfig
from jaxrl_geom.models import Decoder, ModelConfig, load_pretrained
from jaxrl_geom.rl import advantages as adv_lib
from jaxrl_geom.rl import dapo
from jaxrl_geom.rl.rollouts import make_rollout_batch
from jaxrl_geom.rl.step import RolloutBatch, TrainState, grpo_step
from jaxrl_geom.rollout import Rollouts, collect_rollouts, encode_prompts, evaluate_rewards
from jaxrl_geom.sampling import Sample
from jaxrl_geom.warmup import demonstration_batch, sft_step

__all__ = [
    "build_optimizer",
    "build_policy",
    "collect_rollouts",
    "collect_rollouts_dynamic",
    "demonstrations",
    "evaluate_rewards",
    "grpo_step",
    "held_out_examples",
    "host_values",
    "sample_examples",
    "sampling_method",
    "warmup_steps",
]

# The held-out prompts come from their own stream, never from the training one (seed).
_HELD_OUT_SEED_OFFSET = 1_000_003
# Held-out prompts are drawn this many at a time, whatever their number, so that the
# first n of a larger held-out set are the held-out set of size n.
_HELD_OUT_DRAW = 128
# Draws in a row that add nothing before sampling gives up (the task is exhausted).
_FRUITLESS_DRAWS = 64


def build_policy(cfg: TrainConfig, *, tokenizer: Any, mesh: Mesh | None = None) -> nnx.Module:
    """The policy of ``cfg.model``: a fresh tiny decoder (seeded with ``cfg.seed``, vocabulary
    of ``tokenizer``) or, with ``model.path``, a Hugging Face checkpoint; placed on ``mesh``
    (default: not sharded, on the default device)."""
    if cfg.model.path:
        return load_pretrained(
            cfg.model.path, mesh=mesh, dtype=cfg.model.dtype, remat=cfg.model.remat
        )
    mc = ModelConfig.tiny(
        vocab_size=tokenizer.vocab_size,
        hidden_size=cfg.model.hidden_size,
        num_hidden_layers=cfg.model.num_layers,
        dtype=cfg.model.dtype,
        remat=cfg.model.remat,
    )
    model = Decoder(mc, rngs=nnx.Rngs(cfg.seed))
    return model if mesh is None else sharding.shard_model(model, mesh)


def sampling_method(cfg: TrainConfig) -> Sample:
    """The rollout sampler of ``cfg.sampling``: ``Sample(temperature, top_k, top_p)``."""
    s = cfg.sampling
    return Sample(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)


def build_optimizer(cfg: TrainConfig, *, model_config: ModelConfig) -> optax.GradientTransformation:
    """GRPO's optimizer from ``cfg.optim`` and ``cfg.longact``:
    ``chain(clip_by_global_norm, adamw[, longact])``, LongAct the last link (SPEC section 3);
    ``model_config`` gives LongAct the attention head layout."""
    o = cfg.optim
    links = [
        optax.clip_by_global_norm(o.max_grad_norm),
        optax.adamw(o.learning_rate, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay),
    ]
    if cfg.longact.enabled:
        from jaxrl_geom.longact import longact

        la = cfg.longact
        links.append(
            longact(
                num_heads=model_config.num_attention_heads,
                num_kv_heads=model_config.num_key_value_heads,
                head_dim=model_config.head_dim,
                keep_ratio=la.keep_ratio,
                statistic=la.statistic,
                scope=la.scope,
                granularity=la.granularity,
                refresh=la.refresh,
            )
        )
    return optax.chain(*links)


def held_out_examples(cfg: TrainConfig, *, task: Any) -> list[Any]:
    """The run's ``cfg.eval_prompts`` held-out evaluation examples of ``task``: distinct
    prompts, the same in every process and for every run with this ``cfg.seed`` (their
    own random stream; pass their prompts to :func:`sample_examples` as ``exclude``). The
    first ``n`` of them are the held-out set of a run with ``eval_prompts=n``.

    Raises:
      ValueError: ``task`` has fewer distinct prompts than ``cfg.eval_prompts``.
    """
    rng = np.random.default_rng(cfg.seed + _HELD_OUT_SEED_OFFSET)
    out: dict[str, Any] = {}
    fruitless = 0
    while len(out) < cfg.eval_prompts:
        before = len(out)
        for e in task.sample_prompts(rng, _HELD_OUT_DRAW):
            if len(out) < cfg.eval_prompts:
                out.setdefault(e.prompt, e)
        fruitless = fruitless + 1 if len(out) == before else 0
        if fruitless == _FRUITLESS_DRAWS:
            raise ValueError(
                f"eval_prompts={cfg.eval_prompts}: task {type(task).__name__} drew only "
                f"{len(out)} distinct prompts in {_FRUITLESS_DRAWS * _HELD_OUT_DRAW} more draws; "
                "lower eval_prompts (and leave prompts to train on)."
            )
    return list(out.values())


def sample_examples(
    task: Any, *, rng: np.random.Generator, n: int, exclude: Collection[str] = ()
) -> list[Any]:
    """``n`` training examples of ``task`` drawn with ``rng``, none whose prompt is in
    ``exclude`` (e.g. the held-out evaluation prompts).

    Raises:
      ValueError: every prompt drawn is in ``exclude`` (the task is exhausted).
    """
    out: list[Any] = []
    fruitless = 0
    while len(out) < n:
        kept = [e for e in task.sample_prompts(rng, n) if e.prompt not in exclude]
        out.extend(kept)
        fruitless = 0 if kept else fruitless + 1
        if fruitless == _FRUITLESS_DRAWS:
            raise ValueError(
                f"sample_examples: all {_FRUITLESS_DRAWS * n} prompts that task "
                f"{type(task).__name__} drew are in `exclude` ({len(exclude)} prompts): the "
                "task has too few prompts for that many held out; lower eval_prompts."
            )
    return out[:n]


def host_values(tree: Any) -> Any:
    """A pytree of device values (e.g. ``grpo_step``'s metrics) as NumPy in every process;
    arrays spanning several processes are gathered (a collective: call it everywhere)."""

    def get(x: Any) -> Any:
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)


def demonstrations(
    examples: Sequence[Any],
    *,
    task: Any,
    tokenizer: Any,
    max_new_tokens: int,
    mesh: Mesh | None = None,
) -> RolloutBatch:
    """``[prompt | task.demonstration + EOS]`` of each example, laid out like rollouts
    (prompts left-padded to a common bucket, demonstrations right-padded to
    ``max_new_tokens``, ``completion_mask`` on their tokens): the batch of one warm-up step.

    ``examples`` is the global list (the same in every process); with ``mesh`` a process
    encodes only its own rows and the batch is placed on the mesh.

    Raises:
      ValueError: a demonstration longer than ``max_new_tokens`` (EOS included).
    """
    ptok, pmask = encode_prompts(tokenizer, [e.prompt for e in examples])  # global bucket
    rows = sharding.process_rows(len(examples), mesh)
    comps = [
        tokenizer.encode(task.demonstration(e), add_bos=False) + [tokenizer.eos_id]
        for e in examples[rows]
    ]
    batch = demonstration_batch(ptok[rows], pmask[rows], comps, max_new_tokens, tokenizer.pad_id)
    return batch if mesh is None else sharding.shard_batch(batch, mesh)


def warmup_steps(
    state: TrainState,
    *,
    batches: Iterable[Sequence[Any]],
    task: Any,
    tokenizer: Any,
    max_new_tokens: int,
    mesh: Mesh | None = None,
    progress: bool | Any = False,
) -> tuple[TrainState, dict[str, float]]:
    """Supervised steps on ``task.demonstration`` of each batch of examples (+ EOS).

    Each batch is the global list of B examples (the same in every process), laid out by
    :func:`demonstrations`. Returns the state and the last step's metrics (``sft/loss``,
    ``sft/grad_norm``). ``progress``: ``True`` for a tqdm bar, or a tqdm-like object to
    ``update`` (without one, steps are dispatched without waiting for each other).
    """
    bar = tqdm(desc="warm-up", disable=False) if progress is True else progress or None
    m: dict[str, Any] = {}
    for examples in batches:
        batch = demonstrations(
            examples, task=task, tokenizer=tokenizer, max_new_tokens=max_new_tokens, mesh=mesh
        )
        state, m = sft_step(state, batch)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(sft_loss=f"{float(m['sft/loss']):.3f}")
    if progress is True:
        bar.close()
    return state, {k: float(v) for k, v in jax.device_get(m).items()}


def collect_rollouts_dynamic(
    model: Any,
    *,
    next_examples: Callable[[], Sequence[Any]],
    max_tries: int,
    key: jax.Array,
    num_generations: int,
    max_new_tokens: int,
    scale_rewards: str = "group",
    overlong_buffer: int = 0,
    overlong_penalty: float = 1.0,
    mesh: Mesh | None = None,
    **kwargs: Any,
) -> Rollouts:
    """DAPO dynamic sampling: :func:`collect_rollouts` on ``next_examples()`` up to
    ``max_tries`` times, keeping groups whose rewards differ (:func:`dapo.fill_batch`,
    topped up with all-equal groups if the tries run out). One process only.

    ``kwargs`` go to :func:`collect_rollouts` (``tokenizer``, ``reward_fn``, ``method``).
    Advantages are recomputed over the kept groups; ``metrics`` gain
    ``dynamic_sampling/*``.

    Raises:
      ValueError: in a multi-process run (groups would have to move between processes).
    """
    if jax.process_count() > 1:
        raise ValueError(
            f"dynamic_sampling=true runs in one process so far ({jax.process_count()} were "
            "started): set dynamic_sampling=false for a multi-process run."
        )
    if max_tries < 1:
        raise ValueError(f"collect_rollouts_dynamic: max_tries must be >= 1; got {max_tries}.")
    g = int(num_generations)
    tries = iter(range(max_tries))

    def sample(_missing: int) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
        ro = collect_rollouts(
            model,
            examples=next_examples(),
            key=jax.random.fold_in(key, next(tries)),
            num_generations=g,
            max_new_tokens=max_new_tokens,
            mesh=mesh,
            **kwargs,
        )
        b = jax.device_get(ro.batch)
        p = b.tokens.shape[1] - b.completion_mask.shape[1]
        rows = {
            "tokens": b.tokens,
            "prompt_mask": b.attention_mask[:, :p],
            "completion_mask": b.completion_mask,
            "logprobs": b.old_logprobs,
            "lengths": ro.lengths,
            "truncated": ro.truncated,
            "rewards": ro.rewards,
        }
        m = len(ro.rewards) // g
        groups = [{k: v[j * g : (j + 1) * g] for k, v in rows.items()} for j in range(m)]
        return groups, ro.rewards.reshape(m, g)

    first, first_rewards = sample(0)  # M groups per try (one sampler compile)
    m = len(first)
    pending = iter([(first, first_rewards)])

    def sample_fn(missing: int) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
        return next(pending, None) or sample(missing)

    filled = dapo.fill_batch(sample_fn, m, max_tries, on_short="pad")
    b = _stack_groups(list(filled.groups), kwargs["tokenizer"].pad_id)
    raw = b["rewards"].astype(np.float32)
    rewards = raw
    if overlong_buffer > 0:
        penalty = dapo.soft_overlong_punishment(
            jnp.asarray(b["lengths"]), max_new_tokens, overlong_buffer, overlong_penalty
        )
        rewards = raw + np.asarray(penalty, np.float32)
    group_ids = np.repeat(np.arange(m, dtype=np.int32), g)
    adv = np.asarray(
        adv_lib.group_advantages(
            jnp.asarray(rewards), jnp.asarray(group_ids), scale=scale_rewards, num_groups=m
        )
    )
    batch = make_rollout_batch(
        tokens=b["tokens"],
        prompt_mask=b["prompt_mask"],
        completion_mask=b["completion_mask"],
        old_logprobs=b["logprobs"],
        advantages=adv,
        group_ids=group_ids,
    )
    if mesh is not None:
        batch = sharding.shard_batch(batch, mesh)
    grouped = raw.reshape(m, g)
    metrics = {
        "reward/mean": float(raw.mean()),
        "reward/std": float(raw.std()),
        "reward/zero_std_group_fraction": float(np.mean(grouped.max(1) == grouped.min(1))),
        "completion/length_mean": float(b["lengths"].mean()),
        "completion/truncated_fraction": float(b["truncated"].mean()),
        **filled.metrics,
    }
    tok, comp = kwargs["tokenizer"], b["tokens"][:, -b["completion_mask"].shape[1] :]
    texts = [tok.decode(r[: int(n)].tolist()) for r, n in zip(comp, b["lengths"], strict=True)]
    return Rollouts(
        batch=batch,
        rows=slice(0, m * g),
        completions=texts,
        rewards=raw,
        advantages=adv.astype(np.float32),
        lengths=b["lengths"],
        truncated=b["truncated"],
        metrics=metrics,
    )


def _left_pad(a: np.ndarray, width: int, value: int = 0) -> np.ndarray:
    pad = width - a.shape[1]
    return np.pad(a, ((0, 0), (pad, 0)), constant_values=value) if pad else a


def _stack_groups(groups: list[dict[str, np.ndarray]], pad_id: int) -> dict[str, np.ndarray]:
    """Stack groups into one batch. Groups from different sampling tries may have
    different prompt buckets: left-pad the shorter prompts so every row is [P_max | L]."""
    p_max = max(grp["prompt_mask"].shape[1] for grp in groups)
    out: dict[str, list[np.ndarray]] = {k: [] for k in groups[0]}
    for grp in groups:
        p = grp["prompt_mask"].shape[1]
        prompt = _left_pad(grp["tokens"][:, :p], p_max, pad_id)
        out["tokens"].append(np.concatenate([prompt, grp["tokens"][:, p:]], axis=1))
        out["prompt_mask"].append(_left_pad(grp["prompt_mask"], p_max, 0).astype(bool))
        for k in grp:
            if k not in ("tokens", "prompt_mask"):
                out[k].append(grp[k])
    return {k: np.concatenate(v, axis=0) for k, v in out.items()}
