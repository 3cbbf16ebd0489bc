"""The main job: supervised warm-up, then GRPO (optionally with SALT and LongAct).

One round of GRPO, host side then device side::

    prompts --tokenize--> [M, P] --repeat G--> [N, P] --generate--> tokens, logps
      --decode + task.reward--> R [N] --advantages--> A [N] --grpo_step x mu--> params

Everything that touches arrays on the device is jitted (sampler, step); rewards are
computed on decoded text on the host, as verifiable rewards are.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jaxrl_geom import metrics as metrics_lib
from jaxrl_geom import sharding
from jaxrl_geom.checkpoints import Checkpointer
from jaxrl_geom.config import TrainConfig, to_dict
from jaxrl_geom.models import Decoder, ModelConfig, load_pretrained
from jaxrl_geom.rl import advantages as adv_lib
from jaxrl_geom.rl import dapo
from jaxrl_geom.rl.rollouts import make_rollout_batch, repeat_prompts
from jaxrl_geom.rl.step import TrainState, grpo_step, policy_logprobs
from jaxrl_geom.run_dir import check_output_dir, clear_run_dir, restore_run, write_json
from jaxrl_geom.sampling import Greedy, Sample, generate
from jaxrl_geom.tasks import get_task
from jaxrl_geom.tokenizers import CharTokenizer, load_tokenizer
from jaxrl_geom.warmup import demonstration_batch, sft_step


def _bucket(n: int, minimum: int = 16) -> int:
    """Next power of two >= n (prompt-length bucket: one compile per bucket)."""
    b = minimum
    while b < n:
        b *= 2
    return b


@dataclasses.dataclass
class Run:
    """Everything the loop needs, built once from a :class:`TrainConfig`."""

    cfg: TrainConfig
    tokenizer: Any
    task: Any
    mesh: jax.sharding.Mesh
    model_config: ModelConfig
    eval_examples: list
    eval_prompts: set[str]


def build_policy(cfg: TrainConfig, tokenizer: Any, mesh: jax.sharding.Mesh) -> nnx.Module:
    """A fresh tiny model (from scratch) or an HF checkpoint, placed on ``mesh``."""
    if cfg.model.path:
        return load_pretrained(cfg.model.path, mesh=mesh, dtype=cfg.model.dtype)
    mc = ModelConfig.tiny(
        vocab_size=tokenizer.vocab_size,
        hidden_size=cfg.model.hidden_size,
        num_hidden_layers=cfg.model.num_layers,
        dtype=cfg.model.dtype,
        remat=cfg.model.remat,
    )
    model = Decoder(mc, rngs=nnx.Rngs(cfg.seed))
    return sharding.shard_model(model, mesh)


def build_optimizer(cfg: TrainConfig, model_config: ModelConfig) -> optax.GradientTransformation:
    """``chain(clip, adamw[, longact])``: LongAct is the last link (SPEC section 3)."""
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


def encode_prompts(tokenizer: Any, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad prompts to a power-of-two bucket; mask from lengths."""
    longest = max(len(tokenizer.encode(p)) for p in prompts)
    return tokenizer.batch_encode(prompts, pad_to=_bucket(longest), left_pad=True)


def decode_completions(tokenizer: Any, completion: np.ndarray, lengths: np.ndarray) -> list[str]:
    """Decode each completion up to its length (the stop token is dropped by decode)."""
    return [
        tokenizer.decode(row[: int(n)].tolist()) for row, n in zip(completion, lengths, strict=True)
    ]


def evaluate(state_or_model: Any, run: Run, examples: list | None = None) -> dict[str, float]:
    """Greedy decoding on held-out prompts; mean task reward and accuracy."""
    model = state_or_model.model() if isinstance(state_or_model, TrainState) else state_or_model
    examples = run.eval_examples if examples is None else examples
    tok, mask = encode_prompts(run.tokenizer, [e.prompt for e in examples])
    out = generate(
        model,
        tok,
        mask,
        jax.random.key(0),
        max_new_tokens=run.cfg.sampling.max_new_tokens,
        method=Greedy(),
        stop_tokens=(run.tokenizer.eos_id,),
        pad_id=run.tokenizer.pad_id,
        mesh=run.mesh,
    )
    texts = decode_completions(run.tokenizer, np.asarray(out.completion), np.asarray(out.lengths))
    rewards = np.array([run.task.reward(t, e) for t, e in zip(texts, examples, strict=True)])
    return {
        "eval/reward_mean": float(rewards.mean()),
        "eval/accuracy": float((rewards >= 1).mean()),
    }


def _sample_examples(run: Run, rng: np.random.Generator, n: int) -> list:
    """Training prompts, never one of the held-out evaluation prompts."""
    out: list = []
    while len(out) < n:
        out.extend(e for e in run.task.sample_prompts(rng, n) if e.prompt not in run.eval_prompts)
    return out[:n]


def warmup(state: TrainState, run: Run, rng: np.random.Generator, pbar: Any) -> TrainState:
    """Supervised warm-up steps on task demonstrations."""
    w = run.cfg.warmup
    tok = run.tokenizer
    for _ in range(w.steps):
        examples = _sample_examples(run, rng, w.batch_size)
        ptok, pmask = encode_prompts(tok, [e.prompt for e in examples])
        comps = [
            tok.encode(run.task.demonstration(e), add_bos=False) + [tok.eos_id] for e in examples
        ]
        batch = demonstration_batch(ptok, pmask, comps, run.cfg.sampling.max_new_tokens, tok.pad_id)
        batch = sharding.shard_batch(batch, run.mesh)
        state, m = sft_step(state, batch)
        pbar.update(1)
        pbar.set_postfix(sft_loss=f"{float(m['sft/loss']):.3f}")
    return state


def collect_rollouts(
    state: TrainState, run: Run, rng: np.random.Generator, key: jax.Array
) -> tuple[Any, dict[str, float]]:
    """Sample M x G rollouts, score them, and build the rollout batch.

    With DAPO dynamic sampling, groups whose rewards are all equal are dropped and
    more prompts are sampled, up to ``max_sampling_tries`` rounds; if the batch is
    still not full, dropped groups fill it (their advantages are 0) and the metrics
    say how full it was.
    """
    cfg = run.cfg
    m_target, g = cfg.prompts_per_step, cfg.num_generations
    model = state.model()
    tok = run.tokenizer
    method = Sample(
        temperature=cfg.sampling.temperature, top_k=cfg.sampling.top_k, top_p=cfg.sampling.top_p
    )
    keys = iter(jax.random.split(key, cfg.max_sampling_tries))

    def sample_groups(_num_missing: int) -> tuple[list[dict[str, Any]], np.ndarray]:
        # Always M prompts per call: one sampler compile, whatever is missing.
        examples = _sample_examples(run, rng, m_target)
        ptok, pmask = encode_prompts(tok, [e.prompt for e in examples])
        rtok, rmask, _ = repeat_prompts(ptok, pmask, g)
        out = generate(
            model,
            rtok,
            rmask,
            next(keys),
            max_new_tokens=cfg.sampling.max_new_tokens,
            method=method,
            stop_tokens=(tok.eos_id,),
            pad_id=tok.pad_id,
            mesh=run.mesh,
        )
        out = jax.device_get(out)
        texts = decode_completions(tok, out.completion, out.lengths)
        rewards = np.array(
            [run.task.reward(t, examples[i // g]) for i, t in enumerate(texts)], np.float32
        ).reshape(m_target, g)
        groups = [
            {
                "tokens": out.tokens[rows],
                "prompt_mask": rmask[rows],
                "completion_mask": out.completion_mask[rows],
                "logprobs": out.logprobs[rows],
                "lengths": out.lengths[rows],
                "truncated": out.truncated[rows],
                "rewards": rewards[j],
            }
            for j, rows in enumerate(slice(j * g, (j + 1) * g) for j in range(m_target))
        ]
        return groups, rewards

    if cfg.dynamic_sampling:
        filled = dapo.fill_batch(sample_groups, m_target, cfg.max_sampling_tries, on_short="pad")
        groups, sampling_info = filled.groups, filled.metrics
    else:
        groups, _ = sample_groups(m_target)
        sampling_info = {}

    batch_np = _stack_groups(groups, tok.pad_id)
    raw_rewards = batch_np["rewards"].astype(np.float32)
    rewards = raw_rewards
    if cfg.overlong_buffer > 0:
        rewards = rewards + np.asarray(
            dapo.soft_overlong_punishment(
                jnp.asarray(batch_np["lengths"]),
                cfg.sampling.max_new_tokens,
                cfg.overlong_buffer,
                cfg.overlong_penalty,
            )
        )
    group_ids = np.repeat(np.arange(m_target, dtype=np.int32), g)
    advantages = adv_lib.group_advantages(
        jnp.asarray(rewards), jnp.asarray(group_ids), scale=cfg.scale_rewards, num_groups=m_target
    )
    batch = make_rollout_batch(
        tokens=batch_np["tokens"],
        prompt_mask=batch_np["prompt_mask"],
        completion_mask=batch_np["completion_mask"],
        old_logprobs=batch_np["logprobs"],
        advantages=advantages,
        group_ids=group_ids,
    )
    grouped = raw_rewards.reshape(m_target, g)
    info = {
        "reward/mean": float(raw_rewards.mean()),
        "reward/std": float(raw_rewards.std()),
        "reward/zero_std_group_fraction": float(np.mean(grouped.max(1) == grouped.min(1))),
        "completion/length_mean": float(batch_np["lengths"].mean()),
        "completion/truncated_fraction": float(batch_np["truncated"].mean()),
        **sampling_info,
    }
    return batch, info


def _left_pad(a: np.ndarray, width: int, value: int = 0) -> np.ndarray:
    pad = width - a.shape[1]
    return np.pad(a, ((0, 0), (pad, 0)), constant_values=value) if pad else a


def _stack_groups(groups: list[dict[str, Any]], pad_id: int) -> dict[str, np.ndarray]:
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


class TrainingHalted(RuntimeError):
    """The run stopped on purpose (e.g. too many skipped steps); the message says why."""


def prepare(cfg: TrainConfig) -> tuple[Run, nnx.Module, optax.GradientTransformation, Any]:
    """Build and check everything a run needs; no file is written.

    Returns ``(run, policy, grpo_optimizer, salt_config)``. Every option that only the
    built objects can check (task arguments, mesh vs devices and batch sizes, prompt
    length vs the model's positions, LongAct and SALT options) fails here, before the
    warm-up.
    """
    tokenizer = load_tokenizer(cfg.model.path) if cfg.model.path else CharTokenizer()
    try:
        task = get_task(cfg.task.name, **cfg.task.kwargs)
    except ValueError as err:
        raise ValueError(f"task.name/task.kwargs: {err}") from None
    try:
        mesh = sharding.make_mesh(data=cfg.mesh.data, fsdp=cfg.mesh.fsdp, tensor=cfg.mesh.tensor)
    except ValueError as err:
        raise ValueError(f"mesh: {err}") from None
    shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    n = cfg.prompts_per_step * cfg.num_generations
    micro = n // cfg.grpo.num_micro_batches
    if micro % shards:
        raise ValueError(
            f"each micro-batch has prompts_per_step x num_generations / grpo.num_micro_batches"
            f" = {micro} rollouts, not a multiple of the mesh's data x fsdp = {shards} devices; "
            "choose sizes so that it divides (or set mesh.data/mesh.fsdp)."
        )
    if cfg.warmup.steps and cfg.warmup.batch_size % shards:
        raise ValueError(
            f"warmup.batch_size={cfg.warmup.batch_size} is not a multiple of the mesh's "
            f"data x fsdp = {shards} devices; choose a multiple of {shards}."
        )
    policy = build_policy(cfg, tokenizer, mesh)
    eval_examples = task.sample_prompts(
        np.random.default_rng(cfg.seed + 1_000_003), cfg.eval_prompts
    )
    longest = max(len(tokenizer.encode(e.prompt)) for e in eval_examples)
    limit = policy.config.max_position_embeddings
    if longest + cfg.sampling.max_new_tokens > limit:
        raise ValueError(
            f"task prompts have up to {longest} tokens; with sampling.max_new_tokens="
            f"{cfg.sampling.max_new_tokens} that exceeds the model's max_position_embeddings="
            f"{limit}; shorten the prompts (task.kwargs) or lower sampling.max_new_tokens."
        )
    run = Run(
        cfg=cfg,
        tokenizer=tokenizer,
        task=task,
        mesh=mesh,
        model_config=policy.config,
        eval_examples=eval_examples,
        eval_prompts={e.prompt for e in eval_examples},
    )
    try:
        tx = _grpo_optimizer(cfg.optim, cfg.longact, run.model_config)
    except ValueError as err:
        raise ValueError(f"longact: {err}") from None
    try:
        estimator = _salt_estimator(cfg)
    except (ValueError, TypeError) as err:
        raise ValueError(f"salt: {err}") from None
    s = cfg.sampling
    Sample(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    return run, policy, tx, estimator


# The optimizer is a static field of TrainState, so each new object recompiles the jitted
# steps; runs with equal options in one process (notebooks, tests) share one object.
@functools.lru_cache(maxsize=8)
def _grpo_optimizer(
    optim: Any, longact: Any, model_config: ModelConfig
) -> optax.GradientTransformation:
    cfg = TrainConfig(optim=optim, longact=longact)  # build_optimizer reads only these
    return build_optimizer(cfg, model_config)


@functools.lru_cache(maxsize=8)
def _sft_optimizer(learning_rate: float) -> optax.GradientTransformation:
    return optax.adamw(learning_rate, b1=0.9, b2=0.99)


def train(
    cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Run the whole job and return the final metrics (see module docstring).

    Args:
      cfg: the validated config; ``cfg.output_dir`` is the run directory.
      resume: continue the run in ``output_dir`` from its newest checkpoint that
        restores (a damaged newer one is moved to ``corrupt_checkpoints/``).
      overwrite: a fresh run may replace an existing run in ``output_dir``.

    Everything is checked (config, run directory, checkpoint vs model) before a file
    is written. Raises ``ValueError`` for a bad config or run directory,
    :class:`~jaxrl_geom.checkpoints.CheckpointError` when a checkpoint cannot be
    saved, :class:`TrainingHalted` after ``max_consecutive_skips`` skipped steps.
    """
    out_dir = Path(os.path.abspath(cfg.output_dir))
    if resume:
        if not (out_dir / "config.json").is_file():
            raise ValueError(f"--resume {out_dir}: not a run directory (no config.json).")
    else:
        check_output_dir(out_dir, overwrite=overwrite)
    run, policy, tx, estimator = prepare(cfg)
    rng = np.random.default_rng(cfg.seed)
    key = jax.random.key(cfg.seed)
    grpo_cfg = dataclasses.replace(cfg.grpo, temperature=cfg.sampling.temperature)
    if cfg.longact.enabled:
        grpo_cfg = dataclasses.replace(grpo_cfg, capture_activations=True)

    phase, grpo_round, skipped_total = "warmup", 0, 0
    sft_state = TrainState.create(policy, _sft_optimizer(cfg.warmup.learning_rate))
    state = reference_params = None
    history: dict[str, Any] = {}
    if resume:
        state = TrainState.create(sft_state.model(), tx)
        keep_ref = state.params if grpo_cfg.beta > 0 else None
        grpo_round, restored, meta = restore_run(out_dir, cfg, _ckpt_arrays(state, key, keep_ref))
        state = state.replace(
            params=restored["params"], opt_state=restored["opt_state"], step=restored["step"]
        )
        key = jax.random.wrap_key_data(restored["key"])
        reference_params = restored.get("reference")
        rng.bit_generator.state = meta["rng_state"]
        skipped_total = int(meta.get("skipped_steps", 0))
        phase = "grpo"
    elif overwrite:
        clear_run_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = dataclasses.replace(cfg, output_dir=str(out_dir))
    if cfg.model.path:  # absolute, so the run resumes from any working directory
        model = dataclasses.replace(cfg.model, path=os.path.abspath(cfg.model.path))
        saved = dataclasses.replace(saved, model=model)
    write_json(out_dir / "config.json", to_dict(saved))
    ckpt = Checkpointer(out_dir / "checkpoints", max_to_keep=cfg.checkpoints_to_keep)
    writer = metrics_lib.MetricsWriter(out_dir, resume_step=grpo_round if resume else None)

    total = (cfg.warmup.steps if phase == "warmup" else 0) + cfg.steps - grpo_round
    pbar = tqdm(total=total, disable=not progress, desc="train", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        if phase == "warmup":
            start = evaluate(sft_state, run)
            history["eval_start"] = start
            writer.write(0, {"eval/reward_mean": start["eval/reward_mean"], "phase/warmup": 1.0})
            sft_state = warmup(sft_state, run, rng, pbar)
            state = TrainState.create(sft_state.model(), tx)
            # The frozen reference of the KL term is the policy GRPO starts from.
            if grpo_cfg.beta > 0:
                reference_params = jax.tree.map(jnp.copy, state.params)
            after_warmup = evaluate(state, run)
            writer.write(0, after_warmup)
        else:
            after_warmup = evaluate(state, run)  # logged at its round already
        history["eval_after_warmup"] = after_warmup
        reference = (state.graphdef, reference_params, state.rest)
        consecutive, first_round = 0, grpo_round + 1
        for grpo_round in range(first_round, cfg.steps + 1):
            key, sub = jax.random.split(key)
            batch, info = collect_rollouts(state, run, rng, sub)
            if grpo_cfg.beta > 0:
                batch = batch._replace(
                    ref_logprobs=policy_logprobs(*reference, batch, grpo_cfg.temperature)
                )
            batch = sharding.shard_batch(batch, run.mesh)
            for _ in range(cfg.num_iterations):
                state, step_metrics = grpo_step(state, batch, grpo_cfg, estimator)
                skipped = bool(float(step_metrics.get("skipped", 0.0)))
                skipped_total += skipped
                consecutive = consecutive + 1 if skipped else 0
                if consecutive >= cfg.max_consecutive_skips:
                    raise TrainingHalted(
                        f"{consecutive} consecutive GRPO steps were skipped at round "
                        f"{grpo_round} (non-finite loss, gradient or update; max_consecutive_"
                        f"skips={cfg.max_consecutive_skips}); the parameters are those of the "
                        "last good step. Lower optim.learning_rate, check the task's rewards, "
                        "then --resume from the last checkpoint."
                    )
            row = {**info, **jax.device_get(step_metrics), "skipped_steps": skipped_total}
            if grpo_round % cfg.eval_every == 0 or grpo_round == cfg.steps:
                row.update(evaluate(state, run))
            scalars = writer.write(grpo_round, row)
            pbar.update(1)
            pbar.set_postfix(reward=f"{scalars['reward/mean']:.2f}", loss=f"{scalars['loss']:.3f}")
            if grpo_round % cfg.checkpoint_every == 0 or grpo_round == cfg.steps:
                meta = {
                    "grpo_round": grpo_round,
                    "rng_state": rng.bit_generator.state,
                    "skipped_steps": skipped_total,
                }
                ckpt.save(grpo_round, _ckpt_arrays(state, key, reference_params), meta)
        ckpt.wait()
    finally:
        pbar.close()
        writer.close()
        ckpt.close()
    final = evaluate(state, run)
    history["eval_final"] = final
    history["wall_seconds"] = time.perf_counter() - t0
    history["skipped_steps"] = skipped_total
    records = metrics_lib.read_jsonl(out_dir / "metrics.jsonl")
    metrics_lib.plot_reward_curve(records, out_dir / "reward_curve.png", title=cfg.task.name)
    write_json(out_dir / "summary.json", history)
    return {"state": state, **history}


def _ckpt_arrays(state: TrainState, key: jax.Array, reference: nnx.State | None) -> dict[str, Any]:
    """The arrays a GRPO checkpoint holds; the KL reference too when there is one
    (beta > 0), so ``--resume`` keeps the same reference policy."""
    arrays = {
        "params": state.params,
        "opt_state": state.opt_state,
        "step": state.step,
        "key": jax.random.key_data(key),
    }
    if reference is not None:
        arrays["reference"] = reference
    return arrays


def _salt_estimator(cfg: TrainConfig) -> Any:
    """``grpo_step``'s SALT estimator from ``cfg.salt`` (None: plain GRPO)."""
    if not cfg.salt.enabled:
        return None
    from jaxrl_geom.salt import SaltConfig, salt_estimator

    fields = {f.name: getattr(cfg.salt, f.name) for f in dataclasses.fields(SaltConfig)}
    return salt_estimator(SaltConfig(**fields))


def load_policy(run_dir: str | Path) -> tuple[nnx.Module, TrainConfig]:
    """Rebuild the policy of a finished or interrupted run from its newest checkpoint
    that restores (a damaged newer one is skipped with a warning)."""
    policy, run = load_run(run_dir)
    return policy, run.cfg


def load_run(run_dir: str | Path) -> tuple[nnx.Module, Run]:
    """:func:`load_policy` plus the :class:`Run` (tokenizer, task, mesh) of its config."""
    from jaxrl_geom.config import load_run_config

    cfg = load_run_config(run_dir)
    run, policy, tx, _ = prepare(cfg)
    state = TrainState.create(policy, tx)
    ckpt = Checkpointer(Path(cfg.output_dir) / "checkpoints", read_only=True)
    try:
        if not ckpt.all_steps():
            raise ValueError(
                f"{cfg.output_dir} has no checkpoint yet (the run stopped before its first "
                f"checkpoint at round checkpoint_every={cfg.checkpoint_every}); nothing to load."
            )
        reference = state.params if cfg.grpo.beta > 0 else None

        def warn(step: int, why: str) -> None:
            print(
                f"jaxrl-geom: warning: checkpoint {step} in {cfg.output_dir} cannot be "
                f"restored ({why}); trying the previous one.",
                file=sys.stderr,
            )

        _, restored, _ = ckpt.restore_latest(
            _ckpt_arrays(state, jax.random.key(0), reference), on_skip=warn
        )
    finally:
        ckpt.close()
    return state.replace(params=restored["params"]).model(), run
