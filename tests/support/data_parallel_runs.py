"""Training runs on a mesh of several devices and on one device, for `tests/runtime/test_sharding.py`.

Run in a fresh process where XLA_FLAGS=--xla_force_host_platform_device_count=4 gives the CPU
four devices (JAX reads the flag once, at start-up):

    python -m tests.support.data_parallel_runs OUT                    # one process, 4 devices
    python -m tests.support.data_parallel_runs OUT --processes 2      # this process and one more, 2 devices each

Every run trains from seed 0 on the same global batches, unshuffled so that arrays and a source
holding the same examples give the same batches. OUT.npz holds each run's parameters,
BatchNorm statistics and losses (keyed `run/...`), OUT.json what the tests check of shardings
and error messages (and, from one process, what `fit`'s compiled steps see of their batch:
`tests/support/fit_shard_shapes.py`). With `--processes P`, this process starts P - 1 others (with
$JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID, as a cluster would) and they
form one run through `jaxdl.runtime.distributed.initialize`; process 0 writes OUT.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

import numpy as np

CE = "sparse_categorical_crossentropy"


def dataset(n: int = 70):
    """70 examples: batches of 16 leave 6 at the end of an epoch, which 4 devices cannot split as they are."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n).astype(np.int32)
    x = (rng.normal(size=(n, 6, 6, 1)) + y[:, None, None, None]).astype(np.float32)
    return x, y


def nnx_net():
    """A Flax NNX module with BatchNorm and dropout (on its own stream), new at each call: NNX modules hold state.

    No bias before BatchNorm, which cancels it: its gradient is then zero up to rounding, and Adam turns that
    rounding into full-size steps whose direction depends on the order of the sums (seen: 2.8e-3 between 4
    devices and 1).
    """
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(36, 16, use_bias=False, rngs=rngs)
            self.norm = nnx.BatchNorm(16, rngs=rngs)
            self.drop = nnx.Dropout(0.2, rngs=rngs)
            self.out = nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, x):
            x = x.reshape(x.shape[0], -1)
            return self.out(self.drop(nnx.relu(self.norm(self.hidden(x)))))

    return Net(nnx.Rngs(0))


def models() -> dict:
    from jaxdl import MLP, ConvNet

    return {"mlp": MLP(features=(16,), num_outputs=3, dropout_rate=0.2),
            "bn_cnn": ConvNet(layers=(("conv", 4, 3), ("batchnorm",), ("maxpool", 2), ("flatten",), ("dense", 3))),
            "nnx": nnx_net()}


def train(name: str, mesh, source: bool, **options):
    """Two epochs of `fit` from seed 0, on arrays or on the same examples as a random-access source, in order."""
    from jaxdl import fit

    x, y = dataset()
    if name in ("bn_cnn", "nnx"):  # BatchNorm statistics cannot mask padding: the last, smaller batch is dropped
        options.setdefault("drop_remainder", True)
    inputs = {"x": [{"image": image, "label": label} for image, label in zip(x, y)]} if source else {"x": x, "y": y}
    options = {"batch_size": 16, **options}
    return fit(models()[name], **inputs, loss=CE, epochs=2, seed=0, shuffle=False, mesh=mesh, verbose=0,
               **options)


def local(tree) -> dict:
    """Each array's copy on this process's first device: replicated arrays are whole on every device."""
    import jax

    from tests.support.trees import raw  # random keys (an NNX module's streams) by their data

    return {jax.tree_util.keystr(path): np.asarray(raw(leaf).addressable_data(0))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def error_of(call) -> str:
    try:
        call()
    except ValueError as error:
        return str(error)
    return "no error"


def record(arrays: dict, facts: dict, run: str, state, history) -> None:
    arrays.update({f"{run}/params{path}": value for path, value in local(state.params).items()})
    arrays.update({f"{run}/batch_stats{path}": value for path, value in local(state.batch_stats).items()})
    arrays[f"{run}/loss"] = np.asarray(history["loss"])
    kernels = jax_leaves(state.params)
    facts[run] = {"devices": min(len(leaf.sharding.device_set) for leaf in kernels),
                  "replicated": all(leaf.sharding.is_fully_replicated for leaf in kernels)}


def jax_leaves(tree) -> list:
    import jax

    return jax.tree.leaves(tree)


def all_runs(multi_process: bool) -> tuple[dict, dict]:
    import jax
    import optax

    from jaxdl import data, evaluate, fit, make_train_step, predict
    from jaxdl.runtime.sharding import batch_sharding, data_mesh, put_global_batch
    from jaxdl.training.steps import create_train_state

    everywhere = data_mesh()
    arrays, facts = {}, {"devices": jax.device_count(), "processes": jax.process_count()}
    # The reference on one device reads arrays; on all devices both paths run (with several processes,
    # the path where each process reads only its part of a source, and arrays for BatchNorm).
    runs = ([("mlp", "source"), ("bn_cnn", "arrays"), ("nnx", "source")] if multi_process else
            [(name, kind) for name in models() for kind in ("arrays", "source")])
    x, y, states = *dataset(), {}
    for name, kind in runs:
        states[name, kind], history = train(name, everywhere, kind == "source")
        record(arrays, facts, f"{name}/{kind}/many", states[name, kind], history)
    trained = states["bn_cnn", "arrays"]
    if multi_process:  # outputs computed split over both processes, then whole in each
        arrays["predict/many"] = predict(trained, x[:5])
        return arrays, facts
    meshes = {"many": everywhere, "one": data_mesh(jax.devices()[:1])}
    for name in models():
        record(arrays, facts, f"{name}/arrays/one", *train(name, meshes["one"], False))

    for label, mesh in meshes.items():
        scores = evaluate(trained, x, y, loss=CE, batch_size=16, mesh=mesh)
        arrays[f"evaluate/{label}"] = np.asarray([scores["loss"], scores["accuracy"]])
        arrays[f"predict/{label}"] = predict(trained, x[:5], mesh=mesh)  # 5 rows: padded to split over 4

    # A hand-written loop around the step factory, as a user writes it.
    for label, mesh in meshes.items():
        state = create_train_state(models()["mlp"], optax.adam(1e-3), x.shape[1:], jax.random.key(0))
        step = make_train_step(CE, mesh=mesh)
        for batch in data.batches(x[:64], y[:64], 16, seed=0):  # 4 full batches: one program per mesh
            state, _ = step(state, batch)
        record(arrays, facts, f"mlp/step/{label}", state, {"loss": []})
    batch = put_global_batch({"x": x[:16]}, everywhere)["x"]
    facts["batch"] = {"spec": str(batch.sharding.spec), "expected": str(batch_sharding(everywhere).spec),
                      "rows_per_device": sorted(shard.data.shape[0] for shard in batch.addressable_shards)}

    facts["errors"] = {
        "indivisible": error_of(lambda: train("mlp", everywhere, False, batch_size=6)),
        "batch_norm_last_batch": error_of(lambda: train("bn_cnn", everywhere, False, drop_remainder=False)),
        "no_data_axis": error_of(lambda: train("mlp", jax.sharding.Mesh(np.asarray(jax.devices()), ("model",)),
                                               False)),
        # An iterable's batches come as they are: one of 6 would need padding, which BatchNorm cannot mask.
        "batch_norm_iterable": error_of(lambda: fit(models()["bn_cnn"], iter([{"x": x[:6], "y": y[:6]}]), loss=CE,
                                                    mesh=everywhere, verbose=0)),
    }
    # What `fit`'s compiled steps see of their batch (tests/support/fit_shard_shapes.py), in this process rather than
    # a process of its own.
    from tests.support.fit_shard_shapes import seen_shapes

    facts["fit_shard_shapes"] = seen_shapes()
    chunked_inference(arrays, facts, everywhere)
    return arrays, facts


def chunked_inference(arrays: dict, facts: dict, mesh) -> None:
    """`apply_in_chunks` with a mesh (as `jaxdl classify` runs on a CPU device per core), against one piece:
    a small conv net for the network, a softmax of its outputs for the top."""
    import jax
    import jax.numpy as jnp

    from jaxdl.models import ConvNet
    from jaxdl.pretrained.classifier import ImageClassifier
    from jaxdl.runtime.inference import apply_in_chunks

    model = ConvNet(layers=(("conv", 4, 3), ("batchnorm",), ("maxpool", 2), ("flatten",), ("dense", 10)))
    images = jnp.asarray(np.random.default_rng(0).normal(size=(7, 8, 8, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), images)
    arrays["chunked/one_piece"] = np.asarray(jax.jit(model.apply)(variables, images))
    top = lambda v, outputs: jax.nn.softmax(outputs)  # a function of the outputs, run once per share
    spread = jax.jit(lambda v, x: apply_in_chunks(model.apply, v, x, top=top, mesh=mesh))(variables, images)
    arrays["chunked/mesh"] = np.asarray(spread)  # 7 images, padded to 8 to split over the 4 devices
    facts["chunked/mesh"] = len(spread.sharding.device_set)

    # A classifier splits a batch over the devices only where each gets an image: a smaller batch on
    # weights replicated over all of them would be computed on each.
    classifier = ImageClassifier(model, variables, {}, tuple(map(str, range(10))))
    for n in (3, 4):
        placed, split = classifier.placement(n)
        facts[f"placement/{n}"] = [len(jax.tree.leaves(placed)[0].sharding.device_set), split is not None]
        arrays[f"placement/{n}"] = classifier.probabilities(np.asarray(images[:n]))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args(argv)
    others = []
    if args.processes > 1 and "JAX_PROCESS_ID" not in os.environ:  # the first process starts the others
        os.environ.update(JAX_COORDINATOR_ADDRESS=f"localhost:{free_port()}", JAX_NUM_PROCESSES=str(args.processes),
                          JAX_PROCESS_ID="0")
        others = [subprocess.Popen([sys.executable, "-m", "tests.support.data_parallel_runs", args.out, "--processes",
                                    str(args.processes)], env={**os.environ, "JAX_PROCESS_ID": str(index)})
                  for index in range(1, args.processes)]

    from jaxdl.runtime import distributed

    distributed.initialize()
    arrays, facts = all_runs(args.processes > 1)
    if os.environ.get("JAX_PROCESS_ID", "0") == "0":
        np.savez(args.out + ".npz", **arrays)
        with open(args.out + ".json", "w") as file:
            json.dump(facts, file)
    if args.processes > 1:
        import jax

        jax.distributed.shutdown()  # before waiting for the others: they wait for every process to shut down
    for other in others:
        if other.wait(timeout=300):
            raise SystemExit(f"process {others.index(other) + 1} of the multi-process run failed")


if __name__ == "__main__":
    main()
