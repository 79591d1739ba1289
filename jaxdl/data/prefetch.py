"""Host batches onto the device ahead of the step that needs them.

Written by hand: flax's `jax_utils.prefetch_to_device` targets `pmap`'s
leading device axis, and grain's own prefetch stays on the host. Here
`jax.device_put` is asynchronous, so keeping `size` batches in flight lets
the copy and the host's loading overlap the step that is computing.
"""
from __future__ import annotations

import collections
from typing import Callable, Iterable, Iterator

import jax
import numpy as np


def to_device(batches: Iterable[dict], size: int = 2, put: Callable = jax.device_put) -> Iterator[dict]:
    """Yields the batches as device arrays, `size` of them put on the device before they are needed.

    `put(batch)` places one batch (`jaxdl.sharding.put_batch` splits it over
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
