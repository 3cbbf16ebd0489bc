"""Book-keeping (Bu et al., arXiv:2210.00038): the Gram AND the reweighted update from
one backward pass, from each op's kept input ``X`` and output cotangent ``D``.

The taps of :func:`jaxrl_geom.salt.ghost.attach_gram_taps` with ``keep=True`` sow every
op's input as :class:`~jaxrl_geom.salt.ghost.KeptX` and add a zero
:class:`~jaxrl_geom.salt.ghost.KeptD` probe to its output, whose gradient is ``D``.
Rows are independent, so the backward of ``sum_i l_i`` gives row ``i``'s own
``D_i``; then per op (``c = a'`` per row, ``D^kl`` the KL term's cotangent):

.. math::
    K \\mathrel{+}= \\mathrm{block}(X, D), \\qquad
    \\nabla W = X^\\top (c \\odot D + D^{kl})

(``Linear``: ``X^T D``, bias ``sum_t D``; ``RMSNorm``: ``sum_t xhat * D``; ``Embedding``:
scatter-add of ``D`` at the token ids, plus ``h^T D^logits`` for a tied head).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_geom.param_paths import path_to_str
from jaxrl_geom.rl.step import merge_micro_batches
from jaxrl_geom.salt import head as salt_head
from jaxrl_geom.salt.blocks import _dense_block, _last, _lookup_gram, _tied_block
from jaxrl_geom.salt.ghost import DenseTap, EmbeddingTap, KeptD, ScaleTap, _Tap
from jaxrl_geom.salt.gram import _mm, scale_gram

Kept = dict[str, dict[str, jax.Array]]  # module path -> slot ("main" | "head") -> array


class HeadOptions(NamedTuple):
    """How the LM head ran (:mod:`jaxrl_geom.salt.head`): its kept statistics need these."""

    temperature: float = 1.0
    chunk_tokens: int = 1024


_HEAD = HeadOptions()


def tapped_modules(model: nnx.Module) -> dict[str, tuple[nnx.Module, _Tap]]:
    """``{module path: (module, its tap)}`` of every tapped op of ``model``."""
    out = {}
    for path, module in nnx.iter_modules(model):
        tap = getattr(module, "gram_tap", None)
        if isinstance(tap, _Tap):
            out[".".join(str(p) for p in path)] = (module, tap)
    return out


def kept_by_module(state: Any, suffix: str = "") -> Kept:
    """Flatten a ``KeptX`` / ``KeptD`` state into ``{module path: {slot: array}}``.

    Raises:
      ValueError: a tap sowed twice (the op ran twice in one forward pass).
    """
    out: Kept = {}
    for path, value in nnx.to_flat_state(state):
        value = value.get_value() if isinstance(value, nnx.Variable) else value
        if isinstance(value, tuple):
            if len(value) != 1:
                raise ValueError(
                    f"{'.'.join(map(str, path))} was called {len(value)} times in one forward "
                    "pass; book-keeping (and the Gram) needs each op applied once."
                )
            value = value[0]
        module = ".".join(str(p) for p in path[:-2])  # drop "gram_tap", slot
        out.setdefault(module, {})[str(path[-1]).removesuffix(suffix)] = value
    return out


def set_kept_d_probes(model: nnx.Module, outputs: Kept) -> None:
    """Give every keep-tap a zero ``KeptD`` probe shaped like its output(s) ``y``."""
    for name, (_, tap) in tapped_modules(model).items():
        for slot in ("main", "head"):
            y = outputs.get(name, {}).get(f"{slot}_out")
            if y is not None:
                setattr(tap, f"d_{slot}", KeptD(jnp.zeros(y.shape, y.dtype)))


def kept_bytes(outputs: Kept, num_d: int) -> int:
    """Bytes of the kept ``X`` plus ``num_d`` copies of every ``D`` (shape-static)."""
    total = 0
    for slots in outputs.values():
        for key, a in slots.items():
            size = a.size * jnp.dtype(a.dtype).itemsize
            total += size * (num_d if key.endswith("_out") else 1)
    return total


def gram_from_kept(
    model: nnx.Module, xs: Kept, ds: Kept, *, head: HeadOptions = _HEAD
) -> jax.Array:
    """``K`` over the in-scope ops, from kept inputs ``xs`` and cotangents ``ds`` (the
    chunked LM head's from its kept statistics, :func:`jaxrl_geom.salt.head.kept_head_gram`).

    A stacked op (scanned layers: ``[L, N, ...]`` tensors) adds its layers' blocks, one
    layer at a time (``lax.map``), each times its ``LayerScope`` factor if any.
    """
    gram = None
    for name, (module, tap) in tapped_modules(model).items():
        spec, x, d = tap.spec, xs[name], ds[name]
        if not (spec.weight or spec.bias):
            continue
        if salt_head.is_kept_head(x):
            block = salt_head.kept_head_gram(module, tap, x, d, *head)
        elif tap.num_layers:
            blocks = jax.lax.map(lambda a, tap=tap: _block(tap, *a), (x, d, tap.projections()))
            if tap.layer_scope is not None:
                blocks = blocks * tap.layer_scope[...][:, None, None]
            block = jnp.sum(blocks, axis=0)  # [L, N, N] -> [N, N]
        else:
            block = _block(tap, x, d, tap.projections())
        gram = block if gram is None else gram + block
    if gram is None:
        raise ValueError("No tapped op is in the SALT scope; widen SaltConfig.scope.")
    return gram


def _block(tap: _Tap, x: dict, d: dict, proj: tuple) -> jax.Array:
    """One op's (one layer's) Gram block from its kept ``X`` and ``D``."""
    spec = tap.spec
    if isinstance(tap, DenseTap):
        return _dense_block(x["main"], d["d_main"], spec, proj, weight=spec.weight)
    if isinstance(tap, ScaleTap):
        return scale_gram(_flat3(x["main"]), _flat3(d["d_main"]))
    if spec.tied:
        return _tied_block(spec, proj, x["main"], d["d_main"], x["head"], d["d_head"])
    return _lookup_gram(x["main"], d["d_main"], spec)


def grads_from_kept(
    model: nnx.Module, params: nnx.State, xs: Kept, ds: Kept, *, head: HeadOptions = _HEAD
) -> nnx.State:
    """Parameter gradients ``X^T D`` per op (``ds`` already weighted), shaped like ``params``
    (the chunked LM head's by its own vjp, :func:`jaxrl_geom.salt.head.kept_head_grads`).

    Raises:
      ValueError: a parameter is not held by a tapped ``Linear`` / ``Embedding`` /
        ``RMSNorm`` (book-keeping cannot form its gradient; use the recompute path).
    """
    grads: dict[str, jax.Array] = {}
    for name, (module, tap) in tapped_modules(model).items():
        x, d = xs[name], ds[name]
        kept_head = salt_head.is_kept_head(x)
        if kept_head:
            w_head, b_head = salt_head.kept_head_grads(module, x, d, *head)
        if isinstance(tap, DenseTap) and kept_head:
            grads[f"{name}.kernel"] = w_head
            if module.bias is not None:
                grads[f"{name}.bias"] = b_head
        elif isinstance(tap, (DenseTap, ScaleTap)):
            has_bias = getattr(module, "bias", None) is not None
            layer = functools.partial(_layer_grads, tap, has_bias)
            # stacked op (scanned layers): [L, N, ...] -> gradients [L, ...], batched matmuls
            out = jax.vmap(layer)(x, d) if tap.num_layers else layer(x, d)
            grads.update({f"{name}.{attr}": g for attr, g in out.items()})
        elif isinstance(tap, EmbeddingTap):
            table = module.embedding
            dd = _flat2(d["d_main"]).astype(jnp.float32)
            g = jax.ops.segment_sum(dd, x["main"].reshape(-1), num_segments=table.shape[0])
            if tap.spec.tied and kept_head:
                g = g + w_head
            elif tap.spec.tied:
                h, dl = _last(tap.spec, x["head"], d["d_head"])
                g = g + _mm("td,tv->vd", _flat2(h), _flat2(dl))
            grads[f"{name}.embedding"] = g

    def leaf(path, p):
        key = path_to_str(path)
        if key not in grads:
            raise ValueError(
                f"Book-keeping found no tap for parameter {key!r}; only Linear, Embedding "
                "and RMSNorm parameters have one. Use SaltConfig(keep_budget_gib=0)."
            )
        return grads[key].astype(p.dtype)

    return jax.tree_util.tree_map_with_path(leaf, params)


def _layer_grads(tap: _Tap, has_bias: bool, x: dict, d: dict) -> dict[str, jax.Array]:
    """``{attr: gradient}`` of one Linear / RMSNorm (one layer of a stacked one)."""
    if isinstance(tap, ScaleTap):
        prod = x["main"].astype(jnp.float32) * d["d_main"].astype(jnp.float32)
        return {"scale": jnp.sum(_flat2(prod), axis=0)}
    xx, dd = _last(tap.spec, x["main"], d["d_main"])
    out = {"kernel": _mm("ti,to->io", _flat2(xx), _flat2(dd))}
    if has_bias:
        out["bias"] = jnp.sum(_flat2(dd).astype(jnp.float32), axis=0)
    return out


def merge_kept(model: nnx.Module, kept: Kept) -> Kept:
    """Micro-batches ``[m, N/m, ...]`` -> ``[N, ...]`` (``[m, L, N/m, ...]`` ->
    ``[L, N, ...]`` for a stacked op), rows in the order of ``split_micro_batches``."""
    taps = tapped_modules(model)
    out: Kept = {}
    for name, slots in kept.items():
        stacked = taps[name][1].num_layers
        merge = jax.vmap(merge_micro_batches, 1) if stacked else merge_micro_batches
        out[name] = {slot: merge(a) for slot, a in slots.items()}
    return out


def weigh_kept(model: nnx.Module, a: jax.Array, d_pol: Kept, d_kl: Kept | None) -> Kept:
    """``a_i * D_i (+ D^kl_i)`` per kept cotangent in float32 (rows on axis 1 of a
    stacked op's ``[L, N, ...]``)."""
    taps = tapped_modules(model)
    out: Kept = {}
    for name, slots in d_pol.items():
        lead = 1 if taps[name][1].num_layers else 0
        out[name] = {}
        for slot, d in slots.items():
            c = a.astype(jnp.float32).reshape(*[1] * lead, -1, *[1] * (d.ndim - 1 - lead))
            w = c * d.astype(jnp.float32)
            out[name][slot] = w if d_kl is None else w + d_kl[name][slot].astype(jnp.float32)
    return out


def all_params_tapped(model: nnx.Module, params: nnx.State) -> bool:
    """Whether every parameter is held by an op book-keeping can differentiate."""
    names = {
        f"{name}.{attr}"
        for name, (module, _) in tapped_modules(model).items()
        for attr in ("kernel", "bias", "embedding", "scale")
        if getattr(module, attr, None) is not None
    }
    return all(path_to_str(p) in names for p, _ in jax.tree_util.tree_leaves_with_path(params))


def _flat2(a: jax.Array) -> jax.Array:
    return a.reshape(-1, a.shape[-1])


def _flat3(a: jax.Array) -> jax.Array:
    return a.reshape(a.shape[0], -1, a.shape[-1])
