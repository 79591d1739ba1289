"""Meshes and shardings for data-parallel training: the batch split over a `data` axis, the rest replicated.

jaxdl adds no parallelism of its own. A step sees its batch sharded over the
mesh's `data` axis and the train state replicated, and `jax.jit` (GSPMD)
inserts the gradient all-reduce; means over a sharded batch axis are global,
so BatchNorm's statistics are the global batch's, as one device computes
them. With one device the mesh has one device and the same code runs.

Several processes (hosts) each feed their own rows of every global batch:
`local_rows` says which, and `put_batch` assembles the global array from
them with `jax.make_array_from_process_local_data`. Steps receive a mesh;
they never build one.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdl.data import arrays
from jaxdl.runtime import compiler

DATA_AXIS = "data"


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh named `data` over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def resolve_mesh(mesh: Mesh | None = None) -> Mesh:
    """`mesh`, checked to have a `data` axis; None means `data_mesh()` over all devices."""
    if mesh is None:
        return data_mesh()
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(f"the mesh has axes {tuple(mesh.axis_names)} but no {DATA_AXIS!r} axis to split the batch "
                         f"over; build it with jaxdl.runtime.sharding.data_mesh() or name one axis {DATA_AXIS!r}")
    return mesh


def data_parallelism(mesh: Mesh) -> int:
    """How many parts the batch is split into: the size of the mesh's `data` axis."""
    return int(mesh.shape[DATA_AXIS])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, stacked: bool = False) -> NamedSharding:
    """Examples split over `data`; `stacked` batches (K, batch, ...) keep their leading axis whole."""
    return NamedSharding(mesh, PartitionSpec(None, DATA_AXIS) if stacked else PartitionSpec(DATA_AXIS))


def check_global_batch(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    """A global batch that the `data` axis cannot split evenly is an error naming both numbers."""
    parts = data_parallelism(mesh)
    if batch_size % parts:
        raise ValueError(f"{what}={batch_size} cannot be split over the mesh's {parts} devices on its "
                         f"{DATA_AXIS!r} axis: the global batch must be a multiple of {parts} (e.g. "
                         f"{max(parts, batch_size // parts * parts)} or {(batch_size // parts + 1) * parts})")


def local_rows(global_batch: int, mesh: Mesh) -> slice:
    """This process's rows of a global batch: its devices' consecutive part of the `data` axis.

    Assumes the processes' devices are consecutive along the axis, as in
    `data_mesh()` (jax.devices() lists them process by process).
    """
    count = jax.process_count()
    if global_batch % count:
        raise ValueError(f"a global batch of {global_batch} cannot be split over {count} processes")
    return arrays.process_part(global_batch, (jax.process_index(), count))


def put_replicated(tree, mesh: Mesh):
    """`tree` on every device of the mesh (the same values in every process)."""
    target = replicated(mesh)
    if jax.process_count() == 1:
        # Device arrays already on the mesh's devices (a new state) are copied by one program; host data (a
        # dataset placed whole) goes straight to the devices, once.
        leaves = jax.tree.leaves(tree)
        on_the_devices = leaves and all(isinstance(leaf, jax.Array) and leaf.sharding.device_set == target.device_set
                                        for leaf in leaves)
        return _copied_to(target)(tree) if on_the_devices else jax.device_put(tree, target)

    def put(leaf):  # `device_put` reaches only this process's devices: build the global array from its copies
        if isinstance(leaf, jax.Array) and leaf.sharding == target:
            return leaf
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(leaf)), impl=jax.random.key_impl(leaf))
        value = np.asarray(leaf)
        return jax.make_array_from_callback(value.shape, target, lambda index: value[index])

    return jax.tree.map(put, tree)


@compiler.jit
def copied(tree):
    """A copy of `tree`'s arrays where they are, as one program: eagerly, `jax.tree.map(jnp.copy, tree)` is a
    program per leaf shape, each read back from the compilation cache in a new process. New buffers, never the
    same ones: a train step donates the state it is given."""
    return jax.tree.map(jnp.copy, tree)


@functools.lru_cache(maxsize=16)
def _copied_to(target: NamedSharding) -> Callable:
    """`copied`, onto `target`'s shardings: `jax.device_put` compiles a copy per leaf shape that changes sharding.
    For arrays on `target`'s devices already (a program cannot move arrays between devices)."""
    return compiler.jit(copied.__wrapped__, out_shardings=target)


def put_batch(local_batch, mesh: Mesh, stacked: bool = False):
    """A batch split over `data` from this process's rows of it (all of them with one process)."""
    sharding = batch_sharding(mesh, stacked)
    if jax.process_count() == 1:
        return jax.device_put(local_batch, sharding)
    return jax.tree.map(lambda rows: jax.make_array_from_process_local_data(sharding, np.asarray(rows)), local_batch)


def put_global_batch(batch, mesh: Mesh, stacked: bool = False):
    """`put_batch` from a whole global batch that every process holds: each puts its `local_rows`."""
    if jax.process_count() > 1:
        axis = 1 if stacked else 0
        rows = local_rows(np.shape(jax.tree.leaves(batch)[0])[axis], mesh)
        batch = jax.tree.map(lambda leaf: leaf[:, rows] if stacked else leaf[rows], batch)
    return put_batch(batch, mesh, stacked)


def constrain_batch(batch, mesh: Mesh | None):
    """Inside a compiled step: the batch split over `data` (a no-op without a mesh)."""
    return batch if mesh is None else jax.lax.with_sharding_constraint(batch, batch_sharding(mesh))


def constrain_replicated(tree, mesh: Mesh | None):
    """Inside a compiled step: `tree` whole on every device (a no-op without a mesh)."""
    return tree if mesh is None else jax.lax.with_sharding_constraint(tree, replicated(mesh))
