"""worked_addition: the documented format, hand-derived cases, and the reward."""

from __future__ import annotations

import re

import numpy as np
import pytest

from jaxrl_geom.tasks import Example, WorkedAdditionTask, addition_work, get_task
from jaxrl_geom.tokenizers import CharTokenizer

_STEP = re.compile(r"(\d)\+(\d)\+([01])=(\d\d)")


@pytest.mark.parametrize(
    "a, b, num_digits, work",
    [
        (47, 85, 2, "7+5+0=12;4+8+1=13"),  # carry into a new leading digit
        (0, 0, 1, "0+0+0=00"),
        (5, 3, 3, "5+3+0=08;0+0+0=00;0+0+0=00"),  # operands zero-padded
        (999, 1, 3, "9+1+0=10;9+0+1=10;9+0+1=10"),  # carry chain
        (305, 496, 3, "5+6+0=11;0+9+1=10;3+4+1=08"),
    ],
)
def test_addition_work_hand_derived(a, b, num_digits, work):
    assert addition_work(a, b, num_digits) == work


def test_demonstration_format_and_consistency():
    task = get_task("worked_addition", num_digits=3)
    assert isinstance(task, WorkedAdditionTask) and task.name == "worked_addition"
    tok = CharTokenizer()
    for ex in task.sample_prompts(np.random.default_rng(0), 200):
        a, b = map(int, ex.prompt[:-1].split("+"))
        assert ex.prompt == f"{a}+{b}=" and ex.answer == str(a + b)
        demo = task.demonstration(ex)
        work, answer = demo.split("#")
        assert answer == str(a + b)
        steps = [_STEP.fullmatch(s) for s in work.split(";")]
        assert len(steps) == 3 and all(steps)
        # Independent re-derivation: the steps read the digits from the units up, the
        # carry is the previous partial sum's tens digit, the units digits spell a + b.
        carry, digits = 0, []
        for j, m in enumerate(steps):
            x, y, c, s = (int(g) for g in m.groups())
            assert (x, y, c) == ((a // 10**j) % 10, (b // 10**j) % 10, carry)
            assert s == x + y + c
            carry, digits = s // 10, [s % 10, *digits]
        assert int("".join(map(str, [carry, *digits]))) == a + b
        assert len(demo) == 9 * 3 - 1 + 1 + len(answer)
        assert tok.can_encode(ex.prompt + demo)
        assert task.reward(demo, ex) == 1.0


EX = Example(prompt="47+85=", answer="132", solution="7+5+0=12;4+8+1=13")


@pytest.mark.parametrize(
    "completion, loose, strict",
    [
        ("7+5+0=12;4+8+1=13#132", 1.0, 1.0),
        (" 7+5+0=12;4+8+1=13#132 \nnoise", 1.0, 1.0),  # first line, stripped
        ("7+5+0=12;4+8+1=13# 132", 1.0, 1.0),
        ("7+5+0=12;4+8+0=12#132", 1.0, 0.0),  # wrong work, right answer
        ("#132", 1.0, 0.0),
        ("7+5+0=12;4+8+1=13#131", 0.0, 0.0),
        ("7+5+0=12;4+8+1=13#0132", 0.0, 0.0),  # canonical form only
        ("7+5+0=12;4+8+1=13 132", 0.0, 0.0),  # no answer mark
        ("7+5+0=12\n#132", 0.0, 0.0),  # the answer is on the first line
        ("", 0.0, 0.0),
    ],
)
def test_reward(completion, loose, strict):
    assert WorkedAdditionTask().reward(completion, EX) == loose
    assert WorkedAdditionTask(check_work=True).reward(completion, EX) == strict


@pytest.mark.parametrize("num_digits", [0, 10, True])
def test_validation(num_digits):
    with pytest.raises(ValueError, match="num_digits"):
        WorkedAdditionTask(num_digits=num_digits)
