"""Several processes (one per host) training one model: `initialize()` joins them, when the environment says so.

Run one process per host, each with the same script and arguments. Every
process computes the same global batch order from the seed and reads only
its own rows of each batch (`jaxdl.runtime.sharding.local_rows`); `fit` assembles
the global batch across hosts and `jax.jit` runs the step over all devices.
"""
from __future__ import annotations

import os

import jax

# The variables `initialize` reads: JAX's own name for the coordinator, and the process count and id beside it.
COORDINATOR, PROCESS_COUNT, PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
# How many processes a launcher started together, for launchers whose variables
# `jax.distributed.initialize()` reads by itself (jax/_src/clusters). For SLURM it is the
# *step's* task count, which only `srun` sets: SLURM_NTASKS describes the whole allocation
# and is also set in an salloc shell or sbatch script, where a process started without srun
# is a single task that would wait forever for the others.
_CLUSTER_SIZES = ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def _environment_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {value!r}") from None


def initialize(**options) -> bool:
    """Joins this process to a multi-process run when the environment describes one; True if it did.

    - `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES`
      and `JAX_PROCESS_ID`: `jax.distributed.initialize` with those;
    - a launch of more than one task by `srun` (SLURM_STEP_NUM_TASKS > 1) or
      by MPI (OMPI_COMM_WORLD_SIZE, PMI_SIZE): JAX's own detection. A
      process started inside a SLURM allocation without `srun` is one
      process, however many tasks the allocation holds (SLURM_NTASKS);
    - otherwise one process: nothing to do, False.
    `options` go to `jax.distributed.initialize`. Call it first, before
    anything touches a device. Calling it again is harmless.
    """
    if jax.distributed.is_initialized():
        return True
    if os.environ.get(COORDINATOR):
        missing = [name for name in (PROCESS_COUNT, PROCESS_ID) if not os.environ.get(name)]
        if missing:
            raise ValueError(f"${COORDINATOR} is set, but {' and '.join('$' + name for name in missing)} "
                             "not: set all three (the coordinator's host:port, how many processes, this one's id)")
        count, index = _environment_int(PROCESS_COUNT), _environment_int(PROCESS_ID)
        if not 0 <= index < count:
            raise ValueError(f"${PROCESS_ID}={index} must be from 0 to ${PROCESS_COUNT}-1={count - 1}")
        jax.distributed.initialize(os.environ[COORDINATOR], count, index, **options)
        return True
    if any(os.environ.get(name, "1").strip().isdigit() and int(os.environ.get(name, "1")) > 1
           for name in _CLUSTER_SIZES):
        jax.distributed.initialize(**options)
        return True
    return False
