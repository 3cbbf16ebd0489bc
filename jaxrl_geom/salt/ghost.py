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
of the logits) through the backward of the trunk. SALT's step runs the head in chunks
instead (``head_positions > 0``, :mod:`jaxrl_geom.salt.head`): its carrier holds
``(h, y, lse, g)`` of the completion positions and the table, never ``[N, T, V]``.
"""

from __future__ import annotations

import contextlib
import functools
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_geom.models.layers import Embedding, Linear, RMSNorm
from jaxrl_geom.salt import stacked as st
from jaxrl_geom.salt.blocks import (
    _dense_block,
    _lookup_gram,
    _rows,
    _TapSpec,
    _tied_block,
)
from jaxrl_geom.salt.gram import (
    Scope,
    check_scope,
    in_scope,
    path_to_str,
    per_layer_leaves,
    scale_gram,
)
from jaxrl_geom.salt.head_gram import HeadWeight, tied_head_gram

BACKENDS: tuple[str, ...] = ("auto", "ghost", "tiled", "sketch")


class GramProbe(nnx.Variable):
    """A zero ``[N, N]`` input of one tap; its cotangent is the tap's Gram block."""


class SketchProjection(nnx.Variable):
    """A random projection ``[d, k]`` of a sketched dense op (never trained)."""


class KeptX(nnx.Variable):
    """Book-keeping: a tapped op's input ``X`` (sown in the forward pass)."""


class KeptD(nnx.Variable):
    """Book-keeping: a zero added to a tapped op's output; its gradient is ``D``."""


_ACTIVE_CALLS: list[set[str]] = []  # stack of "which taps ran in this forward" sets


@contextlib.contextmanager
def tap_calls() -> Iterator[set[str]]:
    """Record the taps called while tracing a forward pass; a second call of the same
    tap raises (its cross-call terms would be lost from the Gram)."""
    _ACTIVE_CALLS.append(set())
    try:
        yield _ACTIVE_CALLS[-1]
    finally:
        _ACTIVE_CALLS.pop()


def _record_call(name: str) -> None:
    if not _ACTIVE_CALLS:
        return
    if name in _ACTIVE_CALLS[-1]:
        raise ValueError(
            f"The Gram tap of {name!r} was called twice in one forward pass: the Gram "
            "would lose the cross terms between the calls. SALT's taps need each Linear / "
            "Embedding / RMSNorm applied once per forward (share weights by tying, not by "
            "calling a layer twice), or use the materialized reference (per_sample_grads)."
        )
    _ACTIVE_CALLS[-1].add(name)


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
    dy, gram = _gram_now(dy, _tied_block(spec, projections, tokens, dy, h, d_logits))
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
    carrier_ct = (h.astype(jnp.float32), d_logits.astype(jnp.float32))  # carrier dtype
    return d_logits, jnp.zeros_like(h), carrier_ct


_tied_head_tap.defvjp(_tied_head_tap_fwd, _tied_head_tap_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tied_lookup_chunk_tap(
    spec: _TapSpec, y: jax.Array, tokens: jax.Array, probe: jax.Array, projections: tuple
) -> tuple[jax.Array, tuple]:
    """The lookup tap of a tied table whose head runs in chunks (``spec.last`` positions,
    :func:`jaxrl_geom.salt.head.head_logprobs`): identity on ``y`` plus a zero carrier
    ``(h [N, L, D], y, lse, g [N, L], table [V, D], tau)`` whose cotangent the head tap
    sets (no ``[N, L, V]`` tensor; the table is the parameter itself)."""
    del tokens, probe, projections
    return y, _zero_chunk_carrier(spec, y)


def _zero_chunk_carrier(spec: _TapSpec, y: jax.Array) -> tuple:
    n, d = y.shape[0], y.shape[-1]
    per_position = jnp.zeros((n, spec.last), jnp.float32)
    h = jnp.zeros((n, spec.last, d), y.dtype)
    table = jnp.zeros((spec.vocab_size, d), y.dtype)
    return h, per_position, per_position, per_position, table, jnp.zeros((), jnp.float32)


def _tied_lookup_chunk_tap_fwd(spec, y, tokens, probe, projections):
    del probe
    return (y, _zero_chunk_carrier(spec, y)), (tokens, projections)


def _tied_lookup_chunk_tap_bwd(spec, residuals, cotangents):
    tokens, projections = residuals
    dy, (h, targets, lse, g, table, tau) = cotangents  # set by the chunked head tap
    weight = HeadWeight(table, None, tied=True, dtype=table.dtype, chunk_tokens=spec.chunk_tokens)
    head = (h, targets.astype(jnp.int32), lse, g)
    dy, gram = _gram_now(dy, tied_head_gram(spec, projections, weight, tokens, dy, head, tau))
    zeros = jax.tree.map(jnp.zeros_like, projections)
    return dy, _int_cotangent(tokens), gram, zeros


_tied_lookup_chunk_tap.defvjp(_tied_lookup_chunk_tap_fwd, _tied_lookup_chunk_tap_bwd)


# ----------------------------------------------------------------------------------------
# Tap modules (set as ``gram_tap`` of Linear / Embedding / RMSNorm)
# ----------------------------------------------------------------------------------------


class _Tap(nnx.Module):
    def __init__(self, num_rows: int, spec: _TapSpec, num_layers: int = 0):
        # Stacked layers (scan): every Variable here carries a leading [L] axis and the
        # scan body sees one layer's slice, so the probe's cotangent is [L, N, N].
        lead = (num_layers,) if num_layers else ()
        self.probe = GramProbe(jnp.zeros((*lead, num_rows, num_rows), jnp.float32))
        self.spec = spec
        self.num_layers = num_layers  # 0: not stacked
        self.layer_scope = nnx.data(None)  # LayerScope [L] when the scope splits the stack
        self.r_in = nnx.data(None)  # SketchProjection [d_in, k] when sketched
        self.r_out = nnx.data(None)  # SketchProjection [d_out, k] when sketched
        self.d_main = nnx.data(None)  # KeptD (book-keeping), shaped like the output
        self.d_head = nnx.data(None)  # KeptD of a tied table's head (book-keeping)

    def projections(self) -> tuple:
        """``(R_in, R_out)`` of a sketched dense block, else ``()``."""
        return () if self.r_in is None else (self.r_in[...], self.r_out[...])

    def _probe(self) -> jax.Array:
        """The zero probe; times this layer's 0/1 scope when the scope splits a stack
        (the block's cotangent is then scaled by it)."""
        if self.layer_scope is None:
            return self.probe[...]
        return self.probe[...] * self.layer_scope[...]

    def _keep(self, slot: str, y: jax.Array, x: jax.Array) -> jax.Array:
        """Book-keeping: sow ``x`` as ``KeptX``; add the zero probe whose gradient is ``D``
        (before the probes exist, sow ``y`` so the caller learns its shape)."""
        _record_call(f"{self.spec.path}.{slot}")
        self.sow(KeptX, slot, x)
        probe = getattr(self, f"d_{slot}")
        if probe is None:
            self.sow(KeptX, f"{slot}_out", y)
            return y
        return y + probe[...]


class DenseTap(_Tap):
    """Tap of a ``Linear``: Gram of its kernel (and bias) gradients."""

    def __call__(self, y: jax.Array, x: jax.Array) -> jax.Array:
        if self.spec.keep:
            return self._keep("main", y, x)
        _record_call(self.spec.path)
        return _dense_tap(self.spec, y, x, self._probe(), self.projections())


class ScaleTap(_Tap):
    """Tap of an ``RMSNorm``: Gram of its scale gradients."""

    def __call__(self, y: jax.Array, x_hat: jax.Array) -> jax.Array:
        if self.spec.keep:
            return self._keep("main", y, x_hat)
        _record_call(self.spec.path)
        return _scale_tap(self.spec, y, x_hat, self._probe())


class EmbeddingTap(_Tap):
    """Tap of an ``Embedding``: lookup Gram, plus head and cross terms when tied."""

    def __init__(self, num_rows: int, spec: _TapSpec):
        super().__init__(num_rows, spec)
        self.carrier = nnx.data(None)

    def __call__(self, y: jax.Array, tokens: jax.Array) -> jax.Array:
        if self.spec.keep:
            return self._keep("main", y, tokens)
        _record_call(self.spec.path)
        if not self.spec.tied:
            return _lookup_tap(self.spec, y, tokens, self.probe[...])
        lookup = _tied_lookup_chunk_tap if self.spec.last else _tied_lookup_tap
        y, self.carrier = lookup(self.spec, y, tokens, self.probe[...], self.projections())
        return y

    def attend(self, logits: jax.Array, h: jax.Array) -> jax.Array:
        if not self.spec.tied:
            raise ValueError(
                f"Embedding {self.spec.path!r} was tapped as untied but attend() was called: "
                "pass tied_embeddings=True to attach_gram_taps for a tied LM head."
            )
        if self.spec.last:
            raise ValueError(
                f"The tied head of {self.spec.path!r} was tapped for SALT's chunked head "
                "(head_positions > 0): run it through jaxrl_geom.salt.head.head_logprobs, or "
                "attach the taps with head_positions=0 for a full-logits attend()."
            )
        if self.spec.keep:
            return self._keep("head", logits, h)
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
    step: int | jax.Array = 0,
    tied_embeddings: bool | None = None,
    keep: bool = False,
    head_positions: int = 0,
) -> tuple[str, ...]:
    """Set a Gram tap on every ``Linear`` / ``Embedding`` / ``RMSNorm`` with a parameter in scope.

    Modifies ``model`` in place (use a throw-away copy: ``nnx.merge(*nnx.split(model))``).
    Afterwards the model holds one :class:`GramProbe` ``[num_rows, num_rows]`` per tapped
    op; the gradient of ``sum_i l_i`` with respect to them, summed, is the Gram of the
    per-row loss gradients over the selected parameters (:func:`probe_gram`).

    Scanned layers (``ModelConfig.scan_layers``: one module, parameters ``[L, ...]``): the
    stacked module's taps hold ``[L, ...]`` Variables (probe ``[L, N, N]``), scanned with
    the parameters; the scope is judged per layer under the unrolled names
    (``layers.<i>.<...>``), which are also the names returned.

    Args:
      model: the model (e.g. a ``Decoder``).
      num_rows: ``N``, the batch size of the forward pass to come.
      scope: ``None`` (all parameters), a regex searched in the '.'-joined parameter
        path (``path_to_str`` names, e.g. ``"layers.0.mlp.up_proj.kernel"``), or a
        callable ``(path_str, parameter_value) -> bool``.
      backend: dense-op Gram backend, ``"auto"`` | ``"ghost"`` | ``"tiled"`` | ``"sketch"``.
      sketch_dim: sketch size per factor (``backend="sketch"``).
      seed, step: the sketch projections are drawn per ``(seed, step, layer path)``
        (ints or traced integer scalars): fresh each optimizer step, the same on every
        device.
      tied_embeddings: whether the embedding table is also the LM head (``attend``);
        default ``model.config.tie_word_embeddings`` when the model has a config.
      keep: book-keeping taps on EVERY op (the update needs them all; ``scope`` still
        selects the Gram): each sows its input as :class:`KeptX` and adds a
        :class:`KeptD` probe (set by :func:`set_kept_d_probes`) whose gradient is ``D``.
      head_positions: ``L > 0``: the LM head runs only at the last ``L`` positions (the
        completion), in chunks, through :func:`jaxrl_geom.salt.head.head_logprobs`, and
        its Gram comes from per-position statistics (a tied table's ``attend`` then
        raises). 0: the head is tapped at every position of ``model(...)``.

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
    spec = functools.partial(_TapSpec, backend=backend, keep=keep)
    chunk_tokens = getattr(getattr(model, "config", None), "logits_chunk_tokens", 1024)
    head = getattr(model, "lm_head", None)
    covered: list[str] = []
    sketched: list[tuple[_Tap, int, int]] = []  # (tap, d_in, d_out) of sketched dense blocks
    stacks: dict[int, list[tuple[int | None, tuple]]] = {}  # id(tap) -> sketched (layer, path)
    for path, module in list(nnx.iter_modules(model)):
        prefix = ".".join(str(p) for p in path)
        if isinstance(module, Linear):
            layers = module.kernel.ndim - 2  # 1: stacked [L, in, out] (scanned layers)
            kernels = st.selected(scope, path, "kernel", module.kernel[...], layers)
            biases = [False] * len(kernels)
            if module.bias is not None:
                biases = st.selected(scope, path, "bias", module.bias[...], layers)
            covered += st.selected_names(path, "kernel", kernels, layers)
            covered += st.selected_names(path, "bias", biases, layers)
            kernel, bias = any(kernels), any(biases)
            if kernel or bias or keep:
                last = head_positions if module is head else 0
                tap_spec = spec(
                    path=prefix, weight=kernel, bias=bias, last=last, chunk_tokens=chunk_tokens
                )
                module.gram_tap = DenseTap(num_rows, tap_spec, layers and len(kernels))
                module.gram_tap.layer_scope = st.layer_scope(prefix, kernels, biases, layers)
                if kernel:
                    sketched.append((module.gram_tap, *module.kernel.shape[-2:]))
                    stacks[id(module.gram_tap)] = st.layer_paths(path, kernels, layers)
        elif isinstance(module, Embedding):
            selected = in_scope(scope, _join(path, "embedding"), module.embedding[...])
            covered += [_join(path, "embedding")] * selected
            if selected or keep:
                table = spec(
                    path=prefix,
                    weight=selected,
                    bias=False,
                    vocab_size=module.embedding.shape[0],
                    tied=tied_embeddings,
                    last=head_positions if tied_embeddings else 0,
                    chunk_tokens=chunk_tokens,
                )
                module.gram_tap = EmbeddingTap(num_rows, table)
                if tied_embeddings and selected:  # the table as a dense block [D, V]
                    sketched.append((module.gram_tap, *module.embedding.shape[::-1]))
        elif isinstance(module, RMSNorm):
            layers = module.scale.ndim - 1  # 1: stacked [L, C]
            scales = st.selected(scope, path, "scale", module.scale[...], layers)
            covered += st.selected_names(path, "scale", scales, layers)
            if any(scales) or keep:
                tap_spec = spec(path=prefix, weight=any(scales), bias=False)
                module.gram_tap = ScaleTap(num_rows, tap_spec, layers and len(scales))
                no_bias = [False] * len(scales)
                module.gram_tap.layer_scope = st.layer_scope(prefix, scales, no_bias, layers)

    if backend == "sketch":
        _draw_projections(sketched, sketch_dim, seed, step, stacks)

    params = per_layer_leaves(nnx.state(model, nnx.Param), slices=callable(scope))
    wanted = {name for name, leaf in params if in_scope(scope, name, leaf)}
    if not wanted:
        names = [name for name, _ in params]
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


def _draw_projections(
    sketched: list[tuple[_Tap, int, int]],
    k: int,
    seed: int | jax.Array,
    step: int | jax.Array,
    stacks: dict[int, list[tuple[int | None, tuple]]] | None = None,
) -> None:
    """Give every sketched block ``N(0, 1/k)`` projections ``R_in [d_in, k]``,
    ``R_out [d_out, k]``, keyed by ``(seed, step, module path, side)``.

    Drawn in one vmapped call per distinct ``d`` (a handful per model) with the
    ``rbg`` generator from key data ``[seed, crc32(path.side), step, 0]``: the draws depend
    on constants only, and XLA constant-folds threefry (also used by ``fold_in``) at
    compile time, slowly (seconds per layer); RngBitGenerator is not folded.

    A stacked tap (``stacks[id(tap)]``: its sketched layers and their unrolled module
    paths) gets ``[L, d, k]``: layer ``i`` drawn under its unrolled path, in the
    unrolled model's order (the vmapped ``rbg`` draws depend on the batch of keys), so
    scanned and unrolled models draw the same projections.
    """
    stacks = {} if stacks is None else stacks
    entries = []  # (tap, layer or None, module path tuple, d_in, d_out)
    for tap, d_in, d_out in sketched:
        for layer, path in stacks.get(id(tap), [(None, (tap.spec.path,))]):
            entries.append((tap, layer, path, d_in, d_out))
    if any(i is not None for _, i, *_ in entries):  # the unrolled model's module order
        # (nnx.iter_modules: children sorted, depth first), as an unrolled model requests
        entries.sort(key=lambda e: tuple((0, p) if isinstance(p, int) else (1, p) for p in e[2]))
    requests = [(tap, i, path, "r_in", d_in) for tap, i, path, d_in, _ in entries]
    requests += [(tap, i, path, "r_out", d_out) for tap, i, path, _, d_out in entries]
    drawn: dict[tuple[int, str], dict[int | None, jax.Array]] = {}
    for dim in sorted({d for *_, d in requests}):
        group = [(tap, i, path, side) for tap, i, path, side, d in requests if d == dim]
        names = [".".join(str(p) for p in path) + f".{side}" for _, _, path, side in group]
        ids = np.asarray([zlib.crc32(name.encode()) for name in names])
        seeds = jnp.full(ids.shape, seed, jnp.uint32)  # seed may be traced
        zeros = np.zeros(ids.shape, np.uint32)
        steps = jnp.full(ids.shape, step, jnp.uint32)  # step may be traced
        key_data = jnp.stack([seeds, ids.astype(np.uint32), steps, zeros], axis=1)  # [G, 4]
        keys = jax.random.wrap_key_data(key_data, impl="rbg")
        draws = jax.vmap(lambda key, dim=dim: jax.random.normal(key, (dim, k), jnp.float32))(keys)
        draws = draws / np.sqrt(np.float32(k))  # [G, dim, k]
        for (tap, i, _, side), r in zip(group, draws, strict=True):
            drawn.setdefault((id(tap), side), {})[i] = r
    for tap, *_ in sketched:
        for side in ("r_in", "r_out"):
            rows = drawn[(id(tap), side)]
            if not tap.num_layers:
                setattr(tap, side, SketchProjection(rows[None]))  # the one (layer None) draw
                continue
            # layers outside the scope: zeros (their block is scaled by 0)
            zero = jnp.zeros_like(next(iter(rows.values())))
            r = jnp.stack([rows.get(i, zero) for i in range(tap.num_layers)])  # [L, d, k]
            setattr(tap, side, SketchProjection(r))


def probe_gram(probe_grads: Any) -> jax.Array:
    """The Gram: the sum of the probes' cotangents (one ``[N, N]`` block per tapped op,
    ``[L, N, N]`` per stacked op of scanned layers)."""
    leaves = jax.tree_util.tree_leaves(probe_grads)
    return sum(g if g.ndim == 2 else jnp.sum(g, axis=0) for g in leaves)


def probe_blocks(probe_grads: Any) -> dict[str, jax.Array]:
    """The per-op Gram blocks ``{module path: [N, N]}`` (e.g. ``"layers.0.mlp.up_proj"``;
    a Linear's block covers its kernel and bias, a tied table's its lookup and head).
    A stacked op (scanned layers) gives one block per layer under the unrolled names,
    in the unrolled order."""
    suffix = ".gram_tap.probe"
    blocks = []
    for path, block in jax.tree_util.tree_leaves_with_path(probe_grads):
        name = path_to_str(path).removesuffix(suffix)
        if block.ndim == 2:
            blocks.append(((name,), name, block))
            continue
        head, _, tail = name.partition(".")  # layers.<op> -> layers.<i>.<op>
        blocks += [((head, i, tail), f"{head}.{i}.{tail}", block[i]) for i in range(len(block))]
    if any(len(key) > 1 for key, *_ in blocks):
        blocks.sort(key=lambda b: tuple((0, p) if isinstance(p, int) else (1, p) for p in b[0]))
    return {name: block for _, name, block in blocks}


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
    tapped = nnx.merge(*nnx.split(model))
    covered = attach_gram_taps(tapped, num_rows, **tap_kwargs)
    graphdef, probes, params, rest = nnx.split(tapped, GramProbe, nnx.Param, ...)

    def total(probes: nnx.State) -> tuple[jax.Array, Any]:
        # copy=True: fresh Variables at this trace level (nnx.remat'd layers update them).
        with tap_calls():
            per_row, aux = losses_of(nnx.merge(graphdef, probes, params, rest, copy=True))
        if per_row.shape != (num_rows,):
            raise ValueError(
                f"loss_fn returned shape {per_row.shape}; expected per-row losses "
                f"[{num_rows}] (num_rows)."
            )
        return jnp.sum(per_row), aux

    probe_grads, aux = jax.grad(total, has_aux=True)(probes)
    if per_op:  # the ops in scope (a stacked op's layers outside it give zero blocks)
        ops = {name.rsplit(".", 1)[0] for name in covered}
        gram = {k: v for k, v in probe_blocks(probe_grads).items() if k in ops}
    else:
        gram = probe_gram(probe_grads)
    return (gram, aux) if has_aux else gram
