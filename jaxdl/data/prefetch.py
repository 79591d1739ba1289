"""Host batches onto the device ahead of the step that needs them, and when data may go there whole.

Written by hand: flax's `jax_utils.prefetch_to_device` targets `pmap`'s
leading device axis, and grain's own prefetch stays on the host. Here
`jax.device_put` is asynchronous, so keeping `size` batches in flight lets
the copy and the host's loading overlap the step that is computing.

Device memory for data is bounded by the batch: streamed, at most
`PREFETCH_DEPTH + 2` batches (or groups of `steps_per_execution` batches)
are on a device at once: those put ahead, the one the step reads, and the
one being put. In-memory data go to the devices whole (one compiled scan
per epoch, the fast form for small models) only when they fit
`device_data_limit`.
"""
from __future__ import annotations

import collections
from typing import Callable, Iterable, Iterator

import jax
import numpy as np

from jaxdl.data.sources import AUTO_CACHE_SHARE, available_memory

PREFETCH_DEPTH = 2  # batches put on the device ahead of the step that needs them
# The "auto" bound on a GPU or TPU: this share of each device's memory for a whole dataset (replicated on
# every device), the rest left to the model, its optimizer state, the activations of a batch and XLA's
# workspace; where the device does not report its memory, this many bytes. Chosen margins, not measured optima.
AUTO_DEVICE_SHARE = 1 / 8
AUTO_UNKNOWN_DEVICE_BYTES = 256 * 2**20


def device_data_limit(devices, limit: int | str = "auto") -> int:
    """The most bytes of in-memory data a device may hold whole: `limit`, or what "auto" allows on `devices`.

    "auto": on CPU, whose devices' memory is the host's, the copies of all
    this process's devices together at most `AUTO_CACHE_SHARE` of the memory
    available now (as a source's cache; 256 MiB per device where that is
    unknown): the data are in host memory already and each device copies
    them once. On a GPU or TPU, `AUTO_DEVICE_SHARE` of the smallest device's
    memory (`memory_stats()["bytes_limit"]`), or `AUTO_UNKNOWN_DEVICE_BYTES`.
    With several processes, the least of theirs (gathered from all), so that
    all of them place the data alike.

    Args:
        devices: the devices the data would be replicated on (a mesh's).
        limit: "auto", or a number of bytes per device (0: always stream).

    Returns:
        The bound in bytes per device.

    Raises:
        ValueError: `limit` is neither "auto" nor a non-negative integer.
    """
    if limit != "auto":
        if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0:
            raise ValueError(f"device_data_bytes must be 'auto' or a non-negative number of bytes per device, "
                             f"got {limit!r}")
        return int(limit)
    bound = _local_auto_limit(list(devices))
    if jax.process_count() > 1:  # every process must choose the same form (the same compiled programs): the least
        from jax.experimental import multihost_utils

        bound = int(np.min(multihost_utils.process_allgather(np.int64(bound))))
    return bound


def _local_auto_limit(devices: list) -> int:
    """The "auto" bound of `device_data_limit` for this process's part of `devices`."""
    local = [device for device in devices if device.process_index == jax.process_index()] or devices
    if all(device.platform == "cpu" for device in local):
        available = available_memory()
        return AUTO_UNKNOWN_DEVICE_BYTES if available is None else int(AUTO_CACHE_SHARE * available / len(local))
    sizes = [(device.memory_stats() or {}).get("bytes_limit") for device in local]
    if any(size is None for size in sizes):
        return AUTO_UNKNOWN_DEVICE_BYTES
    return int(AUTO_DEVICE_SHARE * min(sizes))


def fits_on_device(nbytes: int, devices, limit: int | str = "auto") -> bool:
    """Whether data of `nbytes` (per device, replicated) may be placed whole on `devices`.

    Args:
        nbytes: the bytes each device would hold.
        devices: the devices the data would be replicated on.
        limit: "auto" or a number of bytes per device (see `device_data_limit`).

    Returns:
        True when `nbytes` is within the bound.
    """
    return nbytes <= device_data_limit(devices, limit)


def to_device(batches: Iterable[dict], size: int = PREFETCH_DEPTH, put: Callable = jax.device_put) -> Iterator[dict]:
    """Yields the batches as device arrays, `size` of them put on the device before they are needed.

    `put(batch)` places one batch (`jaxdl.runtime.sharding.put_batch` splits it over
    devices). Arrays keep their dtype: uint8 images travel as uint8 (a
    quarter of float32's bytes) and become floats inside the compiled step.
    """
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(put(batch))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def _shapes(batch: dict) -> tuple:
    return tuple((key, np.shape(value), np.asarray(value).dtype.str) for key, value in sorted(batch.items()))


def stacked(batches: Iterable[dict], group_size: int) -> Iterator[dict]:
    """Groups of up to `group_size` consecutive batches of one shape, stacked on a new leading axis.

    A compiled call that scans over a group runs `group_size` steps for one
    dispatch. A batch of another shape (an epoch's smaller last batch) closes
    the group early.
    """
    group: list[dict] = []
    for batch in batches:
        if group and (len(group) == group_size or _shapes(batch) != _shapes(group[0])):
            yield {key: np.stack([b[key] for b in group]) for key in group[0]}
            group = []
        group.append(batch)
    if group:
        yield {key: np.stack([b[key] for b in group]) for key in group[0]}
