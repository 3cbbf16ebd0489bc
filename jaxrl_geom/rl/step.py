"""The GRPO train step: one jitted, pure ``(state, batch) -> (state, metrics)`` update.

Reads top-down: the rollout batch, the loss as the formula, micro-batch accumulation,
the optax update with the extra arguments SALT and LongAct need.

.. math::
    \\mathcal{L}(\\theta) = -\\sum_{i,t} w_{it}\\, \\min\\big(r_{it} A_i,
        \\mathrm{clip}(r_{it}, 1-\\epsilon_{low}, 1+\\epsilon_{high}) A_i\\big)
        + \\beta \\sum_{i,t} w_{it}\\, \\mathrm{KL}_{k3}(\\pi_\\theta \\| \\pi_{ref})_{it}

with ``w_it`` the loss-type weight (SPEC section 1). The loss is carried as a sum
over micro-batches divided by a denominator computed once from the whole batch, so
accumulation and sharding give the update of one big batch.

References: DeepSeekMath (GRPO), arXiv:2402.03300; DAPO, arXiv:2503.14476;
Dr.GRPO, arXiv:2503.20783; GSPO, arXiv:2507.18071.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from jaxrl_geom import final_update
from jaxrl_geom.models import taps
from jaxrl_geom.rl import logprobs as lp
from jaxrl_geom.rl import losses

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]


class RolloutBatch(NamedTuple):
    """N rollouts = M prompts x G generations; prompt length P, completion length L."""

    tokens: jax.Array  # int32 [N, P+L]  left-padded prompt, then completion
    positions: jax.Array  # int32 [N, P+L]
    attention_mask: jax.Array  # bool [N, P+L]  real prompt tokens + completion_mask
    completion_mask: jax.Array  # bool [N, L]  True up to and including the stop token
    old_logprobs: jax.Array  # f32 [N, L]  from the sampler (same temperature)
    ref_logprobs: jax.Array  # f32 [N, L]  frozen reference; zeros when beta == 0
    advantages: jax.Array  # f32 [N]
    group_ids: jax.Array  # int32 [N]


@dataclasses.dataclass(frozen=True)
class GrpoConfig:
    """Options of the GRPO-family loss and step (TRL names where TRL has one).

    Attributes:
      loss_type: normalisation of the token sum (SPEC section 1).
      eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]``; ``eps_high=None``
        means symmetric; ``eps_high > eps_low`` is DAPO's clip-higher.
      beta: weight of the k3 KL to the reference policy.
      importance_sampling_level: ``"token"`` (GRPO) or ``"sequence"`` (GSPO).
      temperature: the sampler's temperature; logits are divided by it here too,
        so the trainer's log-probs are those of the sampling distribution.
      max_completion_length: ``L_max`` of Dr.GRPO; default the completion axis length.
      num_micro_batches: gradient accumulation; must divide N.
      capture_activations: collect per-channel q/k statistics in the forward pass
        and pass them to the optimizer as ``activation_stats=`` (LongAct).
    """

    loss_type: LossType = "grpo"
    eps_low: float = 0.2
    eps_high: float | None = None
    beta: float = 0.0
    importance_sampling_level: Literal["token", "sequence"] = "token"
    temperature: float = 1.0
    max_completion_length: int | None = None
    num_micro_batches: int = 1
    capture_activations: bool = False

    def __post_init__(self) -> None:
        if self.loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo"):
            raise ValueError(
                f"Unknown loss_type {self.loss_type!r}; use one of 'grpo', 'bnpo', "
                "'dr_grpo', 'dapo'."
            )
        if not 0.0 <= self.eps_low < 1.0:
            raise ValueError(f"eps_low must be in [0, 1), got {self.eps_low}.")
        if self.eps_high is not None and self.eps_high < 0.0:
            raise ValueError(f"eps_high must be >= 0 (or None for symmetric), got {self.eps_high}.")
        if self.beta < 0.0:
            raise ValueError(f"beta (KL weight) must be >= 0, got {self.beta}.")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(
                "importance_sampling_level must be 'token' (GRPO) or 'sequence' (GSPO), got "
                f"{self.importance_sampling_level!r}."
            )
        if self.temperature <= 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if self.num_micro_batches < 1:
            raise ValueError(f"num_micro_batches must be >= 1, got {self.num_micro_batches}.")


class TrainState(struct.PyTreeNode):
    """Everything a GRPO step updates. ``graphdef`` and ``tx`` are static."""

    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformationExtraArgs = struct.field(pytree_node=False)
    params: nnx.State  # nnx.Param leaves of the policy
    rest: nnx.State  # any non-parameter model state (carried unchanged)
    opt_state: optax.OptState
    step: jax.Array  # int32 []  every grpo_step call, skipped or not
    skipped_steps: jax.Array  # int32 []  calls skipped for a non-finite loss/grad/update

    @classmethod
    def create(cls, model: nnx.Module, tx: optax.GradientTransformation) -> TrainState:
        """Split ``model`` once and initialise the optimizer on its parameters.

        Raises:
          ValueError: the optimizer has a link that must transform the final update
            (``longact``) somewhere else than last (:mod:`jaxrl_geom.final_update`).
        """
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx = _with_extra_args(tx)
        final_update.check_placement(jax.eval_shape(tx.init, params))  # before allocating
        state = cls(
            graphdef=graphdef,
            tx=tx,
            params=params,
            rest=rest,
            opt_state=tx.init(params),
            step=jnp.zeros((), jnp.int32),
            skipped_steps=jnp.zeros((), jnp.int32),
        )
        # One jitted copy puts every leaf on the canonical sharding a jitted step
        # returns (e.g. P() rather than P(None,), the step counter on the mesh), so
        # the second step does not recompile.
        return jax.jit(lambda s: jax.tree.map(jnp.copy, s))(state)

    def model(self) -> nnx.Module:
        """The policy as an NNX module (a fresh object sharing these arrays)."""
        return nnx.merge(self.graphdef, self.params, self.rest)


def _with_extra_args(tx: Any) -> optax.GradientTransformationExtraArgs:
    """``tx`` as an ExtraArgs transform that forwards ``coefficients=`` etc. where it can.

    ``optax.with_extra_args_support`` drops the extra arguments of any plain
    ``GradientTransformation``, also of those whose ``update`` takes ``**extra_args``
    and forwards them (``optax.MultiSteps``): a LongAct link inside would never see
    ``activation_stats=``. Such an ``update`` is kept as it is.
    """
    if isinstance(tx, optax.GradientTransformationExtraArgs):
        return tx
    if isinstance(tx, optax.MultiSteps):
        tx = tx.gradient_transformation()
    kinds = (p.kind for p in inspect.signature(tx.update).parameters.values())
    if inspect.Parameter.VAR_KEYWORD in kinds:
        return optax.GradientTransformationExtraArgs(tx.init, tx.update)
    return optax.with_extra_args_support(tx)


def validate_batch(batch: RolloutBatch, config: GrpoConfig) -> None:
    """Check shapes and consistency of a rollout batch (eagerly, before jit), and on a
    concrete batch that advantages and log-probs are finite (naming the rows)."""
    n, s = batch.tokens.shape
    if n == 0:
        raise ValueError("Empty rollout batch (N = 0): sample at least one group of rollouts.")
    l_comp = batch.completion_mask.shape[1]
    expected = {
        "positions": (n, s),
        "attention_mask": (n, s),
        "completion_mask": (n, l_comp),
        "old_logprobs": (n, l_comp),
        "ref_logprobs": (n, l_comp),
        "advantages": (n,),
        "group_ids": (n,),
    }
    for name, shape in expected.items():
        got = getattr(batch, name).shape
        if got != shape:
            raise ValueError(
                f"RolloutBatch.{name} has shape {got}, expected {shape} for tokens of shape "
                f"{(n, s)} and completion length {l_comp}. Build batches with "
                "jaxrl_geom.rl.rollouts or keep every field aligned on the rollout axis."
            )
    if l_comp >= s:
        raise ValueError(
            f"Completion length {l_comp} must be shorter than the sequence length {s}: "
            "tokens must hold at least one prompt token before the completion."
        )
    if n % config.num_micro_batches:
        raise ValueError(
            f"num_micro_batches={config.num_micro_batches} must divide the number of "
            f"rollouts N={n}."
        )
    for name in ("advantages", "old_logprobs", "ref_logprobs"):
        _check_finite_rows(name, getattr(batch, name), batch.completion_mask)


def _check_finite_rows(name: str, x: jax.Array, completion_mask: jax.Array) -> None:
    """Name the rows of a concrete batch field holding NaN/inf where it is read (masked
    completion slots may hold anything). Nothing under jit: the step's finite guard
    skips such a batch instead."""
    if isinstance(x, jax.core.Tracer) or isinstance(completion_mask, jax.core.Tracer):
        return
    x = np.asarray(x)
    read = np.asarray(completion_mask) if x.ndim == 2 else np.ones(x.shape, bool)
    bad = np.flatnonzero((~np.isfinite(x) & read).reshape(len(x), -1).any(axis=1))
    if bad.size:
        raise ValueError(
            f"RolloutBatch.{name} is NaN or inf in rows {bad[:10].tolist()}"
            f"{' ...' if bad.size > 10 else ''}: compute advantages with group_advantages "
            "(it rejects non-finite rewards) and log-probs from finite logits; grpo_step "
            "would skip this batch."
        )


def completion_hidden(model: nnx.Module, batch: RolloutBatch) -> jax.Array:  # [N, L, D]
    """Final-normed hidden states at positions P-1 .. P+L-2 (they predict the completion)."""
    l_comp = batch.completion_mask.shape[1]
    hidden, _ = model.hidden(
        batch.tokens[:, :-1], batch.positions[:, :-1], batch.attention_mask[:, :-1]
    )  # [N, P+L-1, D]
    return hidden[:, -l_comp:]


def completion_logits(model: nnx.Module, batch: RolloutBatch) -> jax.Array:  # [N, L, V]
    """Logits that predict the completion tokens (positions P-1 .. P+L-2).

    Runs the head at every position (SALT's tied-head Gram tap needs the logits
    aligned with the token lookup); the train step uses :func:`completion_hidden`
    and :func:`completion_logprobs` instead, which never hold ``[N, L, V]``.
    """
    l_comp = batch.completion_mask.shape[1]
    logits, _ = model(
        batch.tokens[:, :-1], batch.positions[:, :-1], batch.attention_mask[:, :-1]
    )  # [N, P+L-1, V]
    return logits[:, -l_comp:]


def completion_logprobs(
    model: nnx.Module, hidden: jax.Array, batch: RolloutBatch, temperature: float
) -> tuple[jax.Array, jax.Array]:  # f32 [N, L] log-probs, f32 [N, L] entropy (no grad)
    """Log-probs and entropies of the completion tokens from ``completion_hidden``,
    the LM head run in chunks of ``model.config.logits_chunk_tokens`` positions
    (:func:`jaxrl_geom.rl.logprobs.chunked_logprobs`)."""
    targets = batch.tokens[:, -batch.completion_mask.shape[1] :]  # [N, L]
    chunk = model.config.logits_chunk_tokens
    return lp.chunked_logprobs(model.head, hidden, targets, temperature, chunk_tokens=chunk)


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature"))
def policy_logprobs(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    batch: RolloutBatch,
    temperature: float = 1.0,
) -> jax.Array:  # f32 [N, L]
    """Teacher-forced log-probs of the completion tokens, e.g. under the frozen
    reference policy for the KL term (same temperature scaling as the sampler)."""
    model = nnx.merge(graphdef, params, rest)
    return completion_logprobs(model, completion_hidden(model, batch), batch, temperature)[0]


def forward_with_stats(
    model: nnx.Module, batch: RolloutBatch, capture: bool
) -> tuple[jax.Array, dict[str, taps.ChannelStats] | None]:
    """Completion hidden states ``[N, L, D]`` and, with ``capture``, the per-layer q/k
    channel statistics of this forward pass (reductions only, via ``nnx.capture``)."""
    if not capture:
        return completion_hidden(model, batch), None
    taps.set_qk_capture(model, True)
    hidden, intermediates = nnx.capture(completion_hidden, nnx.Intermediate)(model, batch)
    return hidden, taps.collect_qk_stats(intermediates)


def loss_and_metrics(
    logp: jax.Array,
    entropy: jax.Array,
    batch: RolloutBatch,
    config: GrpoConfig,
    *,
    num_sequences: jax.Array,
    num_tokens: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The micro-batch share of the loss, ``numerator / global denominator``, and its
    metrics (with ``entropy_sum``), from the completion log-probs ``logp [n, L]`` and
    the token entropies ``entropy [n, L]`` (a value: no gradient flows through it)."""
    terms = losses.policy_loss(
        logp,
        batch.old_logprobs,
        batch.advantages,
        batch.completion_mask,
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
    mask = batch.completion_mask.astype(jnp.float32)
    metrics = dict(terms.metrics)
    metrics["entropy_sum"] = jnp.sum(entropy * mask)
    return terms.numerator / terms.denominator, metrics


def micro_batch_loss(
    params: nnx.State,
    rest: nnx.State,
    batch: RolloutBatch,
    *,
    graphdef: nnx.GraphDef,
    config: GrpoConfig,
    num_sequences: jax.Array,
    num_tokens: jax.Array,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], Any]]:
    """Micro-batch share of the loss (:func:`loss_and_metrics`) and ``(metrics, q/k stats)``."""
    model = nnx.merge(graphdef, params, rest)
    hidden, stats = forward_with_stats(model, batch, config.capture_activations)  # [n, L, D]
    logp, entropy = completion_logprobs(model, hidden, batch, config.temperature)  # [n, L]
    loss, metrics = loss_and_metrics(
        logp, entropy, batch, config, num_sequences=num_sequences, num_tokens=num_tokens
    )
    return loss, (metrics, stats)


def split_micro_batches(tree: Any, m: int) -> Any:
    """[N, ...] -> [m, N/m, ...], micro-batch k = rows k, k+m, ... (keeps the batch
    sharding: every micro-batch is spread over all data-parallel devices)."""

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0] // m, m, *x.shape[1:])  # [N/m, m, ...]
        return jnp.swapaxes(x, 0, 1)  # [m, N/m, ...]

    return jax.tree.map(split, tree)


def merge_micro_batches(tree: Any) -> Any:
    """Inverse of :func:`split_micro_batches`: [m, N/m, ...] -> [N, ...]."""
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), tree)


def merge_metrics(per_micro: dict[str, jax.Array], weights: jax.Array) -> dict[str, jax.Array]:
    """Combine stacked micro-batch metrics: token-weighted means, min of mins, max of maxes."""
    out = {}
    w = weights / jnp.maximum(jnp.sum(weights), 1.0)
    for k, v in per_micro.items():
        if k.startswith("completion_length/") and k.endswith("mean"):
            out[k] = jnp.mean(v)  # a per-sequence mean; micro-batches hold equal N/m rows
        elif k.endswith("_sum"):
            out[k] = jnp.sum(v)
        elif k.endswith("min"):
            out[k] = jnp.min(v)
        elif k.endswith("max"):
            out[k] = jnp.max(v)
        else:
            out[k] = jnp.sum(v * w)
    return out


def combine_micro_batch_stats(stack: taps.ChannelStats) -> taps.ChannelStats:
    """Combine per-micro-batch channel statistics stacked on axis 0."""
    return taps.ChannelStats(
        sum_abs=jnp.sum(stack.sum_abs, 0),
        sum_sq=jnp.sum(stack.sum_sq, 0),
        max_abs=jnp.max(stack.max_abs, 0),
        count=jnp.sum(stack.count, 0),
    )


class Gradients(NamedTuple):
    """What a gradient estimator hands to the optimizer part of :func:`grpo_step`."""

    loss: jax.Array  # [] the clipped loss at the batch's advantages (a value)
    grads: nnx.State  # shaped like the parameters
    metrics: dict[str, jax.Array]  # loss metrics with "entropy_sum", plus the estimator's own
    activation_stats: dict[str, taps.ChannelStats] | None  # LongAct q/k statistics


class GradientEstimator(Protocol):
    """The pluggable gradient computation of :func:`grpo_step`.

    ``estimator(graphdef, params, rest, batch, config, step=step) -> Gradients``, traced
    inside ``grpo_step``'s jit. It is passed as a jit ARGUMENT, so it must be a pytree:
    array leaves are traced (changing them does not recompile), the rest is static (e.g.
    a ``flax.struct.PyTreeNode``; wrap a plain function in ``jax.tree_util.Partial``).
    :func:`plain_gradients` is the default; SALT's is ``jaxrl_geom.salt.salt_estimator``.
    """

    def __call__(
        self,
        graphdef: nnx.GraphDef,
        params: nnx.State,
        rest: nnx.State,
        batch: RolloutBatch,
        config: GrpoConfig,
        *,
        step: jax.Array,
    ) -> Gradients: ...


def accumulate_micro_batches(
    fn: Callable[[Any], Gradients],
    inputs: Any,
    completion_mask: jax.Array,
    m: int,
    params: nnx.State,
) -> Gradients:
    """Sum ``fn`` over ``m`` micro-batches of ``inputs`` (:func:`split_micro_batches`):
    losses and gradients (shaped like ``params``) add, metrics merge token-weighted
    (:func:`merge_metrics`), q/k statistics combine. ``m == 1`` calls ``fn(inputs)``."""
    if m == 1:
        return fn(inputs)

    def body(carry, mb):
        out = fn(mb)
        loss_acc, g_acc = carry
        carry = (loss_acc + out.loss, jax.tree.map(jnp.add, g_acc, out.grads))
        return carry, (out.metrics, out.activation_stats)

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), (metrics_stack, stats_stack) = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), zeros), split_micro_batches(inputs, m)
    )
    tokens_per_micro = jnp.sum(split_micro_batches(completion_mask, m), axis=(1, 2))
    metrics = merge_metrics(metrics_stack, tokens_per_micro.astype(jnp.float32))
    stats = None
    if stats_stack is not None:
        stats = {k: combine_micro_batch_stats(v) for k, v in stats_stack.items()}
    return Gradients(loss, grads, metrics, stats)


def global_denominators(batch: RolloutBatch) -> tuple[jax.Array, jax.Array]:
    """``(num_sequences, num_tokens)`` of the WHOLE batch, float32 scalars."""
    num_sequences = jnp.asarray(batch.tokens.shape[0], jnp.float32)
    return num_sequences, jnp.sum(batch.completion_mask.astype(jnp.float32))


def plain_gradients(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    batch: RolloutBatch,
    config: GrpoConfig,
    *,
    step: jax.Array | None = None,
) -> Gradients:
    """The default :class:`GradientEstimator`: ``value_and_grad`` of
    :func:`micro_batch_loss`, accumulated over ``config.num_micro_batches``."""
    del step
    num_sequences, num_tokens = global_denominators(batch)
    loss_fn = functools.partial(
        micro_batch_loss,
        graphdef=graphdef,
        config=config,
        num_sequences=num_sequences,
        num_tokens=num_tokens,
    )
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def one(mb: RolloutBatch) -> Gradients:
        (loss, (metrics, stats)), grads = grad_fn(params, rest, mb)
        return Gradients(loss, grads, metrics, stats)

    m = config.num_micro_batches
    return accumulate_micro_batches(one, batch, batch.completion_mask, m, params)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnums=(0,))
def grpo_step(
    state: TrainState,
    batch: RolloutBatch,
    config: GrpoConfig = GrpoConfig(),
    estimator: GradientEstimator | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on a rollout batch.

    The optimizer receives the extra arguments ``coefficients=`` (the advantages),
    ``group_ids=`` and, with ``config.capture_activations``, ``activation_stats=``
    (per-layer q/k channel statistics), so SALT and LongAct chain in as ordinary
    optax transforms.

    Args:
      state: the :class:`TrainState` (donated: do not reuse it after the call).
      batch: a :class:`RolloutBatch` of N rollouts.
      config: static :class:`GrpoConfig`.
      estimator: the gradient computation, a :class:`GradientEstimator` pytree (traced
        leaves, e.g. SALT's knobs, never recompile); ``None`` is :func:`plain_gradients`.
        ``jaxrl_geom.salt.salt_estimator(SaltConfig(...))`` reweights the advantages by
        the Gram geometry and logs ``salt/*`` metrics.

    Returns:
      ``(new_state, metrics)`` with loss, grad/update norms, the loss metrics and,
      with a LongAct link, ``longact/<q|k>_{selected_fraction,overlap,concentration}``.

    A non-finite loss, gradient or update makes the call a no-op on the parameters
    and the optimizer state (bit-identical, see :func:`_skip_if_not_finite`):
    ``step`` and ``skipped_steps`` count it and ``metrics["skipped"]`` is 1.

    Raises:
      ValueError: a malformed batch (:func:`validate_batch`: empty, misaligned
        shapes, ``num_micro_batches`` not dividing N), an optimizer whose ``longact()``
        link is not last (:func:`jaxrl_geom.final_update.check_placement`), or one with
        a ``longact()`` link while ``config.capture_activations`` is False.
    """
    validate_batch(batch, config)  # shapes are static: raises while tracing, before XLA
    _check_optimizer(state.opt_state, config)
    num_tokens = jnp.sum(batch.completion_mask.astype(jnp.float32))
    estimator = plain_gradients if estimator is None else estimator
    out = estimator(state.graphdef, state.params, state.rest, batch, config, step=state.step)
    loss, grads, metrics, stats = out

    extra: dict[str, Any] = {"coefficients": batch.advantages, "group_ids": batch.group_ids}
    if stats is not None:
        extra["activation_stats"] = stats
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params, **extra)
    params = optax.apply_updates(state.params, updates)

    metrics = dict(metrics)
    metrics["entropy"] = metrics.pop("entropy_sum") / jnp.maximum(num_tokens, 1.0)
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["update_norm"] = optax.tree.norm(updates)
    metrics.update(final_update.link_metrics(opt_state))  # e.g. longact/<q|k>_<diagnostic>
    return _skip_if_not_finite(state, params, opt_state, metrics)


def _check_optimizer(opt_state: optax.OptState, config: GrpoConfig) -> None:
    """Placement and extra arguments of final-update links (LongAct), at trace time."""
    final_update.check_placement(opt_state)
    provided = ("activation_stats",) if config.capture_activations else ()
    hint = (
        "set GrpoConfig(capture_activations=True) so that grpo_step collects the per-channel "
        "q/k statistics and passes them as activation_stats="
    )
    final_update.check_extra_args(opt_state, provided, {"activation_stats": hint})


def _skip_if_not_finite(
    state: TrainState,
    params: nnx.State,
    opt_state: optax.OptState,
    metrics: dict[str, jax.Array],
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Commit the update only if the loss, the gradient and the update are finite.

    .. math::
        \\mathrm{ok} = \\mathrm{isfinite}(\\mathcal{L}) \\wedge
        \\mathrm{isfinite}(\\|g\\|_2) \\wedge \\mathrm{isfinite}(\\|u\\|_2), \\qquad
        (\\theta, s) \\leftarrow \\mathrm{ok}\\ ?\\ (\\theta', s')\\ :\\ (\\theta, s)

    The global norms (already in ``metrics``) are finite iff every entry is, except
    that a norm overflowing float32 (entries beyond ~1e19) also counts as non-finite;
    reusing them adds no pass over the gradients and leaves XLA's fusion of the update
    unchanged. A skipped step leaves ``params`` and ``opt_state`` bit-identical (a
    select, not ``theta + 0``, which would turn -0.0 into 0.0), still counts ``step``,
    counts ``skipped_steps`` and reports ``metrics["skipped"] = 1.0`` (the other metrics
    show the offending values). The gradient is checked too because a masked link
    (LongAct) can hide a NaN gradient from the update while Adam's moments absorb it.
    ``optax.apply_if_finite`` is not used: it checks only the incoming gradients,
    changes the user's optimizer-state structure, applies ``theta + 0`` and, after
    ``max_consecutive_errors``, applies the non-finite update anyway.
    """
    ok = jnp.isfinite(metrics["loss"])
    ok &= jnp.isfinite(metrics["grad_norm"]) & jnp.isfinite(metrics["update_norm"])
    keep_new = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
    new_state = state.replace(
        params=keep_new(params, state.params),
        opt_state=keep_new(opt_state, state.opt_state),
        step=state.step + 1,
        skipped_steps=state.skipped_steps + (~ok).astype(jnp.int32),
    )
    return new_state, {**metrics, "skipped": (~ok).astype(jnp.float32)}
