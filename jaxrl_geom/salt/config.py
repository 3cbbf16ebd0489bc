"""``SaltConfig``: SALT inside ``grpo_step`` (the knobs plus how the Gram is computed)."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Literal

from jaxrl_geom.salt.gram import check_scope
from jaxrl_geom.salt.reweight import SaltKnobs

GramBackend = Literal["auto", "ghost", "tiled", "sketch"]
GRAM_BACKENDS: tuple[str, ...] = ("auto", "ghost", "tiled", "sketch")

#: Default budget for the book-keeping path's kept ``X`` and ``D`` (GiB).
DEFAULT_KEEP_BUDGET_GIB = 16.0


@dataclasses.dataclass(frozen=True)
class SaltConfig:
    """SALT in ``grpo_step``: ``grpo_step(state, batch, config, salt_estimator(SaltConfig()))``.

    The advantages ``a`` of the policy-gradient part of the update are replaced by
    ``a' = reweight(K, a)`` with ``K = Phi Phi^T`` the Gram of the per-rollout
    policy-gradient features, computed WITHOUT materializing ``Phi``
    (:mod:`jaxrl_geom.salt.policy`); the KL gradient is added unchanged (SPEC section 2).

    Attributes:
      knobs: the :class:`~jaxrl_geom.salt.SaltKnobs` of the reweighting (traced in the
        step: changing them never recompiles, except into or out of
        ``gamma_max=0`` without ``recenter``, which computes the update by the plain
        step's code, bit for bit, while the ``salt/*`` geometry metrics are logged).
      scope: ``None`` (all parameters) or a regex searched in the '.'-joined parameter
        path (``"layers\\.\\d+\\.mlp"``; ``path_to_str`` names). Restricts the Gram only;
        the update covers every parameter.
      backend: per dense op (``Linear`` kernels, the untied LM head, a tied table):
        ``"ghost"`` (``<X_i X_j^T, D_i D_j^T>_F``), ``"tiled"`` (column tiles of
        ``phi_i``), ``"auto"`` (the cheaper of the two by FLOPs,
        :func:`jaxrl_geom.salt.gram.choose_backend`) or ``"sketch"`` (Kronecker random
        projection, approximate). Embedding lookups and norm scales use their exact
        closed forms (a tied table under ``"sketch"`` is sketched as a whole).
      sketch_dim: ``k_in = k_out`` of the sketch (relative error about
        ``sqrt(2/k_in + 2/k_out)``).
      seed: seed of the sketch projections, drawn per ``(seed, step, layer)``: fresh each
        optimizer step, identical on every device.
      keep_budget_gib: the update is formed by book-keeping (one backward pass: each
        op's input ``X`` and output cotangent ``D`` are kept, then ``X^T diag(a') D``)
        when those tensors take at most this many GiB (``X`` and ``D`` of every
        ``Linear`` / ``Embedding`` / ``RMSNorm`` over the whole batch, one more ``D`` with
        a KL term, in their compute dtype; the LM head's ``D`` is float32 logits-sized);
        otherwise by a second backward pass (recompute). ``0`` forces the recompute
        path, ``float("inf")`` book-keeping. Both give the same update.
    """

    knobs: SaltKnobs = SaltKnobs()
    scope: str | None = None
    backend: GramBackend = "auto"
    sketch_dim: int = 64
    seed: int = 0
    keep_budget_gib: float = DEFAULT_KEEP_BUDGET_GIB

    def __post_init__(self) -> None:
        if not isinstance(self.knobs, SaltKnobs):
            raise ValueError(
                f"SaltConfig.knobs must be a jaxrl_geom.salt.SaltKnobs; got "
                f"{type(self.knobs).__name__}, e.g. SaltConfig(knobs=SaltKnobs(gamma_max=1.0))."
            )
        if self.scope is not None and not isinstance(self.scope, str):
            raise ValueError(
                f"SaltConfig.scope must be None or a regex string (the config is hashable "
                f"and static under jit); got {type(self.scope).__name__}. For a callable "
                "filter use jaxrl_geom.salt.gram_of_loss directly."
            )
        check_scope(self.scope)
        if self.backend not in GRAM_BACKENDS:
            raise ValueError(
                f"SaltConfig.backend must be one of {GRAM_BACKENDS}; got {self.backend!r}."
            )
        if not (_is_int(self.sketch_dim) and self.sketch_dim >= 1):
            raise ValueError(
                f"SaltConfig.sketch_dim must be a positive int (sketch size per factor); got "
                f"{self.sketch_dim!r}, e.g. 64."
            )
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise ValueError(f"SaltConfig.seed must be an int in [0, 2^32); got {self.seed!r}.")
        budget = self.keep_budget_gib
        if not isinstance(budget, numbers.Real) or isinstance(budget, bool) or budget < 0:
            raise ValueError(
                f"SaltConfig.keep_budget_gib must be a number >= 0 (GiB; 0 forces the "
                f"recompute path); got {budget!r}."
            )


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
