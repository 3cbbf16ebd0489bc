"""Float32 tolerances from magnitudes and op counts, and bit-identity checks.

A float32 result computed through ``ops`` dependent roundings (terms of a sum, layers
of a network, matmuls in a chain) from intermediates of magnitude at most ``scale``
carries an absolute error of at most about ``ops * u * scale`` (``u = eps32 / 2`` the
unit roundoff; ``sqrt(ops)`` is typical). Two float32 implementations of the same math
(another summation order, a KV cache against a full forward, a sharded GEMM) differ by
up to twice that. The comparisons here therefore use

.. math::
    |a - d| \\le k\\, \\epsilon_{32}\\, \\big(|d| + \\mathrm{ops} \\cdot \\mathrm{scale}\\big),
    \\qquad \\epsilon_{32} = 2^{-23} \\approx 1.19 \\times 10^{-7}

with ``k = ulps`` a small safety factor (default 4). ``scale = 0`` gives a purely
relative check (results computed in one rounding from exact inputs). Choose ``scale``
as the largest magnitude that cancels on the way (e.g. ``max |logits|`` for a
log-softmax, ``sum |x_i|`` for a sum of mixed signs), never as a number tuned until one
CPU passes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23: one ulp at 1.0


def depth_ops(num_layers: int) -> int:
    """Roundings along a decoder's depth: ~4 reductions per layer (q/k/v, attention,
    output, MLP) plus the LM head. Two kernel paths through the same model (HF torch vs
    ours, sharded vs single device, KV cache vs full forward) differ in the logits by
    about ``depth_ops * eps32 * max|logit|``."""
    return 4 * num_layers + 1


def f32_atol(scale: float, ops: int = 1, ulps: float = 4.0) -> float:
    """Absolute part ``ulps * eps32 * ops * scale`` of the float32 tolerance."""
    return float(ulps * EPS32 * ops * float(scale))


def f32_rtol(ulps: float = 4.0) -> float:
    """Relative part ``ulps * eps32`` of the float32 tolerance."""
    return float(ulps * EPS32)


def assert_f32_close(
    actual: Any,
    desired: Any,
    *,
    scale: float = 0.0,
    ops: int = 1,
    ulps: float = 4.0,
    err_msg: str = "",
) -> None:
    """``|actual - desired| <= ulps * eps32 * (|desired| + ops * scale)`` elementwise."""
    np.testing.assert_allclose(
        np.asarray(actual, np.float64),
        np.asarray(desired, np.float64),
        rtol=f32_rtol(ulps),
        atol=f32_atol(scale, ops, ulps),
        err_msg=err_msg,
    )


def bits(x: Any) -> np.ndarray:
    """The raw bits of a float array (``-0.0 != 0.0``, NaN payloads distinct)."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        return x
    return x.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def assert_bits_equal(actual: Any, desired: Any, err_msg: str = "") -> None:
    """Bit identity of two arrays (same dtype and shape, same bits), not value equality."""
    a, d = np.asarray(actual), np.asarray(desired)
    assert a.dtype == d.dtype, f"dtype {a.dtype} != {d.dtype}. {err_msg}"
    np.testing.assert_array_equal(bits(a), bits(d), err_msg=err_msg)


def assert_trees_bits_equal(actual: Any, desired: Any, what: str = "") -> None:
    """:func:`assert_bits_equal` on every leaf of two pytrees of the same structure."""
    import jax

    a_leaves, a_def = jax.tree.flatten(actual)
    d_leaves, d_def = jax.tree.flatten(desired)
    assert a_def == d_def, f"{what}: tree structures differ: {a_def} vs {d_def}"
    for i, (a, d) in enumerate(zip(a_leaves, d_leaves, strict=True)):
        assert_bits_equal(a, d, err_msg=f"{what} leaf {i}")
