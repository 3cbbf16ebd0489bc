"""Command line: ``jaxrl-geom train | eval | bench``.

Configs are YAML/JSON files (``--config``) plus ``key.sub=value`` overrides::

    jaxrl-geom train                                   # the built-in default
    jaxrl-geom train --config my.yaml grpo.loss_type=dapo steps=100
    jaxrl-geom train --resume runs/default             # continue from the last checkpoint
    jaxrl-geom eval runs/default --prompts 256         # score a checkpoint on held-out prompts
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from jaxrl_geom import distributed

    distributed.initialize_from_args(args)  # first: before anything touches a device
    distributed.require_single_process("jaxrl-geom train")
    from jaxrl_geom.config import from_dict, load_config, to_dict
    from jaxrl_geom.train import train

    if args.resume:
        run_dir = Path(args.resume)
        saved = json.loads((run_dir / "config.json").read_text())
        from jaxrl_geom.config import TrainConfig, apply_overrides

        cfg = from_dict(TrainConfig, apply_overrides(saved, list(args.overrides)))
    else:
        cfg = load_config(args.config, args.overrides)
    if args.dump_config:
        print(json.dumps(to_dict(cfg), indent=2, default=str))
        return 0
    result = train(cfg, resume=bool(args.resume), progress=not args.no_progress)
    start = result.get("eval_start", {}).get("eval/reward_mean")
    warm = result["eval_after_warmup"]["eval/reward_mean"]
    final = result["eval_final"]["eval/reward_mean"]
    if start is not None:
        print(
            f"held-out reward: start {start:.3f} -> after warm-up {warm:.3f} -> final {final:.3f}"
        )
    else:
        print(f"held-out reward: resumed at {warm:.3f} -> final {final:.3f}")
    print(f"wrote {cfg.output_dir}/metrics.jsonl, reward_curve.png, checkpoints/")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import numpy as np

    from jaxrl_geom import sharding
    from jaxrl_geom.tasks import get_task
    from jaxrl_geom.tokenizers import CharTokenizer, load_tokenizer
    from jaxrl_geom.train import Run, evaluate, load_policy

    policy, cfg = load_policy(args.run_dir)
    tokenizer = load_tokenizer(cfg.model.path) if cfg.model.path else CharTokenizer()
    task = get_task(cfg.task.name, **cfg.task.kwargs)
    examples = task.sample_prompts(np.random.default_rng(cfg.seed + 1_000_003), args.prompts)
    run = Run(
        cfg=cfg,
        tokenizer=tokenizer,
        task=task,
        mesh=sharding.make_mesh(data=cfg.mesh.data, fsdp=cfg.mesh.fsdp, tensor=cfg.mesh.tensor),
        model_config=policy.config,
        eval_examples=examples,
        eval_prompts={e.prompt for e in examples},
    )
    print(json.dumps(evaluate(policy, run), indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import runpy

    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"bench_{args.which}.py"
    if not script.exists():
        raise SystemExit(
            f"No benchmark {args.which!r}: expected {script} (run from a source checkout)."
        )
    sys.argv = [str(script)]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxrl-geom", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="warm-up + GRPO (with optional SALT / LongAct)")
    t.add_argument("--config", help="YAML or JSON config file")
    t.add_argument("--resume", help="run directory to resume from (its config + overrides)")
    t.add_argument("--dump-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. grpo.beta=0.04")
    from jaxrl_geom.distributed import add_arguments

    add_arguments(t)
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="score a run's latest checkpoint on held-out prompts")
    e.add_argument("run_dir")
    e.add_argument("--prompts", type=int, default=256)
    e.set_defaults(func=_eval)

    b = sub.add_parser("bench", help="run a benchmark script from benchmarks/")
    b.add_argument("which", choices=["sampler", "grpo_step", "salt", "longact"])
    b.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # configuration mistakes: one clear line, no traceback
        print(f"jaxrl-geom: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
