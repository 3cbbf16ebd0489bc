"""Typed run configuration: one frozen dataclass per concern, loadable from YAML/JSON
files with ``a.b=value`` command-line overrides.

Example::

    cfg = load_config("configs/kv.yaml", overrides=["grpo.loss_type=dapo", "steps=40"])
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxrl_geom.rl.step import GrpoConfig
from jaxrl_geom.salt.config import DEFAULT_KEEP_BUDGET_GIB
from jaxrl_geom.salt.reweight import SaltKnobs


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which policy to train: a built-in preset trained from scratch or an HF checkpoint.

    Attributes:
      preset: ``"tiny"`` (built-in config sized for CPU) when ``path`` is empty.
      path: a local Hugging Face checkpoint directory (safetensors) to start from.
      dtype: compute dtype, ``"float32"`` or ``"bfloat16"``.
      hidden_size, num_layers: preset size overrides.
      remat: rematerialize each decoder layer in the backward pass (less memory).
    """

    preset: Literal["tiny"] = "tiny"
    path: str = ""
    dtype: Literal["float32", "bfloat16"] = "float32"
    hidden_size: int = 64
    num_layers: int = 2
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Built-in task name and its keyword arguments (see ``jaxrl_geom.tasks``)."""

    name: str = "arithmetic"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class WarmupConfig:
    """Supervised warm-up on task demonstrations before GRPO."""

    steps: int = 900
    batch_size: int = 64
    learning_rate: float = 3e-3


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.99


@dataclasses.dataclass(frozen=True)
class SaltSpec:
    """SALT options (``jaxrl_geom.salt``); ``enabled=False`` trains plain GRPO.

    ``knobs`` is :class:`jaxrl_geom.salt.SaltKnobs` (``salt.knobs.gamma_max=2``); the
    other fields are those of :class:`jaxrl_geom.salt.SaltConfig`.
    """

    enabled: bool = False
    knobs: SaltKnobs = SaltKnobs()
    scope: str | None = None
    backend: Literal["auto", "ghost", "tiled", "sketch"] = "auto"
    sketch_dim: int = 64
    seed: int = 0
    keep_budget_gib: float = DEFAULT_KEEP_BUDGET_GIB


@dataclasses.dataclass(frozen=True)
class LongActSpec:
    """LongAct options (``jaxrl_geom.longact``); ``enabled=False`` updates all weights."""

    enabled: bool = False
    keep_ratio: float = 0.3
    statistic: Literal["mean_abs", "rms", "max_abs"] = "mean_abs"
    scope: Literal["layer", "head"] = "layer"
    granularity: Literal["channel", "rope_pair"] = "channel"
    refresh: Literal["step", "ema", "fixed"] = "step"


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Device mesh; sizes of -1 take the remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The whole training run. Defaults are the README's main command.

    Attributes:
      steps: GRPO generation rounds.
      prompts_per_step, num_generations: M prompts x G rollouts = N per round.
      num_iterations: optimizer steps per generation batch (TRL's ``num_iterations``).
      scale_rewards: advantage scaling, ``"group"``, ``"batch"`` or ``"none"``.
      dynamic_sampling: DAPO: drop all-equal groups and sample more, up to
        ``max_sampling_tries`` rounds.
      overlong_buffer: DAPO soft overlong punishment buffer (0 = off).
    """

    seed: int = 0
    output_dir: str = "runs/default"
    model: ModelSpec = ModelSpec()
    task: TaskSpec = TaskSpec()
    warmup: WarmupConfig = WarmupConfig()
    sampling: SamplingConfig = SamplingConfig()
    optim: OptimConfig = OptimConfig()
    grpo: GrpoConfig = GrpoConfig()
    salt: SaltSpec = SaltSpec()
    longact: LongActSpec = LongActSpec()
    mesh: MeshSpec = MeshSpec()
    steps: int = 80
    prompts_per_step: int = 16
    num_generations: int = 8
    num_iterations: int = 1
    scale_rewards: Literal["group", "batch", "none"] = "group"
    dynamic_sampling: bool = False
    max_sampling_tries: int = 4
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    eval_every: int = 10
    eval_prompts: int = 128
    checkpoint_every: int = 20

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations={self.num_generations}: group-relative advantages need at "
                "least 2 rollouts per prompt (the group std is undefined for 1)."
            )
        for name in ("steps", "prompts_per_step", "num_iterations", "eval_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("eval_every", "checkpoint_every", "max_sampling_tries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.overlong_buffer < 0 or self.overlong_buffer >= self.sampling.max_new_tokens:
            if self.overlong_buffer != 0:
                raise ValueError(
                    f"overlong_buffer={self.overlong_buffer} must be in [0, max_new_tokens="
                    f"{self.sampling.max_new_tokens}); 0 turns the DAPO punishment off."
                )
        n = self.prompts_per_step * self.num_generations
        if n % self.grpo.num_micro_batches:
            raise ValueError(
                f"grpo.num_micro_batches={self.grpo.num_micro_batches} must divide the "
                f"rollouts per step N = prompts_per_step x num_generations = {n}."
            )


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Turn a parsed YAML value into the dataclass field's type (nested dataclasses too)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}.")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except (ValueError, TypeError):
                continue
        raise ValueError(f"{where}: {value!r} does not match {tp}.")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{where}: {value!r} is not one of {typing.get_args(tp)}.")
        return value
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "5e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if origin is dict and isinstance(value, dict):
        return value
    if tp is Any:
        return value
    raise ValueError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}.")


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys by name."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - fields
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {sorted(unknown)}; valid keys are {sorted(fields)}."
        )
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for JSON metadata and ``--dump-config``)."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"Override {item!r} must look like key.subkey=value.")
        key, raw = item.split("=", 1)
        node = data
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"Override {item!r}: {p!r} is not a section.")
        node[leaf] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Load a :class:`TrainConfig` from an optional YAML/JSON file plus overrides."""
    data: dict[str, Any] = {}
    if path:
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text) if str(path).endswith(".json") else (yaml.safe_load(text) or {})
    data = apply_overrides(data, list(overrides))
    return from_dict(TrainConfig, data)
