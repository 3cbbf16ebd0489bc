"""A few GRPO rounds with SALT and LongAct through the process-aware rollout API.

Used by tests/test_multihost.py twice: as a script in each of two local processes
(``python tests/multihost_job.py OUT_DIR PORT PROCESS_ID``, 4 CPU devices each), and
imported in the test process (8 devices) as the single-process reference.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

ROUNDS = 2  # GRPO rounds before the checkpoint
PROMPTS, GENERATIONS, MAX_NEW = 4, 4, 8  # N = 16 rows: 8 per process, 2 groups each
SEED = 0


def reward_fn(completion: str, example: Any) -> float:
    """A custom reward that varies within groups of an untrained model."""
    return len(set(completion)) / 8.0 + (1.0 if example.answer in completion else 0.0)


def build(mesh: Any) -> tuple[Any, Any, Any, Any]:
    """(task, tokenizer, train state, grpo config), identical in every process."""
    import optax
    from flax import nnx

    from jaxrl_geom import sharding
    from jaxrl_geom.longact import longact
    from jaxrl_geom.models import Decoder, ModelConfig
    from jaxrl_geom.rl.step import GrpoConfig, TrainState
    from jaxrl_geom.tasks import get_task
    from jaxrl_geom.tokenizers import CharTokenizer

    tok = CharTokenizer()
    mc = ModelConfig.tiny(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1)
    model = sharding.shard_model(Decoder(mc, rngs=nnx.Rngs(SEED)), mesh)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(1e-2),
        longact.from_config(mc, keep_ratio=0.5),
    )
    config = GrpoConfig(loss_type="dapo", eps_high=0.28, capture_activations=True)
    return get_task("arithmetic"), tok, TrainState.create(model, tx), config


def run_rounds(state: Any, mesh: Any, rounds: range, task: Any, tok: Any, config: Any):
    """GRPO rounds; the prompt stream and keys are indexed by the round number."""
    import time

    import jax
    import numpy as np

    from jaxrl_geom.rl.step import grpo_step
    from jaxrl_geom.rollout import collect_rollouts
    from jaxrl_geom.salt import SaltConfig, salt_estimator
    from jaxrl_geom.sampling import Sample

    records = []
    for r in rounds:
        t0 = time.perf_counter()
        examples = task.sample_prompts(np.random.default_rng([SEED, r]), PROMPTS)
        ro = collect_rollouts(
            (state.graphdef, state.params, state.rest),
            examples=examples,
            tokenizer=tok,
            reward_fn=reward_fn,
            key=jax.random.fold_in(jax.random.key(SEED), r),
            num_generations=GENERATIONS,
            max_new_tokens=MAX_NEW,
            method=Sample(temperature=1.0),
            mesh=mesh,
        )
        t1 = time.perf_counter()
        state, metrics = grpo_step(state, ro.batch, config, salt_estimator(SaltConfig()))
        jax.block_until_ready(metrics)
        print(f"round {r}: rollouts {t1 - t0:.1f}s step {time.perf_counter() - t1:.1f}s",
              file=sys.stderr, flush=True)  # fmt: skip
        records.append(
            {
                "rows": np.arange(ro.rows.start, ro.rows.stop),
                "completions": ro.completions,
                "rewards": ro.rewards,
                "advantages": ro.advantages,
                "loss": float(metrics["loss"]),
                "reward_mean": ro.metrics["reward/mean"],
            }
        )
    return state, records


def checkpoint_arrays(state: Any) -> dict[str, Any]:
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step}


def main(out_dir: str, port: str, process_id: str) -> None:
    import pickle

    from jaxrl_geom import distributed

    distributed.initialize(f"127.0.0.1:{port}", 2, int(process_id))
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from jaxrl_geom import sharding
    from jaxrl_geom.checkpoints import Checkpointer
    from jaxrl_geom.rollout import collect_rollouts
    from jaxrl_geom.sampling import Sample

    errors = {}  # clear errors of a multi-process run, raised before any work
    try:
        sharding.make_mesh(data=1, fsdp=2, tensor=2)  # leaves process 1's devices out
    except ValueError as err:
        errors["partial_mesh"] = str(err)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    task, tok, state, config = build(mesh)
    try:  # 3 prompts x 4: 6 rows per process would split a group
        collect_rollouts(
            state.model(),
            examples=task.sample_prompts(np.random.default_rng(0), 3),
            tokenizer=tok,
            reward_fn=reward_fn,
            key=jax.random.key(0),
            num_generations=GENERATIONS,
            max_new_tokens=MAX_NEW,
            method=Sample(temperature=1.0),
            mesh=mesh,
        )
    except ValueError as err:
        errors["split_group"] = str(err)
    state, records = run_rounds(state, mesh, range(ROUNDS), task, tok, config)
    ckpt = Checkpointer(Path(out_dir) / "checkpoints")
    ckpt.save(ROUNDS, checkpoint_arrays(state), {"round": ROUNDS})  # every process takes part
    ckpt.close()
    params = multihost_utils.process_allgather(state.params, tiled=True)
    out = {"records": records, "process_count": jax.process_count(), "errors": errors}
    if jax.process_index() == 0:
        out["params"] = params
    with open(Path(out_dir) / f"process{jax.process_index()}.pkl", "wb") as f:
        pickle.dump(out, f)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main(*sys.argv[1:4])
