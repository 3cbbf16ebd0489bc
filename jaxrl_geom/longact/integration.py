"""How a train step talks to LongAct: find its state, check the capture, log diagnostics.

``grpo_step`` does not import this module (``rl`` never imports ``longact``): it reads
the :class:`~jaxrl_geom.longact.transform.LongActState` through its final-update-link
declaration (:mod:`jaxrl_geom.final_update`). These helpers are the same checks for
hand-written loops. The full per-layer arrays stay in the optimizer state
(``optax.tree.get(opt_state, "selected_fraction")["q"]`` is ``[L]``); a step logs their
mean over layers:

=================================  =================================================
metric                             mean over layers of
=================================  =================================================
``longact/<t>_selected_fraction``  channels updated / C
``longact/<t>_overlap``            ``|M_prev & M| / |M|`` (1 = the mask did not change)
``longact/<t>_concentration``      ``sum_c M_c s_c / sum_c s_c`` (saliency share kept)
=================================  =================================================

for each target ``t`` in ``("q", "k")`` that the transform masks.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxrl_geom import final_update
from jaxrl_geom.longact.transform import LongActState

CAPTURE_HINT = (
    "set GrpoConfig(capture_activations=True) so that grpo_step collects the per-channel "
    "q/k statistics and passes them as activation_stats= (by hand: "
    "set_qk_capture(model, True) and activation_stats=collect_qk_stats(...))"
)


def longact_states(opt_state: Any) -> tuple[LongActState, ...]:
    """Every :class:`LongActState` inside an optimizer state, in tree order.

    Works on any nesting (a link of ``optax.chain``, ``masked_optimizer``,
    ``inject_hyperparams``, ``MultiSteps``, dicts of ``named_chain``) because
    ``optax.tree_utils.tree_get_all_with_path`` searches the pytree by the state's class
    name; under ``jit`` the search is static (structure only).
    """
    found = optax.tree_utils.tree_get_all_with_path(opt_state, LongActState.__name__)
    return tuple(x for _, x in found if isinstance(x, LongActState))


def check_capture(opt_state: Any, capture_activations: bool) -> None:
    """Raise a ValueError when ``opt_state`` has a LongAct link but the capture is off.

    Without captured statistics LongAct has no saliency to select channels from (and
    ``refresh="fixed"`` under ``jit`` could not even tell), so a step that forgot the
    capture must fail loudly instead of training with an all-True mask.
    """
    provided = ("activation_stats",) if capture_activations else ()
    final_update.check_extra_args(opt_state, provided, {"activation_stats": CAPTURE_HINT})


def longact_metrics(opt_state: Any, prefix: str = "longact") -> dict[str, jax.Array]:
    """Scalar step metrics of the LongAct diagnostics found in ``opt_state``.

    .. math::
        \\texttt{<prefix>/<t>\\_selected\\_fraction} = \\frac{1}{L} \\sum_l
        \\frac{|M^t_l|}{C_t}, \\quad \\texttt{..._overlap},\\ \\texttt{..._concentration}
        \\text{ likewise}

    Returns an empty dict when the optimizer has no LongAct link. A second LongAct
    state (unusual) is reported under ``<prefix>1/``, a third under ``<prefix>2/``.

    Example:
      >>> metrics.update(longact_metrics(opt_state))  # {"longact/q_overlap": f32[], ...}
    """
    out: dict[str, jax.Array] = {}
    for i, state in enumerate(longact_states(opt_state)):
        name = prefix if i == 0 else f"{prefix}{i}"
        for key, value in state.step_metrics().items():
            out[f"{name}/{key}"] = value
    return out
