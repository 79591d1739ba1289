"""Data-parallel training step time: 1 vs 4 simulated host devices, and `fit` against a hand-written sharded step.

Models: the MNIST CNN (`experiments.mnist.CNN_MODEL`, 28x28x1) and
MobileNetV2 (`jaxdl.models.MobileNetV2`, 10 classes, 96x96x3, trained whole),
on random data, global batch 64, Adam. Each runs in a process started with
`XLA_FLAGS=--xla_force_host_platform_device_count=4`, on the mesh
`data_mesh(jax.devices()[:1])` (1 device) and `data_mesh()` (4 devices), two ways:

- jaxdl `fit(..., mesh=mesh, metrics=())`;
- by hand: Flax `apply` + optax in `jax.jit(step, in_shardings=..., out_shardings=...,
  donate_argnums=0)`, the state replicated, each batch `jax.device_put` with
  `NamedSharding(mesh, P('data'))`; the same model, batch and number of steps.
  It is compiled with jaxdl's XLA options (`jaxdl.runtime.compiler`), so that the ratio
  is what `fit` adds, not what the options save in the convolutions.

Both train the same epochs of the same steps; the first epoch (which compiles)
is left out and the median epoch, divided by its steps, is the ms/step.
The 4 simulated CPU devices share this machine's cores, so "4 devices" is not
what 4 real devices give: it shows what the SPMD program (the batch split,
the gradient all-reduce) costs or saves here, where 4 device programs can
also keep the cores busier than one does.
Run: `python -m benchmarks.data_parallel [--quick]`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

DEVICES = 4
FLAG = f"--xla_force_host_platform_device_count={DEVICES}"
if FLAG not in os.environ.get("XLA_FLAGS", ""):  # before jax is imported: this process gets 4 CPU devices
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FLAG}".strip()

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from benchmarks import report
from benchmarks.train_small import EpochTimer, steady
from jaxdl.runtime import compiler_options

BATCH = 64
# model -> (input shape, steps per epoch, epochs), full and quick
SIZES = {"mnist_cnn": {"full": ((28, 28, 1), 10, 3), "quick": ((28, 28, 1), 3, 2)},
         "mobilenet_v2": {"full": ((96, 96, 3), 3, 3), "quick": None}}
NAMES = {"mnist_cnn": "MNIST CNN", "mobilenet_v2": "MobileNetV2 96x96"}


def build_model(name: str):
    if name == "mnist_cnn":
        from experiments.mnist import CNN_MODEL

        return CNN_MODEL
    from jaxdl.models import MobileNetV2

    return MobileNetV2(num_classes=10, classifier_activation=None)


def random_data(shape, examples: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(examples, *shape)).astype(np.float32), rng.integers(0, 10, examples).astype(np.int32)


def fit_ms_per_step(model, x, y, mesh, epochs: int) -> float:
    from jaxdl import fit

    timer = EpochTimer()
    fit(model, x, y, loss="sparse_categorical_crossentropy", optimizer=optax.adam(1e-3), metrics=(),
        epochs=epochs, batch_size=BATCH, mesh=mesh, callbacks=[timer], verbose=0)
    return steady(timer.times) / (len(x) // BATCH) * 1e3


def hand_written_ms_per_step(model, x, y, mesh, epochs: int) -> float:
    """What a user writes by hand: a jitted step with explicit shardings, batches put on the mesh."""
    tx = optax.adam(1e-3)
    variables = model.init(jax.random.key(0), jnp.zeros((1, *x.shape[1:])))
    batch_norm = "batch_stats" in variables
    replicated, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
    state = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {}),
             "opt_state": tx.init(variables["params"]), "step": jnp.zeros((), jnp.int32)}
    state = jax.device_put(state, replicated)
    dropout_key = jax.random.key(1)

    def step(state, images, labels):
        def loss_fn(params):
            rngs = {"dropout": jax.random.fold_in(dropout_key, state["step"])}
            if batch_norm:
                logits, updates = model.apply({"params": params, "batch_stats": state["batch_stats"]}, images,
                                              train=True, rngs=rngs, mutable=["batch_stats"])
                stats = updates["batch_stats"]
            else:
                logits, stats = model.apply({"params": params}, images, train=True, rngs=rngs), state["batch_stats"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), stats

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "batch_stats": stats,
                "opt_state": opt_state, "step": state["step"] + 1}, loss

    jitted = jax.jit(step, in_shardings=(replicated, split, split), out_shardings=(replicated, replicated),
                     donate_argnums=0, compiler_options=compiler_options())
    steps = len(x) // BATCH
    times = [time.perf_counter()]
    for epoch in range(epochs):
        order = np.random.default_rng(epoch).permutation(len(x))
        losses = []
        for i in range(steps):
            rows = order[i * BATCH:(i + 1) * BATCH]
            state, loss = jitted(state, jax.device_put(x[rows], split), jax.device_put(y[rows], split))
            losses.append(loss)
        float(jnp.mean(jnp.stack(losses)))  # fetch the epoch's loss, as fit does for its history
        times.append(time.perf_counter())
    return steady(times) * 1e3 / steps


def measure_config(name: str, devices: int, quick: bool) -> dict:
    """`{"fit": ms/step, "hand": ms/step}` of one model on a mesh of `devices` devices, in this process."""
    from jaxdl.runtime import data_mesh

    if len(jax.devices()) < devices:
        raise RuntimeError(f"{devices} devices wanted, this process has {len(jax.devices())} "
                           f"(XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}; was jax imported before this module?)")
    shape, steps, epochs = SIZES[name]["quick" if quick else "full"]
    mesh = data_mesh(jax.devices()[:devices])
    model = build_model(name)
    x, y = random_data(shape, steps * BATCH)
    return {"fit": fit_ms_per_step(model, x, y, mesh, epochs),
            "hand": hand_written_ms_per_step(model, x, y, mesh, epochs)}


def in_new_process(name: str, devices: int, quick: bool) -> dict:
    command = [sys.executable, "-m", "benchmarks.data_parallel", "--config", name, str(devices)]
    done = subprocess.run(command + (["--quick"] if quick else []), capture_output=True, text=True,
                          env={**os.environ, "XLA_FLAGS": FLAG})
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(quick: bool) -> dict:
    """Full: each (model, device count) in a fresh process. Quick: the MNIST CNN only, in this process."""
    models = [name for name in SIZES if SIZES[name]["quick" if quick else "full"]]
    figures, ratios, notes = {}, [], []
    for name in models:
        shape, steps, epochs = SIZES[name]["quick" if quick else "full"]
        label = NAMES[name]
        for devices in (1, DEVICES):
            ms = measure_config(name, devices, quick) if quick else in_new_process(name, devices, quick)
            for engine, text in (("fit", "jaxdl fit"), ("hand", "hand-written jit step")):
                figures[f"{label}, {text}, {devices} device{'s' * (devices > 1)}"] = report.figure(ms[engine],
                                                                                                   "ms/step")
        for devices in (1, DEVICES):
            plural = "s" * (devices > 1)
            ratios.append(report.ratio(f"{label}, jaxdl fit, {devices} device{plural}",
                                       f"{label}, hand-written jit step, {devices} device{plural}"))
        ratios.append(report.ratio(f"{label}, jaxdl fit, {DEVICES} devices", f"{label}, jaxdl fit, 1 device"))
        notes.append(f"{label}: input {'x'.join(map(str, shape))}, {steps} steps per epoch, {epochs} epochs, "
                     f"median of epochs 2-{epochs}")
    if quick:
        notes.append("--quick: the MNIST CNN only, both meshes in one process")
    notes += [f"{DEVICES} simulated CPU devices share this machine's {os.cpu_count()} cores: a {DEVICES}-device "
              f"figure is not what {DEVICES} real devices give, only what the SPMD program (batch split, gradient "
              "all-reduce) costs or saves on these cores, which its device programs may keep busier than one does",
              "goal: fit / hand-written jit step below 1.05x"]
    return report.result(
        "Data-parallel training step", f"Global batch {BATCH}, Adam, random data; jaxdl `fit` (metrics=()) against "
        "a hand-written `jax.jit` step with the same shardings (state replicated, batch split over `data`), on "
        f"`data_mesh(jax.devices()[:1])` and `data_mesh()` over {DEVICES} simulated host devices "
        f"(`XLA_FLAGS={FLAG}`). ms per step, first (compiling) epoch excluded.", figures, ratios, notes)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--config"]:  # a child of `measure`: one model on one mesh, JSON on stdout
        print(json.dumps(measure_config(argv[1], int(argv[2]), "--quick" in argv)))
        return
    report.run_cli(measure, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
