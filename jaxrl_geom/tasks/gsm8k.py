"""GSM8K-style final-answer reward, for real checkpoints with HF tokenizers.

The final answer of a completion is, in order of precedence:

1. the content of the last ``\\boxed{...}`` (nested braces allowed; ``\\frac{a}{b}``
   and ``a/b`` are read as fractions there),
2. the number after the last ``####`` (GSM8K reference format),
3. the number after the last "answer is" / "answer:" (case-insensitive),
4. otherwise the last number in the text.

Numbers are integers or decimals, with an optional sign, ``$``, thousands commas
and trailing ``%``; they are compared exactly as rationals, so ``3.0 == 3`` and
``1,000 == 1000``. The reward is 1.0 on a match and 0.0 otherwise (including when
no number is found).

Data are read from a local JSONL file with GSM8K's ``question`` / ``answer`` fields
(the answer ends in ``#### N``); nothing is downloaded.

References:
  Cobbe et al., "Training Verifiers to Solve Math Word Problems",
  arXiv:2110.14168 (GSM8K).
"""

from __future__ import annotations

import dataclasses
import json
import re
from decimal import Decimal, localcontext
from fractions import Fraction
from pathlib import Path

import numpy as np

from jaxrl_geom.tasks.base import Example, Task, check_count, register_task

# A number not glued to a preceding word or decimal point: "-1,234.5", "$12", "7".
_NUMBER = r"(?<![\w.])[-\u2212]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])"
_NUMBER_RE = re.compile(_NUMBER)
_FRACTION_RE = re.compile(r"^\s*([-\u2212]?)\s*\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}\s*$")
_SLASH_RE = re.compile(r"^\s*(" + _NUMBER + r")\s*/\s*(" + _NUMBER + r")\s*$")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:)", re.IGNORECASE)
_CALCULATOR_RE = re.compile(r"<<[^>]*>>")  # GSM8K calculator annotations "<<48/2=24>>"


def parse_number(text: str) -> Fraction | None:
    """Exact value of a number written ``-$1,234.50``, ``3%``, ``\\frac{1}{2}``, ``1/2``."""
    text = text.strip().rstrip(".").strip()
    text = re.sub(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}", r"\1", text)
    text = text.replace("\\$", "$").replace("\\%", "%").replace("\\!", "").replace("\u2212", "-")
    text = text.strip().removesuffix("%").strip()
    while text.startswith("{") and text.endswith("}"):
        text = text[1:-1].strip()
    frac = _FRACTION_RE.match(text) or _SLASH_RE.match(text)
    if frac:
        sign, num, den = frac.groups() if frac.re is _FRACTION_RE else ("", *frac.groups())
        num_value, den_value = parse_number(num), parse_number(den)
        if num_value is None or den_value is None or den_value == 0:
            return None
        value = num_value / den_value
        return -value if sign else value
    match = re.fullmatch(r"(-?)\s?\$?\s?(-?)([\d,]+(?:\.\d+)?)", text)
    if not match:
        return None
    sign_before, sign_after, digits = match.groups()
    if sign_before and sign_after:
        return None
    if "," in digits and not re.fullmatch(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?", digits):
        return None
    value = Fraction(digits.replace(",", ""))
    return -value if (sign_before or sign_after) else value


def format_number(value: Fraction) -> str:
    """Canonical text of a rational: ``"42"``, ``"-3.5"``, or ``"1/3"`` if not a finite decimal."""
    if value.denominator == 1:
        return str(value.numerator)
    with localcontext() as ctx:
        ctx.prec = 60
        decimal = Decimal(value.numerator) / Decimal(value.denominator)
    if Fraction(decimal) == value:
        return format(decimal.normalize(), "f")
    return f"{value.numerator}/{value.denominator}"


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: treat as no box


def _last_number(text: str) -> str | None:
    matches = _NUMBER_RE.findall(text)
    return matches[-1] if matches else None


def extract_final_answer(text: str) -> str | None:
    """The final numeric answer of ``text`` in canonical form (``"1234"``, ``"-0.5"``), or None.

    Precedence: last ``\\boxed{}``, then ``#### N``, then "the answer is N", then the
    last number in the text (module docstring).

    Example::

        extract_final_answer(r"so she pays \\boxed{\\$1,200}.")  # "1200"
        extract_final_answer("no digits here")                # None
    """
    boxed = _last_boxed(text)
    if boxed is not None:
        value = parse_number(boxed)
        if value is None:  # e.g. "\boxed{x = 5}": the right-hand side
            value = parse_number(boxed.rsplit("=", 1)[-1])
        if value is None:  # e.g. "\boxed{5 apples}": its last number
            number = _last_number(boxed)
            value = None if number is None else parse_number(number)
        return None if value is None else format_number(value)
    markers = [text.rfind("####") + 4] if "####" in text else []
    markers += [m.end() for m in _ANSWER_IS_RE.finditer(text)][-1:]
    for start in markers:  # "#### N" first, then "the answer is N"
        number = _NUMBER_RE.search(text, start)
        if number is not None:
            return format_number(parse_number(number.group()))
    number = _last_number(text)
    return None if number is None else format_number(parse_number(number))


def gsm8k_reward(completion: str, answer: str) -> float:
    """1.0 if the completion's final answer equals ``answer`` as a number, else 0.0.

    ``answer`` may be the bare number (``"72"``, ``"1/2"``) or a full GSM8K solution
    ending in ``#### 72``.
    """
    reference = parse_number(answer)  # a bare reference: "72", "1/2"
    if reference is None:
        final = extract_final_answer(answer)
        if final is None:
            raise ValueError(f"Reference answer {answer[-60:]!r} holds no number; check the data.")
        reference = parse_number(final)
    predicted = extract_final_answer(completion)
    if predicted is None:
        return 0.0
    return 1.0 if parse_number(predicted) == reference else 0.0


DEFAULT_PROMPT = (
    "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
)


@register_task("gsm8k")
@dataclasses.dataclass(frozen=True)
class GSM8KTask(Task):
    """Grade-school math word problems from a local GSM8K-format JSONL file.

    Attributes:
      path: JSONL file, one ``{"question": ..., "answer": "... #### N"}`` per line
        (e.g. ``test.jsonl`` from github.com/openai/grade-school-math).
      prompt_template: ``str.format`` template with a ``{question}`` field. Apply the
        checkpoint's chat template on top of it for instruct models.
      max_examples: keep only the first ``max_examples`` lines (None: all).
    """

    path: str
    prompt_template: str = DEFAULT_PROMPT
    max_examples: int | None = None
    examples: tuple[Example, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if "{question}" not in self.prompt_template:
            raise ValueError(
                f"prompt_template {self.prompt_template!r} has no {{question}} field; add one."
            )
        object.__setattr__(self, "examples", tuple(self._load()))

    def _load(self) -> list[Example]:
        path = Path(self.path)
        if not path.is_file():
            raise ValueError(
                f"GSM8K file {str(path)!r} not found; download a GSM8K JSONL yourself "
                "(question/answer fields) and pass its local path (nothing is downloaded)."
            )
        examples = []
        with path.open() as f:
            for line_number, line in enumerate(f, start=1):
                if self.max_examples is not None and len(examples) >= self.max_examples:
                    break
                if not line.strip():
                    continue
                record = json.loads(line)
                if (
                    "question" not in record
                    or "answer" not in record
                    or "####" not in str(record["answer"])
                ):
                    raise ValueError(
                        f"{path}:{line_number} needs 'question' and an 'answer' ending in "
                        "'#### N' (GSM8K format)."
                    )
                solution, final = record["answer"].rsplit("####", 1)
                value = parse_number(final)
                if value is None:
                    raise ValueError(f"{path}:{line_number}: final answer {final!r} is no number.")
                examples.append(
                    Example(
                        prompt=self.prompt_template.format(question=record["question"].strip()),
                        answer=format_number(value),
                        solution=_CALCULATOR_RE.sub("", solution).strip(),
                    )
                )
        if not examples:
            raise ValueError(f"{path} holds no examples; check the file.")
        return examples

    def sample_prompts(self, rng: np.random.Generator, n: int) -> list[Example]:
        """``n`` examples drawn uniformly with replacement."""
        check_count(n)
        return [self.examples[i] for i in rng.integers(0, len(self.examples), size=n).tolist()]

    def demonstration(self, example: Example) -> str:
        """The reference solution (calculator notes removed) ending in ``\\boxed{N}``."""
        body = f"{example.solution}\n" if example.solution else ""
        return f"{body}The final answer is \\boxed{{{example.answer}}}."

    def reward(self, completion: str, example: Example) -> float:
        return gsm8k_reward(completion, example.answer)
