"""Command line: ``jaxrl-geom train | eval | bench``.

Configs are YAML/JSON files (``--config``) plus ``key.sub=value`` overrides (OmegaConf
dotlist, as in Hydra/verl)::

    jaxrl-geom train                                   # the built-in default
    jaxrl-geom train --config my.yaml grpo.loss_type=dapo steps=100
    jaxrl-geom train --resume runs/default steps=160   # continue in runs/default
    jaxrl-geom eval runs/default --prompts 256         # score a checkpoint on held-out prompts

Mistakes in the command, config or run directory end in one line on stderr and exit
code 2, before any work; a run that has to stop (a checkpoint cannot be saved, too many
skipped steps) ends in one line and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(f"{message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _train(args: argparse.Namespace) -> int:
    from jaxrl_geom import distributed

    distributed.initialize_from_args(args)  # first: before anything touches a device
    from jaxrl_geom.config import load_config, load_run_config, to_dict

    if args.resume:
        if args.config:
            raise ValueError(
                f"--config cannot be combined with --resume: the run's config is "
                f"{Path(args.resume) / 'config.json'}; pass changes as key=value overrides."
            )
        if args.overwrite:
            raise ValueError(
                "--overwrite cannot be combined with --resume (it would clear the run)."
            )
        cfg = load_run_config(args.resume, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    if args.dump_config:
        print(json.dumps(to_dict(cfg), indent=2, default=str))
        return 0

    from jaxrl_geom.train import train

    result = train(
        cfg, resume=bool(args.resume), overwrite=args.overwrite, progress=not args.no_progress
    )
    if not distributed.is_main_process():
        return 0  # process 0 reports for all
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
    import dataclasses

    from jaxrl_geom.loop import held_out_examples
    from jaxrl_geom.train import evaluate, load_run

    policy, run = load_run(args.run_dir)
    held_out = run.cfg.eval_prompts
    n = held_out if args.prompts is None else args.prompts
    if n > held_out:
        raise ValueError(
            f"--prompts {n}: the run held out only eval_prompts={held_out} prompts (every "
            f"other prompt may have been trained on); pass --prompts <= {held_out}, or train "
            "with a larger eval_prompts."
        )
    cfg = dataclasses.replace(run.cfg, eval_prompts=n)
    print(json.dumps(evaluate(policy, run, held_out_examples(cfg, task=run.task)), indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import runpy

    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"bench_{args.which}.py"
    if not script.exists():
        raise ValueError(
            f"No benchmark {args.which!r}: expected {script} (run from a source checkout)."
        )
    sys.argv = [str(script)]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxrl-geom", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="warm-up + GRPO (with optional SALT / LongAct)")
    t.add_argument("--config", help="YAML or JSON config file (not with --resume)")
    t.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR from its newest checkpoint (its config.json + overrides)",
    )
    t.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    t.add_argument("--dump-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. grpo.beta=0.04")
    from jaxrl_geom.distributed import add_arguments

    add_arguments(t)
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="score a run's latest checkpoint on held-out prompts")
    e.add_argument("run_dir")
    e.add_argument(
        "--prompts",
        type=_positive_int,
        default=None,
        help="score the first N of the run's held-out prompts (default: all eval_prompts)",
    )
    e.set_defaults(func=_eval)

    b = sub.add_parser("bench", help="run a benchmark script from benchmarks/")
    b.add_argument("which", choices=["sampler", "grpo_step", "salt", "longact"])
    b.set_defaults(func=_bench)
    return parser


def _say(kind: str, err: BaseException) -> None:
    text = " ".join(str(err).split()) or type(err).__name__
    print(f"jaxrl-geom: {kind}: {text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (2: bad input, 1: the run stopped)."""
    from jaxrl_geom.checkpoints import CheckpointError
    from jaxrl_geom.train import TrainingHalted

    try:
        args, extra = build_parser().parse_known_args(argv)
        if args.command == "train":  # overrides may come after options too
            flags = [e for e in extra if e.startswith("-")]
            args.overrides, extra = [*args.overrides, *(e for e in extra if e not in flags)], flags
        if extra:
            raise ValueError(f"unrecognized arguments: {' '.join(extra)} (see 'jaxrl-geom --help')")
        return args.func(args)
    except SystemExit as err:  # --help
        return int(err.code or 0)
    except (CheckpointError, TrainingHalted) as err:  # the run had to stop: say why, once
        _say("error", err)
        return 1
    except (ValueError, OSError) as err:  # bad command, config, file or run directory
        _say("error", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
