"""Device mesh, logical-axis rules and the shardings of parameters and batches.

The mesh always has the axes ``("data", "fsdp", "tensor")``. Parameters name their
axes *logically* (``out_sharding`` metadata set in :mod:`jaxrl_geom.models.layers`);
:data:`LOGICAL_AXIS_RULES` below is the one place that maps them to mesh axes:

==========  ==========  =====================================================
logical     mesh axis   used by
==========  ==========  =====================================================
embed       fsdp        the hidden dimension D of every kernel and embedding
heads       tensor      q_proj columns / o_proj rows (H * hd)
kv          tensor      k_proj, v_proj columns (K * hd)
mlp         tensor      gate/up columns, down rows (F)
vocab       tensor      embedding rows, lm_head columns (V)
==========  ==========  =====================================================

A dimension not divisible by its mesh axis size is an error naming the parameter
(replicating it silently would cost memory and time nobody asked for): choose mesh
sizes that divide the model's dimensions. Norm scales are replicated. Batches shard
their leading dimension over ``("data", "fsdp")``: FSDP devices hold different
examples and gather parameters, as in ZeRO-3.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
LOGICAL_AXIS_RULES: dict[str, str | None] = {
    "embed": "fsdp",
    "heads": "tensor",
    "kv": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
}


def make_mesh(
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh; one size may be ``-1`` (the rest of the devices).

    The default puts every device on ``fsdp`` (data parallel over the batch with
    sharded parameters), the best layout for models that do not fit one device and
    no worse than pure data parallelism for those that do. With explicit sizes whose
    product is below the device count, the first devices are used.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(
            f"make_mesh(data={data}, fsdp={fsdp}, tensor={tensor}): sizes must be positive, "
            "with at most one -1 (= the remaining devices)."
        )
    fixed = math.prod(s for s in sizes if s > 0)
    if -1 in sizes:
        if len(devices) % fixed:
            raise ValueError(
                f"{len(devices)} devices are not divisible by the fixed mesh sizes (product "
                f"{fixed}); choose sizes that divide the device count."
            )
        sizes[sizes.index(-1)] = len(devices) // fixed
    total = math.prod(sizes)
    nproc = len({d.process_index for d in devices})
    where = f" over {nproc} processes" if nproc > 1 else ""
    if total > len(devices):
        raise ValueError(
            f"Mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {total} devices, only "
            f"{len(devices)} are available{where}; lower a size or use -1."
        )
    if nproc > 1 and total != len(devices):
        raise ValueError(
            f"Mesh {dict(zip(MESH_AXES, sizes, strict=True))} uses {total} of the {len(devices)} "
            f"devices{where}; a multi-process mesh must span every device (use -1 for one size)."
        )
    return jax.make_mesh(
        tuple(sizes),
        MESH_AXES,
        axis_types=(AxisType.Auto,) * len(MESH_AXES),
        devices=devices[:total],
    )


def logical_to_spec(
    logical_axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh
) -> PartitionSpec:
    """Map logical axis names to a ``PartitionSpec`` by :data:`LOGICAL_AXIS_RULES`.

    Raises ``ValueError`` when a dimension is not divisible by its mesh axis size.
    """
    if not logical_axes:
        return PartitionSpec()
    if len(logical_axes) != len(shape):
        raise ValueError(f"Logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}.")
    spec = []
    for name, dim in zip(logical_axes, shape, strict=True):
        axis = LOGICAL_AXIS_RULES.get(name) if name is not None else None
        if axis is not None and mesh.shape[axis] == 1:
            axis = None
        if axis is not None and dim % mesh.shape[axis]:
            raise ValueError(
                f"dimension {name}={dim} of shape {tuple(shape)} is not divisible by mesh axis "
                f"{axis}={mesh.shape[axis]}; choose a mesh.{axis} size that divides {dim}."
            )
        spec.append(axis)
    return PartitionSpec(*spec)


def param_shardings(model_or_state: nnx.Module | nnx.State, mesh: Mesh) -> nnx.State:
    """``NamedSharding`` of every variable, as a State shaped like ``nnx.state(model)``.

    Works on concrete or abstract (``nnx.eval_shape``) models and states. Variables
    without logical axes (e.g. sown intermediates) are replicated.
    """
    state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state

    def sharding_of(path: Any, x: Any) -> Any:
        if isinstance(x, nnx.Variable):
            axes = x.get_metadata().get("out_sharding")
            try:
                spec = logical_to_spec(axes, x.shape, mesh)
            except ValueError as err:
                raise ValueError(f"parameter {jax.tree_util.keystr(path)}: {err}") from None
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(
        sharding_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def shard_params(state: nnx.State, mesh: Mesh) -> nnx.State:
    """Place every array of ``state`` on ``mesh`` by its logical axes."""
    return put_global(state, param_shardings(state, mesh))


def put_global(tree: Any, shardings: Any) -> Any:
    """``jax.device_put(tree, shardings)`` that also works when a sharding spans several
    processes: there every process must hold the same full value of each leaf (e.g. a
    model initialised from the same seed, a PRNG key) and keeps its own shards of it."""

    def put(x: Any, s: jax.sharding.Sharding) -> Any:
        if s.is_fully_addressable:
            return jax.device_put(x, s)
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            data = put(jax.random.key_data(x), NamedSharding(s.mesh, PartitionSpec()))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return jax.tree.map(put, tree, shardings)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place ``model``'s variables on ``mesh`` in place; returns the model."""
    nnx.update(model, shard_params(nnx.state(model), mesh))
    return model


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over ``("data", "fsdp")``, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place every array of a batch pytree with :func:`batch_sharding` (scalars replicated).

    The leading dimension of every array holds *this process's* rows (all rows with
    one process): the global array is assembled with
    :func:`jax.make_array_from_process_local_data`, every process passing its own
    block of rows (:func:`process_rows`), and scalars must be equal in every process.

    Raises ``ValueError`` when a leading dimension does not divide over the batch
    axes: pad the batch to a multiple of ``data * fsdp``.
    """
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    rows, replicated = batch_sharding(mesh), NamedSharding(mesh, PartitionSpec())
    nproc = process_batch_factor(mesh)
    local = mesh.devices.size == len(mesh.local_devices)

    def place(x: Any) -> Any:
        if np.ndim(x) == 0:
            return put_global(x, replicated)
        if (np.shape(x)[0] * nproc) % shards:
            raise ValueError(
                f"Batch dimension {np.shape(x)[0] * nproc} is not divisible by data*fsdp = "
                f"{shards}; pad the batch (or choose a batch size that is a multiple of it)."
            )
        if local:
            return jax.device_put(x, rows)
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(rows, x, (x.shape[0] * nproc, *x.shape[1:]))

    return jax.tree.map(place, batch)


def process_batch_factor(mesh: Mesh) -> int:
    """Global rows / this process's rows: batch shards over those this process holds."""
    me = jax.process_index()
    ids = np.vectorize(lambda d: d.process_index)(mesh.devices)  # [data, fsdp, tensor]
    row_blocks = ids.reshape(-1, mesh.shape["tensor"])  # one row per batch shard
    return len(row_blocks) // int(np.sum(np.any(row_blocks == me, axis=1)))


def process_rows(num_rows: int, mesh: Mesh | None) -> slice:
    """The contiguous block of the global batch rows ``[0, num_rows)`` that this process
    holds under :func:`batch_sharding` (all rows with one process or no mesh).

    Raises:
      ValueError: ``num_rows`` does not divide over the batch axes, or the mesh gives
        this process rows that are not one contiguous block (build it with
        :func:`make_mesh`, which keeps each process's devices together).
    """
    if mesh is None or mesh.devices.size == len(mesh.local_devices):
        return slice(0, num_rows)
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if num_rows % shards:
        raise ValueError(
            f"{num_rows} rows do not divide over data*fsdp = {shards}; choose a batch size "
            "that is a multiple of it."
        )
    index_map = batch_sharding(mesh).addressable_devices_indices_map((num_rows,))
    starts = sorted({idx[0].indices(num_rows)[0] for idx in index_map.values()})
    step = num_rows // shards
    lo, hi = starts[0], starts[-1] + step
    if len(starts) * step != hi - lo:
        raise ValueError(
            f"Process {jax.process_index()} holds rows {starts} (blocks of {step}) of the "
            "batch, not one contiguous block; build the mesh with sharding.make_mesh."
        )
    return slice(lo, hi)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded array as NumPy (all rows with one process).

    Reads addressable shards only, so it works where ``jax.device_get`` of an array
    spanning several processes fails; the rows are those of :func:`process_rows`.
    """
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    shards = x.addressable_shards
    lo = min(s.index[0].indices(x.shape[0])[0] for s in shards)
    hi = max(s.index[0].indices(x.shape[0])[1] for s in shards)
    out = np.empty((hi - lo, *x.shape[1:]), x.dtype)
    for shard in shards:
        start, stop, _ = shard.index[0].indices(x.shape[0])
        out[(slice(start - lo, stop - lo), *shard.index[1:])] = np.asarray(shard.data)
    return out
