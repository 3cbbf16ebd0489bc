"""Sampling methods: how one next token is drawn from a row of logits.

A method is a frozen (hashable) dataclass, so the sampler can close over it as a
static argument and compile once per method. Every method exposes

* ``temperature``: the temperature of the distribution whose log-probs the sampler
  returns (``log_softmax(logits / temperature)``, the trainer's distribution);
* ``sample(logits [B, V], key) -> int32 [B]``.

Truncation follows Hugging Face ``generate`` exactly (warpers applied in the order
temperature, top-k, top-p):

.. math::
    z = \\ell / \\tau, \\qquad
    \\mathcal{K} = \\operatorname{top}_k(z), \\qquad
    \\mathcal{N} = \\{ j \\in \\mathcal{K} :
        \\textstyle\\sum_{i \\in \\mathcal{K},\\, z_i > z_j} \\pi_i < p \\},
    \\quad \\pi = \\operatorname{softmax}(z |_{\\mathcal{K}})

i.e. top-k keeps the ``k`` largest logits and top-p keeps the smallest prefix (by
decreasing probability) whose mass reaches ``p``; the most likely token is always
kept. Tokens outside the support get probability zero and the rest are
renormalised.

Cost (shared/PERF.md section 1): a full-vocabulary sort is ~100x slower than
``lax.top_k`` with a small ``k`` on CPU. Top-p therefore first takes the
``candidates`` (default 1024) largest logits and finds the nucleus inside them. If
for some row those candidates hold less than ``p`` of the mass (flat
distributions), a ``lax.cond`` falls back to the exact full sort for that step, so
the result is always the exact nucleus; only its cost depends on the logits.
Ours: the bounded pre-selection and the exact fallback.

Ties at the top-k boundary: Hugging Face keeps every token tied with the k-th
largest logit; ``lax.top_k`` keeps exactly ``k`` (the lowest ids). The two agree
whenever logits are distinct, as they are for real models.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Protocol, TypeVar

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["Greedy", "Sample", "SamplingMethod"]

T = TypeVar("T")


class SamplingMethod(Protocol):
    """What :func:`jaxrl_geom.sampling.generate` needs from a sampling method."""

    @property
    def temperature(self) -> float: ...

    def sample(self, logits: jax.Array, key: jax.Array) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Pick the most likely token, ``argmax_j logits_j`` (first index on ties, as torch).

    Log-probs are reported at temperature 1.
    """

    @property
    def temperature(self) -> float:
        return 1.0

    def sample(self, logits: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """``logits [B, V] -> int32 [B]``; ``key`` is ignored."""
        del key
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Sample:
    """Ancestral sampling from ``softmax(logits / temperature)``, optionally truncated.

    Attributes:
      temperature: ``tau > 0``; logits are divided by it before anything else.
      top_k: keep only the ``k`` most likely tokens (``None``: no top-k). Values
        larger than the vocabulary keep everything, as in Hugging Face.
      top_p: nucleus mass ``0 < p <= 1`` (``None`` or 1: no top-p).
      candidates: size of the bounded ``lax.top_k`` pre-selection used for top-p
        without top-k (exact fallback to a full sort when too small, see module doc).

    Example::

        method = Sample(temperature=0.7, top_p=0.95)
        tokens = method.sample(logits, jax.random.key(0))  # int32 [B]
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    candidates: int = 1024

    def __post_init__(self):
        t = self.temperature
        is_number = isinstance(t, int | float) and not isinstance(t, bool)
        if not is_number or not (t > 0 and math.isfinite(t)):
            raise ValueError(
                f"Sample(temperature={t!r}): temperature must be a finite float > 0; "
                "use Greedy() for deterministic argmax decoding."
            )
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
            raise ValueError(
                f"Sample(top_k={self.top_k!r}): top_k must be an int >= 1, or None to disable it."
            )
        p = self.top_p
        if p is not None and (
            isinstance(p, bool) or not isinstance(p, int | float) or not (0.0 < p <= 1.0)
        ):
            raise ValueError(
                f"Sample(top_p={p!r}): top_p must be a float in (0, 1], or None to disable it."
            )
        c = self.candidates
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"Sample(candidates={c!r}): candidates must be an int >= 1.")

    @property
    def _uses_top_p(self) -> bool:
        return self.top_p is not None and self.top_p < 1.0

    def sample(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        """Draw one token per row: ``logits [B, V] -> int32 [B]``."""
        scaled = logits.astype(jnp.float32) / self.temperature  # [B, V]
        if self.top_k is None and not self._uses_top_p:
            return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
        return self._on_support(scaled, lambda values, ids: _draw(key, values, ids))

    def filtered_logits(self, logits: jax.Array) -> jax.Array:
        """The temperature-scaled logits with ``-inf`` outside the support, ``[B, V]``.

        Same code path as :meth:`sample` (scattered back to the vocabulary); meant for
        inspection and tests, the sampler never materialises it.
        """
        scaled = logits.astype(jnp.float32) / self.temperature  # [B, V]
        if self.top_k is None and not self._uses_top_p:
            return scaled
        rows = jnp.arange(scaled.shape[0])[:, None]  # [B, 1]

        def scatter(values: jax.Array, ids: jax.Array) -> jax.Array:
            return jnp.full_like(scaled, -jnp.inf).at[rows, ids].set(values)

        return self._on_support(scaled, scatter)

    def _on_support(self, scaled: jax.Array, fn: Callable[[jax.Array, jax.Array], T]) -> T:
        """``fn(values, ids)`` on the exact truncated support, both ``[B, k]``.

        ``ids`` are the candidate token ids sorted by decreasing logit and ``values``
        their scaled logits, ``-inf`` where top-p removes the token.
        """
        vocab = scaled.shape[-1]
        bound = min(self.top_k or self.candidates, vocab)
        values, ids = lax.top_k(scaled, bound)  # [B, k] sorted descending
        if not self._uses_top_p:
            return fn(values, ids)
        if self.top_k is not None:
            # Hugging Face applies top-p to the renormalised top-k distribution.
            log_norm = jax.nn.logsumexp(values, axis=-1, keepdims=True)  # [B, 1]
            return fn(_nucleus(values, log_norm, self.top_p), ids)
        log_norm = jax.nn.logsumexp(scaled, axis=-1, keepdims=True)  # [B, 1]
        if bound == vocab:
            return fn(_nucleus(values, log_norm, self.top_p), ids)

        def exact() -> T:  # full sort, only when the candidates miss mass
            all_values, all_ids = lax.top_k(scaled, vocab)  # [B, V]
            return fn(_nucleus(all_values, log_norm, self.top_p), all_ids)

        # Tokens past the candidates have >= their mass before them: all removed iff
        # the candidates hold >= top_p in every row.
        covered = jnp.all(jnp.sum(jnp.exp(values - log_norm), axis=-1) >= self.top_p)
        return lax.cond(covered, lambda: fn(_nucleus(values, log_norm, self.top_p), ids), exact)


def _nucleus(sorted_values: jax.Array, log_norm: jax.Array, top_p: float) -> jax.Array:
    """Logits sorted in decreasing order, ``-inf`` outside the nucleus.

    Token ``j`` is kept iff the mass strictly before it is ``< p`` (Hugging Face's
    ``ascending cumsum <= 1 - p`` removal rule, written from the top). The first
    token has zero mass before it, so at least one token is always kept.
    """
    probs = jnp.exp(sorted_values - log_norm)  # [B, k]
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, k] exclusive cumsum
    return jnp.where(mass_before < top_p, sorted_values, -jnp.inf)


def _draw(key: jax.Array, values: jax.Array, ids: jax.Array) -> jax.Array:
    """Sample a column of ``values [B, k]`` (unnormalised log-probs), return its id."""
    choice = jax.random.categorical(key, values, axis=-1)  # [B]
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
