"""Per-token log-probabilities and entropies of the (temperature-scaled) policy.

The trainer scores completions under the same distribution the sampler drew them
from: logits divided by the sampling temperature, before any top-k / top-p
truncation (the TRL convention, see DESIGN.md "Sampler").

Alignment (DESIGN.md ``RolloutBatch``): with a row laid out as
``[left-padded prompt (P) | completion (L)]``, the logits at positions
``P-1 .. P+L-2`` predict the completion tokens at ``P .. P+L-1``; see
:func:`completion_logits_slice`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def _check_temperature(temperature: float) -> None:
    if not isinstance(temperature, jax.core.Tracer) and not temperature > 0:
        raise ValueError(
            f"temperature must be > 0, got {temperature}; use the sampler's temperature "
            "(1.0 for greedy or plain sampling)."
        )


def _scaled_logits(logits: jax.Array, temperature: float) -> jax.Array:
    _check_temperature(temperature)
    return jnp.asarray(logits).astype(jnp.float32) / temperature


def token_logprobs(
    logits: jax.Array,  # [N, T, V] any float dtype
    targets: jax.Array,  # int32 [N, T]
    temperature: float = 1.0,
) -> jax.Array:  # f32 [N, T]
    """Log-probability of each target token under ``softmax(logits / temperature)``.

    .. math::
        \\log \\pi(y_t) = z_{t, y_t} - \\log \\sum_v e^{z_{tv}},
        \\qquad z = \\mathrm{logits} / \\tau

    Computed as the gathered logit minus ``logsumexp`` in float32, so no ``[N, T, V]``
    log-softmax array is kept for the backward pass beyond the logits themselves.

    Args:
      logits: ``[..., V]`` logits (cast to float32).
      targets: ``[...]`` integer token ids, same leading shape as ``logits``.
      temperature: sampling temperature ``tau > 0``.

    Returns:
      float32 log-probabilities with the shape of ``targets``.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {logits.shape} and targets {targets.shape} disagree: logits must be "
            "[..., V] over the same positions as targets (see completion_logits_slice)."
        )
    z = _scaled_logits(logits, temperature)  # [N, T, V]
    picked = jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(z, axis=-1)  # [N, T]


def token_entropy(
    logits: jax.Array,  # [N, T, V]
    temperature: float = 1.0,
) -> jax.Array:  # f32 [N, T]
    """Entropy of the temperature-scaled next-token distribution at every position.

    .. math::
        H_t = -\\sum_v p_{tv} \\log p_{tv}, \\qquad \\log p_{tv} = z_{tv} - \\log \\sum_u e^{z_{tu}}

    summed as written (non-negative terms), not as ``lse - E_p[z]``, which cancels.

    The caller masks it (only completion tokens count) and usually wraps the logits
    in ``jax.lax.stop_gradient`` when it is a metric.
    """
    z = _scaled_logits(logits, temperature)  # [N, T, V]
    return _entropy(z, jax.nn.logsumexp(z, axis=-1))


def _entropy(z: jax.Array, lse: jax.Array) -> jax.Array:  # [..., V], [...] -> [...]
    logp = z - lse[..., None]
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def completion_logits_slice(
    logits: jax.Array,  # [N, S, V]
    prompt_length: int,
    completion_length: int,
) -> jax.Array:  # [N, L, V]
    """Logits that predict the completion tokens.

    For rows ``[prompt (P) | completion (L)]`` the model's output at position ``t``
    predicts token ``t + 1``, so the completion tokens ``P .. P+L-1`` are predicted by
    the logits at ``P-1 .. P+L-2``. This returns ``logits[:, P-1 : P+L-1]``; it works
    for a forward pass over all ``P+L`` tokens and over ``tokens[:, :-1]`` alike (the
    last position is never needed).

    Args:
      logits: ``[N, S, V]`` with ``S >= P + L - 1``.
      prompt_length: ``P >= 1`` (the prompt buffer width, left padding included).
      completion_length: ``L``.

    Returns:
      ``[N, L, V]`` logits aligned with ``tokens[:, P:P+L]``.
    """
    p, l_comp = int(prompt_length), int(completion_length)
    if p < 1:
        raise ValueError(
            f"prompt_length={p}: at least one prompt token is needed to predict the first "
            "completion token; left-pad prompts to width >= 1."
        )
    if logits.ndim != 3 or logits.shape[1] < p + l_comp - 1:
        raise ValueError(
            f"logits {logits.shape} must be [N, S, V] with S >= P + L - 1 = {p + l_comp - 1}; "
            "run the model over tokens[:, :P+L-1] at least."
        )
    return jax.lax.slice_in_dim(logits, p - 1, p + l_comp - 1, axis=1)


def chunked_logprobs(
    head: Callable[[jax.Array], jax.Array],
    hidden: jax.Array,  # [N, L, D]
    targets: jax.Array,  # int32 [N, L]
    temperature: float = 1.0,
    *,
    chunk_tokens: int = 1024,
) -> tuple[jax.Array, jax.Array]:  # f32 [N, L] log-probs, f32 [N, L] entropy (no grad)
    """:func:`token_logprobs` and :func:`token_entropy` of ``head(hidden)``, never whole.

    The positions are cut into chunks of ``c = max(1, chunk_tokens // N)`` along ``L``
    (the batch axis stays whole, so its sharding is kept); each chunk runs the head,
    ``log pi(y_t) = z_{t,y_t} - logsumexp_v z_tv`` and ``H_t`` under
    ``jax.checkpoint`` inside ``lax.map``. The largest float32 array is one chunk's
    logits ``[N, c, V]``, in the forward and in the backward (which recomputes it).
    The entropy is a metric: it carries no gradient.

    Args:
      head: hidden ``[N, c, D]`` -> logits ``[N, c, V]`` (e.g. ``Decoder.head``).
      hidden: final-normed hidden states at the positions that predict ``targets``.
      targets: the token ids those positions predict.
      temperature: sampling temperature ``tau > 0``.
      chunk_tokens: positions per chunk over the whole batch (``N * c``).
    """
    return _chunked_head(head, hidden, targets, temperature, chunk_tokens, with_lse=False)


def chunked_logprobs_lse(
    head: Callable[[jax.Array], jax.Array],
    hidden: jax.Array,  # [N, L, D]
    targets: jax.Array,  # int32 [N, L]
    temperature: float = 1.0,
    *,
    chunk_tokens: int = 1024,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # f32 [N, L] log-probs, entropy, lse (no grad)
    """:func:`chunked_logprobs` plus ``lse_t = logsumexp_v z_tv`` ``[N, L]`` (no gradient),
    from the same chunks. With ``lse`` the logits' cotangent at any position can be
    recomputed from the hidden state alone: ``dL/dz_t = g_t (e_{y_t} - exp(z_t - lse_t))``
    for ``g = dL/dlog pi`` (SALT's chunked head Gram, :mod:`jaxrl_geom.salt.head`)."""
    return _chunked_head(head, hidden, targets, temperature, chunk_tokens, with_lse=True)


def _chunked_head(head, hidden, targets, temperature, chunk_tokens, *, with_lse):
    _check_temperature(temperature)
    n, length = targets.shape
    if hidden.shape[:2] != (n, length):
        raise ValueError(
            f"hidden {hidden.shape} and targets {targets.shape} disagree: hidden must be "
            "[N, L, D] at the positions that predict targets [N, L]."
        )
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}.")
    c = max(1, min(length, chunk_tokens // max(n, 1)))
    nc = -(-length // c)
    pad = nc * c - length

    def chunks(x: jax.Array) -> jax.Array:  # [N, L, ...] -> [nc, N, c, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.swapaxes(x.reshape(n, nc, c, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def one_chunk(args: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
        h_c, y_c = args  # [N, c, D], [N, c]
        z = head(h_c).astype(jnp.float32) / temperature  # [N, c, V]
        lse = jax.nn.logsumexp(z, axis=-1)  # [N, c]
        picked = jnp.take_along_axis(z, y_c[..., None].astype(jnp.int32), axis=-1)[..., 0]
        zs, lse_s = jax.lax.stop_gradient(z), jax.lax.stop_gradient(lse)
        entropy = _entropy(zs, lse_s)
        return (picked - lse, entropy, lse_s) if with_lse else (picked - lse, entropy)

    out = jax.lax.map(one_chunk, (chunks(hidden), chunks(targets)))  # each [nc, N, c]

    def unchunk(x: jax.Array) -> jax.Array:
        return jnp.swapaxes(x, 0, 1).reshape(n, nc * c)[:, :length]

    return tuple(unchunk(x) for x in out)
