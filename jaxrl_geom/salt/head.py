"""SALT's LM head in the plain step's chunks: tapped log-probs of the completion tokens.

The head runs only at the completion positions, ``ModelConfig.logits_chunk_tokens`` at a
time under ``jax.checkpoint`` (:func:`jaxrl_geom.rl.logprobs.chunked_logprobs_lse`, the
plain step's code), so no ``[N, L, V]`` float32 tensor is whole in the forward or the
backward. The head's own tap is bypassed inside the chunks; the Gram block and the
book-keeping see the head through ``(h, y, lse, g)`` instead: ``h [N, L, D]`` its input,
``lse [N, L]`` the kept log-sum-exp and ``g = dL/dlog pi [N, L]`` the log-probs'
cotangent, from which :mod:`jaxrl_geom.salt.head_gram` recomputes the logits'
cotangent a vocabulary tile at a time.

* recompute path: a ``custom_vjp`` identity on the log-probs takes ``g`` in its
  backward rule and returns the head's Gram block as its probe's cotangent (untied);
  for a tied table it hands ``(h, y, lse, g, table, tau)`` to the lookup tap through a
  carrier (:func:`jaxrl_geom.salt.ghost._tied_lookup_chunk_tap`), which adds lookup,
  head and cross terms;
* book-keeping: ``h``, ``lse``, ``y`` are kept (``KeptX``) and ``g`` is the gradient of
  a ``KeptD`` probe on the log-probs: ``[N, L]`` instead of the head's ``[N, L, V]`` ``D``.
  The head's weight gradient ``sum_it h_it D_it^T`` (``D`` from ``a' g + g^kl``) is the
  chunked head's own vjp.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_geom.models.layers import Embedding
from jaxrl_geom.rl import logprobs as lp
from jaxrl_geom.salt.ghost import KeptX, _gram_now, _int_cotangent, _record_call, _Tap
from jaxrl_geom.salt.head_gram import HeadWeight, dense_head_gram, tied_head_gram


def head_module(model: nnx.Module) -> nnx.Module:
    """The module holding the LM head's weight: ``lm_head``, or the tied ``embed_tokens``."""
    head = getattr(model, "lm_head", None)
    return model.embed_tokens if head is None else head


def head_weight(module: nnx.Module, chunk_tokens: int) -> HeadWeight:
    """The head weight as the forward uses it (kernel + bias, or the tied table)."""
    kw = dict(dtype=module.dtype, chunk_tokens=chunk_tokens)
    if isinstance(module, Embedding):
        return HeadWeight(module.embedding[...], None, tied=True, **kw)
    bias = None if module.bias is None else module.bias[...]
    return HeadWeight(module.kernel[...], bias, tied=False, **kw)


@contextlib.contextmanager
def _untapped(module: nnx.Module) -> Iterator[None]:
    """The head module without its Gram tap (the chunks must not reach it)."""
    tap = module.gram_tap
    module.gram_tap = None
    try:
        yield
    finally:
        module.gram_tap = tap


def head_logprobs(
    model: nnx.Module, hidden: jax.Array, targets: jax.Array, temperature: float
) -> tuple[jax.Array, jax.Array]:  # f32 [N, L] log-probs, f32 [N, L] entropy (no grad)
    """Log-probs and entropies of ``targets [N, L]`` from ``hidden [N, L, D]`` by the chunked
    head (module docstring), with the head's SALT tap (Gram or book-keeping) if it has one."""
    module = head_module(model)
    tap = module.gram_tap
    chunk = model.config.logits_chunk_tokens
    with _untapped(module):
        logp, entropy, lse = lp.chunked_logprobs_lse(
            model.head, hidden, targets, temperature, chunk_tokens=chunk
        )
    if not isinstance(tap, _Tap):
        return logp, entropy
    tied = isinstance(module, Embedding)
    spec = tap.spec
    slot = "head" if tied else "main"
    if spec.keep:  # book-keeping: keep h, lse, y; the probe on log pi gives g
        logp = tap._keep(slot, logp, hidden)
        tap.sow(KeptX, f"{slot}_lse", lse)
        tap.sow(KeptX, f"{slot}_targets", targets)
        return logp, entropy
    weight = head_weight(module, chunk)
    if tied:
        carrier = tap.carrier
        if carrier is None or len(carrier) != 6 or carrier[0].shape[:2] != targets.shape:
            raise ValueError(
                "The tied-head Gram tap needs the lookup of the same rows first, tapped with "
                f"head_positions={targets.shape[1]} (the completion length)."
            )
        _record_call(f"{spec.path}.head")
        check_vocab(weight.vocab)
        tau = jnp.asarray(temperature, jnp.float32)
        table = weight.w.astype(weight.dtype)
        logp = _tied_head_chunk_tap(logp, hidden, targets, lse, table, tau, carrier)
        tap.carrier = None
        return logp, entropy
    _record_call(spec.path)
    head_spec = (spec, float(temperature), weight.dtype.name)  # static, hashable
    w, b = weight.w, weight.bias
    logp = _head_tap(head_spec, logp, hidden, targets, lse, w, b, tap.probe[...], tap.projections())
    return logp, entropy


# ----------------------------------------------------------------------------------------
# custom_vjp taps on the log-probs
# ----------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _head_tap(hspec, logp, h, targets, lse, w, b, probe, projections):
    """Identity on ``logp``; backward: the head's Gram block as ``probe``'s cotangent
    (``hspec = (tap spec, temperature, compute dtype name)``)."""
    del h, targets, lse, w, b, probe, projections
    return logp


def _head_tap_fwd(hspec, logp, h, targets, lse, w, b, probe, projections):
    del probe
    return logp, (h, targets, lse, w, b, projections)


def _head_tap_bwd(hspec, residuals, g):
    spec, temperature, dtype = hspec
    h, targets, lse, w, b, projections = residuals
    weight = HeadWeight(w, b, tied=False, dtype=dtype, chunk_tokens=spec.chunk_tokens)
    head = (h, targets, lse, g.astype(jnp.float32))
    g, gram = _gram_now(g, dense_head_gram(spec, projections, weight, head, temperature))
    zeros = jax.tree.map(jnp.zeros_like, (h, lse, w, b, projections))
    return g, zeros[0], _int_cotangent(targets), zeros[1], zeros[2], zeros[3], gram, zeros[4]


_head_tap.defvjp(_head_tap_fwd, _head_tap_bwd)


@jax.custom_vjp
def _tied_head_chunk_tap(logp, h, targets, lse, table, tau, carrier):
    del h, targets, lse, table, tau, carrier
    return logp


def _tied_head_chunk_tap_fwd(logp, h, targets, lse, table, tau, carrier):
    del carrier
    return logp, (h, targets, lse, table, tau)


def _tied_head_chunk_tap_bwd(residuals, g):
    h, targets, lse, table, tau = residuals
    # Token ids ride as float32 (exact below 2^24: check_vocab in head_logprobs).
    carrier_ct = (h, targets.astype(jnp.float32), lse, g.astype(jnp.float32), table, tau)
    zeros = jax.tree.map(jnp.zeros_like, (h, lse, table, tau))
    return g, zeros[0], _int_cotangent(targets), zeros[1], zeros[2], zeros[3], carrier_ct


_tied_head_chunk_tap.defvjp(_tied_head_chunk_tap_fwd, _tied_head_chunk_tap_bwd)


# ----------------------------------------------------------------------------------------
# Book-keeping: the head's Gram block and weight gradient from kept statistics
# ----------------------------------------------------------------------------------------


def is_kept_head(x: dict[str, jax.Array]) -> bool:
    """Whether a module's kept tensors are the chunked head's statistics (not ``X``, ``D``)."""
    return "main_lse" in x or "head_lse" in x


def _kept_head(x: dict, d: dict, slot: str) -> tuple[jax.Array, ...]:
    return x[slot], x[f"{slot}_targets"], x[f"{slot}_lse"], d[f"d_{slot}"].astype(jnp.float32)


def kept_head_gram(
    module: nnx.Module, tap: _Tap, x: dict, d: dict, temperature: float, chunk_tokens: int
) -> jax.Array:
    """The head's Gram block (a tied table's: lookup + head) from kept statistics."""
    weight = head_weight(module, chunk_tokens)
    if tap.spec.tied:
        head = _kept_head(x, d, "head")
        return tied_head_gram(
            tap.spec, tap.projections(), weight, x["main"], d["d_main"], head, temperature
        )
    return dense_head_gram(
        tap.spec, tap.projections(), weight, _kept_head(x, d, "main"), temperature
    )


def kept_head_grads(
    module: nnx.Module, x: dict, d: dict, temperature: float, chunk_tokens: int
) -> tuple[jax.Array, jax.Array | None]:
    """The head's weight (and bias) gradient for the kept ``g`` (already weighted), as the
    vjp of the chunked head itself: ``[D, V]`` kernel or ``[V, D]`` table part, bias ``[V]``."""
    weight = head_weight(module, chunk_tokens)
    slot = "head" if weight.tied else "main"
    h, targets, _, g = _kept_head(x, d, slot)
    vocab = weight.vocab

    def logp_of(w, b):
        head = HeadWeight(w, b, tied=weight.tied, dtype=weight.dtype)
        fn = lambda h_c: head.logits(h_c, 0, vocab)  # noqa: E731
        return lp.chunked_logprobs(fn, h, targets, temperature, chunk_tokens=chunk_tokens)[0]

    _, vjp = jax.vjp(logp_of, weight.w, weight.bias)
    return vjp(g)


def check_vocab(vocab_size: int) -> None:
    """The tied carrier passes token ids as float32: exact only below ``2^24``."""
    if vocab_size >= 2**24:
        raise ValueError(
            f"vocab_size={vocab_size} >= 2^24: SALT's tied-head carrier holds token ids as "
            "float32; use keep_budget_gib > 0 (book-keeping) or an untied head."
        )
