"""SALT: Gram-geometry reweighting of group-relative coefficients (SPEC section 2).

* ``reweight``: the pure math on ``(K, a, group_ids)``;
* ``gram``: Gram backends (materialized ``vmap``, dense ghost / tiled / sketch,
  embedding ghost, norm scale);
* ``salt``: the optax ``GradientTransformationExtraArgs`` over per-sample features;
* ``ghost``: Gram taps on the model's layers (``gram_of_loss``), the scalable path;
* ``SaltConfig`` / ``salt_policy_gradients``: ``grpo_step(..., salt=SaltConfig(...))``.
"""

from jaxrl_geom.salt.config import SaltConfig
from jaxrl_geom.salt.ghost import (
    GramProbe,
    attach_gram_taps,
    gram_of_loss,
    probe_blocks,
    probe_gram,
    tied_cross_gram,
)
from jaxrl_geom.salt.gram import (
    choose_backend,
    dense_ghost_gram,
    dense_gram,
    dense_tiled_gram,
    embedding_ghost_gram,
    gram_from_features,
    path_to_str,
    per_sample_grads,
    scale_gram,
    sketch_dense_features,
    sketch_dense_gram,
    sketch_variance,
)
from jaxrl_geom.salt.policy import SaltGradients, salt_policy_gradients
from jaxrl_geom.salt.reweight import (
    DEFAULT_ENERGY,
    SaltDiagnostics,
    cancellation,
    reweight,
)
from jaxrl_geom.salt.transform import SaltState, salt

__all__ = [
    "DEFAULT_ENERGY",
    "GramProbe",
    "SaltConfig",
    "SaltDiagnostics",
    "SaltGradients",
    "SaltState",
    "attach_gram_taps",
    "cancellation",
    "choose_backend",
    "dense_ghost_gram",
    "dense_gram",
    "dense_tiled_gram",
    "embedding_ghost_gram",
    "gram_from_features",
    "gram_of_loss",
    "path_to_str",
    "per_sample_grads",
    "probe_blocks",
    "probe_gram",
    "reweight",
    "salt",
    "salt_policy_gradients",
    "scale_gram",
    "sketch_dense_features",
    "sketch_dense_gram",
    "sketch_variance",
    "tied_cross_gram",
]
