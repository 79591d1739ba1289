"""Seconds per training epoch of the "learning to round" network, three ways in one process.

- jaxdl `fit` (a whole epoch in one compiled `lax.scan`),
- a hand-written minimal Flax + Optax `lax.scan` epoch loop (the floor),
- Keras 3 `model.fit` on its JAX backend (same architecture, batch, epochs).

Each trains 10,000 examples, batch 32, for 20 epochs (`--quick`: 2,000
examples, 4 epochs); the first epoch (which compiles) is excluded and the
median of the others is taken. jaxdl and the hand-written loop run three
times each, alternating, and each reports its fastest run: on this 2-core
VM the same loop's median epoch moved from 5.7 to 7.9 ms between runs a
second apart on a quiet machine, more than the difference measured.
Run: `python -m benchmarks.train_small [--quick] [--json PATH]`.
"""
from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import report
from experiments.basics import model, rounding_data
from jaxdl import Callback, fit

EPOCHS, BATCH = 20, 32
ROUNDS = 3  # alternating runs of jaxdl and the hand-written loop; each reports its fastest
QUICK_EPOCHS, QUICK_EXAMPLES = 4, 2_000


class EpochTimer(Callback):
    def on_train_begin(self, run):
        self.times = [time.perf_counter()]

    def on_epoch_end(self, run, epoch, logs):
        self.times.append(time.perf_counter())


def steady(times: list[float]) -> float:
    return statistics.median(np.diff(times)[1:])


def time_jaxdl(x, y, epochs: int = EPOCHS) -> float:
    timer = EpochTimer()
    fit(model(), x, y, loss="sparse_categorical_crossentropy", optimizer=optax.adam(1e-3), epochs=epochs,
        batch_size=BATCH, callbacks=[timer], verbose=False)
    return steady(timer.times)


def time_hand_written(x, y, epochs: int = EPOCHS) -> float:
    """What a user would write by hand: one jitted epoch of scanned Adam steps."""
    net, tx = model(), optax.adam(1e-3)
    params = net.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
    carry = (params, tx.init(params))
    steps = -(-len(x) // BATCH)

    @jax.jit
    def epoch(carry, x, y, key):
        order = jnp.resize(jax.random.permutation(key, x.shape[0]), (steps, BATCH))

        def step(carry, rows):
            params, opt_state = carry

            def loss_fn(p):
                logits = net.apply({"params": p}, x[rows])
                return optax.softmax_cross_entropy_with_integer_labels(logits, y[rows]).mean()

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        carry, losses = jax.lax.scan(step, carry, order)
        return carry, losses.mean()

    x, y = jnp.asarray(x), jnp.asarray(y)
    times = [time.perf_counter()]
    for e in range(epochs):
        carry, loss = epoch(carry, x, y, jax.random.key(e))
        float(loss)  # fetch the epoch's loss, as fit does for its history
        times.append(time.perf_counter())
    return steady(times)


def time_keras(x, y, epochs: int = EPOCHS) -> tuple[float, str]:
    import keras

    class KerasTimer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.times = [time.perf_counter()]

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter())

    keras.utils.set_random_seed(0)
    net = keras.Sequential([keras.Input((1,)), keras.layers.Dense(8, activation="relu"),
                            keras.layers.Dense(2, activation="softmax")])
    net.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                metrics=["accuracy"])
    timer = KerasTimer()
    net.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, callbacks=[timer])
    return steady(timer.times), keras.__version__


def measure(quick: bool) -> dict:
    """ms per epoch of the three loops, and each peer against jaxdl's `fit`."""
    x, y = rounding_data()
    epochs = QUICK_EPOCHS if quick else EPOCHS
    if quick:
        x, y = x[:QUICK_EXAMPLES], y[:QUICK_EXAMPLES]
    ours, floor = "jaxdl `fit`", "hand-written Flax+Optax `lax.scan`"
    runs = {ours: [], floor: []}
    for _ in range(ROUNDS):
        runs[ours].append(time_jaxdl(x, y, epochs))
        runs[floor].append(time_hand_written(x, y, epochs))
    figures = {name: report.figure(min(seconds) * 1e3, "ms/epoch") for name, seconds in runs.items()}
    ratios, notes = [report.ratio(ours, floor, readme=True)], []
    try:
        seconds, version = time_keras(x, y, epochs)
        keras_name = f"Keras {version} `fit` (JAX backend)"
        figures[keras_name] = report.figure(seconds * 1e3, "ms/epoch")
        ratios.append(report.ratio(keras_name, ours))
    except ImportError as error:
        notes.append(f"Keras: skipped ({error})")
    return report.result(
        "Small network training loop",
        f"The `basics` \"learning to round\" network, {len(x):,} examples, batch {BATCH}, {epochs} epochs; "
        f"ms per epoch, median of epochs 2-{epochs}, all three loops in one process; jaxdl and the hand-written "
        f"loop the fastest of {ROUNDS} alternating runs each.", figures, ratios, notes)


def print_table(measured: dict) -> None:
    figures = measured["figures"]
    ours = figures["jaxdl `fit`"]["value"]
    print(f"jax {jax.__version__}, {os.cpu_count()} cores; {measured['about']}")
    print("| loop | ms per epoch | vs jaxdl fit |")
    print("|---|---|---|")
    for name, fig in figures.items():
        print(f"| {name} | {fig['value']:.2f} | {fig['value'] / ours:.2f}x |")
    for note in measured["notes"]:
        print(note)


def main(argv=None):
    report.run_cli(measure, __doc__.splitlines()[0], argv, print_table)


if __name__ == "__main__":
    main()
