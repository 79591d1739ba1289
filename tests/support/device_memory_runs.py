"""How many bytes of data `predict`, `evaluate` and `fit` hold on each device, for `tests/runtime/test_sharding.py`.

Run in a fresh process where XLA_FLAGS=--xla_force_host_platform_device_count=2 gives the CPU two
devices (JAX reads the flag once, at start-up):

    python -m tests.support.device_memory_runs OUT LIMIT

Every placement of host data (`jax.device_put` of numpy arrays: batches, or a whole dataset) is
followed until its arrays are freed, per device; each run records the most bytes alive at once
on one device, and the largest single placement. Each run is made twice: with
`device_data_bytes=LIMIT` (smaller than the dataset) and with the default ("auto", which places
this small dataset whole on CPU). OUT.json holds the peaks and sizes, OUT.npz the results.
"""
from __future__ import annotations

import json
import sys
import weakref

import jax
import numpy as np

CE = "sparse_categorical_crossentropy"
N, FEATURES, BATCH = 1024, 64, 64


class PlacementSpy:
    """Wraps `jax.device_put`: the bytes of host data alive on each device, and their peak."""

    def __init__(self):
        self.put = jax.device_put
        self.alive: dict[str, int] = {}
        self.peak = self.largest = 0

    def __call__(self, tree, *args, **kwargs):
        placed = self.put(tree, *args, **kwargs)
        this_put: dict[str, int] = {}
        for before, after in zip(jax.tree.leaves(tree), jax.tree.leaves(placed)):
            if not isinstance(before, np.ndarray):
                continue  # device arrays moved between shardings (the state): not host data
            for shard in after.addressable_shards:
                device, size = str(shard.device), shard.data.nbytes
                self.alive[device] = self.alive.get(device, 0) + size
                this_put[device] = this_put.get(device, 0) + size
                weakref.finalize(after, self.free, device, size)
        if this_put:
            self.largest = max(self.largest, *this_put.values())
            self.peak = max(self.peak, *self.alive.values())
        return placed

    def free(self, device: str, size: int) -> None:
        self.alive[device] -= size

    def measure(self, run):
        self.peak = self.largest = 0
        result = run()
        return result, {"peak": self.peak, "largest": self.largest}


def main(out: str, limit: int) -> None:
    import optax

    from jaxdl import MLP, create_train_state, data, evaluate, fit, predict

    assert len(jax.devices()) == 2, jax.devices()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, FEATURES)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    model = MLP(features=(16,), num_outputs=2, dropout_rate=0.2)
    state = create_train_state(model, optax.adam(1e-3), (FEATURES,), jax.random.key(0))
    source = [{"image": row, "label": label} for row, label in zip(x, y)]
    spy = PlacementSpy()
    jax.device_put = spy
    runs = {
        "predict": lambda **o: predict(state, x, batch_size=BATCH, **o),
        "evaluate": lambda **o: np.asarray(list(evaluate(state, x, y, loss=CE, batch_size=BATCH, **o).values())),
        "fit_arrays": lambda **o: fit(model, x[:768], y[:768], validation_data=(x[768:], y[768:]), loss=CE,
                                      batch_size=BATCH, epochs=2, seed=1, verbose=0, **o),
        "fit_cached_source": lambda **o: fit(model, source, loss=CE, batch_size=BATCH, epochs=2, seed=1,
                                             cache=True, verbose=0, **o),
    }
    facts, arrays = {"devices": len(jax.devices()), "dataset_bytes": x.nbytes + y.nbytes,
                     "prefetch_depth": data.PREFETCH_DEPTH, "batch_bytes": BATCH * (x[0].nbytes + y[0].nbytes)}, {}
    for name, run in runs.items():
        for kind, options in (("bounded", {"device_data_bytes": limit}), ("whole", {})):
            result, facts[f"{name}/{kind}"] = spy.measure(lambda: run(**options))
            if name.startswith("fit"):
                state_, history = result
                result = {"loss": np.asarray(history["loss"]),
                          **{"/".join(map(str, path)): np.asarray(leaf)
                             for path, leaf in jax.tree_util.tree_leaves_with_path(state_.params)}}
                for key, value in result.items():
                    arrays[f"{name}/{kind}/{key}"] = value
            else:
                arrays[f"{name}/{kind}"] = np.asarray(result)
    np.savez(f"{out}.npz", **arrays)
    with open(f"{out}.json", "w") as file:
        json.dump(facts, file)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
