"""Gram taps on scanned layers: per-layer names and scope of stacked parameters.

With ``ModelConfig.scan_layers`` the decoder holds ONE layer module whose parameters
carry a leading ``[L]`` axis (``layers.mlp.up_proj.kernel [L, D, F]``); the taps of
:mod:`jaxrl_geom.salt.ghost` on it hold ``[L, ...]`` Variables, scanned like the
parameters. Everything a user names stays per layer, as in the unrolled model: the
scope is judged on ``layers.<i>.mlp.up_proj.kernel`` (and its slice), covered parameters
and Gram blocks are reported under those names, and a scope that takes only some layers
of a stack sets a 0/1 :class:`LayerScope` ``[L]`` that scales each layer's block.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from jaxrl_geom.salt.gram import Scope, in_scope


class LayerScope(nnx.Variable):
    """``[L]`` 0/1 of a stacked tap whose layers the scope selects only in part: the
    factor of each layer's Gram block."""


def layer_path(path: tuple, layer: int) -> tuple:
    """The unrolled module path of layer ``layer`` of a stacked module: the index after
    the top-level attribute (``layers.mlp.up_proj`` -> ``layers.<i>.mlp.up_proj``), the
    layout of ``Decoder`` (:func:`jaxrl_geom.models.taps.has_stacked_layers`)."""
    return (path[0], layer, *path[1:])


def _join(path: tuple, name: str) -> str:
    return ".".join([*(str(p) for p in path), name])


def selected(scope: Scope, path: tuple, name: str, value: Any, stacked: int) -> list[bool]:
    """Scope decision per layer of a stacked ``[L, ...]`` parameter (judged under its
    unrolled name ``layers.<i>.<...>``, its slice the value), or the one decision of a
    plain parameter."""
    if not stacked:
        return [in_scope(scope, _join(path, name), value)]
    return [
        in_scope(scope, _join(layer_path(path, i), name), value[i] if callable(scope) else value)
        for i in range(value.shape[0])
    ]


def selected_names(path: tuple, name: str, chosen: list[bool], stacked: int) -> list[str]:
    """The selected parameter names (unrolled names for a stacked parameter)."""
    if not stacked:
        return [_join(path, name)] * chosen[0]
    return [_join(layer_path(path, i), name) for i, s in enumerate(chosen) if s]


def layer_paths(path: tuple, chosen: list[bool], stacked: int) -> list[tuple[int | None, tuple]]:
    """``(layer, unrolled module path)`` of the selected layers of a stacked module;
    ``[(None, path)]`` for a plain one."""
    if not stacked:
        return [(None, path)]
    return [(i, layer_path(path, i)) for i, s in enumerate(chosen) if s]


def layer_scope(
    module: str, weight: list[bool], bias: list[bool], stacked: int
) -> LayerScope | None:
    """The :class:`LayerScope` of a stacked tap whose layers the scope selects in part;
    ``None`` when it takes all or none of them (or the module is not stacked).

    Raises:
      ValueError: the scope selects a stacked kernel and its bias differently across
        layers (one factor per layer cannot express that).
    """
    if not stacked:
        return None
    w, b = any(weight), any(bias)
    per_layer = [wl or bl for wl, bl in zip(weight, bias, strict=True)]
    if any(s and (wl, bl) != (w, b) for s, wl, bl in zip(per_layer, weight, bias, strict=True)):
        raise ValueError(
            f"scope selects the parameters of the stacked {module!r} differently per layer "
            "(the kernel in some layers, the bias in others): with scanned layers select a "
            "Linear's kernel and bias together in each layer, or build the model with "
            "ModelConfig(scan_layers=False)."
        )
    if all(per_layer) or not any(per_layer):
        return None
    return LayerScope(jnp.asarray(per_layer, jnp.float32))
