"""The main job: supervised warm-up, then GRPO (optionally with SALT and LongAct).

One round of GRPO, host side then device side::

    prompts --tokenize--> [M, P] --repeat G--> [N, P] --generate--> tokens, logps
      --decode + task.reward--> R [N] --advantages--> A [N] --grpo_step x mu--> params

Everything that touches arrays on the device is jitted (sampler, step); rewards are
computed on decoded text on the host, as verifiable rewards are. The loop is built from
the public parts in :mod:`jaxrl_geom.loop` (warm-up, rollouts, ``grpo_step``,
evaluation); in a multi-process run each process handles its own rows of the global
batch (:mod:`jaxrl_geom.rollout`), so results do not depend on the process count.
"""

from __future__ import annotations

import dataclasses
import functools
import json
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

from jaxrl_geom import distributed, sharding
from jaxrl_geom import metrics as metrics_lib
from jaxrl_geom.checkpoints import Checkpointer
from jaxrl_geom.config import TrainConfig
from jaxrl_geom.loop import (
    build_optimizer,
    build_policy,
    collect_rollouts,
    collect_rollouts_dynamic,
    evaluate_rewards,
    held_out_examples,
    host_values,
    sample_examples,
    sampling_method,
    warmup_steps,
)
from jaxrl_geom.models import ModelConfig
from jaxrl_geom.rl.step import TrainState, grpo_step, policy_logprobs
from jaxrl_geom.rollout import Rollouts
from jaxrl_geom.run_dir import (
    check_run_dir,
    clear_run_dir,
    restore_run,
    write_json,
    write_run_config,
)
from jaxrl_geom.tasks import get_task
from jaxrl_geom.tokenizers import CharTokenizer, load_tokenizer


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


def evaluate(state_or_model: Any, run: Run, examples: list | None = None) -> dict[str, float]:
    """Greedy decoding on held-out prompts (default: the run's); mean task reward and
    accuracy over all of them, each process decoding its own block."""
    model = state_or_model.model() if isinstance(state_or_model, TrainState) else state_or_model
    return evaluate_rewards(
        model,
        examples=run.eval_examples if examples is None else examples,
        tokenizer=run.tokenizer,
        reward_fn=run.task.reward,
        max_new_tokens=run.cfg.sampling.max_new_tokens,
        mesh=run.mesh,
    )


def _rollouts(state: TrainState, run: Run, rng: np.random.Generator, key: jax.Array) -> Rollouts:
    """One round's M x G scored rollouts (DAPO dynamic sampling when configured)."""
    cfg, s = run.cfg, run.cfg.sampling

    def examples() -> list:
        return sample_examples(run.task, rng=rng, n=cfg.prompts_per_step, exclude=run.eval_prompts)

    kwargs = dict(
        tokenizer=run.tokenizer,
        reward_fn=run.task.reward,
        key=key,
        num_generations=cfg.num_generations,
        max_new_tokens=s.max_new_tokens,
        method=sampling_method(cfg),
        mesh=run.mesh,
        scale_rewards=cfg.scale_rewards,
        overlong_buffer=cfg.overlong_buffer,
        overlong_penalty=cfg.overlong_penalty,
    )
    model = (state.graphdef, state.params, state.rest)
    if cfg.dynamic_sampling:
        return collect_rollouts_dynamic(
            model, next_examples=examples, max_tries=cfg.max_sampling_tries, **kwargs
        )
    return collect_rollouts(model, examples=examples(), **kwargs)


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
    nproc = sharding.process_batch_factor(mesh)
    if nproc > 1:
        if cfg.dynamic_sampling:
            raise ValueError(
                f"dynamic_sampling=true runs in one process so far ({jax.process_count()} "
                "processes were started); set dynamic_sampling=false for a multi-process run."
            )
        if n % (nproc * cfg.num_generations):
            raise ValueError(
                f"prompts_per_step={cfg.prompts_per_step} does not split over the "
                f"{nproc} processes holding batch rows (each keeps whole groups of "
                f"num_generations rollouts); choose a multiple of {nproc}."
            )
    policy = build_policy(cfg, tokenizer=tokenizer, mesh=mesh)
    eval_examples = held_out_examples(cfg, task=task)
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
    sampling_method(cfg)  # its own checks, before any work
    return run, policy, tx, estimator


# The optimizer is a static field of TrainState, so each new object recompiles the jitted
# steps; runs with equal options in one process (notebooks, tests) share one object.
@functools.lru_cache(maxsize=8)
def _grpo_optimizer(
    optim: Any, longact: Any, model_config: ModelConfig
) -> optax.GradientTransformation:
    cfg = TrainConfig(optim=optim, longact=longact)  # build_optimizer reads only these
    return build_optimizer(cfg, model_config=model_config)


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
      progress: show a tqdm bar (process 0 only).

    Everything is checked (config, run directory, checkpoint vs model) before a file
    is written. Raises ``ValueError`` for a bad config or run directory,
    :class:`~jaxrl_geom.checkpoints.CheckpointError` when a checkpoint cannot be
    saved, :class:`TrainingHalted` after ``max_consecutive_skips`` skipped steps.

    In a multi-process run every process calls this with the same config; each works on
    its own rows of the same example stream, all take part in checkpoint saves and
    restores, and only process 0 writes config.json, metrics, plots and summary.json.
    ``output_dir`` must be one shared directory (NFS, GCS fuse, or one host's disk for
    local processes): every process checks it, and orbax writes into it from all.
    """
    out_dir = Path(os.path.abspath(cfg.output_dir))
    main = distributed.is_main_process()
    check_run_dir(out_dir, resume=resume, overwrite=overwrite)
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
        target = _ckpt_arrays(state, key, keep_ref, run.mesh)
        grpo_round, restored, meta = restore_run(out_dir, cfg, target, move_damaged=main)
        state = state.replace(
            params=restored["params"], opt_state=restored["opt_state"], step=restored["step"]
        )
        key = jax.random.wrap_key_data(restored["key"])
        reference_params = restored.get("reference")
        rng.bit_generator.state = meta["rng_state"]
        skipped_total = int(meta.get("skipped_steps", 0))
        phase = "grpo"
    if main:
        if overwrite and not resume:
            clear_run_dir(out_dir)
        write_run_config(out_dir, cfg)
    distributed.barrier("jaxrl_geom.train: run directory ready")
    ckpt = Checkpointer(out_dir / "checkpoints", max_to_keep=cfg.checkpoints_to_keep)
    writer = None
    if main:
        writer = metrics_lib.MetricsWriter(out_dir, resume_step=grpo_round if resume else None)

    def log(step: int, row: dict[str, Any]) -> dict[str, float]:
        return writer.write(step, row) if writer else metrics_lib.to_scalars(row)

    total = (cfg.warmup.steps if phase == "warmup" else 0) + cfg.steps - grpo_round
    pbar = tqdm(total=total, disable=not (progress and main), desc="train", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        if phase == "warmup":
            start = evaluate(sft_state, run)
            history["eval_start"] = start
            log(0, {"eval/reward_mean": start["eval/reward_mean"], "phase/warmup": 1.0})
            w = cfg.warmup
            batches = (
                sample_examples(run.task, rng=rng, n=w.batch_size, exclude=run.eval_prompts)
                for _ in range(w.steps)
            )
            sft_state, _ = warmup_steps(
                sft_state,
                batches=batches,
                task=run.task,
                tokenizer=run.tokenizer,
                max_new_tokens=cfg.sampling.max_new_tokens,
                mesh=run.mesh,
                progress=pbar,
            )
            state = TrainState.create(sft_state.model(), tx)
            # The frozen reference of the KL term is the policy GRPO starts from.
            if grpo_cfg.beta > 0:
                reference_params = jax.tree.map(jnp.copy, state.params)
            after_warmup = evaluate(state, run)
            log(0, after_warmup)
        else:
            after_warmup = evaluate(state, run)  # logged at its round already
        history["eval_after_warmup"] = after_warmup
        reference = (state.graphdef, reference_params, state.rest)
        consecutive, first_round = 0, grpo_round + 1
        for grpo_round in range(first_round, cfg.steps + 1):
            key, sub = jax.random.split(key)
            ro = _rollouts(state, run, rng, sub)
            if cfg.log_rollouts:  # a collective: every process takes part
                _write_rollouts(
                    out_dir / "rollouts" / f"round_{grpo_round:05d}.jsonl", ro, run.mesh
                )
            batch = ro.batch
            if grpo_cfg.beta > 0:
                batch = batch._replace(
                    ref_logprobs=policy_logprobs(*reference, batch, grpo_cfg.temperature)
                )
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
            row = {**ro.metrics, **host_values(step_metrics), "skipped_steps": skipped_total}
            if grpo_round % cfg.eval_every == 0 or grpo_round == cfg.steps:
                row.update(evaluate(state, run))
            scalars = log(grpo_round, row)
            pbar.update(1)
            pbar.set_postfix(reward=f"{scalars['reward/mean']:.2f}", loss=f"{scalars['loss']:.3f}")
            if grpo_round % cfg.checkpoint_every == 0 or grpo_round == cfg.steps:
                meta = {
                    "grpo_round": grpo_round,
                    "rng_state": rng.bit_generator.state,
                    "skipped_steps": skipped_total,
                }
                arrays = _ckpt_arrays(state, key, reference_params, run.mesh)
                ckpt.save(grpo_round, arrays, meta)
        ckpt.wait()
    finally:
        pbar.close()
        if writer:
            writer.close()
        ckpt.close()
    final = evaluate(state, run)
    history["eval_final"] = final
    history["wall_seconds"] = time.perf_counter() - t0
    history["skipped_steps"] = skipped_total
    if main:
        records = metrics_lib.read_jsonl(out_dir / "metrics.jsonl")
        metrics_lib.plot_reward_curve(records, out_dir / "reward_curve.png", title=cfg.task.name)
        write_json(out_dir / "summary.json", history)
    return {"state": state, **history}


def _write_rollouts(path: Path, ro: Rollouts, mesh: jax.sharding.Mesh) -> None:
    """Every row of a round, gathered from all processes and written by process 0:
    completion tokens (up to the stop token), raw reward, advantage, sampler log-prob sum."""
    b = ro.batch
    rows = host_values(
        {
            "tokens": b.tokens[:, -b.completion_mask.shape[1] :],
            "mask": b.completion_mask,
            "logprobs": b.old_logprobs,
            "advantages": b.advantages,
            "rewards": sharding.shard_batch(np.asarray(ro.rewards, np.float32), mesh),
        }
    )
    if not distributed.is_main_process():
        return
    path.parent.mkdir(exist_ok=True)
    lines = []
    for i, mask in enumerate(rows["mask"]):
        row = {
            "row": i,
            "completion": rows["tokens"][i][mask].tolist(),
            "reward": float(rows["rewards"][i]),
            "advantage": float(rows["advantages"][i]),
            "logprob_sum": float(np.sum(rows["logprobs"][i][mask])),
        }
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")


def _ckpt_arrays(
    state: TrainState, key: jax.Array, reference: nnx.State | None, mesh: jax.sharding.Mesh
) -> dict[str, Any]:
    """The arrays a GRPO checkpoint holds; the KL reference too when there is one
    (beta > 0), so ``--resume`` keeps the same reference policy. The PRNG key is stored
    replicated on the mesh (a global array, so every process can save and restore it)."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    arrays = {
        "params": state.params,
        "opt_state": state.opt_state,
        "step": state.step,
        "key": sharding.put_global(jax.random.key_data(key), replicated),
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


def load_policy(run_dir: str | Path, *, step: int | None = None) -> tuple[nnx.Module, TrainConfig]:
    """Rebuild the policy of a finished or interrupted run from its checkpoint of GRPO
    round ``step``, by default the newest that restores (a damaged newer one is skipped
    with a warning)."""
    policy, run = load_run(run_dir, step=step)
    return policy, run.cfg


def load_run(run_dir: str | Path, *, step: int | None = None) -> tuple[nnx.Module, Run]:
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

        target = _ckpt_arrays(state, jax.random.key(0), reference, run.mesh)
        if step is None:
            _, restored, _ = ckpt.restore_latest(target, on_skip=warn)
        else:
            restored, _ = ckpt.restore(target, step)
    finally:
        ckpt.close()
    return state.replace(params=restored["params"]).model(), run
