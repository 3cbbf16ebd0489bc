"""LongAct as an optax transformation: saliency-masked updates of W_Q and W_K.

SPEC section 3. Two exact ways to use it, both masking the FINAL update (after the
optimizer and its weight decay), so unselected columns stay bit-identical:

.. code-block:: python

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6), longact(keep_ratio=0.3))
    tx = masked_optimizer(optax.adamw(1e-6), longact(keep_ratio=0.3), mask_gradients=True)

Placement is checked by :func:`check_chain` (on any transform) and, on every use, by
``TrainState.create`` / ``grpo_step`` (from the structure of the optimizer state, see
:mod:`jaxrl_geom.final_update`): ``longact`` in front of the optimizer would only mask
the gradient, and Adam momentum and weight decay would still move the "frozen" columns.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxrl_geom import final_update
from jaxrl_geom.longact import mask as mask_lib
from jaxrl_geom.longact.stats import Statistic, channel_scores, check_statistic, update_ema
from jaxrl_geom.param_paths import path_to_str

Refresh = Literal["step", "ema", "fixed"]
REFRESH_MODES: tuple[str, ...] = get_args(Refresh)
TARGETS: tuple[str, ...] = ("q", "k")
DEFAULT_KEEP_RATIO = 0.3

#: Parameter paths LongAct masks: ``[...]layers.<i>.self_attn.<q|k>_proj.<kernel|bias>``,
#: with an optional trailing ``.value`` (``nnx.Variable`` leaves of an ``nnx.State``);
#: without ``<i>`` the parameter is stacked over layers (``[L, in, C]`` / ``[L, C]``).
DEFAULT_PARAM_PATTERN = (
    r"(?:^|\.)layers\.(?:(?P<layer>\d+)\.)?self_attn\.(?P<target>[a-z]+)_proj"
    r"\.(?P<kind>kernel|bias)(?:\.value)?$"
)

_PLACEMENT_FIX = (
    "optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr), longact(...)), or wrap the "
    "optimizer: masked_optimizer(optax.adamw(lr), longact(...)). Masking only the gradient "
    "lets Adam momentum and weight decay move the frozen W_Q/W_K columns."
)
_METRIC_NAMES = (
    ("selected_fraction", "selected_fraction"),
    ("mask_overlap", "overlap"),
    ("saliency_concentration", "concentration"),
)
_CAPTURE_FIX = (
    "enable the q/k capture: set_qk_capture(model, True), run the training forward, and pass "
    "activation_stats=collect_qk_stats(model) (grpo_step does this when "
    "GrpoConfig.capture_activations=True)"
)


class LongActDiagnostics(NamedTuple):
    """Per-target (``"q"``, ``"k"``) per-layer diagnostics of the mask in use."""

    selected_fraction: dict[str, jax.Array]  # per target [L] fraction of channels updated
    mask_overlap: dict[str, jax.Array]  # per target [L] |prev & cur| / |cur| (1 = unchanged)
    saliency_concentration: dict[str, jax.Array]  # per target [L] share of |s| kept


class LongActState(NamedTuple):
    """State of :func:`longact`. Read diagnostics with ``optax.tree.get(state, name)``.

    Declares itself a final-update link (:mod:`jaxrl_geom.final_update`), so that
    ``grpo_step`` checks its placement and capture and logs :meth:`step_metrics`
    without importing LongAct.
    """

    count: jax.Array  # [] int32, number of updates so far
    masks: dict[str, jax.Array]  # per target bool [L, C]; all True before the first update
    ema_scores: dict[str, jax.Array]  # per target f32 [L, C]; used by refresh="ema"
    diagnostics: LongActDiagnostics  # of the last update

    final_update_link = "longact"
    required_extra_args = ("activation_stats",)
    placement_fix = _PLACEMENT_FIX

    def step_metrics(self) -> dict[str, jax.Array]:
        """``{"<t>_selected_fraction" | "<t>_overlap" | "<t>_concentration": mean over
        layers}`` for each masked target ``t``."""
        out = {}
        for field, short in _METRIC_NAMES:
            for target, per_layer in getattr(self.diagnostics, field).items():
                out[f"{target}_{short}"] = jnp.mean(per_layer)  # [L] -> []
        return out


class MaskedOptimizerState(NamedTuple):
    """State of :func:`masked_optimizer`: the inner optimizer's and LongAct's."""

    inner_state: Any
    longact_state: LongActState


class LongActTransformation(optax.GradientTransformationExtraArgs):
    """A ``GradientTransformationExtraArgs`` tagged as LongAct (for placement checks).

    Behaves exactly like its base class inside ``optax.chain``. ``core`` holds the mask
    refresh / apply functions that :func:`masked_optimizer` reuses.
    """


class _Core(NamedTuple):
    refresh: Any  # (state, activation_stats) -> LongActState (masks refreshed)
    apply: Any  # (updates, masks) -> updates with unselected columns zeroed
    init: Any  # params -> LongActState


def longact(
    keep_ratio: float | None = None,
    *,
    sparsity: float | None = None,
    targets: tuple[str, ...] = TARGETS,
    statistic: Statistic = "mean_abs",
    scope: mask_lib.Scope = "layer",
    granularity: mask_lib.Granularity = "channel",
    refresh: Refresh = "step",
    ema_decay: float = 0.9,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    param_pattern: str = DEFAULT_PARAM_PATTERN,
) -> LongActTransformation:
    """LongAct: update only the most salient query/key channels.

    For every attention layer ``l`` and target ``t`` in ``targets`` (``W_Q``, ``W_K``):

    .. math::
        s_{lc} = \\mathrm{statistic}_{\\mathrm{valid\\ tokens}}\\, |t_{lc}|, \\qquad
        M_l = \\mathrm{select}(s_l;\\ \\rho), \\qquad
        \\Delta W^t_l[:, c] \\leftarrow M_{lc}\\, \\Delta W^t_l[:, c], \\quad
        \\Delta b^t_l[c] \\leftarrow M_{lc}\\, \\Delta b^t_l[c]

    with ``select`` = :func:`~jaxrl_geom.longact.mask.select_channels` (top
    ``ceil(rho * C)`` channels per layer, or per head, or whole RoPE pairs). Every
    other parameter passes through untouched (the same array object). Put it LAST in
    the chain so that it masks the final update (SPEC: frozen entries stay
    bit-identical), or use :func:`masked_optimizer`.

    Knob to abstract (arXiv 2604.14922): "saliency" -> ``statistic`` over q/k
    activations; "30% sparsity" -> ``keep_ratio`` / ``sparsity``; "sparse updates" ->
    the column mask. Ours: scores are computed before RoPE (after q/k norm), the
    ``scope`` / ``granularity`` / ``refresh`` options, lowest-index tie breaking.

    Args:
      keep_ratio: fraction of channels KEPT (updated), in ``(0, 1]``; default 0.3.
      sparsity: fraction DROPPED, in ``[0, 1)``; ``sparsity=s`` equals
        ``keep_ratio=1-s``. The abstract's "30%" is ambiguous: ``keep_ratio=0.3``
        reads it as kept, ``sparsity=0.3`` as dropped. Mutually exclusive.
      targets: subset of ``("q", "k")``.
      statistic: ``"mean_abs"`` (default), ``"rms"`` or ``"max_abs"``.
      scope: ``"layer"`` or ``"head"`` (top-k within each head).
      granularity: ``"channel"`` or ``"rope_pair"`` (pairs ``(j, j+hd/2)`` together).
      refresh: ``"step"`` (mask from this batch, default), ``"ema"`` (from an EMA of
        the scores, see :func:`~jaxrl_geom.longact.stats.update_ema`) or ``"fixed"``
        (from the first batch, a calibration batch, then frozen).
      ema_decay: EMA decay ``beta`` in ``[0, 1)`` for ``refresh="ema"``.
      num_heads, num_kv_heads, head_dim: head layout of q_proj / k_proj, needed for
        ``scope="head"`` or ``"rope_pair"`` (a ``ModelConfig``'s
        ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``). ``head_dim`` is
        inferred from either head count.
      param_pattern: regex over the '.'-joined parameter path with named groups
        ``layer``, ``target`` and ``kind`` (default :data:`DEFAULT_PARAM_PATTERN`).

    Extra args of ``update``: ``activation_stats={"q": ChannelStats [L, Cq], "k":
    ChannelStats [L, Ck]}`` from ``collect_qk_stats`` (may be omitted with
    ``refresh="fixed"`` after the first update; a missing calibration batch is caught
    outside ``jit`` only); others are ignored.

    Diagnostics (``optax.tree.get(state, name)``, per target, ``[L]``):
    ``selected_fraction`` (channels updated / C), ``mask_overlap`` (fraction of the
    channels kept now that were kept at the previous update; 1 at the first update,
    whose "previous" mask is all-True) and ``saliency_concentration`` (share of this
    batch's total score held by the kept channels).

    Example:
      >>> tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6),
      ...                  longact(keep_ratio=0.3))
      >>> updates, state = tx.update(grads, state, params, activation_stats=stats)
      >>> optax.tree.get(state, "selected_fraction")["q"]  # [L]

    References:
      LongAct, arXiv 2604.14922 (abstract only; formalization in SPEC section 3).
    """
    keep = _resolve_keep_ratio(keep_ratio, sparsity)
    targets = _check_targets(targets)
    check_statistic(statistic)
    if refresh not in REFRESH_MODES:
        raise ValueError(f"refresh={refresh!r} is not one of {REFRESH_MODES}.")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay={ema_decay} must be in [0, 1).")
    if scope not in mask_lib.SCOPES or granularity not in mask_lib.GRANULARITIES:
        raise ValueError(
            f"scope={scope!r} / granularity={granularity!r}: choose scope in "
            f"{mask_lib.SCOPES} and granularity in {mask_lib.GRANULARITIES}."
        )
    pattern = _compile_pattern(param_pattern)
    heads = {"q": num_heads, "k": num_kv_heads}

    def layout_head_dim(shapes: dict[str, tuple[int, int]]) -> int | None:
        if head_dim is not None:
            return head_dim
        for t, (_, c) in shapes.items():
            if heads[t] and c % heads[t] == 0:
                return c // heads[t]
        return None

    def select(t: str, scores: jax.Array, hd: int | None) -> jax.Array:
        return mask_lib.select_channels(
            scores,
            keep_ratio=keep,
            num_heads=heads[t],
            head_dim=hd,
            scope=scope,
            granularity=granularity,
        )

    def init_fn(params: Any) -> LongActState:
        shapes = _attention_layout(params, pattern, targets)  # {t: (L, C)}
        hd = layout_head_dim(shapes)
        for t, (_, c) in shapes.items():  # validate the head layout eagerly
            mask_lib.selection_groups(c, heads[t], hd, scope, granularity)
        masks = _like_kernel_columns(
            params, pattern, {t: np.ones(s, bool) for t, s in shapes.items()}
        )
        ones = {t: jnp.ones(s[:1], jnp.float32) for t, s in shapes.items()}
        return LongActState(
            count=jnp.zeros((), jnp.int32),
            masks=masks,
            ema_scores={t: jnp.zeros(s, jnp.float32) for t, s in shapes.items()},
            diagnostics=LongActDiagnostics(ones, dict(ones), dict(ones)),
        )

    def refresh_fn(state: LongActState, activation_stats: Any) -> LongActState:
        shapes = {t: tuple(m.shape) for t, m in state.masks.items()}
        if activation_stats is None and refresh == "fixed":
            if not isinstance(state.count, jax.core.Tracer) and int(state.count) == 0:
                raise ValueError(
                    "longact(refresh='fixed') computes its mask on the first update: pass the "
                    f"calibration batch's activation_stats= ({_CAPTURE_FIX})."
                )
            ones = {t: jnp.ones(s[:1], jnp.float32) for t, s in shapes.items()}
            diag = state.diagnostics._replace(mask_overlap=ones)
            return state._replace(count=optax.safe_increment(state.count), diagnostics=diag)
        _check_stats(activation_stats, shapes)
        hd = layout_head_dim(shapes)
        is_first = state.count == 0
        masks, ema, frac, overlap, conc = {}, {}, {}, {}, {}
        for t in shapes:
            scores = channel_scores(activation_stats[t], statistic)  # [L, C]
            ema[t] = state.ema_scores[t]
            if refresh == "ema":
                ema[t] = update_ema(state.ema_scores[t], scores, ema_decay, is_first=is_first)
                masks[t] = select(t, ema[t], hd)
            elif refresh == "fixed":
                masks[t] = jnp.where(is_first, select(t, scores, hd), state.masks[t])
            else:
                masks[t] = select(t, scores, hd)
            frac[t] = mask_lib.selected_fraction(masks[t])
            overlap[t] = mask_lib.mask_overlap(state.masks[t], masks[t])
            conc[t] = mask_lib.saliency_concentration(scores, masks[t])
        return LongActState(
            count=optax.safe_increment(state.count),
            masks=masks,
            ema_scores=ema,
            diagnostics=LongActDiagnostics(frac, overlap, conc),
        )

    def apply_fn(updates: Any, masks: dict[str, jax.Array]) -> Any:
        return _apply_masks(updates, masks, pattern)

    def update_fn(
        updates: Any,
        state: LongActState,
        params: Any = None,
        *,
        activation_stats: Any = None,
        **extra_args: Any,
    ) -> tuple[Any, LongActState]:
        del params, extra_args
        state = refresh_fn(state, activation_stats)
        return apply_fn(updates, state.masks), state

    tx = LongActTransformation(init_fn, update_fn)
    tx.core = _Core(refresh=refresh_fn, apply=apply_fn, init=init_fn)
    return tx


def masked_optimizer(
    inner: optax.GradientTransformation,
    longact_tx: LongActTransformation,
    *,
    mask_gradients: bool = False,
) -> LongActTransformation:
    """Wrap any optimizer so that LongAct masks its FINAL update (exact by construction).

    .. math::
        g' = M \\odot g \\ (\\text{if mask\\_gradients}), \\qquad
        u = \\mathrm{inner}(g'), \\qquad u' = M \\odot u

    ``mask_gradients=True`` also masks the gradient fed to ``inner`` so that Adam's
    moments of frozen columns do not accumulate; the final mask alone already keeps
    the frozen entries bit-identical (weight decay included). All extra args reach
    ``inner`` as well.

    Args:
      inner: the optimizer, e.g. ``optax.adamw(lr, weight_decay=0.1)`` or a chain.
      longact_tx: a :func:`longact` transform (its options define the mask).
      mask_gradients: also mask the incoming gradient.
    """
    if not isinstance(longact_tx, LongActTransformation):
        raise ValueError(
            "masked_optimizer(inner, longact_tx) needs longact_tx = longact(...); got "
            f"{type(longact_tx).__name__}."
        )
    core: _Core = longact_tx.core
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: Any) -> MaskedOptimizerState:
        return MaskedOptimizerState(inner.init(params), core.init(params))

    def update_fn(
        updates: Any,
        state: MaskedOptimizerState,
        params: Any = None,
        **extra_args: Any,
    ) -> tuple[Any, MaskedOptimizerState]:
        la_state = core.refresh(state.longact_state, extra_args.get("activation_stats"))
        if mask_gradients:
            updates = core.apply(updates, la_state.masks)
        updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        return core.apply(updates, la_state.masks), MaskedOptimizerState(inner_state, la_state)

    tx = LongActTransformation(init_fn, update_fn)
    tx.core = core
    return tx


def check_chain(tx: optax.GradientTransformation, params: Any) -> None:
    """Raise a ValueError unless ``tx`` has a LongAct link that masks its final update.

    Inspects the structure of ``tx.init(params)`` (abstractly, via ``jax.eval_shape``;
    no memory is allocated) with the rule of
    :func:`jaxrl_geom.final_update.check_placement`: LongAct must be the last link of
    every chain around it, or inside :func:`masked_optimizer` placed last. ``grpo_step``
    and ``TrainState.create`` apply the same rule; this also fails when there is no
    LongAct link at all.
    """
    state = jax.eval_shape(tx.init, params)
    if not optax.tree_utils.tree_get_all_with_path(state, LongActState.__name__):
        raise ValueError(
            "check_chain found no longact() link in this optimizer. Fix: " + _PLACEMENT_FIX
        )
    final_update.check_placement(state)


# ----------------------------------------------------------------------------- helpers


def _resolve_keep_ratio(keep_ratio: float | None, sparsity: float | None) -> float:
    if keep_ratio is not None and sparsity is not None:
        raise ValueError(
            f"Pass keep_ratio (fraction kept) OR sparsity (fraction dropped), not both; got "
            f"keep_ratio={keep_ratio}, sparsity={sparsity}."
        )
    if sparsity is not None:
        if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(
                f"sparsity={sparsity!r} must be in [0, 1): it is the fraction of channels "
                "DROPPED (frozen); use keep_ratio= for the fraction kept."
            )
        keep_ratio = round(1.0 - float(sparsity), 12)  # 1 - 0.7 -> 0.3, not 0.30000000000000004
    keep = DEFAULT_KEEP_RATIO if keep_ratio is None else keep_ratio
    mask_lib.check_keep_ratio(keep)
    return float(keep)


def _check_targets(targets: Any) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if not targets or len(set(targets)) != len(targets) or not set(targets) <= set(TARGETS):
        raise ValueError(f"targets={targets!r} must be a non-empty subset of {TARGETS}.")
    return targets


def _compile_pattern(param_pattern: str) -> re.Pattern:
    pattern = re.compile(param_pattern)
    missing = {"layer", "target", "kind"} - set(pattern.groupindex)
    if missing:
        raise ValueError(
            f"param_pattern must have the named groups layer, target and kind; missing "
            f"{sorted(missing)}. Start from DEFAULT_PARAM_PATTERN."
        )
    return pattern


def _match(pattern: re.Pattern, path: tuple[Any, ...]) -> tuple[int | None, str, str] | None:
    """``(layer, target, kind)``; ``layer`` is None for a parameter stacked over layers."""
    m = pattern.search(path_to_str(path))
    if m is None or m.group("target") not in TARGETS:
        return None
    layer = m.groupdict().get("layer")
    return (None if layer is None else int(layer)), m.group("target"), m.group("kind")


def _like_kernel_columns(params: Any, pattern: re.Pattern, arrays: dict[str, Any]) -> dict:
    """Put each ``[L, C]`` array on the sharding of its kernels' output axis (replicated
    over L), which is where a jitted step's refresh leaves the masks: starting them
    replicated would compile the step twice. Concrete ``NamedSharding`` params only."""
    out = {t: jnp.asarray(a) for t, a in arrays.items()}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        hit = _match(pattern, path)
        sharding = getattr(leaf, "sharding", None)
        if hit is None or hit[1] not in arrays or hit[2] != "kernel":
            continue
        if isinstance(leaf, jax.core.Tracer) or not isinstance(sharding, NamedSharding):
            continue
        spec = (*sharding.spec, None, None)[: jnp.ndim(leaf)]
        placed = NamedSharding(sharding.mesh, PartitionSpec(None, spec[-1]))
        host = np.asarray(arrays[hit[1]])
        out[hit[1]] = jax.make_array_from_callback(host.shape, placed, lambda i, h=host: h[i])
    return out


def _attention_layout(
    params: Any, pattern: re.Pattern, targets: tuple[str, ...]
) -> dict[str, tuple[int, int]]:
    """``{target: (L, C)}`` from the q/k kernels of ``params``, validated."""
    found: dict[str, dict[int, int]] = {t: {} for t in targets}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        hit = _match(pattern, path)
        if hit is None or hit[1] not in targets or hit[2] != "kernel":
            continue
        if jnp.ndim(leaf) != (2 if hit[0] is not None else 3):
            raise ValueError(
                f"{path_to_str(path)} has shape {jnp.shape(leaf)}; LongAct expects an [in, out] "
                "kernel per layer (layers.<i>) or one [L, in, out] stack (scanned layers)."
            )
        layers = [hit[0]] if hit[0] is not None else range(jnp.shape(leaf)[0])
        for layer in layers:
            found[hit[1]][layer] = jnp.shape(leaf)[-1]
    shapes = {}
    for t, per_layer in found.items():
        if not per_layer:
            raise ValueError(
                f"longact found no attention parameter for target {t!r}: expected paths like "
                f"'layers.<i>.self_attn.{t}_proj.kernel' (regex {pattern.pattern!r}). Pass the "
                "model's params (nnx.state(model, nnx.Param)) or set param_pattern=."
            )
        num_layers = max(per_layer) + 1
        widths = set(per_layer.values())
        if sorted(per_layer) != list(range(num_layers)) or len(widths) != 1:
            raise ValueError(
                f"{t}_proj kernels found for layers {sorted(per_layer)} with widths "
                f"{sorted(widths)}; LongAct needs layers 0..L-1 with one width C."
            )
        shapes[t] = (num_layers, widths.pop())
    return shapes


def _check_stats(activation_stats: Any, shapes: dict[str, tuple[int, int]]) -> None:
    if activation_stats is None:
        raise ValueError(f"longact needs activation_stats= in update(): {_CAPTURE_FIX}.")
    if not isinstance(activation_stats, Mapping):
        raise ValueError(
            f"activation_stats must be a dict {{'q': ChannelStats, 'k': ChannelStats}}, got "
            f"{type(activation_stats).__name__}: {_CAPTURE_FIX}."
        )
    for t, (num_layers, c) in shapes.items():
        s = activation_stats.get(t)
        fields = ("sum_abs", "sum_sq", "max_abs", "count")
        if s is None or not all(hasattr(s, f) for f in fields):
            raise ValueError(
                f"activation_stats has no ChannelStats for {t!r} (keys "
                f"{sorted(activation_stats)}): {_CAPTURE_FIX}."
            )
        bad = [
            f"{f} {jnp.shape(getattr(s, f))}"
            for f, want in (
                ("sum_abs", (num_layers, c)),
                ("sum_sq", (num_layers, c)),
                ("max_abs", (num_layers, c)),
                ("count", (num_layers,)),
            )
            if tuple(jnp.shape(getattr(s, f))) != want
        ]
        if bad:
            raise ValueError(
                f"activation_stats[{t!r}] has {', '.join(bad)} but the model's {t}_proj has "
                f"L={num_layers} layers of C={c} channels (want [L, C] sums, [L] count, summed "
                f"over micro-batches): {_CAPTURE_FIX}."
            )


def _apply_masks(updates: Any, masks: dict[str, jax.Array], pattern: re.Pattern) -> Any:
    """Zero the unselected columns (kernels) / entries (biases) of the masked targets."""
    matched = []

    def apply(path: tuple[Any, ...], u: Any) -> Any:
        hit = _match(pattern, path)
        if hit is None or hit[1] not in masks:
            return u
        layer, t, _ = hit
        num_layers, c = masks[t].shape
        stacked_ok = layer is not None or jnp.shape(u)[:1] == (num_layers,)
        if (layer or 0) >= num_layers or jnp.shape(u)[-1:] != (c,) or not stacked_ok:
            raise ValueError(
                f"update {path_to_str(path)} of shape {jnp.shape(u)} does not fit the LongAct "
                f"state (L={num_layers}, C={c}); init the optimizer with the same params."
            )
        matched.append(t)
        if layer is None:  # stacked [L, (in,) C]: row l takes mask l
            m = masks[t].reshape(num_layers, *([1] * (jnp.ndim(u) - 2)), c)
            return jnp.where(m, u, jnp.zeros((), u.dtype))
        return jnp.where(masks[t][layer], u, jnp.zeros((), u.dtype))  # [C] over the last axis

    out = jax.tree_util.tree_map_with_path(apply, updates)
    if set(matched) != set(masks):
        raise ValueError(
            f"longact found no update for targets {sorted(set(masks) - set(matched))} at "
            f"paths like 'layers.<i>.self_attn.<t>_proj.kernel' (regex {pattern.pattern!r}); "
            "pass updates with the params' structure."
        )
    return out
