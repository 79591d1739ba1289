"""Flax's NNX MNIST tutorial's CNN trained five ways in one process: jaxdl `fit` against NNX's own loops.

The CNN of Flax's NNX MNIST tutorial (`experiments.mnist.NNXCNN`, 824,458
parameters) with its recipe (AdamW 0.005, b1 0.9, batch 32), on the first
6,400 real MNIST training images (`../shared/data/mnist`; MNIST-like
generated images where absent, said in the notes), 4 epochs each; images/s of
the steady epochs (the median of epochs 2-4, compile excluded):

- jaxdl `fit` on the NNX module;
- the tutorial's own loop: `nnx.Optimizer` and an `@nnx.jit` train step on
  the module (its `nnx.value_and_grad`), one call per batch;
- jaxdl `fit` on the same network written as a Linen module;
- your own loop with jaxdl's step (`create_train_state(module)`,
  `make_train_step`), one call per batch;
- a hand-written functional loop: `nnx.split` once, a pure `jax.jit` step
  that merges, differentiates and splits, one call per batch (the floor of
  the own-loop figure).

Ratios > 1x mean the first is faster. `--quick`: 640 images, 2 epochs.
Run: `python -m benchmarks.nnx_training [--quick] [--json PATH]`.
"""
from __future__ import annotations

import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import report
from benchmarks.convnet_training import images
from benchmarks.train_small import EpochTimer
from experiments.mnist import NNXCNN, RECIPES
from jaxdl import create_train_state, fit, make_train_step

EPOCHS, EXAMPLES = 4, 6_400
QUICK_EPOCHS, QUICK_EXAMPLES = 2, 640
CE = "sparse_categorical_crossentropy"


class LinenCNN(nn.Module):
    """`NNXCNN` written in Linen: the same layers, shapes and initialisers."""

    @nn.compact
    def __call__(self, x):
        x = x.astype(jnp.float32) / 255
        x = nn.avg_pool(nn.relu(nn.Conv(32, (3, 3))(x)), (2, 2), (2, 2))
        x = nn.avg_pool(nn.relu(nn.Conv(64, (3, 3))(x)), (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(10)(nn.relu(nn.Dense(256)(x)))


def _optimizer():
    return RECIPES["nnx_cnn"][0]()


BATCH = RECIPES["nnx_cnn"][1]


def steady_rate(times: list[float], examples: int) -> float:
    """Images/s of the median epoch after the first (which compiles)."""
    return examples / statistics.median(np.diff(times)[1:])


def time_fit(model, x, y, epochs: int) -> float:
    timer = EpochTimer()
    fit(model, x, y, loss=CE, optimizer=_optimizer(), epochs=epochs, batch_size=BATCH, callbacks=[timer], verbose=0)
    return steady_rate(timer.times, len(x))


def _batches(x, y, epoch: int):
    order = np.random.default_rng(epoch).permutation(len(x))
    for start in range(0, len(x) - BATCH + 1, BATCH):
        rows = order[start:start + BATCH]
        yield x[rows], y[rows]


def time_tutorial_loop(x, y, epochs: int) -> float:
    """The NNX tutorial's loop: `nnx.Optimizer`, an `@nnx.jit` step on the module, one call per batch."""
    model = NNXCNN(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, _optimizer(), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, images, labels):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(images), labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    times = [time.perf_counter()]
    for epoch in range(epochs):
        for images_, labels in _batches(x, y, epoch):
            loss = train_step(model, optimizer, images_, labels)
        float(loss)
        times.append(time.perf_counter())
    return steady_rate(times, len(x) // BATCH * BATCH)


def time_own_loop(x, y, epochs: int) -> float:
    """Your own loop with jaxdl's step on an NNX module's state, one call per batch."""
    state = create_train_state(NNXCNN(nnx.Rngs(0)), _optimizer())
    train_step = make_train_step(CE)
    times = [time.perf_counter()]
    for epoch in range(epochs):
        for images_, labels in _batches(x, y, epoch):
            state, sums = train_step(state, {"x": images_, "y": labels})
        float(sums["loss"])
        times.append(time.perf_counter())
    return steady_rate(times, len(x) // BATCH * BATCH)


def time_functional_loop(x, y, epochs: int) -> float:
    """A hand-written functional loop: `nnx.split` once, a pure jitted step that merges and splits again."""
    model = NNXCNN(nnx.Rngs(0))
    tx = _optimizer()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, rest, opt_state, images, labels):
        def loss_fn(params):
            module = nnx.merge(graphdef, params, rest, copy=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(module(images), labels).mean()
            return loss, nnx.state(module, nnx.Not(nnx.Param))

        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss

    times = [time.perf_counter()]
    for epoch in range(epochs):
        for images_, labels in _batches(x, y, epoch):
            params, rest, opt_state, loss = train_step(params, rest, opt_state, images_, labels)
        float(loss)
        times.append(time.perf_counter())
    return steady_rate(times, len(x) // BATCH * BATCH)


def measure(quick: bool) -> dict:
    """Images/s of the five loops, and the three ratios the NNX issue names."""
    examples, epochs = (QUICK_EXAMPLES, QUICK_EPOCHS) if quick else (EXAMPLES, EPOCHS)
    x, y, where = images(examples)
    fit_nnx, tutorial, fit_linen = "jaxdl `fit`, NNX module", "NNX tutorial's `nnx.jit` loop", \
        "jaxdl `fit`, Linen module"
    own, functional = "your loop with jaxdl's step, NNX state", "hand-written functional loop (`nnx.split` once)"
    figures = {fit_nnx: time_fit(NNXCNN(nnx.Rngs(0)), x, y, epochs),
               tutorial: time_tutorial_loop(x, y, epochs),
               fit_linen: time_fit(LinenCNN(), x, y, epochs),
               own: time_own_loop(x, y, epochs),
               functional: time_functional_loop(x, y, epochs)}
    return report.result(
        "Flax NNX: the NNX MNIST tutorial's CNN",
        f"Flax's NNX MNIST tutorial's CNN, AdamW 0.005, batch {BATCH}, {len(x):,} images, {epochs} epochs; images/s "
        "of the median epoch after the first, all five loops in one process; ratios > 1x mean the first is "
        "faster.", {name: report.figure(rate, "images/s") for name, rate in figures.items()},
        [report.ratio(fit_nnx, tutorial, readme=True), report.ratio(fit_nnx, fit_linen),
         report.ratio(own, functional)], [f"data: {where}"])


def main(argv=None):
    report.run_cli(measure, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
