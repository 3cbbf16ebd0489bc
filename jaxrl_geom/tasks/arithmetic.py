"""Multi-digit integer arithmetic: ``a+b=``, optionally ``-`` and ``*``.

Prompt format: the two operands and the operator, then ``=`` (``"37+58="``); the
answer is the exact integer result in decimal (``"95"``; subtraction may give
``"-21"``). Operands are uniform on ``[0, 10**num_digits)``.

Reward: 1.0 when the first line of the completion, stripped, is exactly the
answer's integer (leading ``+`` or zeros are not accepted: the model should write
the canonical form it was shown), else 0.0. With ``partial_credit=True`` a wrong
integer earns the fraction of answer digits it gets right, aligned from the units
digit, scaled by ``partial_scale`` (< 1, so only an exact answer scores 1):

.. math::
    r = s \\cdot \\frac{\\#\\{j : \\hat y_{-j} = y_{-j}\\}}{\\max(|\\hat y|, |y|)}

where :math:`y_{-j}` is the j-th character from the right and :math:`|y|` the
length (sign included).

Measured on CPU for the default, 2-digit addition (from scratch, hidden 128, 4
layers, supervised warm-up only, batch 64, adamw lr 3e-3, one seed; teacher-forced
exact accuracy on 256 held-out prompts): 0.016 after 200 steps, 0.055 after 300,
0.11 after 500 (loss 1.43 -> 0.80). At 0.1 accuracy a group of 8 rollouts holds a
correct one about half the time, enough signal for GRPO; use ``num_digits=1`` for a
faster start.
"""

from __future__ import annotations

import dataclasses
import operator
import re

import numpy as np

from jaxrl_geom.tasks.base import Example, Task, check_count, first_line, register_task

_OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_INTEGER = re.compile(r"-?\d+")


@register_task("arithmetic")
@dataclasses.dataclass(frozen=True)
class ArithmeticTask(Task):
    """``a <op> b =`` with uniform ``num_digits``-digit operands.

    Attributes:
      num_digits: operands are uniform on ``[0, 10**num_digits)``.
      operations: operators drawn uniformly per prompt, from ``"+"``, ``"-"``, ``"*"``.
      partial_credit: give digit-level partial credit to wrong answers (off by default).
      partial_scale: the most a wrong answer can earn with ``partial_credit``.
    """

    num_digits: int = 2
    operations: tuple[str, ...] = ("+",)
    partial_credit: bool = False
    partial_scale: float = 0.5

    def __post_init__(self):
        if not 1 <= self.num_digits <= 18:
            raise ValueError(f"num_digits must be in [1, 18], got {self.num_digits}.")
        ops = (self.operations,) if isinstance(self.operations, str) else tuple(self.operations)
        bad = [op for op in ops if op not in _OPERATORS]
        if not ops or bad:
            raise ValueError(
                f"operations={self.operations!r} must be a non-empty subset of "
                f"{sorted(_OPERATORS)}; unknown: {bad}."
            )
        object.__setattr__(self, "operations", ops)  # lists from config files -> tuple
        if not 0.0 <= self.partial_scale < 1.0:
            raise ValueError(
                f"partial_scale must be in [0, 1) so only exact answers score 1, "
                f"got {self.partial_scale}."
            )

    def sample_prompts(self, rng: np.random.Generator, n: int) -> list[Example]:
        check_count(n)
        high = 10**self.num_digits
        a = rng.integers(0, high, size=n)
        b = rng.integers(0, high, size=n)
        ops = rng.integers(0, len(self.operations), size=n)
        examples = []
        for x, y, k in zip(a.tolist(), b.tolist(), ops.tolist(), strict=True):
            op = self.operations[k]
            examples.append(Example(prompt=f"{x}{op}{y}=", answer=str(_OPERATORS[op](x, y))))
        return examples

    def reward(self, completion: str, example: Example) -> float:
        guess = first_line(completion)
        if guess == example.answer:
            return 1.0
        if not self.partial_credit or not _INTEGER.fullmatch(guess):
            return 0.0
        target = example.answer
        matches = sum(g == t for g, t in zip(reversed(guess), reversed(target), strict=False))
        return self.partial_scale * matches / max(len(guess), len(target))
