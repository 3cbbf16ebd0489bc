"""Long-context key-value retrieval (RULER "needle in a haystack", multi-key).

The context lists ``num_pairs`` random ``key=value`` pairs with distinct keys; the
query names one of them and the answer is its value. Prompt format (defaults:
1-letter keys, 2-digit values, 4 pairs)::

    a=07;q=41;m=93;k=10
    ?m=

answer ``93``; with ``key_len=2`` the keys read ``ab=07;...``. That is
``";".join(f"{k}={v}")`` over the pairs, a newline, then ``"?" + key + "="``; the
demonstration is the value and the model should stop (EOS) after it. A prompt has
``num_pairs * (key_len + value_len + 2) + key_len + 2`` characters, so the context
grows linearly with ``num_pairs`` (or set ``context_chars`` and the number of pairs
is derived from it). The queried pair is uniform over positions (depths).

Reward: 1.0 when the first line of the completion, stripped, equals the value, else
0.0.

Learnability, measured on CPU (from scratch, hidden 128, 4 layers, supervised
warm-up only, batch 64, adamw lr 1e-3, one seed; teacher-forced exact accuracy on
256 held-out prompts): with the defaults it stays near 0.1 (copying a random one of
the four values would score 0.25) for ~500 steps, then jumps to 0.24-0.29 by steps
600-900 (loss 1.36 -> 0.5), which leaves GRPO a reward signal. With ``key_len=2`` it
was still at 0.09-0.17 after 700 steps (and lr 3e-3 was worse), hence one-letter
keys by default. Raise ``num_pairs`` (up to 26 with 1-letter keys), ``key_len`` or
``context_chars`` for long-context runs.

References:
  Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context
  Language Models?", arXiv:2404.06654 (niah multikey / multivalue).
"""

from __future__ import annotations

import dataclasses
import string

import numpy as np

from jaxrl_geom.tasks.base import Example, Task, check_count, first_line, register_task

_SEPARATORS = "=;?\n"


def _words(codes: np.ndarray, alphabet: str, length: int) -> list[str]:
    """Integer codes ``[M]`` written in base ``len(alphabet)`` as ``length``-letter words."""
    base = len(alphabet)
    place = base ** np.arange(length - 1, -1, -1, dtype=np.int64)  # [length]
    digits = (codes[:, None] // place[None, :]) % base  # [M, length]
    return ["".join(alphabet[d] for d in row) for row in digits]


def _check_alphabet(field: str, alphabet: str) -> None:
    if not alphabet or len(set(alphabet)) != len(alphabet):
        raise ValueError(f"{field}={alphabet!r} must be non-empty with distinct characters.")
    clash = sorted(set(alphabet) & set(_SEPARATORS))
    if clash:
        raise ValueError(
            f"{field}={alphabet!r} contains format separators {clash!r}; remove them "
            f"(the prompt uses {_SEPARATORS!r})."
        )


@register_task("kv_retrieval")
@dataclasses.dataclass(frozen=True)
class KVRetrievalTask(Task):
    """Retrieve the value of the queried key from a list of key=value pairs.

    Attributes:
      num_pairs: pairs in the context (ignored when ``context_chars`` is set).
      key_len: characters per key (keys are distinct within a prompt).
      value_len: characters per value.
      context_chars: target prompt length in characters; if set, the number of
        pairs is the largest whose prompt fits (see :attr:`pairs_per_prompt`).
      key_alphabet: characters keys are drawn from.
      value_alphabet: characters values are drawn from.
    """

    num_pairs: int = 4
    key_len: int = 1
    value_len: int = 2
    context_chars: int | None = None
    key_alphabet: str = string.ascii_lowercase
    value_alphabet: str = string.digits

    def __post_init__(self):
        for field in ("num_pairs", "key_len", "value_len"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}.")
        _check_alphabet("key_alphabet", self.key_alphabet)
        _check_alphabet("value_alphabet", self.value_alphabet)
        if self.context_chars is not None:
            shortest = self.prompt_chars(1)
            if self.context_chars < shortest:
                raise ValueError(
                    f"context_chars={self.context_chars} cannot hold one pair and the query "
                    f"({shortest} characters); raise it to at least {shortest}."
                )
        key_space = len(self.key_alphabet) ** self.key_len
        value_space = len(self.value_alphabet) ** self.value_len
        if max(key_space, value_space) >= 2**62:
            raise ValueError(
                f"key_len={self.key_len} / value_len={self.value_len} give more than 2**62 "
                "distinct words; use shorter keys and values."
            )
        if self.pairs_per_prompt > key_space:
            raise ValueError(
                f"{self.pairs_per_prompt} distinct keys are needed but only {key_space} keys "
                f"of length {self.key_len} exist; raise key_len or lower the context size."
            )

    def prompt_chars(self, num_pairs: int) -> int:
        """Prompt length in characters for ``num_pairs`` pairs."""
        return num_pairs * (self.key_len + self.value_len + 2) + self.key_len + 2

    @property
    def pairs_per_prompt(self) -> int:
        """Pairs in each context: ``num_pairs``, or the most that fit ``context_chars``."""
        if self.context_chars is None:
            return self.num_pairs
        return (self.context_chars - self.key_len - 2) // (self.key_len + self.value_len + 2)

    def sample_prompts(self, rng: np.random.Generator, n: int) -> list[Example]:
        check_count(n)
        m = self.pairs_per_prompt
        key_space = len(self.key_alphabet) ** self.key_len
        value_space = len(self.value_alphabet) ** self.value_len
        examples = []
        for _ in range(n):
            key_codes = rng.choice(key_space, size=m, replace=False)  # distinct keys
            value_codes = rng.integers(0, value_space, size=m)
            keys = _words(key_codes, self.key_alphabet, self.key_len)
            values = _words(value_codes, self.value_alphabet, self.value_len)
            q = int(rng.integers(0, m))
            context = ";".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
            examples.append(Example(prompt=f"{context}\n?{keys[q]}=", answer=values[q]))
        return examples

    def reward(self, completion: str, example: Example) -> float:
        return 1.0 if first_line(completion) == example.answer else 0.0
