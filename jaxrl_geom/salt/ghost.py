"""The N x N per-sample Gram of a model's loss without materializing ``Phi``: Gram taps.

For per-row losses ``l_1 .. l_N`` of a batch whose rows are independent (a decoder
LM: attention, norms and MLPs act within a row), the backward pass of
``sum_i l_i`` gives at every parameterised op the per-row output cotangent ``D_i``
of ``l_i`` alone. With the op's input ``X_i`` (all tokens, prompt included) its
per-sample gradient is ``phi_i = X_i^T D_i``, and the Gram ``K_ij = <g_i, g_j>`` is
a sum of per-op blocks with closed forms (SPEC section 2, "Cost"; PERF.md section 4):

.. math::
    K = \\sum_{\\text{dense}} \\langle X_i X_j^\\top, D_i D_j^\\top \\rangle_F
      + \\sum_{\\text{embed}} \\sum_{t,s} [\\mathrm{tok}_{it} = \\mathrm{tok}_{js}]
        \\langle D_{it}, D_{js} \\rangle
      + \\sum_{\\text{norm}} (\\textstyle\\sum_t \\hat x_{it} \\odot D_{it})
        \\cdot (\\sum_s \\hat x_{js} \\odot D_{js}) + \\dots

A *tap* is a ``jax.custom_vjp`` identity on a layer's output (set as the layer's
``gram_tap``) that takes a dummy zero input ``probe [N, N]``; its backward rule
returns the layer's Gram block as the probe's cotangent (paxml ``ghostnorm``
style), so ``D`` is consumed where it is produced and never stored. Differentiating
with respect to the probes only, the parameter gradients are dead code.

Covered ops: ``Linear`` kernels and biases (dense backends ghost / tiled / auto /
sketch of :mod:`jaxrl_geom.salt.gram`), ``Embedding`` lookups (token-equality closed
form), the untied LM head (a ``Linear``), ``RMSNorm`` scales (including q/k norms),
and TIED embeddings. A tied table ``E`` gets per-sample gradient from the lookup AND
the head ``logits = h E^T``; the Gram of the sum needs the cross terms, which we
compute exactly in closed form (our derivation):

.. math::
    K^{tied}_{ij} = K^{lookup}_{ij} + K^{head}_{ij} + C_{ij} + C_{ji}, \\qquad
    C_{ij} = \\sum_{t,s} \\langle D^{emb}_{it}, h_{js} \\rangle\\,
             D^{logits}_{js}[\\mathrm{tok}_{it}]

The head's ``(h, D^logits)`` reach the lookup's backward rule through a *carrier*: a
zero output of the lookup tap that the head tap takes as input and whose cotangent
it sets to ``(h, D^logits)``. This holds one ``[N, T, V]`` float32 tensor (the size
of the logits) through the backward of the trunk.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_geom.models.layers import Embedding, Linear, RMSNorm
from jaxrl_geom.salt.gram import (
    _HI,
    Scope,
    _bias_gram,
    _columns,
    check_scope,
    choose_backend,
    dense_ghost_gram,
    dense_tiled_gram,
    embedding_ghost_gram,
    in_scope,
    path_to_str,
    scale_gram,
)

BACKENDS: tuple[str, ...] = ("auto", "ghost", "tiled", "sketch")

#: Elements of one ``[N, chunk, T, T]`` ghost intermediate (16 MiB of float32). Smaller
#: than ``salt.gram``'s default: the blocks of several ops can be live at once.
_GHOST_ELEMENTS = 1 << 22


def _ghost_chunk(n: int, t: int) -> int:
    """Columns of a ghost block per step so ``[N, chunk, T, T]`` fits ``_GHOST_ELEMENTS``."""
    return max(1, min(n, _GHOST_ELEMENTS // max(1, n * t * t)))


class GramProbe(nnx.Variable):
    """A zero ``[N, N]`` input of one tap; its cotangent is the tap's Gram block."""


class SketchProjection(nnx.Variable):
    """A fixed random projection ``[d, k]`` of a sketched dense op (never trained)."""


@dataclasses.dataclass(frozen=True)
class _TapSpec:
    """Static description of one tap (hashable: a ``custom_vjp`` nondiff argument)."""

    path: str  # module path, e.g. "layers.0.mlp.up_proj"
    weight: bool  # the kernel / table / scale is in scope
    bias: bool  # the bias is in scope (Linear only)
    backend: str  # dense blocks: "auto" | "ghost" | "tiled" | "sketch"
    vocab_size: int = 0  # Embedding only
    tied: bool = False  # Embedding only: the table is also the LM head


# ----------------------------------------------------------------------------------------
# Gram blocks
# ----------------------------------------------------------------------------------------


def _rows(a: jax.Array) -> jax.Array:
    """``[N, ..., C]`` -> ``[N, T', C]``: every middle axis is a token axis."""
    return a.reshape(a.shape[0], -1, a.shape[-1])


def _lookup_gram(tokens: jax.Array, d: jax.Array, spec: _TapSpec) -> jax.Array:
    chunk = _ghost_chunk(*tokens.shape)
    return embedding_ghost_gram(tokens, d, spec.vocab_size, chunk_size=chunk)


def _sketch_gram(x: jax.Array, d: jax.Array, r_in: jax.Array, r_out: jax.Array) -> jax.Array:
    """``<R_in^T X_i^T D_i R_out, R_in^T X_j^T D_j R_out>_F``: the Kronecker sketch of
    :func:`jaxrl_geom.salt.sketch_dense_gram` (same ``N(0, 1/k)`` factors, so the same
    unbiasedness and variance) with the projections given instead of drawn."""
    xs = jnp.einsum("itd,dk->itk", x, r_in, precision=_HI)  # [N, T, k_in]
    ds = jnp.einsum("ite,el->itl", d, r_out, precision=_HI)  # [N, T, k_out]
    psi = jnp.einsum("itk,itl->ikl", xs, ds, precision=_HI)  # [N, k_in, k_out]
    flat = psi.reshape(psi.shape[0], -1)  # [N, k_in * k_out]
    return jnp.dot(flat, flat.T, precision=_HI)


def _dense_block(
    x: jax.Array, d: jax.Array, spec: _TapSpec, projections: tuple, *, weight: bool
) -> jax.Array:
    """Gram of a dense op ``y = x W (+ b)`` from its input and output cotangent."""
    x, d = _rows(x).astype(jnp.float32), _rows(d).astype(jnp.float32)  # [N, T, *]
    n = x.shape[0]
    gram = jnp.zeros((n, n), jnp.float32)
    if weight:
        backend = spec.backend
        if backend == "auto":
            backend = choose_backend(n, x.shape[1], x.shape[2], d.shape[2])
        if backend == "sketch":
            gram = _sketch_gram(x, d, *projections)
        elif backend == "ghost":
            gram = dense_ghost_gram(x, d, chunk_size=_ghost_chunk(n, x.shape[1]))
        else:
            gram = dense_tiled_gram(x, d)
    if spec.bias:
        gram = gram + _bias_gram(d)
    return gram


def tied_cross_gram(
    tokens: jax.Array, d_lookup: jax.Array, h: jax.Array, d_logits: jax.Array
) -> jax.Array:
    """Cross term of a tied table: ``C_ij = <lookup gradient of i, head gradient of j>``.

    .. math::
        C_{ij} = \\sum_{t,s} \\langle D^{emb}_{it}, h_{js} \\rangle\\,
                 D^{logits}_{js}[\\mathrm{tok}_{it}]

    (the lookup gradient of ``i`` is ``sum_t e_{tok_it} D^emb_it^T``, the head gradient
    of ``j`` is ``sum_s D^logits_js h_js^T``, both ``[V, D]``). About ``2 N^2 T^2 D``
    FLOPs, ``chunk`` columns at a time. Tokens outside ``[0, V)`` contribute nothing.

    Args:
      tokens: ``[N, T]`` ids fed to the lookup.
      d_lookup: ``[N, T, D]`` cotangent of the lookup output.
      h: ``[N, S, D]`` input of the tied head.
      d_logits: ``[N, S, V]`` cotangent of the logits.

    Returns:
      ``[N, N]`` float32 (not symmetric; the Gram adds ``C + C^T``).
    """
    n, t = tokens.shape
    vocab = d_logits.shape[-1]
    valid = (tokens >= 0) & (tokens < vocab)  # [N, T]
    d = jnp.where(valid[..., None], d_lookup.astype(jnp.float32), 0.0)  # [N, T, D]
    tok = jnp.clip(tokens, 0, vocab - 1)  # [N, T]

    def column(h_j, dl_j):  # [S, D], [S, V] -> C[:, j] [N]
        dh = jnp.einsum("itd,sd->its", d, h_j.astype(jnp.float32), precision=_HI)  # [N, T, S]
        picked = jnp.take(dl_j.astype(jnp.float32), tok, axis=1)  # [S, N, T]
        return jnp.einsum("its,sit->i", dh, picked, precision=_HI)

    return _columns(column, (h, d_logits), n, _ghost_chunk(n, max(t, h.shape[1])))


# ----------------------------------------------------------------------------------------
# custom_vjp taps: identity forward, Gram block as the probe's cotangent
# ----------------------------------------------------------------------------------------


def _int_cotangent(x: jax.Array) -> np.ndarray:
    return np.zeros(x.shape, jax.dtypes.float0)


def _gram_now(dy: Any, gram: jax.Array) -> tuple[Any, jax.Array]:
    """Tie the Gram block to the cotangent passed on, so the block is computed as soon as
    ``D`` exists and ``D`` dies there. Without it XLA tends to schedule every block after
    the whole backward chain, keeping every layer's ``D`` alive (about one more copy
    of the activations)."""
    return jax.lax.optimization_barrier((dy, gram))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dense_tap(
    spec: _TapSpec, y: jax.Array, x: jax.Array, probe: jax.Array, projections: tuple
) -> jax.Array:
    del x, probe, projections
    return y


def _dense_tap_fwd(spec, y, x, probe, projections):
    del probe
    return y, (x, projections)


def _dense_tap_bwd(spec, residuals, dy):
    x, projections = residuals
    dy, gram = _gram_now(dy, _dense_block(x, dy, spec, projections, weight=spec.weight))
    return dy, jnp.zeros_like(x), gram, jax.tree.map(jnp.zeros_like, projections)


_dense_tap.defvjp(_dense_tap_fwd, _dense_tap_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scale_tap(spec: _TapSpec, y: jax.Array, x_hat: jax.Array, probe: jax.Array) -> jax.Array:
    del x_hat, probe
    return y


def _scale_tap_fwd(spec, y, x_hat, probe):
    del probe
    return y, x_hat


def _scale_tap_bwd(spec, x_hat, dy):
    dy, gram = _gram_now(dy, scale_gram(_rows(x_hat), _rows(dy)))
    return dy, jnp.zeros_like(x_hat), gram


_scale_tap.defvjp(_scale_tap_fwd, _scale_tap_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lookup_tap(spec: _TapSpec, y: jax.Array, tokens: jax.Array, probe: jax.Array) -> jax.Array:
    del tokens, probe
    return y


def _lookup_tap_fwd(spec, y, tokens, probe):
    del probe
    return y, tokens


def _lookup_tap_bwd(spec, tokens, dy):
    dy, gram = _gram_now(dy, _lookup_gram(tokens, dy, spec))
    return dy, _int_cotangent(tokens), gram


_lookup_tap.defvjp(_lookup_tap_fwd, _lookup_tap_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tied_lookup_tap(
    spec: _TapSpec, y: jax.Array, tokens: jax.Array, probe: jax.Array, projections: tuple
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Identity on ``y`` plus the zero carrier ``(h-shaped, logits-shaped)``."""
    del tokens, probe, projections
    return y, _zero_carrier(spec, y)


def _zero_carrier(spec: _TapSpec, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    n, t, d = y.shape
    return jnp.zeros((n, t, d), jnp.float32), jnp.zeros((n, t, spec.vocab_size), jnp.float32)


def _tied_lookup_tap_fwd(spec, y, tokens, probe, projections):
    del probe
    return (y, _zero_carrier(spec, y)), (tokens, projections)


def _tied_lookup_tap_bwd(spec, residuals, cotangents):
    tokens, projections = residuals
    dy, (h, d_logits) = cotangents  # the carrier's cotangent is the head's (h, D^logits)
    cross = tied_cross_gram(tokens, dy, h, d_logits)
    gram = (
        _lookup_gram(tokens, dy, spec)
        + _dense_block(h, d_logits, spec, projections, weight=True)
        + cross
        + cross.T
    )
    zeros = jax.tree.map(jnp.zeros_like, projections)
    return dy, _int_cotangent(tokens), gram, zeros


_tied_lookup_tap.defvjp(_tied_lookup_tap_fwd, _tied_lookup_tap_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tied_head_tap(spec: _TapSpec, logits: jax.Array, h: jax.Array, carrier: tuple) -> jax.Array:
    del h, carrier
    return logits


def _tied_head_tap_fwd(spec, logits, h, carrier):
    del carrier
    return logits, h


def _tied_head_tap_bwd(spec, h, d_logits):
    carrier_ct = (h.astype(jnp.float32), d_logits.astype(jnp.float32))
    return d_logits, jnp.zeros_like(h), carrier_ct


_tied_head_tap.defvjp(_tied_head_tap_fwd, _tied_head_tap_bwd)


# ----------------------------------------------------------------------------------------
# Tap modules (set as ``gram_tap`` of Linear / Embedding / RMSNorm)
# ----------------------------------------------------------------------------------------


class _Tap(nnx.Module):
    def __init__(self, num_rows: int, spec: _TapSpec):
        self.probe = GramProbe(jnp.zeros((num_rows, num_rows), jnp.float32))
        self.spec = spec
        self.r_in = nnx.data(None)  # SketchProjection [d_in, k] when sketched
        self.r_out = nnx.data(None)  # SketchProjection [d_out, k] when sketched

    def projections(self) -> tuple:
        """``(R_in, R_out)`` of a sketched dense block, else ``()``."""
        return () if self.r_in is None else (self.r_in[...], self.r_out[...])


class DenseTap(_Tap):
    """Tap of a ``Linear``: Gram of its kernel (and bias) gradients."""

    def __call__(self, y: jax.Array, x: jax.Array) -> jax.Array:
        return _dense_tap(self.spec, y, x, self.probe[...], self.projections())


class ScaleTap(_Tap):
    """Tap of an ``RMSNorm``: Gram of its scale gradients."""

    def __call__(self, y: jax.Array, x_hat: jax.Array) -> jax.Array:
        return _scale_tap(self.spec, y, x_hat, self.probe[...])


class EmbeddingTap(_Tap):
    """Tap of an ``Embedding``: lookup Gram, plus head and cross terms when tied."""

    def __init__(self, num_rows: int, spec: _TapSpec):
        super().__init__(num_rows, spec)
        self.carrier = nnx.data(None)

    def __call__(self, y: jax.Array, tokens: jax.Array) -> jax.Array:
        if not self.spec.tied:
            return _lookup_tap(self.spec, y, tokens, self.probe[...])
        y, self.carrier = _tied_lookup_tap(
            self.spec, y, tokens, self.probe[...], self.projections()
        )
        return y

    def attend(self, logits: jax.Array, h: jax.Array) -> jax.Array:
        if not self.spec.tied:
            raise ValueError(
                f"Embedding {self.spec.path!r} was tapped as untied but attend() was called: "
                "pass tied_embeddings=True to attach_gram_taps for a tied LM head."
            )
        if self.carrier is None or self.carrier[1].shape[:2] != logits.shape[:2]:
            raise ValueError(
                "The tied-head Gram tap needs the lookup of the same tokens first, with "
                "logits at every position (no KV cache, logits_slice=None)."
            )
        logits = _tied_head_tap(self.spec, logits, h, self.carrier)
        self.carrier = None
        return logits


# ----------------------------------------------------------------------------------------
# Attaching taps and reading the Gram
# ----------------------------------------------------------------------------------------


def _join(path: tuple, name: str) -> str:
    return ".".join([*(str(p) for p in path), name])


def attach_gram_taps(
    model: nnx.Module,
    num_rows: int,
    *,
    scope: Scope = None,
    backend: str = "auto",
    sketch_dim: int = 64,
    seed: int | jax.Array = 0,
    tied_embeddings: bool | None = None,
) -> tuple[str, ...]:
    """Set a Gram tap on every ``Linear`` / ``Embedding`` / ``RMSNorm`` with a parameter in scope.

    Modifies ``model`` in place (use a throw-away copy: ``nnx.merge(*nnx.split(model))``).
    Afterwards the model holds one :class:`GramProbe` ``[num_rows, num_rows]`` per tapped
    op; the gradient of ``sum_i l_i`` with respect to them, summed, is the Gram of the
    per-row loss gradients over the selected parameters (:func:`probe_gram`).

    Args:
      model: the model (e.g. a ``Decoder``).
      num_rows: ``N``, the batch size of the forward pass to come.
      scope: ``None`` (all parameters), a regex searched in the '.'-joined parameter
        path (``path_to_str`` names, e.g. ``"layers.0.mlp.up_proj.kernel"``), or a
        callable ``(path_str, parameter_value) -> bool``.
      backend: dense-op Gram backend, ``"auto"`` | ``"ghost"`` | ``"tiled"`` | ``"sketch"``.
      sketch_dim: sketch size per factor (``backend="sketch"``).
      seed: seed of the sketch projections, an int or a traced integer scalar (the
        projections are fixed per ``(seed, layer path)``).
      tied_embeddings: whether the embedding table is also the LM head (``attend``);
        default ``model.config.tie_word_embeddings`` when the model has a config.

    Returns:
      the sorted parameter paths that enter the Gram.

    Raises:
      ValueError: bad arguments, a scope that selects nothing, or a selected parameter
        held by a module without a Gram tap (use the ``vmap`` reference for it).
    """
    check_scope(scope)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")
    if not (isinstance(num_rows, int) and num_rows >= 1):
        raise ValueError(f"num_rows must be a positive int (the batch size N); got {num_rows!r}.")
    if tied_embeddings is None:
        tied_embeddings = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", 0))
    if backend == "sketch" and not (isinstance(sketch_dim, int) and sketch_dim >= 1):
        raise ValueError(f"sketch_dim must be a positive int; got {sketch_dim!r}.")
    spec = functools.partial(_TapSpec, backend=backend)
    covered: list[str] = []
    sketched: list[tuple[_Tap, int, int]] = []  # (tap, d_in, d_out) of sketched dense blocks
    for path, module in list(nnx.iter_modules(model)):
        prefix = ".".join(str(p) for p in path)
        if isinstance(module, Linear):
            kernel = in_scope(scope, _join(path, "kernel"), module.kernel[...])
            bias = module.bias is not None and in_scope(
                scope, _join(path, "bias"), module.bias[...]
            )
            covered += [_join(path, "kernel")] * kernel + [_join(path, "bias")] * bias
            if kernel or bias:
                module.gram_tap = DenseTap(num_rows, spec(path=prefix, weight=kernel, bias=bias))
                if kernel:
                    sketched.append((module.gram_tap, *module.kernel.shape))
        elif isinstance(module, Embedding):
            if in_scope(scope, _join(path, "embedding"), module.embedding[...]):
                covered.append(_join(path, "embedding"))
                table = spec(
                    path=prefix,
                    weight=True,
                    bias=False,
                    vocab_size=module.embedding.shape[0],
                    tied=tied_embeddings,
                )
                module.gram_tap = EmbeddingTap(num_rows, table)
                if tied_embeddings:  # the head half h E^T: a dense block [D, V]
                    sketched.append((module.gram_tap, *module.embedding.shape[::-1]))
        elif isinstance(module, RMSNorm):
            if in_scope(scope, _join(path, "scale"), module.scale[...]):
                covered.append(_join(path, "scale"))
                module.gram_tap = ScaleTap(num_rows, spec(path=prefix, weight=True, bias=False))

    if backend == "sketch":
        _draw_projections(sketched, sketch_dim, seed)

    params = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    wanted = {path_to_str(p) for p, leaf in params if in_scope(scope, path_to_str(p), leaf)}
    if not wanted:
        names = [path_to_str(p) for p, _ in params]
        raise ValueError(
            f"scope {scope!r} selects no parameter; the paths are e.g. {names[:5]}. Fix the "
            "scope regex/filter or pass scope=None for all parameters."
        )
    missing = sorted(wanted - set(covered))
    if missing:
        raise ValueError(
            f"No Gram tap covers the selected parameters {missing[:5]}: only Linear, "
            "Embedding and RMSNorm parameters have one. Narrow the scope, or use the "
            "materialized reference (per_sample_grads + gram_from_features) for them."
        )
    return tuple(sorted(covered))


def _draw_projections(sketched: list[tuple[_Tap, int, int]], k: int, seed: int | jax.Array) -> None:
    """Give every sketched block fixed ``N(0, 1/k)`` projections ``R_in [d_in, k]``,
    ``R_out [d_out, k]``, keyed by ``(seed, module path, side)``.

    Drawn in one vmapped call per distinct ``d`` (a handful per model) with the
    ``rbg`` generator from key data ``[seed, crc32(path.side), 0, 0]``: the draws depend
    on constants only, and XLA constant-folds threefry (also used by ``fold_in``) at
    compile time, slowly (seconds per layer); RngBitGenerator is not folded.
    """
    requests = [(tap, "r_in", d_in) for tap, d_in, _ in sketched]
    requests += [(tap, "r_out", d_out) for tap, _, d_out in sketched]
    for dim in sorted({d for *_, d in requests}):
        group = [(tap, side) for tap, side, d in requests if d == dim]
        ids = np.asarray([zlib.crc32(f"{t.spec.path}.{side}".encode()) for t, side in group])
        seeds = jnp.full(ids.shape, seed, jnp.uint32)  # seed may be traced
        zeros = np.zeros(ids.shape, np.uint32)
        key_data = jnp.stack([seeds, ids.astype(np.uint32), zeros, zeros], axis=1)  # [G, 4]
        keys = jax.random.wrap_key_data(key_data, impl="rbg")
        draws = jax.vmap(lambda key, dim=dim: jax.random.normal(key, (dim, k), jnp.float32))(keys)
        draws = draws / np.sqrt(np.float32(k))  # [G, dim, k]
        for (tap, side), r in zip(group, draws, strict=True):
            setattr(tap, side, SketchProjection(r))


def probe_gram(probe_grads: Any) -> jax.Array:
    """The Gram: the sum of the probes' cotangents (one ``[N, N]`` block per tapped op)."""
    return sum(jax.tree_util.tree_leaves(probe_grads))


def probe_blocks(probe_grads: Any) -> dict[str, jax.Array]:
    """The per-op Gram blocks ``{module path: [N, N]}`` (e.g. ``"layers.0.mlp.up_proj"``;
    a Linear's block covers its kernel and bias, a tied table's its lookup and head)."""
    suffix = ".gram_tap.probe"
    return {
        path_to_str(path).removesuffix(suffix): block
        for path, block in jax.tree_util.tree_leaves_with_path(probe_grads)
    }


def split_tapped(
    model: nnx.Module, num_rows: int, **tap_kwargs: Any
) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
    """A tapped copy of ``model`` split as ``(graphdef, probes, params, rest)``.

    ``nnx.merge(graphdef, probes, params, rest, copy=True)`` rebuilds it inside a
    differentiated function (``copy=True``: Variables of this trace level, which
    ``nnx.remat`` needs); ``params`` has the structure of
    ``nnx.state(model, nnx.Param)``, so the original parameter state can be passed in
    its place (and differentiated). ``tap_kwargs``: as
    :func:`attach_gram_taps`.
    """
    tapped = nnx.merge(*nnx.split(model))
    attach_gram_taps(tapped, num_rows, **tap_kwargs)
    return nnx.split(tapped, GramProbe, nnx.Param, ...)


def gram_of_loss(
    loss_fn: Callable[..., Any],
    model: nnx.Module,
    *args: Any,
    has_aux: bool = False,
    num_rows: int | None = None,
    per_op: bool = False,
    **tap_kwargs: Any,
) -> Any:
    """Gram of per-row loss gradients by Gram taps, never materializing them.

    .. math::
        K_{ij} = \\langle \\nabla_\\theta l_i, \\nabla_\\theta l_j \\rangle, \\qquad
        l = \\mathrm{loss\\_fn}(\\mathrm{model}, *\\mathrm{args}) \\in \\mathbb{R}^N

    restricted to the parameters in ``scope``. One forward and one backward pass (with
    respect to the probes only) of ``sum_i l_i``.

    Requires independent rows: ``l_i`` depends on row ``i`` of the batch only (true
    for a decoder LM; not with batch-coupled ops such as batch norm), so the backward
    of ``sum_i l_i`` carries each row's own cotangent.

    Args:
      loss_fn: ``(model, *args) -> [N]`` per-row losses (``((N,), aux)`` with ``has_aux``).
      model: an NNX model with ``Linear`` / ``Embedding`` / ``RMSNorm`` parameters (it is
        not modified: the taps go on a copy).
      *args: passed to ``loss_fn``.
      has_aux: ``loss_fn`` returns ``(losses, aux)``; then ``(K, aux)`` is returned.
      num_rows: ``N``; default from ``jax.eval_shape`` of ``loss_fn`` (one extra trace).
      per_op: return the per-op blocks ``{module path: [N, N]}`` (:func:`probe_blocks`,
        e.g. per-layer geometry) instead of their sum.
      **tap_kwargs: ``scope``, ``backend``, ``sketch_dim``, ``seed``,
        ``tied_embeddings`` of :func:`attach_gram_taps`.

    Returns:
      ``[N, N]`` float32 Gram, or the per-op blocks (and ``aux``).

    Example:
      >>> def per_rollout_loss(model, batch):          # [N]
      ...     logits, _ = model(batch.tokens, batch.positions, batch.mask)
      ...     return -jnp.sum(batch.weights * token_logp(logits, batch), axis=1)
      >>> k = gram_of_loss(per_rollout_loss, model, batch, scope=r"mlp", backend="auto")
    """

    def losses_of(m: nnx.Module) -> tuple[jax.Array, Any]:
        out = loss_fn(m, *args)
        return out if has_aux else (out, None)

    if num_rows is None:
        graphdef, state = nnx.split(model)
        rows = lambda s: losses_of(nnx.merge(graphdef, s, copy=True))[0]
        shape = jax.eval_shape(rows, state).shape
        if len(shape) != 1:
            raise ValueError(
                f"loss_fn must return per-row losses [N]; got shape {shape}. Do not sum over "
                "the batch: the Gram needs one loss per row."
            )
        num_rows = shape[0]
    graphdef, probes, params, rest = split_tapped(model, num_rows, **tap_kwargs)

    def total(probes: nnx.State) -> tuple[jax.Array, Any]:
        # copy=True: fresh Variables at this trace level (nnx.remat'd layers update them).
        per_row, aux = losses_of(nnx.merge(graphdef, probes, params, rest, copy=True))
        if per_row.shape != (num_rows,):
            raise ValueError(
                f"loss_fn returned shape {per_row.shape}; expected per-row losses "
                f"[{num_rows}] (num_rows)."
            )
        return jnp.sum(per_row), aux

    probe_grads, aux = jax.grad(total, has_aux=True)(probes)
    gram = probe_blocks(probe_grads) if per_op else probe_gram(probe_grads)
    return (gram, aux) if has_aux else gram
