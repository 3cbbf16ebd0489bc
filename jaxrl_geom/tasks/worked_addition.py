"""Multi-digit addition with the work written out before the answer.

Why this task: SALT's premise is signed cancellation between rollouts' gradients
(``kappa < 1``, SPEC section 2). With a 3-4-token answer (``arithmetic``) correct and
wrong rollouts push different tokens; here every rollout of a prompt first writes the
same long scratchpad (digit pairs, carries, partial sums), so correct (``A > 0``) and
wrong (``A < 0``) rollouts share long stretches of tokens whose gradients can cancel.

Prompt: ``"{a}+{b}="`` with ``a, b`` uniform on ``[0, 10**num_digits)``. Completion
(the demonstration): one step per digit from the units up, the operands' digits
zero-padded to ``num_digits``, then ``#`` and the sum::

    47+85=  ->  7+5+0=12;4+8+1=13#132

Step ``j`` reads ``x_j + y_j + c_j = s_j`` with ``c_0 = 0``, ``s_j`` written with two
digits and ``c_{j+1}`` its tens digit; the answer is ``a + b`` in canonical decimal.
A completion has ``9 * num_digits - 1 + 1 + len(str(a + b))`` characters.

Reward: 1.0 when the first line of the completion has a ``#`` and the text after the
first ``#``, stripped, is exactly ``str(a + b)``; else 0.0. Only the answer is verified
(the work is the model's own, like reasoning before a final answer); with
``check_work=True`` the work before ``#`` must also equal the demonstration's.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxrl_geom.tasks.base import Example, Task, check_count, first_line, register_task

ANSWER_MARK = "#"


def addition_work(a: int, b: int, num_digits: int) -> str:
    """The scratchpad of ``a + b``: ``"x+y+c=ss;"`` per digit from the units up, no
    trailing ``;`` (``addition_work(47, 85, 2) == "7+5+0=12;4+8+1=13"``)."""
    steps, carry = [], 0
    for j in range(num_digits):
        x, y = (a // 10**j) % 10, (b // 10**j) % 10
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s:02d}")
        carry = s // 10
    return ";".join(steps)


@register_task("worked_addition")
@dataclasses.dataclass(frozen=True)
class WorkedAdditionTask(Task):
    """``a+b=`` answered with the digit-by-digit work before ``#`` and the sum.

    Attributes:
      num_digits: operands are uniform on ``[0, 10**num_digits)`` (1..9).
      check_work: also require the work before ``#`` to be exactly right.
    """

    num_digits: int = 2
    check_work: bool = False

    def __post_init__(self):
        if isinstance(self.num_digits, bool) or not 1 <= int(self.num_digits) <= 9:
            raise ValueError(f"num_digits must be an int in [1, 9], got {self.num_digits!r}.")

    def sample_prompts(self, rng: np.random.Generator, n: int) -> list[Example]:
        check_count(n)
        high = 10**self.num_digits
        a = rng.integers(0, high, size=n).tolist()
        b = rng.integers(0, high, size=n).tolist()
        return [
            Example(
                prompt=f"{x}+{y}=",
                answer=str(x + y),
                solution=addition_work(x, y, self.num_digits),
            )
            for x, y in zip(a, b, strict=True)
        ]

    def demonstration(self, example: Example) -> str:
        return f"{example.solution}{ANSWER_MARK}{example.answer}"

    def reward(self, completion: str, example: Example) -> float:
        line = first_line(completion)
        work, mark, answer = line.partition(ANSWER_MARK)
        if not mark or answer.strip() != example.answer:
            return 0.0
        if self.check_work and work.strip() != example.solution:
            return 0.0
        return 1.0
