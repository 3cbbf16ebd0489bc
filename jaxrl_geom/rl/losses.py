"""GRPO-family policy losses: grpo, bnpo, dr_grpo, dapo; clip-higher; k3 KL; GSPO.

Notation (SPEC section 1): rollout ``i`` has completion mask ``m_it``, length
``|o_i| = sum_t m_it``, advantage ``A_i``; ``logp``, ``old`` and ``ref`` are the
per-token log-probs under the current, sampling and reference policies.

.. math::
    r_{it} &= \\exp(\\log\\pi_\\theta(o_{it}) - \\log\\pi_{old}(o_{it}))
        \\quad \\text{(token level, GRPO)} \\\\
    r_{it} &= s_i = \\exp\\Big(\\tfrac{1}{|o_i|}\\sum_t m_{it}
        (\\log\\pi_\\theta - \\log\\pi_{old})\\Big) \\quad \\text{(sequence level, GSPO)} \\\\
    \\psi_{it} &= \\min\\big(r_{it} A_i,\\ \\mathrm{clip}(r_{it}, 1-\\epsilon_{low},
        1+\\epsilon_{high}) A_i\\big) \\\\
    \\mathrm{KL}_{it} &= e^{\\,ref_{it} - logp_{it}} - (ref_{it} - logp_{it}) - 1
        \\quad \\text{(k3)} \\\\
    \\mathcal{L} &= \\sum_{i,t} w_{it} \\big(-\\psi_{it} + \\beta\\, \\mathrm{KL}_{it}\\big)

with the per-token weight ``w_it = u_it / D`` of the loss type:

=========  ===========================  =====================================
loss_type  ``u_it`` (per row)           ``D`` (global)
=========  ===========================  =====================================
grpo       ``m_it / max(|o_i|, 1)``     ``N`` (``num_sequences``)
bnpo/dapo  ``m_it``                     ``max(sum_i |o_i|, 1)`` (``num_tokens``)
dr_grpo    ``m_it``                     ``N * L_max``
=========  ===========================  =====================================

:func:`policy_loss` returns the numerator ``sum_{i,t} u_it (-psi_it + beta KL_it)`` and
``D`` separately. ``u`` depends on row ``i`` only, so when the caller passes the
global ``num_sequences`` / ``num_tokens``, summing the numerators of micro-batches
(or devices) and dividing once by ``D`` gives exactly the full-batch loss for every
loss type. The defaults (``N`` and ``sum |o_i|`` of the arrays passed) are right for
a single batch.

Differences from TRL ``GRPOTrainer`` (and why): TRL's ``bnpo`` divides by the tokens of
the local micro-batch and its ``dapo`` by the global token count; here both use
``num_tokens`` (global when the caller passes it), as SPEC section 1 makes them the
same loss. TRL's ``dr_grpo`` uses the configured ``max_completion_length`` for
``L_max``; pass it, otherwise ``L_max`` is the completion buffer width ``L``.

References:
  Shao et al., DeepSeekMath (GRPO), arXiv:2402.03300.
  Yu et al., DAPO (clip-higher, token-level loss), arXiv:2503.14476.
  Liu et al., Understanding R1-Zero-Like Training (Dr.GRPO), arXiv:2503.20783.
  Zheng et al., Group Sequence Policy Optimization (GSPO), arXiv:2507.18071.
  J. Schulman, "Approximating KL Divergence" (k3), http://joschu.net/blog/kl-approx.html
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ImportanceSamplingLevel = Literal["token", "sequence"]
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
_LEVELS = ("token", "sequence")


class LossTerms(NamedTuple):
    """A loss as ``numerator / denominator`` so partial batches combine exactly."""

    numerator: jax.Array  # f32 []  plain sum over the rows passed
    denominator: jax.Array  # f32 []  global normaliser D (same for every micro-batch)
    metrics: dict[str, jax.Array]  # f32 [] each


# ---------------------------------------------------------------------------------------
# Validation helpers (eager, at the public boundary).
# ---------------------------------------------------------------------------------------


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown loss_type {loss_type!r}; use one of {LOSS_TYPES}.")


def _resolve_eps(eps_low: float, eps_high: float | None) -> tuple[float, float]:
    if not 0.0 <= eps_low < 1.0:
        raise ValueError(
            f"eps_low must be in [0, 1) so that the lower clip bound 1 - eps_low is positive, "
            f"got {eps_low}; GRPO uses 0.2."
        )
    if eps_high is None:
        eps_high = eps_low
    if eps_high < 0.0:
        raise ValueError(
            f"eps_high must be >= 0 (None means eps_high = eps_low), got {eps_high}; DAPO's "
            "clip-higher uses eps_high = 0.28 > eps_low = 0.2."
        )
    return float(eps_low), float(eps_high)


def _check_mask(completion_mask: jax.Array) -> jax.Array:
    mask = jnp.asarray(completion_mask)
    if mask.ndim != 2:
        raise ValueError(f"completion_mask must have shape [N, L], got {mask.shape}.")
    if mask.shape[0] == 0 or mask.shape[1] == 0:
        raise ValueError(
            f"Empty batch: completion_mask has shape {mask.shape}; sample at least one rollout "
            "with max_new_tokens >= 1."
        )
    return mask.astype(bool).astype(jnp.float32)  # [N, L]


# ---------------------------------------------------------------------------------------
# Building blocks (public: SALT needs w_it, the ratio and the clip indicator).
# ---------------------------------------------------------------------------------------


def _weights_and_denominator(
    mask: jax.Array,  # f32 [N, L]
    loss_type: str,
    max_completion_length: int | None,
    num_sequences: jax.Array | int | None,
    num_tokens: jax.Array | int | None,
) -> tuple[jax.Array, jax.Array]:  # ([N, L], [])
    """Per-row weights ``u_it`` and the global denominator ``D`` (module docstring)."""
    _check_loss_type(loss_type)
    n, l_comp = mask.shape
    if num_sequences is None:
        num_sequences = n
    elif _is_concrete(num_sequences) and not np.asarray(num_sequences) >= n:
        raise ValueError(
            f"num_sequences={num_sequences} is smaller than the {n} rows passed; give the "
            "number of rollouts of the WHOLE batch (all micro-batches and devices)."
        )
    if num_tokens is None:
        num_tokens = jnp.sum(mask)
    elif _is_concrete(num_tokens) and not np.asarray(num_tokens) >= 0:
        raise ValueError(f"num_tokens must be >= 0 (total completion tokens), got {num_tokens}.")
    if max_completion_length is None:
        max_completion_length = l_comp
    elif int(max_completion_length) < 1:
        raise ValueError(
            f"max_completion_length must be >= 1 (L_max of Dr.GRPO), got {max_completion_length}."
        )
    num_sequences = jnp.asarray(num_sequences, jnp.float32)
    num_tokens = jnp.asarray(num_tokens, jnp.float32)
    if loss_type == "grpo":
        lengths = jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)  # [N, 1]
        return mask / lengths, num_sequences
    if loss_type in ("bnpo", "dapo"):
        return mask, jnp.maximum(num_tokens, 1.0)
    return mask, num_sequences * float(max_completion_length)  # dr_grpo


def token_weights(
    completion_mask: jax.Array,  # bool [N, L]
    loss_type: LossType = "grpo",
    *,
    max_completion_length: int | None = None,
    num_sequences: jax.Array | int | None = None,
    num_tokens: jax.Array | int | None = None,
) -> jax.Array:  # f32 [N, L]
    """The per-token weight ``w_it`` of SPEC section 2, normaliser included.

    ``policy_loss`` equals ``-sum(w * psi) + beta * sum(w * kl)`` with these weights
    (table in the module docstring); padded tokens get weight 0.
    """
    mask = _check_mask(completion_mask)
    u, denominator = _weights_and_denominator(
        mask, loss_type, max_completion_length, num_sequences, num_tokens
    )
    return u / denominator


def importance_ratio(
    logprobs: jax.Array,  # f32 [N, L]
    old_logprobs: jax.Array,  # f32 [N, L]
    completion_mask: jax.Array,  # bool [N, L]
    level: ImportanceSamplingLevel = "token",
) -> jax.Array:  # f32 [N, L]
    """``r_it`` (token level) or GSPO's ``s_i`` broadcast over tokens (sequence level).

    .. math::
        r_{it} = e^{\\log\\pi_\\theta - \\log\\pi_{old}}, \\qquad
        s_i = \\exp\\Big(\\sum_t m_{it} (\\log\\pi_\\theta - \\log\\pi_{old})
            / \\max(|o_i|, 1)\\Big)

    Padded tokens get log-ratio 0 (``r = 1``), so garbage there never reaches ``exp``.
    Sequence level is TRL's ``importance_sampling_level="sequence"``.
    """
    if level not in _LEVELS:
        raise ValueError(
            f"importance_sampling_level must be 'token' (GRPO) or 'sequence' (GSPO), got {level!r}."
        )
    mask = jnp.asarray(completion_mask).astype(bool)
    log_ratio = jnp.where(mask, logprobs - old_logprobs, 0.0)  # [N, L]
    if level == "sequence":
        lengths = jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1)  # [N, 1]
        seq = jnp.sum(log_ratio, axis=1, keepdims=True) / lengths  # [N, 1]
        log_ratio = jnp.broadcast_to(seq, log_ratio.shape)  # [N, L]
    return jnp.exp(log_ratio)


def clip_active(
    ratio: jax.Array,  # f32 [N, L]
    advantages: jax.Array,  # f32 [N]
    eps_low: float = 0.2,
    eps_high: float | None = None,
) -> jax.Array:  # bool [N, L]
    """Whether ``psi_it`` takes the unclipped branch, i.e. its gradient passes.

    .. math::
        \\mathrm{active}_{it} = \\begin{cases}
            r_{it} \\le 1 + \\epsilon_{high} & A_i > 0 \\\\
            r_{it} \\ge 1 - \\epsilon_{low} & A_i < 0 \\\\
            1 - \\epsilon_{low} \\le r_{it} \\le 1 + \\epsilon_{high} & A_i = 0
        \\end{cases}

    so that ``grad psi_it = active_it * A_i * grad r_it`` (SPEC section 2). For
    ``A_i = 0`` the value is irrelevant to the loss; we call a token active only inside
    the trust region, where it is for either sign of a reweighted coefficient (our
    choice). Ties on a bound count as active; :func:`policy_loss` uses the same rule.
    """
    eps_low, eps_high = _resolve_eps(eps_low, eps_high)
    a = jnp.asarray(advantages)[:, None]  # [N, 1]
    below_high = ratio <= 1.0 + eps_high
    above_low = ratio >= 1.0 - eps_low
    return jnp.where(a > 0, below_high, jnp.where(a < 0, above_low, below_high & above_low))


def kl_k3(
    logprobs: jax.Array,  # f32 [N, L]
    ref_logprobs: jax.Array,  # f32 [N, L]
    completion_mask: jax.Array,  # bool [N, L]
) -> jax.Array:  # f32 [N, L]
    """Schulman's k3 estimator of ``KL(pi_theta || pi_ref)`` per token (0 on padding).

    .. math::
        \\mathrm{KL}_{it} = e^{\\,ref_{it} - logp_{it}} - (ref_{it} - logp_{it}) - 1 \\ge 0
    """
    d = jnp.where(jnp.asarray(completion_mask).astype(bool), ref_logprobs - logprobs, 0.0)
    return jnp.exp(d) - d - 1.0


# ---------------------------------------------------------------------------------------
# The loss.
# ---------------------------------------------------------------------------------------


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def policy_loss(
    logprobs: jax.Array,  # f32 [N, L]
    old_logprobs: jax.Array,  # f32 [N, L]
    advantages: jax.Array,  # f32 [N]
    completion_mask: jax.Array,  # bool [N, L]
    *,
    loss_type: LossType = "grpo",
    eps_low: float = 0.2,
    eps_high: float | None = None,
    beta: float = 0.0,
    ref_logprobs: jax.Array | None = None,  # f32 [N, L]
    importance_sampling_level: ImportanceSamplingLevel = "token",
    max_completion_length: int | None = None,
    num_sequences: jax.Array | int | None = None,
    num_tokens: jax.Array | int | None = None,
) -> LossTerms:
    """Clipped surrogate loss of the GRPO family (formulas in the module docstring).

    .. math::
        \\mathcal{L} = \\frac{1}{D} \\sum_{i,t} u_{it}
            \\big(-\\psi_{it} + \\beta\\, \\mathrm{KL}^{k3}_{it}\\big)
            = \\frac{\\texttt{numerator}}{\\texttt{denominator}}

    The surrogate is evaluated as ``where(active, r A, clip(r) A)``, which equals
    ``min(r A, clip(r) A)`` in value and whose gradient is exactly
    ``active * A * grad r`` with ``active`` from :func:`clip_active`.

    Args:
      logprobs: ``[N, L]`` log-probs of the completion tokens under the current policy
        (differentiate through these).
      old_logprobs: ``[N, L]`` log-probs under the sampling policy.
      advantages: ``[N]`` advantages (:func:`~jaxrl_geom.rl.advantages.group_advantages`).
      completion_mask: ``[N, L]`` True on real completion tokens.
      loss_type: ``"grpo"``, ``"bnpo"``, ``"dr_grpo"`` or ``"dapo"``.
      eps_low: lower clip ``1 - eps_low``, in ``[0, 1)``.
      eps_high: upper clip ``1 + eps_high``; ``None`` = ``eps_low`` (symmetric);
        ``eps_high > eps_low`` is DAPO's clip-higher.
      beta: weight of the k3 KL to the reference policy (``>= 0``).
      ref_logprobs: ``[N, L]`` reference log-probs; required when ``beta > 0``; when
        given the ``kl`` metric is reported even with ``beta = 0``.
      importance_sampling_level: ``"token"`` (GRPO) or ``"sequence"`` (GSPO).
      max_completion_length: ``L_max`` of dr_grpo (TRL uses the configured maximum);
        default the width ``L`` of the arrays.
      num_sequences: number of rollouts of the whole batch; default ``N``.
      num_tokens: completion tokens of the whole batch; default ``sum(mask)``.

    Returns:
      :class:`LossTerms` with ``numerator``, ``denominator`` and metrics (token means
      over valid tokens unless named otherwise): ``clip_ratio/low_mean``
      (``r < 1-eps_low`` and ``A < 0``), ``clip_ratio/high_mean`` (``r > 1+eps_high``
      and ``A > 0``), ``clip_ratio/region_mean`` (either), ``ratio_mean``, ``kl`` (mean
      k3, when ``ref_logprobs`` is given) and ``completion_length/{mean,min,max}`` over
      rollouts. At sequence level the clip ratios are token-weighted shares of
      sequences (TRL averages them over sequences), so micro-batch metrics combine with
      token-count weights. The entropy metric comes from
      :func:`~jaxrl_geom.rl.logprobs.token_entropy` on the caller's logits.

    Raises:
      ValueError: unknown ``loss_type`` or level, ``eps_low`` outside ``[0, 1)``,
        ``eps_high < 0``, ``beta < 0``, ``beta > 0`` without ``ref_logprobs``, shape
        mismatches, or an empty batch (``N = 0``, ``L = 0``, or no valid token when the
        mask is concrete).

    Example:
      >>> terms = policy_loss(logp, old, adv, mask, loss_type="dapo", eps_high=0.28)
      >>> loss = terms.numerator / terms.denominator
    """
    _check_loss_type(loss_type)
    eps_low, eps_high = _resolve_eps(eps_low, eps_high)
    if not beta >= 0.0:
        raise ValueError(f"beta (KL weight) must be >= 0, got {beta}; use 0 to drop the KL term.")
    if beta > 0.0 and ref_logprobs is None:
        raise ValueError(
            f"beta={beta} > 0 needs ref_logprobs (reference-policy log-probs [N, L]); pass "
            "them or set beta=0."
        )
    mask = _check_mask(completion_mask)  # f32 [N, L]
    n, l_comp = mask.shape
    logprobs = jnp.asarray(logprobs, jnp.float32)
    old_logprobs = jnp.asarray(old_logprobs, jnp.float32)
    advantages = jnp.asarray(advantages, jnp.float32)
    arrays = {"logprobs": logprobs, "old_logprobs": old_logprobs}
    if ref_logprobs is not None:
        ref_logprobs = jnp.asarray(ref_logprobs, jnp.float32)
        arrays["ref_logprobs"] = ref_logprobs
    for name, x in arrays.items():
        if x.shape != (n, l_comp):
            raise ValueError(
                f"{name} has shape {x.shape} but completion_mask has {(n, l_comp)}; all "
                "per-token arrays must be [N, L] over the completion tokens."
            )
    if advantages.shape != (n,):
        raise ValueError(
            f"advantages has shape {advantages.shape}, expected ({n},): one per rollout."
        )
    total_tokens = num_tokens if num_tokens is not None else jnp.sum(mask)
    if _is_concrete(total_tokens) and float(np.asarray(total_tokens)) == 0.0:
        raise ValueError(
            "Empty batch: the completion mask has no valid token (every completion has "
            "length 0); check the sampler's stop rule / max_new_tokens."
        )

    u, denominator = _weights_and_denominator(
        mask, loss_type, max_completion_length, num_sequences, num_tokens
    )  # [N, L], []

    ratio = importance_ratio(logprobs, old_logprobs, mask, importance_sampling_level)  # [N, L]
    a = advantages[:, None]  # [N, 1]
    active = clip_active(ratio, advantages, eps_low, eps_high)  # [N, L]
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)  # [N, L]
    psi = jnp.where(active, ratio * a, clipped * a)  # [N, L] == min(r A, clip(r) A)
    per_token = -psi
    kl = None
    if ref_logprobs is not None:
        kl = kl_k3(logprobs, ref_logprobs, mask)  # [N, L]
        if beta > 0.0:
            per_token = per_token + beta * kl
    numerator = jnp.sum(u * per_token)

    r = jax.lax.stop_gradient(ratio)
    low = (r < 1.0 - eps_low) & (a < 0)
    high = (r > 1.0 + eps_high) & (a > 0)
    lengths = jnp.sum(mask, axis=1)  # [N]
    metrics = {
        "clip_ratio/low_mean": _masked_mean(low, mask),
        "clip_ratio/high_mean": _masked_mean(high, mask),
        "clip_ratio/region_mean": _masked_mean(low | high, mask),
        "ratio_mean": _masked_mean(r, mask),
        "completion_length/mean": jnp.mean(lengths),
        "completion_length/min": jnp.min(lengths),
        "completion_length/max": jnp.max(lengths),
    }
    if kl is not None:
        metrics["kl"] = _masked_mean(jax.lax.stop_gradient(kl), mask)
    return LossTerms(numerator=numerator, denominator=denominator, metrics=metrics)
