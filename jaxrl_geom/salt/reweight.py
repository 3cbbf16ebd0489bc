"""SALT coefficient reweighting: the pure math of SPEC section 2 (no optax, no model).

SALT (Subspace-Adaptive geometry pLug-in componenT, arXiv 2606.05800) rewrites the
group-relative coefficients ``a`` (the advantages) of a GRPO-style update
``Phi^T a`` using only the N x N Gram matrix ``K = Phi Phi^T`` of the per-sample
policy-gradient features. Each knob below serves one sentence of the abstract:

* "estimates a dominant shared subspace from the mini-batch Gram geometry"
  -> the eigendecomposition of ``K`` and the rank knobs ``rank`` / ``energy`` /
  ``max_rank``;
* "decomposes group-relative coefficients into shared and residual channels"
  -> the sample-space projector ``P = V_r V_r^T``: ``a_sh = P a``, ``a_res = a - P a``;
* "amplifies the residual channel when signed cancellation is severe"
  -> the cancellation ratio ``kappa``, its severity ``s`` and the gain
  ``gamma = gamma_max * s^power``.

Everything else is our formalization (SPEC section 2), not the abstract's: the exact
definition of ``kappa``, the energy rule for the rank, the power law for ``gamma``,
the renormalization and re-centering options, their order, and all the defaults.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Renorm = Literal["update_norm", "coef_norm", "none"]
RENORM_MODES: tuple[str, ...] = ("update_norm", "coef_norm", "none")
ZeroAdvantage = Literal["exclude", "include"]
ZERO_ADVANTAGE_MODES: tuple[str, ...] = ("exclude", "include")

#: Energy fraction ``tau`` used when neither ``rank`` nor ``energy`` is given (our choice).
DEFAULT_ENERGY = 0.9

#: Relative zero of a quadratic form (our choice, float32 eigen-noise level); see ``reweight``.
DEFAULT_EPS = 1e-6

_HI = jax.lax.Precision.HIGHEST
_NO_CAP = 2**31 - 1  # "no max_rank": capped by N inside the math


class SaltDiagnostics(NamedTuple):
    """What one SALT reweighting did (SPEC section 2, "Diagnostics"). All scalars."""

    kappa_before: jax.Array  # []  kappa(a): 1 = no net interference, < 1 = cancellation
    kappa_after: jax.Array  # []  kappa(a') of the returned coefficients
    rank: jax.Array  # [] int32  r, the dimension of the shared subspace
    gamma: jax.Array  # []  residual gain gamma = gamma_max * s^power
    severity: jax.Array  # []  s = clip(1 - kappa(a), 0, 1)
    effective_rank: jax.Array  # []  exp(H(lambda / sum lambda)); 0 for a zero Gram
    top_eig_share: jax.Array  # []  lambda_1 / trace K; 0 for a zero Gram
    coef_norm_ratio: jax.Array  # []  ||a'|| / ||a||; 1 when a = 0
    ok: jax.Array  # [] bool  inputs were finite; when False, a' = a (a flagged no-op)
    zero_adv_mass: jax.Array  # []  sum_{a_i = 0} |a'_i| / sum_i |a'_i| (0 when a' = 0)


def neutral_diagnostics() -> SaltDiagnostics:
    """Diagnostics of a no-op reweighting (used to initialise optimizer state)."""
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    return SaltDiagnostics(
        kappa_before=f32(1.0),
        kappa_after=f32(1.0),
        rank=jnp.asarray(0, jnp.int32),
        gamma=f32(0.0),
        severity=f32(0.0),
        effective_rank=f32(0.0),
        top_eig_share=f32(0.0),
        coef_norm_ratio=f32(1.0),
        ok=jnp.asarray(True),
        zero_adv_mass=f32(0.0),
    )


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class SaltKnobs:
    """The knobs of SALT's reweighting, validated once: used by :func:`reweight`,
    ``salt()``, ``SaltConfig`` and the run config (SPEC section 2).

    Attributes:
      gamma_max: residual gain at full severity (``s = 1``); ``0`` disables SALT.
      power: exponent ``p`` of the severity response ``gamma = gamma_max * s^p``.
      rank: fixed shared-subspace rank ``r`` (exclusive with ``energy``).
      energy: energy fraction ``tau`` in ``(0, 1]`` (``DEFAULT_ENERGY`` when neither is set).
      max_rank: upper bound on ``r``.
      renorm: ``"update_norm"`` (``||Phi^T a'|| = ||Phi^T a||``), ``"coef_norm"``, ``"none"``.
      recenter: subtract each group's mean from ``a'`` (before renormalization).
      eps: relative threshold under which a quadratic form counts as zero.
      zero_advantage: ``"exclude"`` (rows with ``a_i = 0`` are left out of ``K`` and keep
        ``a'_i = 0``) or ``"include"`` (the literal form: they may get ``a'_i != 0``).

    Every knob enters the jitted math as a traced value (:meth:`arrays`), so a schedule
    over any of them never recompiles.
    """

    gamma_max: float = 1.0
    power: float = 1.0
    rank: int | None = None
    energy: float | None = None
    max_rank: int | None = None
    renorm: Renorm = "update_norm"
    recenter: bool = False
    eps: float = DEFAULT_EPS
    zero_advantage: ZeroAdvantage = "exclude"

    def __post_init__(self) -> None:
        check_knobs(
            gamma_max=self.gamma_max,
            power=self.power,
            rank=self.rank,
            energy=self.energy,
            max_rank=self.max_rank,
            renorm=self.renorm,
            eps=self.eps,
        )
        if not isinstance(self.recenter, bool):
            raise ValueError(f"recenter must be a bool; got {self.recenter!r}.")
        if self.zero_advantage not in ZERO_ADVANTAGE_MODES:
            raise ValueError(
                f"zero_advantage must be one of {ZERO_ADVANTAGE_MODES}; got "
                f"{self.zero_advantage!r}. 'exclude' (default) keeps a'_i = 0 where a_i = 0."
            )

    @property
    def is_identity(self) -> bool:
        """Whether ``a' = a`` bit for bit (``gamma_max=0`` without re-centering)."""
        return self.gamma_max == 0 and not self.recenter

    def arrays(self) -> _Knobs:
        """The knobs as traced scalars (what the jitted math reads)."""
        return _Knobs(
            gamma_max=jnp.float32(self.gamma_max),
            power=jnp.float32(self.power),
            energy=jnp.float32(DEFAULT_ENERGY if self.energy is None else self.energy),
            eps=jnp.float32(self.eps),
            rank=jnp.int32(-1 if self.rank is None else min(self.rank, _NO_CAP)),
            cap=jnp.int32(_NO_CAP if self.max_rank is None else min(self.max_rank, _NO_CAP)),
            renorm=jnp.int32(RENORM_MODES.index(self.renorm)),
            recenter=jnp.asarray(self.recenter),
            include_zero=jnp.asarray(self.zero_advantage == "include"),
        )


def check_knobs(
    *,
    gamma_max: float,
    power: float,
    rank: int | None,
    energy: float | None,
    max_rank: int | None,
    renorm: str,
    eps: float,
) -> None:
    """Validate SALT hyper-parameters eagerly (shared by ``reweight`` and ``salt``)."""
    if not (np.isfinite(gamma_max) and gamma_max >= 0):
        raise ValueError(
            f"gamma_max must be a finite number >= 0 (the residual gain ceiling); got "
            f"{gamma_max!r}. Use gamma_max=0 to turn SALT into a no-op."
        )
    if not (np.isfinite(power) and power > 0):
        raise ValueError(
            f"power must be a finite number > 0 (gamma = gamma_max * severity**power); got "
            f"{power!r}. Use power=1 for a linear response to the severity."
        )
    if rank is not None and energy is not None:
        raise ValueError(
            f"Give either rank= (fixed shared-subspace rank) or energy= (energy fraction "
            f"tau), not both; got rank={rank!r}, energy={energy!r}."
        )
    if rank is not None and not (_is_int(rank) and rank >= 0):
        raise ValueError(f"rank must be an int >= 0 or None; got {rank!r}.")
    if energy is not None and not (0.0 < float(energy) <= 1.0):
        raise ValueError(
            f"energy (tau) must lie in (0, 1]; got {energy!r}. It is the fraction of "
            "trace(K) the shared subspace must capture, e.g. energy=0.9."
        )
    if max_rank is not None and not (_is_int(max_rank) and max_rank >= 0):
        raise ValueError(f"max_rank must be an int >= 0 or None; got {max_rank!r}.")
    if renorm not in RENORM_MODES:
        raise ValueError(f"renorm must be one of {RENORM_MODES}; got {renorm!r}.")
    if not (np.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0; got {eps!r}.")


def check_num_groups(num_groups: int | None) -> None:
    """Validate the static group count of ``reweight`` and ``salt`` eagerly."""
    if num_groups is not None and not (_is_int(num_groups) and num_groups >= 1):
        raise ValueError(
            f"num_groups must be an int >= 1 or None; got {num_groups!r}. Pass the "
            "number of prompts M (group ids in [0, M)), or None to infer groups."
        )


def resolve_knobs(knobs: SaltKnobs | _Knobs | None, overrides: dict) -> SaltKnobs | _Knobs:
    """``knobs`` (default ``SaltKnobs()``) with keyword ``overrides`` applied."""
    if knobs is None:
        knobs = SaltKnobs()
    if not overrides:
        return knobs
    if not isinstance(knobs, SaltKnobs):
        raise ValueError("Pass either traced knobs or keyword overrides, not both.")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(SaltKnobs)})
    if unknown:
        raise ValueError(
            f"Unknown SALT knob(s) {unknown}; the knobs are the fields of "
            f"jaxrl_geom.salt.SaltKnobs: {[f.name for f in dataclasses.fields(SaltKnobs)]}."
        )
    return dataclasses.replace(knobs, **overrides)


def _is_traced(*arrays) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in arrays if x is not None)


def _quad(k: jax.Array, a: jax.Array) -> jax.Array:
    """a^T K a, clipped at 0 (K is PSD; negatives are rounding)."""
    return jnp.maximum(jnp.dot(a, jnp.dot(k, a, precision=_HI), precision=_HI), 0.0)


def _diag_quad(k: jax.Array, a: jax.Array) -> jax.Array:
    """a^T diag(K) a = sum_i a_i^2 K_ii: the sum of squared norms of the parts."""
    return jnp.sum(jnp.diagonal(k) * jnp.square(a))


def _kappa(k: jax.Array, a: jax.Array) -> jax.Array:
    """kappa(a) = a^T K a / a^T diag(K) a, defined as 1 when the denominator is 0."""
    num, den = _quad(k, a), _diag_quad(k, a)
    positive = den > 0
    return jnp.where(positive, num / jnp.where(positive, den, 1.0), 1.0)


def cancellation(gram: jax.Array, coefficients: jax.Array) -> jax.Array:
    """Cancellation ratio of an aggregated update (SPEC section 2).

    .. math::
        \\kappa(a) = \\frac{a^\\top K a}{a^\\top \\mathrm{diag}(K)\\, a}
        = \\frac{\\|\\sum_i a_i \\phi_i\\|^2}{\\sum_i a_i^2 \\|\\phi_i\\|^2}

    ``kappa = 1``: no net interference; ``kappa < 1``: signed cancellation;
    ``kappa > 1``: the parts reinforce each other. Defined as 1 when the denominator
    is 0 (zero Gram or zero coefficients: nothing cancels).
    """
    k = jnp.asarray(gram, jnp.float32)
    return _kappa(0.5 * (k + k.T), jnp.asarray(coefficients, jnp.float32))


def _group_center(
    x: jax.Array, group_ids: jax.Array, num_groups: int | None, w: jax.Array
) -> jax.Array:
    """Subtract from each entry the mean of its group over the rows with ``w = 1``."""
    if num_groups is not None:
        sums = jax.ops.segment_sum(w * x, group_ids, num_segments=num_groups)  # [M]
        counts = jax.ops.segment_sum(w, group_ids, num_segments=num_groups)  # [M]
        means = sums / jnp.maximum(counts, 1.0)
        return x - means[group_ids]
    same = (group_ids[:, None] == group_ids[None, :]).astype(x.dtype) * w[None, :]  # [N, N]
    return x - jnp.dot(same, x, precision=_HI) / jnp.maximum(jnp.sum(same, axis=1), 1.0)


class _Knobs(NamedTuple):
    """Hyper-parameters as traced scalars: changing them never recompiles ``_reweight``."""

    gamma_max: jax.Array  # [] float32
    power: jax.Array  # [] float32
    energy: jax.Array  # [] float32, tau
    eps: jax.Array  # [] float32
    rank: jax.Array  # [] int32, fixed rank, or -1 for the energy rule
    cap: jax.Array  # [] int32, min(max_rank, N)
    renorm: jax.Array  # [] int32, index into RENORM_MODES
    recenter: jax.Array  # [] bool
    include_zero: jax.Array  # [] bool, zero_advantage == "include"


@functools.partial(jax.jit, static_argnames=("num_groups",))
def _reweight(
    gram: jax.Array,  # [N, N]
    coefficients: jax.Array,  # [N]
    group_ids: jax.Array,  # [N] int
    knobs: _Knobs,
    *,
    num_groups: int | None,
) -> tuple[jax.Array, SaltDiagnostics]:
    n = coefficients.shape[0]
    dtype = jnp.promote_types(jnp.result_type(gram, coefficients), jnp.float32)
    a_in = coefficients.astype(dtype)  # [N]
    k = gram.astype(dtype)  # [N, N]

    # Non-finite input: compute on zeros (no NaN reaches eigh), return a' = a, ok=False.
    ok = jnp.all(jnp.isfinite(k)) & jnp.all(jnp.isfinite(a_in))
    a = jnp.where(ok, a_in, 0.0)
    k = jnp.where(ok, k, 0.0)
    # zero_advantage="exclude": rows with a_i = 0 leave K (and so the eigenbasis, kappa
    # and the renormalization) and keep a'_i = a_i = 0.
    keep = (a != 0) | knobs.include_zero  # [N]
    w = keep.astype(dtype)
    k = k * w[:, None] * w[None, :]

    # Symmetrize, and normalize to max diag 1: every quantity below is invariant to
    # the scale of K, and the normalization keeps quadratic forms away from under/overflow.
    k = 0.5 * (k + k.T)
    k_scale = jnp.max(jnp.diagonal(k))
    k = jnp.where(k_scale > 0, k / jnp.where(k_scale > 0, k_scale, 1.0), 0.0)

    # K = V diag(lambda) V^T, lambda descending (eigh is ascending), negatives clipped.
    lam, v = jnp.linalg.eigh(k)  # [N], [N, N]
    lam = jnp.maximum(lam[::-1], 0.0)
    v = v[:, ::-1]
    cum = jnp.cumsum(lam)  # [N]
    trace = cum[-1]

    # Rank: fixed, or the smallest r in {0..N} with sum_{k<=r} lambda_k >= tau trace(K).
    partial_sums = jnp.concatenate([jnp.zeros((1,), dtype), cum[:-1]])  # [N] C_0..C_{N-1}
    energy_rank = jnp.sum(partial_sums < knobs.energy * trace).astype(jnp.int32)
    cap = jnp.minimum(knobs.cap, n)
    r = jnp.minimum(jnp.where(knobs.rank >= 0, jnp.minimum(knobs.rank, n), energy_rank), cap)

    # Shared / residual channels: P = V_r V_r^T as a mask over eigenvectors (r is traced).
    in_shared = (jnp.arange(n) < r).astype(dtype)  # [N]
    a_sh = jnp.dot(v, in_shared * jnp.dot(v.T, a, precision=_HI), precision=_HI)  # [N]
    a_res = a - a_sh  # [N]

    kappa_before = _kappa(k, a)
    severity = jnp.clip(1.0 - kappa_before, 0.0, 1.0)
    gamma = knobs.gamma_max * severity**knobs.power

    # a' = a_sh + (1 + gamma) a_res, written as a + gamma a_res so gamma = 0 returns a exactly.
    a_new = a + gamma * a_res
    # Re-center BEFORE renormalizing, so the chosen norm is preserved exactly.
    centered = _group_center(a_new, group_ids, num_groups, w)
    a_new = jnp.where(knobs.recenter, centered, a_new)
    a_new = jnp.where(keep, a_new, a)

    # "update_norm": ||Phi^T a'|| = ||Phi^T a||, i.e. a'^T K a' = a^T K a. When a'^T K a'
    # is ~0 (Phi^T a' cancels to rounding noise) there is nothing to match: scale 1.
    q_old, q_new = _quad(k, a), _quad(k, a_new)
    valid = q_new > knobs.eps * _diag_quad(k, a_new)
    update_scale = jnp.where(valid, jnp.sqrt(q_old / jnp.where(valid, q_new, 1.0)), 1.0)
    # "coef_norm": ||a'|| = ||a||.
    n_old, n_new = jnp.linalg.norm(a), jnp.linalg.norm(a_new)
    coef_scale = jnp.where(n_new > 0, n_old / jnp.where(n_new > 0, n_new, 1.0), 1.0)
    scale = jnp.stack([update_scale, coef_scale, jnp.ones((), dtype)])[knobs.renorm]
    # Without re-centering a' is a when gamma = 0: make the scale exactly 1 there.
    scale = jnp.where(knobs.recenter | (gamma > 0), scale, 1.0)
    a_new = scale * a_new

    norm_a = jnp.linalg.norm(a)
    share = jnp.where(trace > 0, lam / jnp.where(trace > 0, trace, 1.0), 0.0)  # [N]
    entropy = -jnp.sum(jnp.where(share > 0, share * jnp.log(jnp.where(share > 0, share, 1.0)), 0))
    diagnostics = SaltDiagnostics(
        kappa_before=kappa_before.astype(jnp.float32),
        kappa_after=_kappa(k, a_new).astype(jnp.float32),
        rank=r,
        gamma=jnp.asarray(gamma, jnp.float32),
        severity=severity.astype(jnp.float32),
        effective_rank=jnp.where(trace > 0, jnp.exp(entropy), 0.0).astype(jnp.float32),
        top_eig_share=share[0].astype(jnp.float32),
        coef_norm_ratio=jnp.where(
            norm_a > 0, jnp.linalg.norm(a_new) / jnp.where(norm_a > 0, norm_a, 1.0), 1.0
        ).astype(jnp.float32),
        ok=ok,
        zero_adv_mass=_zero_mass(a, a_new).astype(jnp.float32),
    )
    return jnp.where(ok, a_new, a_in), diagnostics


def _zero_mass(a: jax.Array, a_new: jax.Array) -> jax.Array:
    """sum_{a_i = 0} |a'_i| / sum_i |a'_i|, 0 when a' = 0."""
    total = jnp.sum(jnp.abs(a_new))
    moved = jnp.sum(jnp.where(a == 0, jnp.abs(a_new), 0.0))
    return jnp.where(total > 0, moved / jnp.where(total > 0, total, 1.0), 0.0)


def reweight(
    gram: jax.Array,
    coefficients: jax.Array,
    group_ids: jax.Array | None = None,
    knobs: SaltKnobs | _Knobs | None = None,
    *,
    num_groups: int | None = None,
    **knob_overrides,
) -> tuple[jax.Array, SaltDiagnostics]:
    """Reweight group-relative coefficients by the Gram geometry (SALT, SPEC section 2).

    With per-sample features ``Phi = [phi_1; ...; phi_N]``, ``K = Phi Phi^T`` and
    coefficients ``a`` (the advantages), the update ``Phi^T a`` is replaced by
    ``Phi^T a'`` where

    .. math::
        \\kappa(a) &= \\frac{a^\\top K a}{a^\\top \\mathrm{diag}(K)\\, a}, \\qquad
        s = \\mathrm{clip}(1 - \\kappa(a), 0, 1), \\qquad
        \\gamma = \\gamma_{\\max}\\, s^{p} \\\\
        K &= V \\mathrm{diag}(\\lambda) V^\\top \\ (\\lambda_1 \\ge \\dots \\ge \\lambda_N), \\qquad
        P = V_r V_r^\\top \\\\
        a_{sh} &= P a, \\quad a_{res} = (I - P) a, \\quad
        a' = c \\cdot \\mathrm{center}\\big(a_{sh} + (1 + \\gamma)\\, a_{res}\\big)

    with ``r = rank`` or the smallest ``r`` with
    ``sum_{k<=r} lambda_k >= energy * trace(K)``, capped by ``max_rank`` and ``N``.
    ``center`` subtracts each group's mean (only when ``recenter``) and the scale ``c``
    makes ``a'^T K a' = a^T K a`` (``"update_norm"``: same update norm
    ``||Phi^T a'|| = ||Phi^T a||``), ``||a'|| = ||a||`` (``"coef_norm"``), or is 1
    (``"none"``).

    Abstract sentence -> knob (arXiv 2606.05800): "estimates a dominant shared subspace
    from the mini-batch Gram geometry" -> ``rank`` / ``energy`` / ``max_rank``;
    "decomposes group-relative coefficients into shared and residual channels" -> ``P``;
    "amplifies the residual channel when signed cancellation is severe" ->
    ``gamma_max``, ``power``.

    Our choices (not in the abstract): the formulas above; defaults ``gamma_max=1``,
    ``power=1``, ``energy=0.9`` when neither ``rank`` nor ``energy`` is given,
    ``renorm="update_norm"`` (SALT changes the update's direction, not its size, so
    optimizer settings carry over), no re-centering; re-centering happens BEFORE the
    renormalization so the chosen norm is preserved exactly; the eigenvalues are
    clipped at 0 and ``trace(K)`` is their sum; ``gamma`` is computed from
    ``kappa(a)`` of the original coefficients.

    What to expect from ``kappa_after``: the residual channel lives on the small
    eigenvalues of ``K``, i.e. the sample-space directions whose features cancel, so
    amplifying it usually LOWERS ``kappa`` (never raises it when all features have equal
    norms, ``diag K = cI``). SALT re-balances the update towards the sample-specific
    (residual) directions; ``kappa_after`` is a diagnostic, not an objective.

    All knobs except ``num_groups`` are traced scalars inside one jitted program, so
    changing them (e.g. a ``gamma_max`` schedule) never recompiles.

    Degenerate inputs, handled on purpose (no NaN ever comes out of finite input):

    * zero Gram, or ``a = 0``: ``kappa := 1`` (nothing cancels), so ``gamma = 0`` and
      ``a' = a`` (re-centered if asked); a zero Gram has energy rank 0, effective rank
      0 and top share 0; ``N = 1`` always has ``kappa = 1`` and ``a' = a``;
    * rank-deficient Gram: zero eigenvalues carry no energy, so the energy rank never
      exceeds rank(K) for ``energy < 1``; ``energy=1`` selects the numerical rank,
      which in float32 may count rounding-level eigenvalues;
    * eigenvalue ties: ``P`` is unique when ``lambda_r > lambda_{r+1}``; when the rank
      boundary splits a tie, ``P`` uses the basis ``eigh`` returns for that eigenspace
      (finite, but not unique);
    * ``a'^T K a' <= eps * a'^T diag(K) a'`` (the reweighted update cancels to rounding
      noise): ``"update_norm"`` keeps ``c = 1`` because there is no norm to match;
    * ``gamma = 0`` (e.g. ``gamma_max=0``) without re-centering returns ``a``
      bit-for-bit, whatever ``renorm``;
    * non-finite ``gram`` or ``coefficients``: eagerly a ``ValueError``; under a trace
      ``a' = a`` and ``ok=False`` in the diagnostics.

    Args:
      gram: ``[N, N]`` symmetric PSD Gram ``K = Phi Phi^T`` (any scale: SALT is invariant
        to ``K -> cK``, ``c > 0``).
      coefficients: ``[N]`` group-relative coefficients ``a`` (advantages).
      group_ids: ``[N]`` int group (prompt) of each sample; only used by ``recenter``
        (``None``: the whole batch is one group).
      knobs: a :class:`SaltKnobs` (default ``SaltKnobs()``), or its traced
        :meth:`SaltKnobs.arrays` (inside a jitted step).
      num_groups: static number of groups ``M`` with ids in ``[0, M)`` (checked eagerly);
        optional, only changes how group means are computed (segment sums instead of
        an N x N id match, same result).
      **knob_overrides: fields of :class:`SaltKnobs` (``reweight(k, a, gamma_max=2.0)``
        is ``reweight(k, a, knobs=SaltKnobs(gamma_max=2.0))``).

    Returns:
      ``(a', diagnostics)``: the ``[N]`` float coefficients and a ``SaltDiagnostics``.

    Example:
      >>> k = phi @ phi.T                               # [N, N]
      >>> a_new, diag = reweight(k, advantages, group_ids)
      >>> update = a_new @ phi                          # in place of advantages @ phi

    References:
      SALT: "When More Rollouts Don't Help in Group-Based Policy Optimization and How to
      Make Them Matter", arXiv 2606.05800 (abstract only; the formulas are SPEC's).
    """
    knobs = resolve_knobs(knobs, knob_overrides)
    check_num_groups(num_groups)  # the knobs were checked by SaltKnobs
    gram = jnp.asarray(gram)
    coefficients = jnp.asarray(coefficients)
    if coefficients.ndim != 1 or coefficients.shape[0] < 1:
        raise ValueError(
            f"coefficients must be a non-empty vector [N]; got shape {coefficients.shape}. "
            "Pass one coefficient (advantage) per rollout."
        )
    n = coefficients.shape[0]
    if gram.shape != (n, n):
        raise ValueError(
            f"gram must be [N, N] = [{n}, {n}] to match coefficients [{n}]; got "
            f"{gram.shape}. Build it from per-sample features with gram_from_features."
        )
    if group_ids is not None:
        group_ids = jnp.asarray(group_ids)
        if group_ids.shape != (n,) or not jnp.issubdtype(group_ids.dtype, jnp.integer):
            raise ValueError(
                f"group_ids must be an int vector [N] = [{n}]; got shape {group_ids.shape} "
                f"and dtype {group_ids.dtype}. Pass the prompt index of each rollout."
            )
        if num_groups is not None and not _is_traced(group_ids):
            ids = np.asarray(group_ids)
            if ids.min() < 0 or ids.max() >= num_groups:
                raise ValueError(
                    f"group_ids must lie in [0, num_groups={num_groups}); got range "
                    f"[{ids.min()}, {ids.max()}]. Fix num_groups or renumber the groups."
                )
    if not _is_traced(gram, coefficients):
        if not (np.all(np.isfinite(np.asarray(gram))) and np.all(np.isfinite(coefficients))):
            raise ValueError(
                "reweight got non-finite values (NaN or inf) in the gram or the "
                "coefficients. Check the loss and per-sample gradients for overflow; under "
                "jit SALT instead returns the coefficients unchanged with ok=False."
            )
    if group_ids is None:
        group_ids = jnp.zeros((n,), jnp.int32)  # one group
    if isinstance(knobs, SaltKnobs):
        knobs = knobs.arrays()
    return _reweight(gram, coefficients, group_ids, knobs, num_groups=num_groups)
