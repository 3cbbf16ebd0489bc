"""LongAct: saliency-guided sparse updates of the query/key projections (SPEC section 3).

``longact(...)`` is an optax ``GradientTransformationExtraArgs`` taking
``activation_stats=`` (from ``jaxrl_geom.models.collect_qk_stats``); put it LAST in the
chain, after weight decay, or wrap the optimizer with ``masked_optimizer``
(``check_chain(tx, params)`` checks; ``TrainState.create`` and ``grpo_step`` enforce it):

.. code-block:: python

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6), longact(keep_ratio=0.3))

Capture helpers live with the model: ``set_qk_capture``, ``collect_qk_stats``.
``grpo_step(..., GrpoConfig(capture_activations=True))`` captures, passes the statistics
and logs ``longact/<q|k>_{selected_fraction,overlap,concentration}`` (see
:mod:`~jaxrl_geom.longact.integration`), reading the state through
:mod:`jaxrl_geom.final_update` (``rl`` never imports ``longact``).
"""

from jaxrl_geom.longact.integration import check_capture, longact_metrics, longact_states
from jaxrl_geom.longact.mask import (
    channels_kept_per_layer,
    mask_overlap,
    num_kept,
    saliency_concentration,
    select_channels,
    selected_fraction,
)
from jaxrl_geom.longact.stats import channel_scores, update_ema
from jaxrl_geom.longact.transform import (
    DEFAULT_PARAM_PATTERN,
    LongActDiagnostics,
    LongActState,
    LongActTransformation,
    MaskedOptimizerState,
    check_chain,
    longact,
    masked_optimizer,
)
from jaxrl_geom.models.taps import ChannelStats, collect_qk_stats, set_qk_capture

__all__ = [
    "DEFAULT_PARAM_PATTERN",
    "ChannelStats",
    "LongActDiagnostics",
    "LongActState",
    "LongActTransformation",
    "MaskedOptimizerState",
    "channel_scores",
    "check_capture",
    "channels_kept_per_layer",
    "check_chain",
    "collect_qk_stats",
    "longact",
    "longact_metrics",
    "longact_states",
    "mask_overlap",
    "masked_optimizer",
    "num_kept",
    "saliency_concentration",
    "select_channels",
    "selected_fraction",
    "set_qk_capture",
    "update_ema",
]
