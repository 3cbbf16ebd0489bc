"""SALT: Gram-geometry reweighting of group-relative coefficients (SPEC section 2).

* ``reweight``: the pure math on ``(K, a, group_ids)``;
* ``gram``: Gram backends (materialized ``vmap``, dense ghost / tiled / sketch,
  embedding ghost, norm scale);
* ``salt``: the optax ``GradientTransformationExtraArgs`` over per-sample features.
"""

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
from jaxrl_geom.salt.reweight import (
    DEFAULT_ENERGY,
    SaltDiagnostics,
    cancellation,
    reweight,
)
from jaxrl_geom.salt.transform import SaltState, salt

__all__ = [
    "DEFAULT_ENERGY",
    "SaltDiagnostics",
    "SaltState",
    "cancellation",
    "choose_backend",
    "dense_ghost_gram",
    "dense_gram",
    "dense_tiled_gram",
    "embedding_ghost_gram",
    "gram_from_features",
    "path_to_str",
    "per_sample_grads",
    "reweight",
    "salt",
    "scale_gram",
    "sketch_dense_features",
    "sketch_dense_gram",
    "sketch_variance",
]
