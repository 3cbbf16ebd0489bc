"""SALT: Gram-geometry reweighting of group-relative coefficients (SPEC section 2).

What a user calls:

* ``SaltKnobs``: the knobs of the reweighting (one frozen dataclass everywhere);
* ``reweight(gram, a, group_ids, knobs)``: the pure math on ``(K, a)``;
* ``salt(knobs)``: the optax transformation over materialized per-sample features
  (``per_sample_grads``; ``gram_from_features`` for their Gram), the reference path;
* ``SaltConfig`` + ``salt_estimator``: the scalable path inside
  ``grpo_step(state, batch, config, salt_estimator(SaltConfig(...)))``;
* ``gram_of_loss``: the Gram of any per-row loss by Gram taps (e.g. per-layer geometry);
* ``cancellation``: the ratio ``kappa`` of an aggregated update.

Backends and taps live in :mod:`jaxrl_geom.salt.gram` and :mod:`jaxrl_geom.salt.ghost`.
"""

from jaxrl_geom.salt.config import SaltConfig
from jaxrl_geom.salt.ghost import gram_of_loss
from jaxrl_geom.salt.gram import gram_from_features, per_sample_grads
from jaxrl_geom.salt.policy import SaltEstimator, salt_estimator
from jaxrl_geom.salt.reweight import SaltDiagnostics, SaltKnobs, cancellation, reweight
from jaxrl_geom.salt.transform import SaltState, salt

__all__ = [
    "SaltConfig",
    "SaltDiagnostics",
    "SaltEstimator",
    "SaltKnobs",
    "SaltState",
    "cancellation",
    "gram_from_features",
    "gram_of_loss",
    "per_sample_grads",
    "reweight",
    "salt",
    "salt_estimator",
]
