"""Start-up of a multi-process run: one process per host, one global device mesh.

JAX's multi-controller runtime runs the same program in every process; each process
sees only its local devices, and :func:`jax.distributed.initialize` connects them so
that ``jax.devices()`` lists every device of every process. :func:`initialize` wraps
it with three ways to say how many processes there are, tried in this order:

1. explicit arguments (the CLI's ``--coordinator host:port --num-processes N
   --process-id i``);
2. the environment variables ``JAXRL_COORDINATOR``, ``JAXRL_NUM_PROCESSES``,
   ``JAXRL_PROCESS_ID`` (or JAX's own ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
   ``JAX_PROCESS_ID``);
3. a cluster JAX detects by itself: a Cloud TPU pod slice (``TPU_WORKER_HOSTNAMES``,
   ``MEGASCALE_COORDINATOR_ADDRESS``), SLURM (``srun``) or Open MPI (``mpirun``) with more
   than one task; or ``auto=True`` to ask JAX to detect one (e.g. a TPU VM whose
   workers are only known from the metadata server).

With one process it does nothing, so single-host code calls it unconditionally.
Must run before anything touches a device (before the first ``jax.devices()``).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax

__all__ = [
    "DistributedConfig",
    "add_arguments",
    "barrier",
    "initialize",
    "initialize_from_args",
    "is_main_process",
    "raise_if_any",
    "resolve",
]

# CPU has no default cross-process collectives; gloo ships with jaxlib.
_CPU_COLLECTIVES = "gloo"


class DistributedConfig(NamedTuple):
    """How this process joins the run (``auto``: let JAX read the cluster's environment)."""

    coordinator: str | None
    num_processes: int
    process_id: int | None
    auto: bool


def _int_env(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                msg = f"Environment variable {name}={value!r} must be an integer."
                raise ValueError(msg) from None
    return None


def _detected_cluster_size() -> int | None:
    """Number of processes of a cluster JAX can auto-detect, from public env markers."""
    for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
        if "SLURM_JOB_ID" in os.environ and (n := _int_env(name)) is not None:
            return n
    if (n := _int_env("OMPI_COMM_WORLD_SIZE")) is not None:
        return n
    hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES")
    if hosts:
        return len([h for h in hosts.split(",") if h.strip()])
    if os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return 2  # multislice: always several processes
    return None


def resolve(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> DistributedConfig:
    """Combine arguments, environment variables and cluster detection; validate them.

    Raises:
      ValueError: ``num_processes > 1`` without a coordinator (and no cluster to detect
        one from), a malformed ``host:port``, or ``process_id`` outside
        ``[0, num_processes)``.
    """
    coordinator = (
        coordinator
        or os.environ.get("JAXRL_COORDINATOR")
        or os.environ.get("JAX_COORDINATOR_ADDRESS")
        or None
    )
    if num_processes is None:
        num_processes = _int_env("JAXRL_NUM_PROCESSES", "JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _int_env("JAXRL_PROCESS_ID", "JAX_PROCESS_ID")
    detected = _detected_cluster_size()
    explicit = num_processes is not None or coordinator is not None
    if not explicit and (auto or (detected or 1) > 1):
        # Let JAX read everything from the cluster (TPU pod, SLURM, Open MPI).
        return DistributedConfig(None, detected or 0, None, True)
    if num_processes is None:
        num_processes = 1
    if num_processes < 1:
        raise ValueError(f"--num-processes={num_processes} must be >= 1.")
    if num_processes == 1:
        if process_id not in (None, 0):
            raise ValueError(f"--process-id={process_id} with a single process; it must be 0.")
        return DistributedConfig(coordinator, 1, 0, False)
    if coordinator is None:
        raise ValueError(
            f"--num-processes={num_processes} needs a coordinator: pass --coordinator host:port "
            "(the address of process 0, reachable from every process; the same on all of "
            "them) or set JAXRL_COORDINATOR. On a TPU pod, SLURM or Open MPI, leave all three "
            "options out and JAX reads them from the cluster."
        )
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(
            f"--coordinator={coordinator!r} must be host:port, e.g. 10.0.0.1:1234 "
            "(process 0's address and a free port)."
        )
    if process_id is None:
        raise ValueError(
            f"--num-processes={num_processes} needs --process-id (0 .. {num_processes - 1}, "
            "a different one for every process) or JAXRL_PROCESS_ID."
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"--process-id={process_id} is outside [0, {num_processes}); number the "
            f"processes 0 .. {num_processes - 1}."
        )
    return DistributedConfig(coordinator, num_processes, process_id, False)


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    initialization_timeout: int = 300,
) -> DistributedConfig:
    """Join the multi-process run (see the module docstring); a no-op for one process.

    Args:
      coordinator: ``host:port`` of process 0, the same in every process.
      num_processes: how many processes run this program.
      process_id: this process's rank, ``0 .. num_processes - 1``.
      auto: ask JAX to detect the cluster even without the usual environment markers.
      initialization_timeout: seconds to wait for every process to connect.

    Returns:
      the resolved :class:`DistributedConfig`.

    Raises:
      ValueError: inconsistent options (see :func:`resolve`).
    """
    cfg = resolve(coordinator, num_processes, process_id, auto=auto)
    if not cfg.auto and cfg.num_processes == 1:
        return cfg
    if jax.distributed.is_initialized():
        return cfg
    # Processes on CPU need explicit cross-process collectives (harmless elsewhere).
    jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES)
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator,
        num_processes=None if cfg.auto else cfg.num_processes,
        process_id=cfg.process_id,
        initialization_timeout=initialization_timeout,
    )
    return cfg


def is_main_process() -> bool:
    """True in process 0, the one that prints and writes files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (a no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def raise_if_any(error: BaseException | None) -> None:
    """Collective check: raise in every process if any process failed its check.

    A process raises its own ``error``; the others raise a ``ValueError`` naming the
    first process that failed, so no process waits forever in a later collective.
    """
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    import numpy as np
    from jax.experimental import multihost_utils

    failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
    if error is not None:
        raise error
    if failed.any():
        raise ValueError(
            f"process {int(np.argmax(failed.reshape(-1)))} failed a check before the run "
            "started; see its message."
        )


def add_arguments(parser: Any) -> None:
    """Add ``--coordinator``, ``--num-processes``, ``--process-id`` to an argparse parser."""
    g = parser.add_argument_group("multi-process (one process per host; see docs/SCALE.md)")
    g.add_argument("--coordinator", help="host:port of process 0 (the same on every process)")
    g.add_argument("--num-processes", type=int, help="number of processes (default 1)")
    g.add_argument("--process-id", type=int, help="this process's rank, 0 .. N-1")


def initialize_from_args(args: Any) -> DistributedConfig:
    """:func:`initialize` with the options :func:`add_arguments` added."""
    return initialize(
        getattr(args, "coordinator", None),
        getattr(args, "num_processes", None),
        getattr(args, "process_id", None),
    )
