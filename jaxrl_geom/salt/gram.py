"""Gram backends for SALT: the N x N geometry ``K = Phi Phi^T`` of per-sample gradients.

Two families (SPEC section 2, "Cost"; PERF.md section 4):

* **materialized** (reference, small scopes): ``per_sample_grads`` builds
  ``Phi`` with ``vmap(grad)`` and ``gram_from_features`` sums ``F_l F_l^T`` over the
  selected leaves;
* **per layer, from captured tensors** (the scalable path, never holds ``Phi``): a
  dense layer ``y = x W`` has per-sample kernel gradient ``phi_i = X_i^T D_i`` with
  ``X = x`` ``[N, T, d_in]`` its input and ``D = dL/dy`` ``[N, T, d_out]`` its output
  cotangent, so the Gram is additive over layers. Exact: ``dense_ghost_gram``,
  ``dense_tiled_gram`` (``choose_backend`` picks by FLOPs), ``embedding_ghost_gram``,
  ``scale_gram``; approximate: ``sketch_dense_gram`` (Kronecker random projection).

Every function takes ``(x, d)`` exactly as a dense layer sees them, so a custom_vjp
tap can call it in its backward rule. Arithmetic follows the inputs (``_mm``): 16-bit
inputs (a bf16 model) are contracted as they are with float32 accumulation
(``preferred_element_type``: the fast path of an accelerator); float32 inputs use
``Precision.HIGHEST``, since the cancellation ratio compares ``a^T K a`` with
``a^T diag(K) a`` and TF32-style matmuls would drown the difference. The results are
float32; the eigendecomposition and the reweighting run in float32.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_geom.models.taps import has_stacked_layers
from jaxrl_geom.param_paths import path_to_str

PyTree = Any
Scope = str | Callable[[str, Any], bool] | None

_HI = jax.lax.Precision.HIGHEST

#: Elements of one [N, chunk, T, T] ghost intermediate (64 MiB of float32).
_GHOST_BLOCK_ELEMENTS = 1 << 24

#: Elements of one [N, d_in, tile] tile of per-sample kernel gradients (256 MiB of float32).
_TILE_ELEMENTS = 1 << 26


def _low(*arrays: jax.Array) -> jnp.dtype:
    """The 16-bit dtype among the inputs, else float32 (the arithmetic dtype)."""
    low = [a.dtype for a in arrays if jnp.dtype(a.dtype).itemsize < 4]
    return low[0] if low else jnp.dtype(jnp.float32)


def _mm(subscripts: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``einsum`` with float32 output: 16-bit inputs at their own precision (f32
    accumulation), float32 inputs at ``Precision.HIGHEST``."""
    dtype = _low(a, b)
    precision = _HI if dtype == jnp.float32 else None
    return jnp.einsum(
        subscripts,
        a.astype(dtype),
        b.astype(dtype),
        precision=precision,
        preferred_element_type=jnp.float32,
    )


# ----------------------------------------------------------------------------------------
# Materialized features (reference path)
# ----------------------------------------------------------------------------------------


def _leading_size(tree: PyTree, what: str) -> int:
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"{what} has no array leaves; pass a pytree of arrays [N, ...].")
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"All leaves of {what} need the same leading (sample) axis N; got leading sizes "
            f"{sorted(str(s) for s in sizes)}. Stack one entry per rollout on axis 0."
        )
    return sizes.pop()


def per_sample_grads(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    *,
    chunk_size: int | None = None,
) -> PyTree:
    """Per-sample gradients ``g_i = grad_params loss_fn(params, batch[i])``.

    .. math::
        G = [\\nabla_\\theta \\ell(\\theta; b_1); \\dots; \\nabla_\\theta \\ell(\\theta; b_N)]

    ``loss_fn(params, example)`` receives ONE example (``batch`` with its leading axis
    indexed away) and returns a scalar. For SALT features (DESIGN.md sign convention)
    ``loss_fn`` is the loss of one rollout per unit coefficient, i.e. without the
    advantage, so that ``sum_i a_i g_i`` is the ordinary loss gradient.

    Args:
      loss_fn: ``(params, example) -> scalar``.
      params: parameter pytree (closed over, not batched).
      batch: pytree whose leaves share the leading sample axis ``N``.
      chunk_size: ``None`` vmaps over all ``N`` at once; an int processes that many
        samples at a time with ``lax.map(..., batch_size=chunk_size)`` to bound memory
        (peak ~ ``chunk_size`` copies of the parameters' gradient).

    Returns:
      a pytree like ``params`` whose leaves have a leading axis ``N``.
    """
    _leading_size(batch, "batch")
    grad_fn = jax.grad(loss_fn)
    if chunk_size is None:
        return jax.vmap(grad_fn, in_axes=(None, 0))(params, batch)
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}.")
    return jax.lax.map(lambda example: grad_fn(params, example), batch, batch_size=chunk_size)


def check_scope(scope: Scope) -> None:
    """Raise a ValueError unless ``scope`` is None, a regex string or a callable."""
    if scope is None or callable(scope):
        return
    if isinstance(scope, str):
        try:
            re.compile(scope)
        except re.error as err:
            raise ValueError(
                f"scope {scope!r} is not a valid regular expression ({err}). Escape it or "
                "pass a callable (path_str, leaf) -> bool."
            ) from err
        return
    raise ValueError(
        f"scope must be None (all parameters), a regex on the '.'-joined parameter path, or "
        f"a callable (path_str, leaf) -> bool; got {type(scope).__name__}."
    )


def in_scope(scope: Scope, path_str: str, leaf: Any) -> bool:
    """Whether a leaf at ``path_str`` is selected (regex: ``re.search`` on the path)."""
    if scope is None:
        return True
    if isinstance(scope, str):
        return re.search(scope, path_str) is not None
    return bool(scope(path_str, leaf))


def gram_from_features(features: PyTree, scope: Scope = None) -> jax.Array:
    """Gram of materialized per-sample features, summed over the selected leaves.

    .. math::
        K = \\sum_{l \\in \\mathrm{scope}} F_l F_l^\\top, \\qquad
        F_l = \\mathrm{reshape}(\\mathrm{leaf}_l, [N, -1])

    Args:
      features: pytree whose leaves are ``[N, ...]`` (e.g. from ``per_sample_grads``).
      scope: ``None`` (all leaves), a regex searched in the '.'-joined key path
        (``"mlp|self_attn"``; see ``path_to_str``), or a callable
        ``(path_str, leaf) -> bool``. The scope restricts the Gram only.

    Returns:
      ``[N, N]`` float32 Gram.
    """
    check_scope(scope)
    n = _leading_size(features, "features")
    leaves = per_layer_leaves(features, layer_axis=1)
    selected = [leaf for name, leaf in leaves if in_scope(scope, name, leaf)]
    if not selected:
        paths = [name for name, _ in leaves]
        raise ValueError(
            f"scope {scope!r} selects no parameter; the paths are e.g. {paths[:5]}. "
            "Fix the scope regex/filter or pass scope=None for all parameters."
        )
    gram = jnp.zeros((n, n), jnp.float32)
    for leaf in selected:
        flat = jnp.reshape(leaf, (n, -1)).astype(jnp.float32)  # [N, P_l]
        gram = gram + jnp.dot(flat, flat.T, precision=_HI)
    return gram


def per_layer_leaves(
    tree: PyTree, *, layer_axis: int = 0, slices: bool = True
) -> list[tuple[str, Any]]:
    """``(name, leaf)`` per leaf of ``tree``; on scanned layers (an ``nnx.State`` whose
    ``layers.<...>`` leaves stack the layers on ``layer_axis``) one entry per layer under
    its unrolled name ``layers.<i>.<...>`` with its slice (``None`` without ``slices``),
    so a scope selects the same parameters as on the unrolled model and its Gram taps."""
    stacked = isinstance(tree, nnx.State) and has_stacked_layers(tree)
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = path_to_str(path)
        head, _, tail = name.partition(".")
        if stacked and head == "layers":
            for i in range(leaf.shape[layer_axis]):
                value = (
                    jax.lax.index_in_dim(leaf, i, layer_axis, keepdims=False) if slices else None
                )
                out.append((f"{head}.{i}.{tail}", value))
        else:
            out.append((name, leaf))
    return out


# ----------------------------------------------------------------------------------------
# Per-layer Grams from captured (x, d)
# ----------------------------------------------------------------------------------------


def _check_xd(x: jax.Array, d: jax.Array, name: str) -> None:
    if x.ndim != 3 or d.ndim != 3 or x.shape[:2] != d.shape[:2]:
        raise ValueError(
            f"{name} expects x [N, T, d_in] and d [N, T, d_out] with the same N and T; got "
            f"x {x.shape}, d {d.shape}. Add a token axis of length 1 for per-sample vectors."
        )


def _columns(column_fn: Callable, operands: tuple, n: int, chunk: int) -> jax.Array:
    """K[:, j] = column_fn(*operands[j]) for all j, ``chunk`` columns at a time."""
    if chunk >= n:
        return jax.vmap(column_fn, out_axes=1)(*operands)  # [N, N]
    return jax.lax.map(lambda ops: column_fn(*ops), operands, batch_size=chunk).T


def _bias_gram(d: jax.Array) -> jax.Array:
    """Gram of the bias gradients ``sum_t D_it`` of a dense layer."""
    g = jnp.sum(d.astype(jnp.float32), axis=1)  # [N, d_out]
    return jnp.dot(g, g.T, precision=_HI)


def _ghost_chunks(n: int, t: int, block_elements: int) -> tuple[int, int]:
    """``(columns, key positions)`` per step so ``[N, columns, T, s]`` fits the budget:
    whole columns while one fits, else one column and a block of ``s`` positions."""
    if n * t * t <= block_elements:
        return min(n, block_elements // (n * t * t)), t
    return 1, max(1, min(t, block_elements // max(1, n * t)))


@functools.partial(jax.jit, static_argnames=("bias", "chunk_size", "block_elements"))
def dense_ghost_gram(
    x: jax.Array,
    d: jax.Array,
    bias: bool = False,
    *,
    chunk_size: int | None = None,
    block_elements: int | None = None,
) -> jax.Array:
    """Exact per-sample-gradient Gram of a dense layer without forming ``X_i^T D_i``.

    .. math::
        K_{ij} = \\langle X_i^\\top D_i, X_j^\\top D_j \\rangle_F
               = \\sum_{t,s} (X_i X_j^\\top)_{ts} (D_i D_j^\\top)_{ts}
               \\; [+ (\\textstyle\\sum_t D_{it}) \\cdot (\\sum_s D_{js})]

    ("ghost" trick: Goodfellow arXiv:1510.01799; Li et al. arXiv:2110.05679; Bu et al.
    arXiv:2205.10683.) About ``2 N^2 T^2 (d_in + d_out)`` FLOPs. Columns ``j`` are
    processed ``chunk_size`` at a time, so the ``[N, chunk, T, T]`` intermediates stay
    bounded (default: about 64 MiB).

    Args:
      x: ``[N, T, d_in]`` layer input (all tokens, prompt included).
      d: ``[N, T, d_out]`` output cotangent (zero on tokens that carry no loss).
      bias: add the bias term (the layer has a bias ``b``, ``grad_b = sum_t D_t``).
      chunk_size: columns of ``K`` per step; ``None`` picks them from ``block_elements``.
      block_elements: budget of one ``[N, chunk, T, s]`` intermediate (default 2^24
        elements); when one column exceeds it, the key positions are blocked too.

    Returns:
      ``[N, N]`` float32.
    """
    _check_xd(x, d, "dense_ghost_gram")
    n, t, _ = x.shape
    dtype = _low(x, d)
    x, d = x.astype(dtype), d.astype(dtype)
    budget = _GHOST_BLOCK_ELEMENTS if chunk_size is None else chunk_size * n * t * t
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}.")
    chunk, span = _ghost_chunks(n, t, budget)
    gram = _pair_columns(lambda a, b, c, e: _mm("itd,sd->its", a, b) * _mm("ite,se->its", c, e),
                         x, d, chunk, span)  # fmt: skip
    return gram + _bias_gram(d) if bias else gram


def _pair_columns(block: Callable, x: jax.Array, d: jax.Array, chunk: int, span: int) -> jax.Array:
    """``K[:, j] = sum over s-blocks of sum_{t,s} block(x, x_j[s], d, d_j[s])``,
    ``chunk`` columns and ``span`` key positions at a time (bounded intermediates)."""
    n, t = x.shape[:2]
    if span >= t:
        column = lambda x_j, d_j: jnp.sum(block(x, x_j, d, d_j), axis=(1, 2))
        return _columns(column, (x, d), n, chunk)
    num = -(-t // span)
    pad = ((0, 0), (0, num * span - t), (0, 0))
    xs = jnp.pad(x, pad).reshape(n, num, span, -1).swapaxes(0, 1)  # [S, N, span, d_in]
    ds = jnp.pad(d, pad).reshape(n, num, span, -1).swapaxes(0, 1)  # zero rows add nothing

    def column(x_j, d_j):  # [S, span, d_in], [S, span, d_out] -> K[:, j]
        def add(acc, blk):
            return acc + jnp.sum(block(x, blk[0], d, blk[1]), axis=(1, 2)), None

        return jax.lax.scan(add, jnp.zeros((n,), jnp.float32), (x_j, d_j))[0]

    return jax.lax.map(lambda ops: column(*ops), (xs.swapaxes(0, 1), ds.swapaxes(0, 1))).T


@functools.partial(jax.jit, static_argnames=("tile", "bias"))
def dense_tiled_gram(
    x: jax.Array, d: jax.Array, tile: int | None = None, *, bias: bool = False
) -> jax.Array:
    """Exact dense-layer Gram by materializing ``phi_i`` one column tile at a time.

    .. math::
        K = \\sum_{c} \\Phi^{(c)} \\Phi^{(c)\\top}, \\qquad
        \\phi^{(c)}_i = X_i^\\top D_{i,:,c} \\in \\mathbb{R}^{d_{in} \\times |c|}

    Over column tiles ``c`` of ``W``: the Gram is additive, so each tile's
    ``[N, d_in, tile]`` block is formed, contracted and dropped inside a ``lax.scan``.
    About ``2 N d_in d_out (T + N)`` FLOPs, memory ``N d_in tile`` (SPEC "tiled").

    Args:
      x: ``[N, T, d_in]`` layer input.
      d: ``[N, T, d_out]`` output cotangent.
      tile: columns per tile (``d_out`` is zero-padded to a multiple; zeros add nothing);
        ``None``: as many as keep ``[N, d_in, tile]`` within 256 MiB of float32 (the LM
        head then takes a few large tiles, not one pass per 128 vocabulary columns).
      bias: add the bias term.

    Returns:
      ``[N, N]`` float32.
    """
    _check_xd(x, d, "dense_tiled_gram")
    n, t, d_in = x.shape
    d_out = d.shape[-1]
    if tile is None:
        tile = max(128, _TILE_ELEMENTS // max(1, n * d_in))
    if not (isinstance(tile, int) and tile >= 1):
        raise ValueError(f"tile must be a positive int; got {tile!r}.")
    tile = min(tile, d_out)
    num_tiles = -(-d_out // tile)
    dtype = _low(x, d)
    x, d_low = x.astype(dtype), d.astype(dtype)
    d_tiles = jnp.pad(d_low, ((0, 0), (0, 0), (0, num_tiles * tile - d_out)))
    d_tiles = d_tiles.reshape(n, t, num_tiles, tile).transpose(2, 0, 1, 3)  # [C, N, T, tile]

    def add_tile(gram, d_tile):  # d_tile [N, T, tile]
        phi = _mm("itd,ite->ide", x, d_tile).astype(dtype)  # [N, d_in, tile]
        return gram + _mm("ide,jde->ij", phi, phi), None

    gram, _ = jax.lax.scan(add_tile, jnp.zeros((n, n), jnp.float32), d_tiles)
    return gram + _bias_gram(d) if bias else gram


def dense_costs(n: int, t: int, d_in: int, d_out: int) -> dict[str, int]:
    """FLOPs of a dense layer's Gram: ghost ``2 N^2 T^2 (d_in + d_out)``, tiled
    ``2 N d_in d_out (T + N)`` (PERF.md section 4). Python ints, so no overflow."""
    n, t, d_in, d_out = int(n), int(t), int(d_in), int(d_out)
    return {"ghost": 2 * n * n * t * t * (d_in + d_out), "tiled": 2 * n * d_in * d_out * (t + n)}


def choose_backend(n: int, t: int, d_in: int, d_out: int) -> Literal["ghost", "tiled"]:
    """SPEC's ``gram_backend="auto"`` rule for one dense layer, by FLOP count.

    .. math::
        \\text{ghost iff } N T^2 (d_{in} + d_{out}) < d_{in} d_{out} (T + N)

    (:func:`dense_costs`; PERF.md section 4).
    """
    cost = dense_costs(n, t, d_in, d_out)
    return "ghost" if cost["ghost"] < cost["tiled"] else "tiled"


def dense_gram(
    x: jax.Array,
    d: jax.Array,
    *,
    bias: bool = False,
    backend: Literal["auto", "ghost", "tiled"] = "auto",
    tile: int | None = None,
) -> jax.Array:
    """Exact dense-layer Gram by ``backend`` (``"auto"``: ``choose_backend``)."""
    _check_xd(x, d, "dense_gram")
    if backend == "auto":
        backend = choose_backend(x.shape[0], x.shape[1], x.shape[2], d.shape[2])
    if backend == "ghost":
        return dense_ghost_gram(x, d, bias)
    if backend == "tiled":
        return dense_tiled_gram(x, d, tile, bias=bias)
    raise ValueError(f"backend must be 'auto', 'ghost' or 'tiled'; got {backend!r}.")


@functools.partial(jax.jit, static_argnames=("vocab_size", "chunk_size", "block_elements"))
def embedding_ghost_gram(
    tokens: jax.Array,
    d: jax.Array,
    vocab_size: int,
    *,
    chunk_size: int | None = None,
    block_elements: int | None = None,
) -> jax.Array:
    """Exact per-sample Gram of an embedding table ``E [V, D]`` from tokens and cotangents.

    The lookup is ``y = onehot(tokens) E``, so ``X_i X_j^T`` is the token-match matrix:

    .. math::
        K_{ij} = \\sum_{t,s} [\\mathrm{tok}_{it} = \\mathrm{tok}_{js}]\\,
                 \\langle D_{it}, D_{js} \\rangle

    (fastDP ``supported_layers_grad_samplers.py``; PERF.md section 4). Tokens outside
    ``[0, vocab_size)`` contribute nothing, as with ``one_hot(tokens, vocab_size)``.
    About ``2 N^2 T^2 D`` FLOPs, chunked over columns like ``dense_ghost_gram``.

    Args:
      tokens: ``[N, T]`` int token ids.
      d: ``[N, T, D]`` cotangent of the embedding output.
      vocab_size: ``V``.
      chunk_size: columns of ``K`` per step (``None``: from ``block_elements``).
      block_elements: as in :func:`dense_ghost_gram`.

    Returns:
      ``[N, N]`` float32.
    """
    if tokens.ndim != 2 or d.ndim != 3 or tokens.shape != d.shape[:2]:
        raise ValueError(
            f"embedding_ghost_gram expects tokens [N, T] and d [N, T, D]; got tokens "
            f"{tokens.shape}, d {d.shape}. Pass the ids fed to the embedding."
        )
    n, t = tokens.shape
    valid = (tokens >= 0) & (tokens < vocab_size)  # [N, T]
    d = jnp.where(valid[..., None], d, 0).astype(_low(d))  # [N, T, D]
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}.")
    budget = _GHOST_BLOCK_ELEMENTS if block_elements is None else block_elements
    budget = budget if chunk_size is None else chunk_size * n * t * t
    chunk, span = _ghost_chunks(n, t, budget)

    def block(tok, tok_j, d_all, d_j):  # ids [N, T, 1], [s, 1]; d [N, T, D], [s, D]
        match = tok[:, :, None, 0] == tok_j[None, None, :, 0]  # [N, T, s]
        return jnp.where(match, _mm("ite,se->its", d_all, d_j), 0.0)

    return _pair_columns(block, tokens[..., None], d, chunk, span)


@jax.jit
def scale_gram(xhat: jax.Array, d: jax.Array) -> jax.Array:
    """Exact per-sample Gram of an elementwise scale (RMSNorm ``y = xhat * scale``).

    .. math::
        g_i = \\sum_t \\hat x_{it} \\odot D_{it} \\in \\mathbb{R}^{D}, \\qquad K = G G^\\top

    The per-sample gradient is only ``[N, D]``, so it is materialized (``N T D`` FLOPs).

    Args:
      xhat: ``[N, T, D]`` normalized input (what multiplies the scale).
      d: ``[N, T, D]`` output cotangent.
    """
    if xhat.ndim != 3 or xhat.shape != d.shape:
        raise ValueError(
            f"scale_gram expects xhat and d of the same shape [N, T, D]; got {xhat.shape} "
            f"and {d.shape}. Pass the normalized input, not the raw one."
        )
    g = jnp.einsum("itd,itd->id", xhat.astype(jnp.float32), d.astype(jnp.float32))  # [N, D]
    return jnp.dot(g, g.T, precision=_HI)


@functools.partial(jax.jit, static_argnames=("k_in", "k_out"))
def sketch_dense_features(
    x: jax.Array, d: jax.Array, key: jax.Array, k_in: int, k_out: int
) -> jax.Array:
    """Kronecker-sketched per-sample kernel gradients ``R_in^T X_i^T D_i R_out``.

    ``R_in [d_in, k_in]``, ``R_out [d_out, k_out]`` i.i.d. ``N(0, 1/k)`` from ``key``
    (the same for every sample and device, so sketches from different devices can be
    compared). Computed as ``(X_i R_in)^T (D_i R_out)``: ``N T (d_in k_in + d_out k_out
    + k_in k_out)`` FLOPs, never ``[d_in, d_out]``.

    Returns:
      ``[N, k_in, k_out]`` float32.
    """
    _check_xd(x, d, "sketch_dense_features")
    for name, k in (("k_in", k_in), ("k_out", k_out)):
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"{name} must be a positive int (sketch size); got {k!r}.")
    key_in, key_out = jax.random.split(key)
    r_in = jax.random.normal(key_in, (x.shape[-1], k_in), jnp.float32) / math.sqrt(k_in)
    r_out = jax.random.normal(key_out, (d.shape[-1], k_out), jnp.float32) / math.sqrt(k_out)
    xs = jnp.einsum("itd,dk->itk", x.astype(jnp.float32), r_in, precision=_HI)  # [N, T, k_in]
    ds = jnp.einsum("ite,el->itl", d.astype(jnp.float32), r_out, precision=_HI)  # [N, T, k_out]
    return jnp.einsum("itk,itl->ikl", xs, ds, precision=_HI)  # [N, k_in, k_out]


@functools.partial(jax.jit, static_argnames=("k_in", "k_out", "bias"))
def sketch_dense_gram(
    x: jax.Array,
    d: jax.Array,
    key: jax.Array,
    k_in: int,
    k_out: int,
    *,
    bias: bool = False,
) -> jax.Array:
    """Unbiased sketch of the dense-layer Gram (LoGra-style Kronecker projection).

    .. math::
        \\hat K_{ij} = \\langle R_{in}^\\top A R_{out}, R_{in}^\\top B R_{out} \\rangle_F,
        \\qquad A = X_i^\\top D_i,\\ B = X_j^\\top D_j

    Unbiased: ``E[R R^T] = I`` for each factor, so ``E[K_hat_ij] = <A, B>``. Error (our
    derivation, Gaussian factors, with ``E[G M G] = M + (M^T + tr(M) I)/k`` for
    ``G = R R^T``): writing ``C = A^T B`` and ``k1 = k_in``, ``k2 = k_out``,

    .. math::
        \\mathrm{Var}\\,\\hat K_{ij} = \\tfrac{1}{k_1}\\Big[(1 + \\tfrac{1}{k_2})\\|A B^\\top\\|_F^2
          + \\tfrac{\\|A\\|_F^2 \\|B\\|_F^2 + \\|C\\|_F^2 + \\mathrm{tr}(C)^2}{k_2}
          + \\mathrm{tr}(C^2)\\Big] + \\tfrac{1}{k_2}\\big[\\|C\\|_F^2 + \\mathrm{tr}(C^2)\\big]

    hence ``std(K_hat_ij - K_ij) <= ||phi_i|| ||phi_j|| sqrt(2/k_in + 2/k_out +
    4/(k_in k_out))``. The relative error is ``O(1/sqrt(min(k_in, k_out)))``, NOT
    ``O(1/sqrt(k_in k_out))``: each factor is its own JL projection and the coarser one
    dominates. The bias term (``bias=True``) is added exactly.

    References:
      LoGra: Choe et al., "What is Your Data Worth to GPT?", arXiv 2405.13954.

    Returns:
      ``[N, N]`` float32.
    """
    psi = sketch_dense_features(x, d, key, k_in, k_out)  # [N, k_in, k_out]
    flat = psi.reshape(psi.shape[0], -1)  # [N, k_in * k_out]
    gram = jnp.dot(flat, flat.T, precision=_HI)
    return gram + _bias_gram(d) if bias else gram


def sketch_variance(a: jax.Array, b: jax.Array, k_in: int, k_out: int) -> jax.Array:
    """Exact variance of one ``sketch_dense_gram`` entry for ``phi_i = a``, ``phi_j = b``.

    ``a, b``: ``[d_in, d_out]``. The formula of ``sketch_dense_gram`` (for tests and for
    choosing ``k``).
    """
    c = a.T @ b  # [d_out, d_out]
    ab = a @ b.T  # [d_in, d_in]
    c_fro2 = jnp.sum(c * c)
    tr_c2 = jnp.trace(c @ c)
    term_in = (
        (1 + 1 / k_out) * jnp.sum(ab * ab)
        + (jnp.sum(a * a) * jnp.sum(b * b) + c_fro2 + jnp.trace(c) ** 2) / k_out
        + tr_c2
    )
    return term_in / k_in + (c_fro2 + tr_c2) / k_out
