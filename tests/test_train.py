"""The main job end to end: CLI train -> metrics/checkpoints/PNG -> resume -> eval."""

import json

from jaxrl_geom import cli
from jaxrl_geom.config import TrainConfig, load_config, to_dict
from jaxrl_geom.metrics import read_jsonl

TINY = [
    "model.hidden_size=32",
    "model.num_layers=1",
    "warmup.steps=3",
    "warmup.batch_size=8",
    "prompts_per_step=2",
    "num_generations=4",
    "eval_prompts=8",
    "eval_every=1",
    "checkpoint_every=1",
    "task.kwargs={num_digits: 1}",
]


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("grpo:\n  loss_type: dapo\n  eps_high: 0.28\nsteps: 7\n")
    cfg = load_config(path, ["grpo.beta=0.04", "sampling.top_p=0.9", "optim.learning_rate=5e-4"])
    assert cfg.optim.learning_rate == 5e-4
    assert isinstance(cfg, TrainConfig)
    assert (cfg.grpo.loss_type, cfg.grpo.eps_high, cfg.grpo.beta) == ("dapo", 0.28, 0.04)
    assert cfg.steps == 7 and cfg.sampling.top_p == 0.9


def test_overrides_win_over_the_file_and_json_round_trips(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("steps: 7\nsampling: {top_k: 5}\n")
    cfg = load_config(path, ["steps=9", "sampling.top_k=null", "task.kwargs={num_digits: 1}"])
    assert (cfg.steps, cfg.sampling.top_k, cfg.task.kwargs) == (9, None, {"num_digits": 1})
    dumped = tmp_path / "dump.json"
    dumped.write_text(json.dumps(to_dict(cfg)))
    assert load_config(dumped) == cfg  # --dump-config output is a valid config file


def test_train_resume_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--no-progress", f"output_dir={out}", "steps=2", *TINY]) == 0
    records = read_jsonl(out / "metrics.jsonl")
    steps = [r["step"] for r in records if "reward/mean" in r]
    assert steps == [1, 2]
    for r in records:
        if "loss" in r:
            assert all(map(lambda v: v == v, r.values()))  # no NaN
    assert (out / "reward_curve.png").stat().st_size > 1000
    assert any((out / "tensorboard").iterdir())
    assert (out / "checkpoints" / "2").exists()

    # Resume for two more rounds: continues at round 3, does not redo the warm-up.
    assert cli.main(["train", "--no-progress", "--resume", str(out), "steps=4"]) == 0
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if "reward/mean" in r] == [1, 2, 3, 4]
    assert "resumed" in capsys.readouterr().out

    assert cli.main(["eval", str(out), "--prompts", "8"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert 0.0 <= scores["eval/reward_mean"] <= 1.0
    # Only the run's own held-out prompts are held out: more is a one-line error.
    assert cli.main(["eval", str(out), "--prompts", "9"]) == 2
    err = capsys.readouterr().err
    assert "--prompts 9" in err and "eval_prompts=8" in err


def test_train_with_salt_longact_dapo(tmp_path):
    """The main job with every option on: DAPO loss + dynamic sampling + overlong
    punishment, SALT (ghost Gram) and LongAct (last link of the chain)."""
    out = tmp_path / "run"
    args = [
        "train",
        "--no-progress",
        f"output_dir={out}",
        "steps=1",
        *TINY,
        "grpo.loss_type=dapo",
        "grpo.eps_high=0.28",
        "dynamic_sampling=true",
        "max_sampling_tries=2",
        "overlong_buffer=2",
        "salt.enabled=true",
        "longact.enabled=true",
    ]
    assert cli.main(args) == 0
    (row,) = [r for r in read_jsonl(out / "metrics.jsonl") if "reward/mean" in r]
    for key in (
        "salt/kappa_before",
        "salt/gamma",
        "longact/q_selected_fraction",
        "dynamic_sampling/tries",
        "dynamic_sampling/filled_fraction",
    ):
        assert key in row, key
    assert 1.0 <= row["dynamic_sampling/tries"] <= 2.0
