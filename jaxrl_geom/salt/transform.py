"""SALT as an optax transformation over per-sample features (SPEC sections 2 and 4)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxrl_geom.salt.gram import Scope, check_scope, gram_from_features
from jaxrl_geom.salt.reweight import (
    SaltDiagnostics,
    SaltKnobs,
    check_num_groups,
    neutral_diagnostics,
    resolve_knobs,
    reweight,
)


class SaltState(NamedTuple):
    """State of ``salt``: a step counter and the last step's diagnostics."""

    count: jax.Array  # [] int32, number of updates applied
    diagnostics: SaltDiagnostics  # of the last update (neutral values before the first)


_FIRST_IN_CHAIN = (
    "salt() must come FIRST in the optax chain and receive per-sample features: a pytree "
    "whose leaves all have a leading axis N == coefficients.shape[0] (e.g. from "
    "jaxrl_geom.salt.per_sample_grads), plus coefficients=[N] as an extra arg."
)


def _check_residual(residual: Any, like: Any) -> None:
    """``residual_updates`` must be shaped like the aggregated update."""
    same_tree = jax.tree_util.tree_structure(residual) == jax.tree_util.tree_structure(like)
    leaves = zip(jax.tree_util.tree_leaves(residual), jax.tree_util.tree_leaves(like), strict=False)
    if not same_tree or any(jnp.shape(r) != jnp.shape(u) for r, u in leaves):
        raise ValueError(
            "residual_updates must be a gradient pytree shaped like the parameters (the "
            "features without their leading sample axis N), e.g. the KL gradient."
        )


def salt(
    knobs: SaltKnobs | None = None,
    *,
    scope: Scope = None,
    num_groups: int | None = None,
    **knob_overrides: Any,
) -> optax.GradientTransformationExtraArgs:
    """SALT: reweight group-relative coefficients by the per-sample Gram geometry.

    Input ``updates`` are PER-SAMPLE loss-gradient features ``G`` with a leading axis
    ``N`` (DESIGN.md sign convention: ``updates[i]`` is the gradient of rollout ``i``'s
    loss per unit coefficient, so ``sum_i a_i G_i`` is the ordinary loss gradient). The
    output is an ordinary gradient pytree, without the leading axis:

    .. math::
        K = \\sum_{l \\in \\mathrm{scope}} G_l G_l^\\top, \\qquad
        a' = \\mathrm{reweight}(K, a, \\mathrm{group\\_ids}), \\qquad
        \\mathrm{out} = \\sum_i a'_i\\, G_i

    ``scope`` restricts only the Gram (the geometry SALT looks at); the output sums over
    ALL leaves, so parameters outside the scope still get ``sum_i a'_i G_i``. See
    ``reweight`` for the math, the knob-to-abstract mapping and which choices are ours.

    Because the input has a sample axis, SALT must be the FIRST link of a chain; the rest
    of the chain (clipping, Adam, weight decay, LongAct) sees a normal gradient.

    Args:
      knobs: the :class:`~jaxrl_geom.salt.SaltKnobs` (default ``SaltKnobs()``);
        ``**knob_overrides`` replace fields (``salt(gamma_max=2.0)``).
      num_groups: as in ``jaxrl_geom.salt.reweight``.
      scope: parameter filter for the Gram: ``None`` (all), a regex searched in the
        '.'-joined parameter path, or a callable ``(path_str, leaf) -> bool``.

    Extra args of ``update``: ``coefficients`` ``[N]`` (required, the advantages),
    ``group_ids`` ``[N]`` (optional, for ``recenter``) and ``residual_updates``
    (optional, a gradient pytree without the sample axis, e.g. the KL gradient, added
    unchanged after the aggregation: ``out = sum_i a'_i G_i + residual``; SPEC section 2:
    terms outside ``Phi`` are not reweighted); any other extra arg is ignored.

    Example:
      >>> tx = optax.chain(salt(gamma_max=1.0), optax.clip_by_global_norm(1.0),
      ...                  optax.adamw(1e-3))
      >>> feats = per_sample_grads(loss_per_unit_advantage, params, batch)  # [N, ...]
      >>> updates, state = tx.update(feats, state, params,
      ...                            coefficients=advantages, group_ids=group_ids)
      >>> optax.tree.get(state, "kappa_before")

    References:
      SALT, arXiv 2606.05800 (abstract only; the formalization is SPEC section 2).
    """
    knobs = resolve_knobs(knobs, knob_overrides)
    check_num_groups(num_groups)  # the knobs were checked by SaltKnobs
    check_scope(scope)

    def init_fn(params: Any) -> SaltState:
        del params
        return SaltState(count=jnp.zeros((), jnp.int32), diagnostics=neutral_diagnostics())

    def update_fn(
        updates: Any,
        state: SaltState,
        params: Any = None,
        *,
        coefficients: jax.Array | None = None,
        group_ids: jax.Array | None = None,
        residual_updates: Any = None,
        **extra_args: Any,
    ) -> tuple[Any, SaltState]:
        del params, extra_args
        if coefficients is None:
            raise ValueError(
                "salt() needs the group-relative coefficients: call update(..., "
                "coefficients=advantages [N]) (optax.chain forwards extra args)."
            )
        coefficients = jnp.asarray(coefficients)
        if coefficients.ndim != 1:
            raise ValueError(
                f"coefficients must be a vector [N]; got shape {coefficients.shape}. "
                + _FIRST_IN_CHAIN
            )
        n = coefficients.shape[0]
        leaves = jax.tree_util.tree_leaves(updates)
        bad = [jnp.shape(leaf) for leaf in leaves if jnp.ndim(leaf) == 0 or leaf.shape[0] != n]
        if not leaves or bad:
            raise ValueError(
                f"Expected every leaf of updates to have leading axis N={n}; got shapes "
                f"{bad[:3] or 'no leaves'}. " + _FIRST_IN_CHAIN
            )
        gram = gram_from_features(updates, scope)  # [N, N]
        a_new, diagnostics = reweight(gram, coefficients, group_ids, knobs, num_groups=num_groups)

        def combine(g: jax.Array) -> jax.Array:  # [N, ...] -> [...]
            dtype = jnp.promote_types(g.dtype, a_new.dtype)
            out = jnp.tensordot(a_new.astype(dtype), g.astype(dtype), axes=1)
            return out.astype(g.dtype)

        new_updates = jax.tree_util.tree_map(combine, updates)
        if residual_updates is not None:
            _check_residual(residual_updates, new_updates)
            new_updates = jax.tree_util.tree_map(
                lambda u, r: (u + r).astype(u.dtype), new_updates, residual_updates
            )
        count = optax.safe_increment(state.count)
        return new_updates, SaltState(count=count, diagnostics=diagnostics)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
