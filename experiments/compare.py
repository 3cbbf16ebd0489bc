"""GRPO vs +SALT vs +LongAct vs SALT+LongAct on the built-in tasks, over seeds.

Usage (``docs/RESULTS.md`` has the exact commands behind its table)::

    python experiments/compare.py --out runs/compare --seeds 0 1 2 3 4 [--rounds 40]
    python experiments/compare.py --out runs/gpu --size medium   # or --model-path DIR

Design (issue 12, item 4). For each (task, seed): build the policy (``--size`` preset
from scratch, or ``--model-path``), run the supervised warm-up ONCE, then train every
arm from those same weights with the same example stream (NumPy generator seeded from
the seed) and the same sampling keys (``jax.random.key(seed)`` split per round), at
equal rounds, prompts per round and rollouts per prompt. Every arm uses the library's
defaults (``TrainConfig()``: optimizer, sampling, GRPO loss; ``SaltConfig()``; the
CLI's ``LongActSpec()``); only the plug-ins differ. Held-out reward is greedy decoding
on the run's held-out prompts (``eval_prompts``, drawn as ``jaxrl-geom train`` draws
them and excluded from training).

Reported per (task, arm): final held-out reward, mean and 95% t-interval over seeds;
the paired difference to GRPO on the same seeds (mean and 95% t-interval); wall and
CPU seconds per run; SALT's ``salt/kappa_before``, ``salt/severity``, ``salt/gamma``
and LongAct's ``longact/{q,k}_{concentration,overlap}`` averaged over steps, then
seeds. Outputs in ``--out``: ``results.json`` (rewritten after every run, so a partial
run still has a table), ``results.md`` and ``reward_curves.png`` / ``final_reward.png``.
Compiled functions are reused across seeds: one optimizer object per arm (the
optimizer is a static field of ``TrainState``) and one SALT estimator.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from jaxrl_geom.config import TrainConfig
from jaxrl_geom.loop import (
    build_optimizer,
    build_policy,
    collect_rollouts,
    evaluate_rewards,
    grpo_step,
    held_out_examples,
    host_values,
    sample_examples,
    sampling_method,
    warmup_steps,
)
from jaxrl_geom.rl import TrainState
from jaxrl_geom.salt import SaltConfig, salt_estimator
from jaxrl_geom.tasks import get_task
from jaxrl_geom.tokenizers import CharTokenizer, load_tokenizer

ARMS: dict[str, tuple[bool, bool]] = {  # name -> (SALT, LongAct)
    "grpo": (False, False),
    "salt": (True, False),
    "longact": (False, True),
    "salt+longact": (True, True),
}
SIZES: dict[str, tuple[int, int]] = {  # preset -> (hidden_size, num_layers); tiny = README
    "micro": (32, 1),  # smoke tests only
    "tiny": (64, 2),
    "small": (128, 4),
    "medium": (256, 6),
    "large": (512, 8),
}
TASKS = ("arithmetic", "worked_addition", "kv_retrieval")
# Completion budget per task (EOS included): 2-digit sums; the 2-digit worked addition
# writes 17 characters of work, '#' and up to 3 digits; a 2-digit value.
MAX_NEW_TOKENS = {"arithmetic": 8, "worked_addition": 24, "kv_retrieval": 8}
# Supervised warm-up steps per task (default: the CLI's 900). The 2-digit worked addition
# is solved (held-out reward 1.0) after 900 steps, which leaves GRPO nothing to learn;
# fewer steps start GRPO below the ceiling. Same for every arm.
WARMUP_STEPS = {"worked_addition": 200}
DIAGNOSTICS = (
    "salt/kappa_before",
    "salt/severity",
    "salt/gamma",
    "longact/q_concentration",
    "longact/k_concentration",
    "longact/q_overlap",
    "longact/k_overlap",
)
STEP_KEYS = ("reward/mean", "loss", "grad_norm", "skipped", *DIAGNOSTICS)


# --- statistics -----------------------------------------------------------------------


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: Student-t interval ``mean -+ t_{(1+level)/2, n-1} s / sqrt(n)``
    with ``s`` the sample standard deviation (ddof 1); low = high = nan for n < 2."""
    from scipy import stats  # a dependency of jax

    x = np.asarray(values, np.float64)
    n = x.size
    mean = float(x.mean()) if n else math.nan
    if n < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, arm) present in ``results["runs"]``: final held-out reward
    (mean, 95% CI), paired difference to ``grpo`` on the seeds both have, median wall
    and CPU seconds per run, and each diagnostic averaged over steps then seeds."""
    runs = results["runs"]
    order = [a for a in ARMS if any(r["arm"] == a for r in runs)]
    rows = []
    for task in dict.fromkeys(r["task"] for r in runs):
        by_arm = {
            a: {r["seed"]: r for r in runs if r["task"] == task and r["arm"] == a} for a in order
        }
        base = by_arm.get("grpo", {})
        for arm in order:
            got = by_arm[arm]
            if not got:
                continue
            seeds = sorted(got)
            final = [got[s]["final_reward"] for s in seeds]
            paired = sorted(set(seeds) & set(base))
            diff = [got[s]["final_reward"] - base[s]["final_reward"] for s in paired]
            row = {
                "task": task,
                "arm": arm,
                "seeds": seeds,
                "reward": t_interval(final),
                "diff": t_interval(diff) if arm != "grpo" and diff else None,
                "wall_s": float(np.median([got[s]["wall_s"] for s in seeds])),
                "cpu_s": float(np.median([got[s]["cpu_s"] for s in seeds])),
                "round_s": float(np.median([_steady(got[s]) for s in seeds])),
            }
            for key in DIAGNOSTICS:
                per_seed = [np.mean(got[s]["steps"][key]) for s in seeds if key in got[s]["steps"]]
                row[key] = float(np.mean(per_seed)) if per_seed else None
            kappa = [np.asarray(got[s]["steps"].get("salt/kappa_before", [])) for s in seeds]
            row["kappa_below_1"] = (
                float(np.mean([np.mean(k < 1.0) for k in kappa]))
                if all(k.size for k in kappa)
                else None
            )
            rows.append(row)
    return rows


def _steady(run: dict[str, Any]) -> float:
    """Median seconds per GRPO round after the first (which compiles), evaluation excluded."""
    times = run.get("round_s", [])
    return float(np.median(times[1:] if len(times) > 1 else times or [math.nan]))


def _ci(stat: tuple[float, float, float] | None, signed: bool = False) -> str:
    if stat is None:
        return "-"
    mean, lo, hi = stat
    f = "{:+.3f}" if signed else "{:.3f}"
    if math.isnan(lo):
        return f.format(mean)
    return f"{f.format(mean)} [{f.format(lo)}, {f.format(hi)}]"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def markdown_table(results: dict[str, Any]) -> str:
    """The table of :func:`summarize` in markdown (3 decimals), one line per (task, arm)."""
    head = (
        "| task | arm | seeds | held-out reward, mean [95% CI] | minus GRPO (paired), "
        "mean [95% CI] | wall / CPU s per run | wall s/round | kappa_before | steps kappa<1 "
        "| severity | gamma | q / k concentration | q / k mask overlap |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in summarize(results):
        conc = overlap = "-"
        if r["longact/q_concentration"] is not None:
            conc = f"{r['longact/q_concentration']:.3f} / {r['longact/k_concentration']:.3f}"
            overlap = f"{r['longact/q_overlap']:.3f} / {r['longact/k_overlap']:.3f}"
        cells = [
            r["task"],
            r["arm"],
            str(len(r["seeds"])),
            _ci(r["reward"]),
            _ci(r["diff"], signed=True),
            f"{r['wall_s']:.0f} / {r['cpu_s']:.0f}",
            f"{r['round_s']:.2f}",
            _num(r["salt/kappa_before"]),
            _num(r["kappa_below_1"]),
            _num(r["salt/severity"]),
            _num(r["salt/gamma"]),
            conc,
            overlap,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    warm = results.get("warmup", {})
    notes = []
    for task, per_seed in warm.items():
        vals = [v["eval"]["eval/reward_mean"] for v in per_seed.values()]
        notes.append(f"{task} {_ci(t_interval(vals))}")
    foot = ""
    if notes:
        foot = (
            "\nHeld-out reward after the warm-up (all arms start here): " + "; ".join(notes) + "\n"
        )
    return head + "\n".join(lines) + "\n" + foot


# --- plots ----------------------------------------------------------------------------


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    """``reward_curves.png`` (held-out reward per evaluation round, mean and 95% CI band
    over seeds, one panel per task) and ``final_reward.png`` (final reward per arm, and
    its paired difference to GRPO, with 95% CIs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, rows = results["runs"], summarize(results)
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for arm in ARMS:
            mine = [r for r in runs if r["task"] == task and r["arm"] == arm]
            if not mine:
                continue
            x = mine[0]["eval_rounds"]
            mine = [r for r in mine if r["eval_rounds"] == x]
            stats = [t_interval([r["eval_reward"][i] for r in mine]) for i in range(len(x))]
            mean = np.array([s[0] for s in stats])
            ax.plot(x, mean, marker="o", ms=3, label=f"{arm} (n={len(mine)})")
            if len(mine) > 1:
                ax.fill_between(x, [s[1] for s in stats], [s[2] for s in stats], alpha=0.15)
        ax.set_title(task)
        ax.set_xlabel("GRPO round")
        ax.set_ylabel("held-out reward (greedy)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    curves = out / "reward_curves.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 6.0), squeeze=False)
    for j, task in enumerate(tasks):
        mine = [r for r in rows if r["task"] == task]
        for i, r in enumerate(mine):
            for ax, stat in ((axes[0, j], r["reward"]), (axes[1, j], r["diff"])):
                if stat is None:
                    continue
                mean, lo, hi = stat
                err = None if math.isnan(lo) else [[mean - lo], [hi - mean]]
                ax.errorbar([i], [mean], yerr=err, fmt="o", capsize=4, color=f"C{i}")
        for ax in axes[:, j]:
            ax.set_xticks(range(len(mine)), [r["arm"] for r in mine], rotation=20, fontsize=8)
        axes[0, j].set_title(f"{task}: final reward, 95% CI", fontsize=10)
        axes[1, j].set_title(f"{task}: minus GRPO (paired), 95% CI", fontsize=10)
        axes[1, j].axhline(0.0, color="k", lw=0.8, ls="--")
    fig.tight_layout()
    final = out / "final_reward.png"
    fig.savefig(final, dpi=110)
    plt.close(fig)
    return [curves, final]


# --- the runs -------------------------------------------------------------------------


def run_config(args: argparse.Namespace, seed: int, *, with_longact: bool = False) -> TrainConfig:
    """The library's defaults (``TrainConfig()``) with this run's model, seed, held-out
    count and LongAct switch: the arms differ only in the plug-ins."""
    d = TrainConfig()
    hidden, layers = SIZES[args.size]
    model = dataclasses.replace(
        d.model,
        path=args.model_path,
        hidden_size=hidden,
        num_layers=layers,
        dtype=args.dtype,
        remat=args.remat,
    )
    longact_spec = dataclasses.replace(d.longact, enabled=with_longact)
    return dataclasses.replace(
        d, seed=seed, model=model, longact=longact_spec, eval_prompts=args.eval_prompts
    )


def warmup_steps_of(task_name: str, args: argparse.Namespace) -> int:
    """``--warmup-steps`` if given, else the task's entry in ``WARMUP_STEPS`` or the CLI's."""
    if args.warmup_steps is not None:
        return args.warmup_steps
    return WARMUP_STEPS.get(task_name, TrainConfig().warmup.steps)


def make_task(name: str, args: argparse.Namespace) -> Any:
    return (
        get_task("kv_retrieval", num_pairs=args.kv_pairs)
        if name == "kv_retrieval"
        else get_task(name)
    )


def run_arm(
    warmed: nnx.Module,
    *,
    task: Any,
    task_name: str,
    arm: str,
    seed: int,
    tx: optax.GradientTransformation,
    estimator: Any,
    args: argparse.Namespace,
    defaults: TrainConfig,
    tokenizer: Any,
    eval_examples: list[Any],
    eval_after_warmup: dict[str, float],
) -> dict[str, Any]:
    """GRPO rounds of one arm from the warmed-up policy; its curve and final numbers."""
    use_salt, use_longact = ARMS[arm]
    s = defaults.sampling
    max_new = MAX_NEW_TOKENS.get(task_name, s.max_new_tokens)
    grpo_cfg = dataclasses.replace(
        defaults.grpo, temperature=s.temperature, capture_activations=use_longact
    )
    method = sampling_method(defaults)
    exclude = {e.prompt for e in eval_examples}
    rng = np.random.default_rng([seed, 1])  # the same example stream in every arm
    key = jax.random.key(seed)  # the same sampling keys in every arm
    state = TrainState.create(warmed, tx)  # copies the weights (steps donate them)
    steps: dict[str, list[float]] = {}
    eval_rounds, eval_reward = [0], [eval_after_warmup["eval/reward_mean"]]
    eval_kw = dict(
        examples=eval_examples, tokenizer=tokenizer, reward_fn=task.reward, max_new_tokens=max_new
    )
    t0, c0 = time.perf_counter(), time.process_time()
    round_s = []
    for rnd in range(1, args.rounds + 1):
        tr = time.perf_counter()
        key, sub = jax.random.split(key)
        ro = collect_rollouts(
            (state.graphdef, state.params, state.rest),
            examples=sample_examples(task, rng=rng, n=args.prompts_per_step, exclude=exclude),
            tokenizer=tokenizer,
            reward_fn=task.reward,
            key=sub,
            num_generations=args.group_size,
            max_new_tokens=max_new,
            method=method,
            scale_rewards=defaults.scale_rewards,
        )
        state, metrics = grpo_step(state, ro.batch, grpo_cfg, estimator if use_salt else None)
        row = {**ro.metrics, **host_values(metrics)}
        for k in STEP_KEYS:
            if k in row:
                steps.setdefault(k, []).append(float(row[k]))
        round_s.append(time.perf_counter() - tr)  # rollouts + step (+ compiles in round 1)
        if rnd % args.eval_every == 0 or rnd == args.rounds:
            final = evaluate_rewards(state.model(), **eval_kw)
            eval_rounds.append(rnd)
            eval_reward.append(final["eval/reward_mean"])
    return {
        "task": task_name,
        "arm": arm,
        "seed": seed,
        "eval_rounds": eval_rounds,
        "eval_reward": eval_reward,
        "steps": steps,
        "final_reward": final["eval/reward_mean"],
        "final_accuracy": final["eval/accuracy"],
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
        "round_s": round_s,
    }


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, separators=(",", ":")))
    os.replace(tmp, path)


def write_outputs(results: dict[str, Any], out: Path, plots: bool = True) -> None:
    """``results.json`` and ``results.md`` (and the PNGs) from what has run so far."""
    _write_json(out / "results.json", results)
    (out / "results.md").write_text(markdown_table(results))
    if plots and results["runs"]:
        plot(results, out)


def merge(dirs: Sequence[str]) -> dict[str, Any]:
    """The results of several runs of this script as one (runs and warm-ups concatenated,
    wall and CPU seconds summed; ``parts`` keeps each run's command, args and totals)."""
    parts = [json.loads(Path(d, "results.json").read_text()) for d in dirs]
    merged = {k: v for k, v in parts[0].items() if k not in ("runs", "warmup")}
    merged["parts"] = [{k: p.get(k) for k in ("command", "args", "wall_s", "cpu_s")} for p in parts]
    merged["runs"] = [r for p in parts for r in p["runs"]]
    merged["warmup"] = {}
    for p in parts:
        for task, per_seed in p["warmup"].items():
            merged["warmup"].setdefault(task, {}).update(per_seed)
    merged["wall_s"] = sum(p.get("wall_s", 0.0) for p in parts)
    merged["cpu_s"] = sum(p.get("cpu_s", 0.0) for p in parts)
    return merged


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model preset")
    p.add_argument("--model-path", default="", help="local HF checkpoint (overrides --size)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=d.model.dtype)
    p.add_argument("--remat", action="store_true", help="rematerialize layers (less memory)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--rounds", type=int, default=d.steps, help="GRPO rounds per arm")
    p.add_argument("--prompts-per-step", type=int, default=d.prompts_per_step)
    p.add_argument("--group-size", type=int, default=d.num_generations)
    p.add_argument("--eval-prompts", type=int, default=d.eval_prompts)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help=f"supervised steps before GRPO (default per task: {WARMUP_STEPS}, else "
        f"{d.warmup.steps})",
    )
    p.add_argument("--warmup-batch", type=int, default=d.warmup.batch_size)
    p.add_argument("--kv-pairs", type=int, default=4, help="kv_retrieval num_pairs")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the table and PNGs from OUT/results.json",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        default=[],
        metavar="DIR",
        help="with --report-only: combine the results.json of these runs (e.g. seeds run in "
        "separate processes) into OUT",
    )
    args = p.parse_args(argv)
    if "grpo" not in args.arms:
        p.error("--arms must include grpo (the paired differences are taken against it)")
    for name in ("rounds", "prompts_per_step", "group_size", "eval_prompts", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.group_size < 2:
        p.error("--group-size must be >= 2 (group advantages)")
    if args.model_path and not Path(args.model_path, "config.json").is_file():
        p.error(f"--model-path {args.model_path}: no config.json there (a local HF checkpoint)")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the comparison; returns the results dict also written to ``--out``."""
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = (
            merge(args.merge) if args.merge else json.loads((out / "results.json").read_text())
        )
        write_outputs(results, out, plots=not args.no_plots)
        print(markdown_table(results))
        return results
    defaults = TrainConfig()
    tokenizer = load_tokenizer(args.model_path) if args.model_path else CharTokenizer()
    sft_tx = optax.adamw(defaults.warmup.learning_rate, b1=0.9, b2=0.99)  # as the CLI
    estimator = salt_estimator(SaltConfig())
    txs: dict[str, optax.GradientTransformation] = {}
    results: dict[str, Any] = {
        "command": " ".join(
            [os.path.basename(sys.argv[0]) or "compare.py", *(argv or sys.argv[1:])]
        ),
        "args": vars(args),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
            "devices": [str(dev) for dev in jax.devices()],
        },
        "defaults": {
            "optim": dataclasses.asdict(defaults.optim),
            "sampling": dataclasses.asdict(defaults.sampling),
            "grpo": dataclasses.asdict(defaults.grpo),
            "longact": dataclasses.asdict(defaults.longact),
            "salt": repr(SaltConfig()),
            "max_new_tokens": MAX_NEW_TOKENS,
        },
        "warmup": {},
        "runs": [],
    }
    t_start, c_start = time.perf_counter(), time.process_time()
    for seed in args.seeds:  # seed-major: a partial run has every task at fewer seeds
        for task_name in args.tasks:
            task = make_task(task_name, args)
            max_new = MAX_NEW_TOKENS[task_name]
            eval_examples = held_out_examples(run_config(args, seed), task=task)
            exclude = {e.prompt for e in eval_examples}
            policy = build_policy(run_config(args, seed), tokenizer=tokenizer)
            t0 = time.perf_counter()
            sft = TrainState.create(policy, sft_tx)
            rng = np.random.default_rng(seed)
            batches = (
                sample_examples(task, rng=rng, n=args.warmup_batch, exclude=exclude)
                for _ in range(warmup_steps_of(task_name, args))
            )
            sft, sft_metrics = warmup_steps(
                sft, batches=batches, task=task, tokenizer=tokenizer, max_new_tokens=max_new
            )
            warmed = sft.model()
            after = evaluate_rewards(
                warmed,
                examples=eval_examples,
                tokenizer=tokenizer,
                reward_fn=task.reward,
                max_new_tokens=max_new,
            )
            results["warmup"].setdefault(task_name, {})[str(seed)] = {
                "eval": after,
                "sft": sft_metrics,
                "steps": warmup_steps_of(task_name, args),
                "wall_s": time.perf_counter() - t0,
            }
            print(
                f"[{seed}] {task_name}: after warm-up {after['eval/reward_mean']:.3f}", flush=True
            )
            for arm in args.arms:
                if arm not in txs:
                    cfg = run_config(args, seed, with_longact=ARMS[arm][1])
                    txs[arm] = build_optimizer(cfg, model_config=warmed.config)
                run = run_arm(
                    warmed,
                    task=task,
                    task_name=task_name,
                    arm=arm,
                    seed=seed,
                    tx=txs[arm],
                    estimator=estimator,
                    args=args,
                    defaults=defaults,
                    tokenizer=tokenizer,
                    eval_examples=eval_examples,
                    eval_after_warmup=after,
                )
                results["runs"].append(run)
                results["wall_s"] = time.perf_counter() - t_start
                results["cpu_s"] = time.process_time() - c_start
                write_outputs(results, out, plots=False)
                steady = _steady(run)
                print(
                    f"[{seed}] {task_name} {arm}: final {run['final_reward']:.3f} "
                    f"({run['wall_s']:.1f} s, {steady:.3f} s per round after the first)",
                    flush=True,
                )
    write_outputs(results, out, plots=not args.no_plots)
    print(markdown_table(results))
    return results


if __name__ == "__main__":
    main()
