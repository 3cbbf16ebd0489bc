"""The task interface: prompts, a demonstration, and a verifiable reward.

A task is host-side Python. The trainer samples prompts, the sampler decodes
completions, and the reward is computed on decoded text outside ``jit`` (as
verifiable rewards are; DeepSeekMath, arXiv:2402.03300; DAPO, arXiv:2503.14476)::

    examples = task.sample_prompts(rng, n)           # list[Example]
    target = task.demonstration(examples[0])          # completion text, EOS not included
    r = task.reward(completion_text, examples[0])     # float in [0, 1]

Tasks register themselves by name with :func:`register_task`; :func:`get_task`
builds one from a name and keyword arguments (what ``TaskSpec`` in the config holds).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import numpy as np


@dataclasses.dataclass(frozen=True)
class Example:
    """One prompt with its reference answer.

    Attributes:
      prompt: text fed to the model (the tokenizer adds BOS).
      answer: the reference the reward checks against (e.g. ``"42"``).
      solution: optional worked solution used for the demonstration (GSM8K);
        empty for tasks whose demonstration is the answer itself.
    """

    prompt: str
    answer: str
    solution: str = ""


class Task(abc.ABC):
    """Base class of the built-in tasks (subclasses are frozen dataclasses).

    Subclasses set ``name`` and implement :meth:`sample_prompts` and :meth:`reward`;
    :meth:`demonstration` defaults to the answer.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def sample_prompts(self, rng: np.random.Generator, n: int) -> list[Example]:
        """``n`` examples drawn with ``rng`` (deterministic given its state)."""

    def demonstration(self, example: Example) -> str:
        """Completion text for supervised warm-up; the trainer appends EOS after it."""
        return example.answer

    @abc.abstractmethod
    def reward(self, completion: str, example: Example) -> float:
        """Verifiable reward of the decoded ``completion`` (specials removed), in [0, 1]."""


def first_line(text: str) -> str:
    """The answer span of a short completion: its first non-blank line, stripped."""
    return text.strip().split("\n", 1)[0].strip()


def check_count(n: int) -> None:
    """Validate the ``n`` argument of ``sample_prompts``."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"sample_prompts needs a non-negative int n, got {n!r}.")


_TASKS: dict[str, type[Task]] = {}

T = TypeVar("T", bound=type[Task])


def register_task(name: str) -> Callable[[T], T]:
    """Class decorator adding a :class:`Task` subclass to the registry under ``name``."""

    def add(cls: T) -> T:
        if name in _TASKS and _TASKS[name] is not cls:
            raise ValueError(f"Task name {name!r} is already registered; pick another name.")
        cls.name = name
        _TASKS[name] = cls
        return cls

    return add


def task_names() -> list[str]:
    """Names :func:`get_task` accepts."""
    import jaxrl_geom.tasks  # noqa: F401  (registers the built-in tasks)

    return sorted(_TASKS)


def get_task(name: str, **kwargs: Any) -> Task:
    """Build the task registered as ``name`` with its keyword arguments.

    Example::

        task = get_task("kv_retrieval", num_pairs=8)
    """
    names = task_names()
    if name not in _TASKS:
        raise ValueError(f"Unknown task {name!r}; choose one of {names}.")
    cls = _TASKS[name]
    fields = (
        [f.name for f in dataclasses.fields(cls) if f.init] if dataclasses.is_dataclass(cls) else []
    )
    unknown = sorted(set(kwargs) - set(fields)) if fields else []
    if unknown:
        raise ValueError(f"Task {name!r} has no arguments {unknown}; it accepts {fields}.")
    try:
        return cls(**kwargs)
    except TypeError as e:  # e.g. a required argument is missing
        raise ValueError(
            f"Cannot build task {name!r} from {kwargs}: {e}. It accepts {fields}."
        ) from e
