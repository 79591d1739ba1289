"""What `fit`'s compiled steps see of their batch on 4 devices, for `tests/runtime/test_sharding.py`.

Run in a fresh process where XLA_FLAGS=--xla_force_host_platform_device_count=4 gives the CPU
four devices (JAX reads the flag once, at start-up):

    python -m tests.support.fit_shard_shapes

tests/support/data_parallel_runs.py calls `seen_shapes` in its 4-device process (one start-up of JAX fewer).
The model reports, from inside the compiled programs `fit` builds (through
`jax.debug.inspect_array_sharding`, called as XLA partitions the program), the
global shape of the input it is given, the shape of each device's part of it
and how many devices hold parts. Printed as JSON: `{path: [[mode, global,
per_device, devices], ...]}`.
"""
from __future__ import annotations

import json

import flax.linen as nn
import jax
import numpy as np

SEEN: list = []


class ShardProbe(nn.Module):
    """A small MLP that records the sharding of its input in every program it is compiled into."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        shape, mode = tuple(x.shape), "train" if train else "inference"
        jax.debug.inspect_array_sharding(
            x, callback=lambda s: SEEN.append([mode, list(shape), list(s.shard_shape(shape)), len(s.device_set)]))
        return nn.Dense(3)(nn.relu(nn.Dense(4)(x)))


def seen_shapes() -> dict:
    """`{path: [[mode, global, per_device, devices], ...]}` for arrays and for a source, from `fit`'s programs.

    Its programs must be compiled here, not read from JAX's compilation cache: the probe reports as XLA
    partitions a program. Each process calls it once (tests/support/data_parallel_runs.py, or `main` below).
    """
    from jaxdl import fit

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 40).astype(np.int32)
    x = (rng.normal(size=(40, 3)) + y[:, None]).astype(np.float32)
    options = dict(loss="sparse_categorical_crossentropy", epochs=1, batch_size=16, verbose=0)
    seen = {}
    # In-memory arrays: whole on every device, each batch gathered inside one compiled scan per epoch.
    SEEN[:] = []
    fit(ShardProbe(), x, y, validation_data=(x[:16], y[:16]), **options)
    seen["arrays"], SEEN[:] = list(SEEN), []
    # A source read every epoch: host batches put on the devices, then the compiled steps (cached, a source on
    # one process would run scanned, as arrays).
    fit(ShardProbe(), [{"image": row, "label": label} for row, label in zip(x[:32], y[:32])], cache=False,
        **options)
    seen["source"], SEEN[:] = list(SEEN), []
    return seen


def main() -> None:
    print(json.dumps({"devices": jax.device_count(), **seen_shapes()}))


if __name__ == "__main__":
    main()
