"""Flax's ResNet with `BatchNorm(axis_name='batch')` and with `axis_name=None`, on 4 devices and on 1, for
`tests/training/test_flax_examples.py`.

Run in a fresh process where XLA_FLAGS=--xla_force_host_platform_device_count=4 gives the CPU four devices
(JAX reads the flag once, at start-up):

    python -m tests.support.flax_example_runs OUT

Every run trains flax's own test-sized ResNet (`_ResNet1`: one block) from seed 0 on the same unshuffled
batches; OUT.npz holds each run's parameters, BatchNorm statistics and losses, keyed `{axis}/{devices}/...`.
"""
from __future__ import annotations

import sys

import numpy as np


def dataset(n: int = 32):
    """32 images of 16x16x3: two batches of 16, each split over 4 devices as 4 images each."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n).astype(np.int32)
    x = (rng.normal(size=(n, 16, 16, 3)) + y[:, None, None, None]).astype(np.float32)
    return x, y


def all_runs() -> dict:
    import jax
    import optax

    from jaxdl import fit
    from jaxdl.runtime.sharding import data_mesh
    from tests.support.flax_resnet import _ResNet1

    x, y = dataset()
    arrays = {}
    for devices, mesh in (("4", data_mesh()), ("1", data_mesh(jax.devices()[:1]))):
        for axis_name in ("batch", None):
            state, history = fit(_ResNet1(num_classes=3, num_filters=4, axis_name=axis_name), x, y,
                                 loss="sparse_categorical_crossentropy", optimizer=optax.sgd(0.1, momentum=0.9),
                                 epochs=2, batch_size=16, shuffle=False, seed=0, mesh=mesh, verbose=0)
            run = f"{axis_name}/{devices}"
            for part in ("params", "batch_stats"):
                for path, leaf in jax.tree_util.tree_leaves_with_path(getattr(state, part)):
                    arrays[f"{run}/{part}{jax.tree_util.keystr(path)}"] = np.asarray(leaf.addressable_data(0))
            arrays[f"{run}/loss"] = np.asarray(history["loss"])
            arrays[f"{run}/devices"] = np.asarray(len(jax.tree.leaves(state.params)[0].sharding.device_set))
    return arrays


if __name__ == "__main__":
    np.savez(sys.argv[1] + ".npz", **all_runs())
