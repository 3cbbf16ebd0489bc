"""Typed run configuration: one frozen dataclass per concern (the schema), loaded with
OmegaConf from YAML/JSON files and ``key.sub=value`` overrides, as Hydra/verl users know.

Example::

    cfg = load_config("configs/kv.yaml", overrides=["grpo.loss_type=dapo", "steps=40"])

Every option is checked when its dataclass is built (``__post_init__``), so a config
that loads is a config the trainer accepts; errors name the option and the fix.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jaxrl_geom.rl.step import GrpoConfig
from jaxrl_geom.salt.config import DEFAULT_KEEP_BUDGET_GIB
from jaxrl_geom.salt.reweight import SaltKnobs


def _require(ok: bool, option: str, value: Any, rule: str) -> None:
    """Raise ``ValueError("option=value: rule")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{option}={value!r}: {rule}")


def _positive(option: str, value: float) -> None:
    _require(math.isfinite(value) and value > 0, option, value, "must be a finite number > 0.")


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

    def __post_init__(self) -> None:
        h = self.hidden_size
        _require(
            h >= 8 and h % 8 == 0,
            "model.hidden_size",
            h,
            "must be a positive multiple of 8 (the tiny preset has 4 heads of even size).",
        )
        _require(self.num_layers >= 1, "model.num_layers", self.num_layers, "must be >= 1.")
        if self.path:
            p = Path(self.path)
            _require(
                p.is_dir() and (p / "config.json").is_file(),
                "model.path",
                self.path,
                "must be a local Hugging Face checkpoint directory holding config.json and "
                "*.safetensors (download it first; the trainer never fetches from a hub).",
            )


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

    def __post_init__(self) -> None:
        _require(self.steps >= 0, "warmup.steps", self.steps, "must be >= 0 (0 skips it).")
        _require(self.batch_size >= 1, "warmup.batch_size", self.batch_size, "must be >= 1.")
        _positive("warmup.learning_rate", self.learning_rate)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        m = self.max_new_tokens
        _require(m >= 1, "sampling.max_new_tokens", m, "must be >= 1.")
        _positive("sampling.temperature", self.temperature)
        k, p = self.top_k, self.top_p
        _require(k is None or k >= 1, "sampling.top_k", k, "must be >= 1, or null (off).")
        _require(p is None or 0 < p <= 1, "sampling.top_p", p, "must be in (0, 1], or null (off).")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.99

    def __post_init__(self) -> None:
        _positive("optim.learning_rate", self.learning_rate)
        _positive("optim.max_grad_norm", self.max_grad_norm)
        wd = self.weight_decay
        _require(math.isfinite(wd) and wd >= 0, "optim.weight_decay", wd, "must be >= 0.")
        for name in ("b1", "b2"):
            b = getattr(self, name)
            _require(0 <= b < 1, f"optim.{name}", b, "must be in [0, 1).")


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

    def __post_init__(self) -> None:
        r = self.keep_ratio
        _require(0 < r <= 1, "longact.keep_ratio", r, "must be in (0, 1] (fraction kept).")


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Device mesh; sizes of -1 take the remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = dataclasses.asdict(self)
        for name, size in sizes.items():
            _require(size >= 1 or size == -1, f"mesh.{name}", size, "must be >= 1, or -1.")
        _require(
            list(sizes.values()).count(-1) <= 1,
            "mesh",
            sizes,
            "at most one size may be -1 (= the remaining devices).",
        )


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
      max_consecutive_skips: stop the run after this many consecutive GRPO steps
        skipped for a non-finite loss, gradient or update.
      checkpoints_to_keep: how many of the latest checkpoints stay on disk.
      log_rollouts: write every rollout of each GRPO round (completion tokens, reward,
        advantage, sampler log-prob sum) to ``rollouts/round_<n>.jsonl``.
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
    checkpoints_to_keep: int = 3
    max_consecutive_skips: int = 10
    log_rollouts: bool = False

    def __post_init__(self) -> None:
        _require(self.seed >= 0, "seed", self.seed, "must be >= 0 (NumPy and JAX seeds).")
        _require(bool(self.output_dir), "output_dir", self.output_dir, "must name a directory.")
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations={self.num_generations}: group-relative advantages need at "
                "least 2 rollouts per prompt (the group std is undefined for 1)."
            )
        for name in ("steps", "prompts_per_step", "num_iterations", "eval_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 1.")
        for name in (
            "eval_every",
            "checkpoint_every",
            "max_sampling_tries",
            "checkpoints_to_keep",
            "max_consecutive_skips",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 1.")
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


# --- Loading: OmegaConf over a mirror of the dataclasses --------------------------------
# OmegaConf 2.3 has no ``Literal`` and wants mutable dataclasses, so each schema class is
# mirrored once: ``Literal[...]`` becomes an Enum (OmegaConf checks the choice and lists
# the valid ones), ``X | None`` becomes ``Optional[X]``, tuples become lists. OmegaConf
# then does the parsing, type conversion, unknown-key and merge work; the frozen
# dataclasses are built from its plain-dict result and run their own checks.


def _mirror_type(tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _mirror(tp)
    if origin is Literal:
        return enum.Enum(where.replace(".", "_"), {str(a): a for a in args})
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = _mirror_type(rest[0], where) if len(rest) == 1 else Any
        return Optional[inner] if type(None) in args else inner  # noqa: UP045
    if origin is tuple:
        return list[_mirror_type(args[0], where)] if args else list[Any]
    return tp


_MIRRORS: dict[type, type] = {}


def _mirror(cls: type) -> type:
    """A mutable dataclass OmegaConf accepts, with the fields and defaults of ``cls``."""
    if cls not in _MIRRORS:
        hints = typing.get_type_hints(cls)
        fields = []
        for f in dataclasses.fields(cls):
            tp = _mirror_type(hints[f.name], f"{cls.__name__}.{f.name}")
            default = (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            )
            fields.append((f.name, tp, dataclasses.field(default_factory=_factory(default))))
        _MIRRORS[cls] = dataclasses.make_dataclass(cls.__name__, fields)
    return _MIRRORS[cls]


def _factory(default: Any) -> Any:
    if dataclasses.is_dataclass(default):
        return lambda: _mirror(type(default))(
            **{k: _factory(getattr(default, k))() for k in _field_names(type(default))}
        )
    if isinstance(default, tuple):
        return lambda: list(default)
    if isinstance(default, dict | list):
        return lambda: type(default)(default)
    return lambda: default


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _is_tuple_type(tp: Any) -> bool:
    return any(c is tuple or typing.get_origin(c) is tuple for c in (tp, *typing.get_args(tp)))


def _build(cls: type, data: dict[str, Any]) -> Any:
    """The frozen dataclass ``cls`` from OmegaConf's plain dict (enums already strings)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            try:
                value = _build(tp, value)
            except ValueError as err:  # name the section: "eps_low ..." -> "grpo.eps_low ..."
                msg = str(err)
                raise ValueError(msg if msg.startswith(f"{name}.") else f"{name}.{msg}") from None
        elif isinstance(value, list) and _is_tuple_type(tp):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _one_line(err: OmegaConfBaseException, cls: type) -> str:
    """OmegaConf's message (first line) with the full key, and the valid keys if unknown."""
    msg = str(err).splitlines()[0].strip() if str(err) else type(err).__name__
    key = getattr(err, "full_key", None) or ""
    if key and key not in msg:
        msg = f"{key}: {msg}"
    if "not in" in msg and key:
        section = cls
        for part in key.split(".")[:-1]:
            section = typing.get_type_hints(section).get(part) if section else None
        if dataclasses.is_dataclass(section):
            msg += f"; valid keys: {', '.join(_field_names(section))}"
    return msg


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass ``cls`` from a nested mapping (or DictConfig) through its schema.

    Unknown keys, wrong types and values outside a ``Literal`` raise ``ValueError``
    naming the key; the dataclasses' own checks then run.
    """
    return _resolve(cls, [data], where)


def _check_sections(cls: type, data: Any, prefix: str = "") -> None:
    """A section (nested dataclass) given as a scalar: name it instead of a merge error."""
    if not isinstance(data, dict):
        return
    hints = typing.get_type_hints(cls)
    for key in data:
        tp = hints.get(str(key))
        if tp is None or not dataclasses.is_dataclass(tp):
            continue
        value = data[key]
        if isinstance(value, dict):
            _check_sections(tp, value, f"{prefix}{key}.")
        else:
            raise ValueError(
                f"{prefix}{key}: is a section of options ({', '.join(_field_names(tp)[:4])}, ...), "
                f"not the value {value!r}; write e.g. {prefix}{key}.{_field_names(tp)[0]}=..."
            )


def _resolve(cls: type, layers: list[Any], where: str) -> Any:
    for layer in layers:
        plain = OmegaConf.to_container(layer) if isinstance(layer, DictConfig) else layer
        _check_sections(cls, plain)
    try:
        schema = OmegaConf.structured(_mirror(cls))
        merged = OmegaConf.merge(schema, *layers)
        plain = OmegaConf.to_container(merged, resolve=True, enum_to_str=True)
    except OmegaConfBaseException as err:
        raise ValueError(f"{where}: {_one_line(err, cls)}") from None
    try:
        return _build(cls, plain)
    except TypeError as err:  # e.g. None where a number is needed
        raise ValueError(f"{where}: {err}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for JSON metadata and ``--dump-config``)."""
    return dataclasses.asdict(cfg)


def read_config_file(path: str | Path) -> DictConfig:
    """A YAML or JSON file of options, checked to be a mapping; errors name the file."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"config file {p} does not exist; check the --config path.")
    if not p.is_file():
        raise ValueError(f"config file {p} is not a file; pass the path of a .yaml or .json file.")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))  # only to see the top-level type
        data = OmegaConf.load(p)  # OmegaConf's YAML rules (e.g. 5e-4 is a float)
    except Exception as err:  # yaml.YAMLError, UnicodeDecodeError: say where, no traceback
        first = " ".join(str(err).split())[:200] or type(err).__name__
        raise ValueError(f"config file {p} is not valid YAML/JSON: {first}") from None
    if raw is None:
        return OmegaConf.create({})
    if not isinstance(raw, dict) or not isinstance(data, DictConfig):
        raise ValueError(
            f"config file {p} must hold a mapping of options (e.g. 'steps: 40'), "
            f"not a {type(raw).__name__}."
        )
    return data


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> DictConfig:
    """``key.sub=value`` overrides (values parsed as YAML), as OmegaConf's dotlist."""
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ValueError(f"override {item!r} must look like key.sub=value (e.g. steps=40).")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ValueError(f"overrides: {_one_line(err, TrainConfig)}") from None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    base: dict[str, Any] | None = None,
) -> TrainConfig:
    """A :class:`TrainConfig` from defaults < ``base`` dict < file ``path`` < overrides."""
    layers: list[Any] = []
    if base is not None:
        layers.append(base)
    if path:
        layers.append(read_config_file(path))
    layers.append(parse_overrides(list(overrides)))
    return _resolve(TrainConfig, layers, "config")


def load_run_config(
    run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """The config of the run in ``run_dir`` (its ``config.json``) plus overrides.

    ``output_dir`` is always ``run_dir`` made absolute, whatever the file says, so a
    copied run directory is resumed or evaluated in the copy, from any working directory.
    """
    run_dir = Path(os.path.abspath(run_dir))
    if not run_dir.is_dir():
        what = "is not a directory" if run_dir.exists() else "does not exist"
        raise ValueError(f"run directory {run_dir} {what}; pass the output_dir of a run.")
    path = run_dir / "config.json"
    if not path.is_file():
        raise ValueError(
            f"{run_dir} is not a run directory (no config.json); pass the output_dir of a "
            "run started with 'jaxrl-geom train'."
        )
    for item in overrides:
        if item.split("=", 1)[0].strip() == "output_dir":
            raise ValueError(
                f"override {item!r}: a resumed run stays in its directory {run_dir}; copy the "
                "directory and resume the copy to continue elsewhere."
            )
    cfg = load_config(path, overrides)
    return dataclasses.replace(cfg, output_dir=str(run_dir))
