"""SALT's scalable path: the policy gradient of ``grpo_step(..., salt=SaltConfig(...))``.

The GRPO policy loss is, around the current parameters, linear in the advantages
(SPEC section 2): with the clip indicators held fixed,

.. math::
    L_{lin}(\\theta; c) = \\sum_i c_i\\, l_i(\\theta), \\qquad
    l_i(\\theta) = -\\sum_t w_{it}\\, \\mathrm{active}_{it}\\, r_{it}(\\theta)

(``w`` from :func:`jaxrl_geom.rl.losses.token_weights`, ``active`` from
:func:`~jaxrl_geom.rl.losses.clip_active` at the current parameters and the ORIGINAL
advantages, ``r`` the token ratio or GSPO's sequence ratio broadcast over tokens), and
``grad L_lin(theta; A)`` is exactly the gradient of the clipped loss. The per-rollout
feature is ``g_i = grad l_i`` (DESIGN.md sign convention, ``g_i = -phi_i``) and

1. one forward and one backward of ``sum_i l_i`` through Gram taps gives
   ``K = G G^T`` over ``scope`` (:mod:`jaxrl_geom.salt.ghost`, never holding ``G``);
2. ``a' = reweight(K, A, group_ids)``;
3. one more ordinary backward gives the update
   ``grad L_lin(theta; a') + beta grad KL = G^T a' + beta grad KL``: the KL term is
   not part of ``Phi`` and its gradient is added unchanged.

Without micro-batches the two backward passes share ONE forward pass
(``jax.vjp`` with cotangents ``(1, 0)`` then ``(a', 1)`` on ``(l, KL)``). With
``num_micro_batches = m > 1`` the Gram pass still runs on the full batch (the Gram
couples every pair of rollouts: peak memory is that of a full-batch forward +
backward), and step 3 accumulates over micro-batches like ``grpo_step``, with the
clip indicators of step 1 passed in.

Cost (measured by ``benchmarks/bench_salt.py``): a forward, a backward that propagates
only ``D`` (the weight gradients are dead code) plus the Gram blocks, and a full
backward: about 4/3 of a plain step plus the Gram (``tiled`` about ``(T + N) / 3T`` of
a plain step, ``sketch`` a few percent, ``ghost`` ``N T (d_in + d_out) / 3 d_in d_out``:
only for short rows). Book-keeping (keep every ``D`` and form ``X^T (a' * D)``) would
drop the second backward's ``D`` chain at the memory cost of all ``D``; not done here.

``gamma_max=0`` without re-centering gives ``a' = a`` bit for bit; the update is then
computed by the very code of the plain step, so the new parameters are identical
to ``grpo_step`` without ``salt`` while the ``salt/*`` geometry metrics are logged.

References:
  SALT, arXiv 2606.05800 (abstract only; the formalization is SPEC section 2).
  Book-keeping alternative (X and D kept, no second backward): Bu et al.,
  arXiv:2210.00038 (not used: it stores every layer's D).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_geom.models import taps
from jaxrl_geom.rl import logprobs as lp
from jaxrl_geom.rl import losses
from jaxrl_geom.rl.step import (
    GrpoConfig,
    RolloutBatch,
    _loss,
    _merge_metrics,
    _split_micro_batches,
    _sum_stats_over_micro_batches,
    completion_logits,
)
from jaxrl_geom.salt.config import SaltConfig
from jaxrl_geom.salt.ghost import gram_of_loss, probe_gram, split_tapped
from jaxrl_geom.salt.reweight import SaltDiagnostics, reweight

#: Diagnostics logged as ``salt/<name>`` metrics.
SALT_METRICS: tuple[str, ...] = (
    "kappa_before",
    "kappa_after",
    "rank",
    "gamma",
    "effective_rank",
    "top_eig_share",
    "coef_norm_ratio",
    "ok",
)


class SaltGradients(NamedTuple):
    """What ``grpo_step`` needs from the SALT path."""

    loss: jax.Array  # [] the plain clipped loss at the ORIGINAL advantages (a value)
    grads: nnx.State  # G^T a' + beta grad KL, shaped like the parameters
    metrics: dict[str, jax.Array]  # the loss metrics (with "entropy_sum") and salt/*
    activation_stats: dict[str, taps.ChannelStats] | None  # LongAct q/k statistics


class _Aux(NamedTuple):
    loss: jax.Array  # []
    metrics: dict[str, jax.Array]
    stats: dict[str, taps.ChannelStats] | None
    active: jax.Array  # bool [n, L] clip indicators used by l_i


def _surrogate(
    model: nnx.Module,
    batch: RolloutBatch,
    config: GrpoConfig,
    *,
    num_sequences: jax.Array,
    num_tokens: jax.Array,
    active: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, _Aux]:
    """Per-rollout unit-coefficient terms ``l_i`` ``[n]``, the KL term ``[]`` and aux.

    ``active=None``: the clip indicators from the current ratio and the original
    advantages (then returned in aux); otherwise the given ones (held fixed).
    """
    mask = batch.completion_mask
    stats = None
    if config.capture_activations:
        taps.set_qk_capture(model, True)
        capture = nnx.capture(completion_logits, nnx.Intermediate)
        logits, intermediates = capture(model, batch)  # [n, L, V]
        stats = taps.collect_qk_stats(intermediates)
    else:
        logits = completion_logits(model, batch)  # [n, L, V]
    targets = batch.tokens[:, -mask.shape[1] :]  # [n, L]
    logp = lp.token_logprobs(logits, targets, config.temperature)  # [n, L]
    weights = losses.token_weights(
        mask,
        config.loss_type,
        max_completion_length=config.max_completion_length,
        num_sequences=num_sequences,
        num_tokens=num_tokens,
    )  # [n, L] w_it, normaliser included
    ratio = losses.importance_ratio(
        logp, batch.old_logprobs, mask, config.importance_sampling_level
    )  # [n, L]
    if active is None:
        active = losses.clip_active(
            jax.lax.stop_gradient(ratio), batch.advantages, config.eps_low, config.eps_high
        )  # [n, L]
    per_row = -jnp.sum(weights * active * ratio, axis=1)  # [n] l_i
    kl_term = jnp.zeros((), jnp.float32)
    if config.beta > 0:
        kl = losses.kl_k3(logp, batch.ref_logprobs, mask)  # [n, L]
        kl_term = config.beta * jnp.sum(weights * kl)

    # The plain clipped loss and its metrics, as values (what grpo_step reports).
    terms = losses.policy_loss(
        jax.lax.stop_gradient(logp),
        batch.old_logprobs,
        batch.advantages,
        mask,
        loss_type=config.loss_type,
        eps_low=config.eps_low,
        eps_high=config.eps_high,
        beta=config.beta,
        ref_logprobs=batch.ref_logprobs if config.beta > 0 else None,
        importance_sampling_level=config.importance_sampling_level,
        max_completion_length=config.max_completion_length,
        num_sequences=num_sequences,
        num_tokens=num_tokens,
    )
    metrics = dict(terms.metrics)
    entropy = lp.token_entropy(jax.lax.stop_gradient(logits), config.temperature)
    metrics["entropy_sum"] = jnp.sum(entropy * mask.astype(jnp.float32))
    aux = _Aux(terms.numerator / terms.denominator, metrics, stats, active)
    return per_row, kl_term, aux


def _plain_gradients(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    batch: RolloutBatch,
    config: GrpoConfig,
    num_sequences: jax.Array,
    num_tokens: jax.Array,
) -> tuple[jax.Array, nnx.State, dict[str, jax.Array], Any]:
    """The plain step's loss gradient, by the same code as ``grpo_step`` (bit-identical)."""
    loss_fn = functools.partial(
        _loss,
        graphdef=graphdef,
        config=config,
        num_sequences=num_sequences,
        num_tokens=num_tokens,
    )
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    m = config.num_micro_batches
    if m == 1:
        (loss, (metrics, stats)), grads = grad_fn(params, rest, batch)
        return loss, grads, metrics, stats
    micro = _split_micro_batches(batch, m)

    def accumulate(carry, mb):
        (loss_mb, aux), g_mb = grad_fn(params, rest, mb)
        loss_acc, g_acc = carry
        return (loss_acc + loss_mb, jax.tree.map(jnp.add, g_acc, g_mb)), aux

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), (metrics_stack, stats_stack) = jax.lax.scan(
        accumulate, (jnp.zeros((), jnp.float32), zeros), micro
    )
    tokens_per_micro = jnp.sum(micro.completion_mask, axis=(1, 2)).astype(jnp.float32)
    metrics = _merge_metrics(metrics_stack, tokens_per_micro)
    stats = None
    if stats_stack is not None:
        stats = {k: _sum_stats_over_micro_batches(v) for k, v in stats_stack.items()}
    return loss, grads, metrics, stats


def _micro_batch_update(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    batch: RolloutBatch,
    config: GrpoConfig,
    coefficients: jax.Array,  # [N] a'
    active: jax.Array,  # bool [N, L]
    num_sequences: jax.Array,
    num_tokens: jax.Array,
) -> nnx.State:
    """``grad (sum_i a'_i l_i + KL)`` accumulated over micro-batches (active held fixed)."""
    m = config.num_micro_batches
    plain = dataclasses.replace(config, capture_activations=False)
    micro = _split_micro_batches((batch, coefficients, active), m)

    def objective(params, mb, a_mb, active_mb):
        model = nnx.merge(graphdef, params, rest, copy=True)
        per_row, kl_term, _ = _surrogate(
            model,
            mb,
            plain,
            num_sequences=num_sequences,
            num_tokens=num_tokens,
            active=active_mb,
        )
        return jnp.dot(a_mb, per_row) + kl_term

    def accumulate(g_acc, inputs):
        g_mb = jax.grad(objective)(params, *inputs)
        return jax.tree.map(jnp.add, g_acc, g_mb), None

    grads, _ = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params), micro)
    return grads


def salt_metrics(diagnostics: SaltDiagnostics) -> dict[str, jax.Array]:
    """``salt/<name>`` float32 scalars for the metrics dict (``ok`` as 0/1)."""
    return {
        f"salt/{name}": jnp.asarray(getattr(diagnostics, name), jnp.float32)
        for name in SALT_METRICS
    }


def salt_policy_gradients(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    batch: RolloutBatch,
    config: GrpoConfig,
    salt: SaltConfig,
) -> SaltGradients:
    """The SALT-reweighted GRPO loss gradient, Gram by taps (module docstring).

    .. math::
        K = G_{scope} G_{scope}^\\top, \\quad a' = \\mathrm{reweight}(K, A), \\quad
        \\text{grads} = \\textstyle\\sum_i a'_i g_i + \\beta \\nabla \\mathrm{KL},
        \\quad g_i = \\nabla_\\theta l_i

    Used by ``grpo_step(..., salt=...)`` (traced inside its jit); the Gram is over the
    whole batch (``N x N``), replicated on a mesh.

    Args:
      graphdef, params, rest: the split policy (``TrainState`` fields).
      batch: the rollout batch (N rollouts).
      config: the GRPO options (loss type, clip range, KL, micro-batches, capture).
      salt: the SALT options.

    Returns:
      :class:`SaltGradients`; ``metrics`` holds ``salt/kappa_before``,
      ``salt/kappa_after``, ``salt/rank``, ``salt/gamma``, ``salt/effective_rank``,
      ``salt/top_eig_share``, ``salt/coef_norm_ratio`` and ``salt/ok``.
    """
    if not isinstance(salt, SaltConfig):
        raise ValueError(
            f"salt must be a jaxrl_geom.salt.SaltConfig (or None); got {type(salt).__name__}."
        )
    n = batch.tokens.shape[0]
    num_sequences = jnp.asarray(n, jnp.float32)
    num_tokens = jnp.sum(batch.completion_mask.astype(jnp.float32))
    surrogate = functools.partial(
        _surrogate, config=config, num_sequences=num_sequences, num_tokens=num_tokens
    )
    tap_kwargs = dict(
        scope=salt.scope, backend=salt.backend, sketch_dim=salt.sketch_dim, seed=salt.seed
    )
    model = nnx.merge(graphdef, params, rest)

    if salt.is_identity or config.num_micro_batches > 1:
        # Gram pass alone: differentiate w.r.t. the probes only (parameters closed over).
        def per_row_loss(m: nnx.Module, b: RolloutBatch):
            per_row, _, aux = surrogate(m, b)
            return per_row, aux

        gram, aux = gram_of_loss(per_row_loss, model, batch, has_aux=True, num_rows=n, **tap_kwargs)
        a_new, diagnostics = reweight(
            gram, batch.advantages, batch.group_ids, **salt.reweight_kwargs()
        )
        if salt.is_identity:
            loss, grads, metrics, stats = _plain_gradients(
                graphdef, params, rest, batch, config, num_sequences, num_tokens
            )
        else:
            grads = _micro_batch_update(
                graphdef, params, rest, batch, config, a_new, aux.active,
                num_sequences, num_tokens,
            )  # fmt: skip
            loss, metrics, stats = aux.loss, aux.metrics, aux.stats
    else:
        # One forward, two backward passes: cotangent (1, 0) -> Gram, (a', 1) -> update.
        tapped_graphdef, probes, _, tapped_rest = split_tapped(model, n, **tap_kwargs)

        def forward(params: nnx.State, probes: nnx.State):
            m = nnx.merge(tapped_graphdef, probes, params, tapped_rest, copy=True)
            per_row, kl_term, aux = surrogate(m, batch)
            return (per_row, kl_term), aux

        (per_row, kl_term), vjp_fn, aux = jax.vjp(forward, params, probes, has_aux=True)
        _, probe_grads = vjp_fn((jnp.ones_like(per_row), jnp.zeros_like(kl_term)))
        gram = probe_gram(probe_grads)
        a_new, diagnostics = reweight(
            gram, batch.advantages, batch.group_ids, **salt.reweight_kwargs()
        )
        grads, _ = vjp_fn((a_new.astype(per_row.dtype), jnp.ones_like(kl_term)))
        loss, metrics, stats = aux.loss, aux.metrics, aux.stats

    metrics = {**metrics, **salt_metrics(diagnostics)}
    return SaltGradients(loss=loss, grads=grads, metrics=metrics, activation_stats=stats)
