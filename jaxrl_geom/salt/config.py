"""``SaltConfig``: the ``salt=`` option of ``grpo_step`` (SALT's scalable path)."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Literal

from jaxrl_geom.salt.gram import check_scope
from jaxrl_geom.salt.reweight import DEFAULT_EPS, Renorm, check_knobs

GramBackend = Literal["auto", "ghost", "tiled", "sketch"]
GRAM_BACKENDS: tuple[str, ...] = ("auto", "ghost", "tiled", "sketch")


@dataclasses.dataclass(frozen=True)
class SaltConfig:
    """SALT inside ``grpo_step``: Gram by per-layer taps, one more backward for the update.

    ``grpo_step(state, batch, config, salt=SaltConfig(...))`` replaces the advantages
    ``a`` of the policy-gradient part of the update by ``a' = reweight(K, a)`` with
    ``K = Phi Phi^T`` the Gram of the per-rollout policy-gradient features, computed
    WITHOUT materializing ``Phi`` (see :func:`jaxrl_geom.salt.policy.salt_policy_gradients`).
    The KL gradient is added unchanged (SPEC section 2).

    Attributes:
      gamma_max, power, rank, energy, max_rank, renorm, recenter, eps: the knobs of
        :func:`jaxrl_geom.salt.reweight` (same defaults). ``gamma_max=0`` (without
        ``recenter``) makes the update exactly plain GRPO's while the ``salt/*``
        geometry metrics are still logged: the way to monitor the Gram geometry of a
        plain GRPO run.
      scope: ``None`` (all parameters) or a regex searched in the '.'-joined parameter
        path (``"layers\\.\\d+\\.mlp"``; same names as ``nnx.state(model, nnx.Param)``,
        see :func:`jaxrl_geom.salt.path_to_str`). Restricts the Gram only; the update
        covers every parameter.
      backend: per dense layer (``Linear`` kernels, the untied LM head and the head half
        of a tied table): ``"ghost"`` (``<X_i X_j^T, D_i D_j^T>_F``), ``"tiled"``
        (column tiles of ``phi_i``), ``"auto"`` (the cheaper of the two by FLOPs,
        :func:`jaxrl_geom.salt.choose_backend`) or ``"sketch"`` (Kronecker random
        projection, approximate). Embedding lookups, norm scales and biases always
        use their exact closed forms.
      sketch_dim: ``k_in = k_out`` of the sketch (relative error about
        ``sqrt(2/k_in + 2/k_out)``, :func:`jaxrl_geom.salt.sketch_dense_gram`).
      seed: seed of the sketch projections (fixed per layer: ``fold_in`` of the
        parameter path), so every step and device sees the same projections.
    """

    gamma_max: float = 1.0
    power: float = 1.0
    rank: int | None = None
    energy: float | None = None
    max_rank: int | None = None
    renorm: Renorm = "update_norm"
    recenter: bool = False
    scope: str | None = None
    backend: GramBackend = "auto"
    sketch_dim: int = 64
    seed: int = 0
    eps: float = DEFAULT_EPS

    def __post_init__(self) -> None:
        check_knobs(
            gamma_max=self.gamma_max,
            power=self.power,
            rank=self.rank,
            energy=self.energy,
            max_rank=self.max_rank,
            renorm=self.renorm,
            num_groups=None,
            eps=self.eps,
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
        if not _is_int(self.seed):
            raise ValueError(f"SaltConfig.seed must be an int; got {self.seed!r}.")
        if not isinstance(self.recenter, bool):
            raise ValueError(f"SaltConfig.recenter must be a bool; got {self.recenter!r}.")

    @property
    def is_identity(self) -> bool:
        """Whether ``a' = a`` bit for bit (``gamma_max=0`` without re-centering)."""
        return self.gamma_max == 0 and not self.recenter

    def reweight_kwargs(self) -> dict:
        """The keyword arguments of :func:`jaxrl_geom.salt.reweight` (and ``salt()``)."""
        return dict(
            gamma_max=self.gamma_max,
            power=self.power,
            rank=self.rank,
            energy=self.energy,
            max_rank=self.max_rank,
            renorm=self.renorm,
            recenter=self.recenter,
            eps=self.eps,
        )


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
