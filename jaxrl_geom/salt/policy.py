"""SALT's scalable path: ``grpo_step(state, batch, config, salt_estimator(SaltConfig()))``.

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

1. one forward and one backward of ``sum_i l_i`` (only the activation gradients
   ``D``: the weight gradients are dead code) gives ``K = G G^T`` over ``scope``
   (never holding ``G``);
2. ``a' = reweight(K, A, group_ids)``;
3. the update ``G^T a' + beta grad KL`` (the KL term is not part of ``Phi``; its
   gradient is added unchanged), by one of two paths that give the same update:

   * **book-keeping** (:mod:`jaxrl_geom.salt.bookkeeping`, when the kept tensors fit
     ``SaltConfig.keep_budget_gib``): every op's ``X`` and ``D`` are kept from step 1,
     and each parameter's gradient is one matmul ``X^T (a' * D + D^kl)``; with a KL
     term the backward also propagates the KL's ``D^kl`` (a second cotangent through
     the same vjp). Micro-batches run forward + backward one at a time and keep
     their ``X``, ``D``; the Gram couples all rows, so it is formed after the last.
   * **recompute**: the Gram blocks are formed inside the backward by custom_vjp taps
     (``D`` dies where it is produced, :mod:`jaxrl_geom.salt.ghost`); a second
     backward with cotangents ``(a', 1)`` on ``(l, KL)`` gives the update (shared
     forward, ``jax.vjp``); with ``m > 1`` micro-batches the Gram pass runs on the
     full batch and the update accumulates over micro-batches with the clip
     indicators of step 1 held fixed.

FLOPs against a plain step's ``6P`` per token (SPEC section 2): book-keeping ``8P``
plus the Gram blocks (about 1.33x), recompute ``10P`` plus the Gram (1.67x); a KL
term adds ``2P`` to book-keeping (its ``D`` chain). Gram blocks: ``tiled`` about
``(T + N) / 3T`` of a plain step, ``sketch`` a few percent, ``ghost``
``N T (d_in + d_out) / 3 d_in d_out`` (only for short rows).

The LM head runs only at the completion positions, in the plain step's chunks
(:mod:`jaxrl_geom.salt.head`): its Gram block and book-keeping use the kept
``(h, y, lse, g)`` per position, never the ``[N, L, V]`` logits or their cotangent.

``gamma_max=0`` without re-centering gives ``a' = a`` bit for bit; the update is then
computed by the very code of the plain step, so the new parameters are identical
to ``grpo_step`` without ``salt`` while the ``salt/*`` geometry metrics are logged.

References:
  SALT, arXiv 2606.05800 (abstract only; the formalization is SPEC section 2).
  Book-keeping (X and D kept, no second backward): Bu et al., arXiv:2210.00038.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxrl_geom.models import taps
from jaxrl_geom.rl import losses
from jaxrl_geom.rl.step import (
    Gradients,
    GrpoConfig,
    RolloutBatch,
    accumulate_micro_batches,
    combine_micro_batch_stats,
    completion_hidden,
    global_denominators,
    loss_and_metrics,
    merge_metrics,
    plain_gradients,
    split_micro_batches,
)
from jaxrl_geom.salt import bookkeeping as bk
from jaxrl_geom.salt.config import SaltConfig
from jaxrl_geom.salt.ghost import (
    KeptD,
    KeptX,
    attach_gram_taps,
    probe_gram,
    split_tapped,
    tap_calls,
)
from jaxrl_geom.salt.head import head_logprobs
from jaxrl_geom.salt.reweight import SaltDiagnostics, SaltKnobs, _Knobs, reweight

#: Diagnostics logged as ``salt/<name>`` metrics.
SALT_METRICS: tuple[str, ...] = (
    "kappa_before",
    "kappa_after",
    "rank",
    "gamma",
    "severity",
    "effective_rank",
    "top_eig_share",
    "coef_norm_ratio",
    "zero_adv_mass",
    "ok",
)


class _Aux(NamedTuple):
    loss: jax.Array  # []
    metrics: dict[str, jax.Array]
    stats: dict[str, taps.ChannelStats] | None
    active: jax.Array  # bool [n, L] clip indicators used by l_i
    kept: Any = None  # KeptX state (book-keeping taps)


def _surrogate(
    model: nnx.Module,
    batch: RolloutBatch,
    config: GrpoConfig,
    *,
    num_sequences: jax.Array,
    num_tokens: jax.Array,
    active: jax.Array | None = None,
    keep: bool = False,
) -> tuple[jax.Array, jax.Array, _Aux]:
    """Per-rollout unit-coefficient terms ``l_i`` ``[n]``, the KL term ``[]`` and aux.

    ``active=None``: the clip indicators from the current ratio and the original
    advantages (then returned in aux); otherwise the given ones (held fixed). ``keep``:
    also capture the book-keeping taps' ``KeptX`` (one ``nnx.capture`` for all types).
    """
    mask = batch.completion_mask
    types = (nnx.Intermediate,) * config.capture_activations + (KeptX,) * keep
    stats = kept = None
    policy = functools.partial(_completion_logprobs, temperature=config.temperature)
    if types:
        if config.capture_activations:
            taps.set_qk_capture(model, True)
        (logp, entropy), *states = nnx.capture(policy, *types)(model, batch)  # [n, L] each
        if config.capture_activations:
            stats = taps.collect_qk_stats(states[0])
        kept = states[-1] if keep else None
    else:
        logp, entropy = policy(model, batch)  # [n, L] each
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
    loss, metrics = loss_and_metrics(
        jax.lax.stop_gradient(logp),
        entropy,
        batch,
        config,
        num_sequences=num_sequences,
        num_tokens=num_tokens,
    )
    return per_row, kl_term, _Aux(loss, metrics, stats, active, kept)


def _completion_logprobs(model: nnx.Module, batch: RolloutBatch, temperature: float):
    """``(log pi, entropy)`` ``[n, L]`` of the completion tokens: the trunk, then the LM
    head at the completion positions only, in the plain step's chunks, tapped
    (:func:`jaxrl_geom.salt.head.head_logprobs`)."""
    targets = batch.tokens[:, -batch.completion_mask.shape[1] :]  # [n, L]
    return head_logprobs(model, completion_hidden(model, batch), targets, temperature)


def salt_metrics(diagnostics: SaltDiagnostics) -> dict[str, jax.Array]:
    """``salt/<name>`` float32 scalars for the metrics dict (``ok`` as 0/1)."""
    return {
        f"salt/{name}": jnp.asarray(getattr(diagnostics, name), jnp.float32)
        for name in SALT_METRICS
    }


class SaltEstimator(struct.PyTreeNode):
    """SALT's :class:`~jaxrl_geom.rl.step.GradientEstimator` (build it with
    :func:`salt_estimator`). The knobs and the sketch seed are traced leaves; the rest of
    the :class:`SaltConfig` is static."""

    knobs: _Knobs
    seed: jax.Array  # uint32 []
    options: SaltConfig = struct.field(pytree_node=False)  # knob values stripped

    def __call__(
        self,
        graphdef: nnx.GraphDef,
        params: nnx.State,
        rest: nnx.State,
        batch: RolloutBatch,
        config: GrpoConfig,
        *,
        step: jax.Array,
    ) -> Gradients:
        """The SALT-reweighted GRPO loss gradient (module docstring).

        .. math::
            K = G_{scope} G_{scope}^\\top, \\quad a' = \\mathrm{reweight}(K, A), \\quad
            \\text{grads} = \\textstyle\\sum_i a'_i g_i + \\beta \\nabla \\mathrm{KL}

        ``metrics`` gains ``salt/<name>`` for :data:`SALT_METRICS`.
        """
        n = batch.tokens.shape[0]
        opts = self.options
        num_sequences, num_tokens = global_denominators(batch)
        surrogate = _bind(config, num_sequences, num_tokens)
        tap_kwargs = dict(
            scope=opts.scope,
            backend=opts.backend,
            sketch_dim=opts.sketch_dim,
            seed=self.seed,
            step=step,
            head_positions=batch.completion_mask.shape[1],
        )
        model = nnx.merge(graphdef, params, rest)
        m = config.num_micro_batches
        identity = opts.knobs.is_identity
        if not identity and opts.keep_budget_gib > 0:
            rows = n // m
            tapped = nnx.merge(*nnx.split(model))
            attach_gram_taps(tapped, rows, keep=True, **tap_kwargs)
            one = jax.tree.map(lambda x: x[:rows], batch)
            outputs = _discover(tapped, surrogate, one)
            num_d = 2 if config.beta > 0 else 1
            fits = bk.kept_bytes(outputs, num_d) * m <= opts.keep_budget_gib * 2**30
            if fits and bk.all_params_tapped(tapped, params):
                bk.set_kept_d_probes(tapped, outputs)
                return _bookkeeping(tapped, params, batch, config, surrogate, self.knobs)
        return _recompute(model, batch, config, surrogate, self.knobs, identity, tap_kwargs)


def salt_estimator(config: SaltConfig | None = None) -> SaltEstimator:
    """SALT as ``grpo_step``'s estimator: ``grpo_step(state, batch, cfg, salt_estimator(c))``.

    The knobs (``gamma_max``, ``power``, ``energy``, ``renorm``, ...) and ``seed`` become
    traced values: a new estimator with other knob values reuses the compiled step.
    """
    config = SaltConfig() if config is None else config
    if not isinstance(config, SaltConfig):
        raise ValueError(
            f"salt_estimator needs a jaxrl_geom.salt.SaltConfig; got {type(config).__name__}."
        )
    static_knobs = SaltKnobs(gamma_max=0.0 if config.knobs.is_identity else 1.0)
    options = dataclasses.replace(config, knobs=static_knobs, seed=0)
    seed = jnp.asarray(config.seed, jnp.uint32)
    return SaltEstimator(knobs=config.knobs.arrays(), seed=seed, options=options)


def _bind(config: GrpoConfig, num_sequences: jax.Array, num_tokens: jax.Array):
    def surrogate(model, batch, active=None, keep=False):
        return _surrogate(
            model,
            batch,
            config,
            num_sequences=num_sequences,
            num_tokens=num_tokens,
            active=active,
            keep=keep,
        )

    return surrogate


def _discover(tapped: nnx.Module, surrogate, batch: RolloutBatch) -> bk.Kept:
    """Shapes of every kept ``X`` and output ``y`` (one abstract trace, no FLOPs)."""
    graphdef, state = nnx.split(tapped)

    def run(state):
        with tap_calls():
            return surrogate(nnx.merge(graphdef, state), batch, keep=True)[2].kept

    return bk.kept_by_module(jax.eval_shape(run, state))


def _bookkeeping(
    tapped: nnx.Module,
    params: nnx.State,
    batch: RolloutBatch,
    config: GrpoConfig,
    surrogate,
    knobs: _Knobs,
) -> Gradients:
    """One forward + one backward (two cotangents with a KL term) per micro-batch, X and
    D kept; Gram, reweight, then ``X^T (a' D + D^kl)`` per op."""
    graphdef, probes, rest = nnx.split(tapped, KeptD, ...)

    def one(mb: RolloutBatch):
        def forward(probes):
            with tap_calls():
                model = nnx.merge(graphdef, probes, rest, copy=True)
                per_row, kl_term, aux = surrogate(model, mb, keep=True)
            return (per_row, kl_term), aux

        (per_row, kl_term), vjp_fn, aux = jax.vjp(forward, probes, has_aux=True)
        (d_pol,) = vjp_fn((jnp.ones_like(per_row), jnp.zeros_like(kl_term)))
        d_kl = None
        if config.beta > 0:
            (d_kl,) = vjp_fn((jnp.zeros_like(per_row), jnp.ones_like(kl_term)))
        return aux.loss, aux.metrics, aux.stats, aux.kept, d_pol, d_kl

    m = config.num_micro_batches
    if m == 1:
        loss, metrics, stats, kept, d_pol, d_kl = one(batch)
    else:
        loss, metrics, stats, kept, d_pol, d_kl = jax.lax.map(one, split_micro_batches(batch, m))
        loss = jnp.sum(loss)
        tokens = jnp.sum(split_micro_batches(batch.completion_mask, m), axis=(1, 2))
        metrics = merge_metrics(metrics, tokens.astype(jnp.float32))
        if stats is not None:
            stats = {k: combine_micro_batch_stats(v) for k, v in stats.items()}
    xs, d_pol = bk.kept_by_module(kept), bk.kept_by_module(d_pol)
    d_kl = None if d_kl is None else bk.kept_by_module(d_kl)
    if m > 1:  # stacked ops (scanned layers) keep [m, L, N/m, ...]
        merge = lambda k: None if k is None else bk.merge_kept(tapped, k)  # noqa: E731
        xs, d_pol, d_kl = merge(xs), merge(d_pol), merge(d_kl)
    head = bk.HeadOptions(config.temperature, tapped.config.logits_chunk_tokens)
    gram = bk.gram_from_kept(tapped, xs, d_pol, head=head)
    a_new, diagnostics = reweight(gram, batch.advantages, batch.group_ids, knobs)
    weighted = bk.weigh_kept(tapped, a_new, d_pol, d_kl)
    grads = bk.grads_from_kept(tapped, params, xs, weighted, head=head)
    metrics = {**metrics, **salt_metrics(diagnostics)}
    return Gradients(loss=loss, grads=grads, metrics=metrics, activation_stats=stats)


def _recompute(
    model: nnx.Module,
    batch: RolloutBatch,
    config: GrpoConfig,
    surrogate,
    knobs: _Knobs,
    identity: bool,
    tap_kwargs: dict[str, Any],
) -> Gradients:
    """Gram inside the backward (custom_vjp taps), then a second backward for the update."""
    n = batch.tokens.shape[0]
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tapped_graphdef, probes, _, tapped_rest = split_tapped(model, n, **tap_kwargs)

    def forward(params: nnx.State, probes: nnx.State):
        with tap_calls():
            m = nnx.merge(tapped_graphdef, probes, params, tapped_rest, copy=True)
            per_row, kl_term, aux = surrogate(m, batch)
        return (per_row, kl_term), aux

    if identity or config.num_micro_batches > 1:
        # Gram pass alone: differentiate w.r.t. the probes only.
        gram_pass = lambda p: forward(params, p)  # noqa: E731
        (per_row, kl_term), vjp_fn, aux = jax.vjp(gram_pass, probes, has_aux=True)
        (probe_grads,) = vjp_fn((jnp.ones_like(per_row), jnp.zeros_like(kl_term)))
        gram = probe_gram(probe_grads)
        a_new, diagnostics = reweight(gram, batch.advantages, batch.group_ids, knobs)
        if identity:  # the plain step's own code: bit-identical update and metrics
            out = plain_gradients(graphdef, params, rest, batch, config)
            metrics = {**out.metrics, **salt_metrics(diagnostics)}
            return out._replace(metrics=metrics)
        grads = _micro_batch_update(graphdef, params, rest, batch, config, a_new, aux.active)
    else:
        # One forward, two backward passes: cotangent (1, 0) -> Gram, (a', 1) -> update.
        (per_row, kl_term), vjp_fn, aux = jax.vjp(forward, params, probes, has_aux=True)
        _, probe_grads = vjp_fn((jnp.ones_like(per_row), jnp.zeros_like(kl_term)))
        gram = probe_gram(probe_grads)
        a_new, diagnostics = reweight(gram, batch.advantages, batch.group_ids, knobs)
        grads, _ = vjp_fn((a_new.astype(per_row.dtype), jnp.ones_like(kl_term)))
    metrics = {**aux.metrics, **salt_metrics(diagnostics)}
    return Gradients(loss=aux.loss, grads=grads, metrics=metrics, activation_stats=aux.stats)


def _micro_batch_update(graphdef, params, rest, batch, config, a_new, active) -> nnx.State:
    """``grad (sum_i a'_i l_i + KL)`` accumulated over micro-batches (active held fixed)."""
    plain = dataclasses.replace(config, capture_activations=False)
    num_sequences, num_tokens = global_denominators(batch)
    surrogate = _bind(plain, num_sequences, num_tokens)

    def one(inputs) -> Gradients:
        mb, a_mb, active_mb = inputs

        def objective(params):
            model = nnx.merge(graphdef, params, rest, copy=True)
            per_row, kl_term, _ = surrogate(model, mb, active=active_mb)
            return jnp.dot(a_mb, per_row) + kl_term

        grads = jax.grad(objective)(params)
        zero = jnp.zeros((), jnp.float32)
        return Gradients(zero, grads, {"loss_sum": zero}, None)

    inputs = (batch, a_new, active)
    m = config.num_micro_batches
    return accumulate_micro_batches(one, inputs, batch.completion_mask, m, params).grads
