"""The input pipeline against the step it feeds: the MNIST CNN on CPU, batch 128, in one process.

1. Examples per second the batch iterator delivers alone (no training):
   from a tfds ArrayRecord source (grain, `jaxdl.data.SourceBatches`) and
   from in-memory arrays (host batches in a shuffled order).
2. `fit` seconds per epoch from the source (1 and 4 steps per dispatch)
   against `fit` from the same examples as in-memory arrays.

The data is MNIST-shaped and written here as a real tfds ArrayRecord
directory (28x28x1 PNGs, 10 classes) by `jaxdl.data.write_image_dataset`:
MNIST itself cannot be downloaded on the machines this runs on, and the
pipeline's cost does not depend on what the digits look like. Each `fit`
runs 3 epochs; the first (which compiles) is excluded and the median of the
others is reported. Goals: the source delivers at least 5x the examples/s
the step consumes, and `fit` from the source reaches at least 0.8x the
in-memory throughput. Run: `python -m benchmarks.input_pipeline`.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np

from experiments.common import machine
from experiments.mnist import CNN_MODEL
from benchmarks.train_small import EpochTimer, steady
from jaxdl import data, fit

BATCH, EPOCHS = 128, 3


def mnist_like(examples: int, seed: int = 0):
    """uint8 digits-like images whose class shows in their brightness, and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, examples)
    images = (rng.integers(0, 60, (examples, 28, 28, 1)) + 19 * labels[:, None, None, None]).astype(np.uint8)
    return images, labels.astype(np.int32)


def delivered_per_second(batches) -> float:
    started, count = time.perf_counter(), 0
    for batch in batches:
        count += len(batch["y"])
    return count / (time.perf_counter() - started)


def fit_seconds_per_epoch(x, y=None, **options) -> float:
    timer = EpochTimer()
    fit(CNN_MODEL, x, y, loss="sparse_categorical_crossentropy", epochs=EPOCHS, batch_size=BATCH,
        callbacks=[timer], verbose=0, **options)
    return steady(timer.times)


def main(argv=None):
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--examples", type=int, default=20_000, help="training examples (MNIST has 60,000)")
    args = cli.parse_args(argv)
    images, labels = mnist_like(args.examples)
    with tempfile.TemporaryDirectory() as root:
        started = time.perf_counter()
        data.write_image_dataset(root, "mnist", {"train": (images, labels)}, num_classes=10, version="3.0.1")
        written = time.perf_counter() - started
        source = data.tfds_source("mnist", "train", data_dir=root)

        from_source = delivered_per_second(data.SourceBatches(source, BATCH, data.Features(), seed=0).epoch(0))
        order = np.random.default_rng(0).permutation(len(images))
        from_arrays = delivered_per_second(data.ordered_batches({"x": images, "y": labels}, order, BATCH))

        arrays_epoch = fit_seconds_per_epoch(images, labels)
        source_epoch = fit_seconds_per_epoch(source)
        source_epoch_k4 = fit_seconds_per_epoch(source, steps_per_dispatch=4)

    consumed = len(images) / arrays_epoch
    print(f"measured on {machine()}; {len(images):,} MNIST-shaped examples (tfds ArrayRecord written in "
          f"{written:.1f} s), batch {BATCH}, {EPOCHS} epochs, median of epochs 2-{EPOCHS}, "
          f"grain read threads {data.sources.READ_THREADS}")
    print()
    print("| batches alone | examples/s | vs what the step consumes |")
    print("|---|---|---|")
    print(f"| tfds ArrayRecord source (grain) | {from_source:,.0f} | {from_source / consumed:.1f}x |")
    print(f"| in-memory arrays | {from_arrays:,.0f} | {from_arrays / consumed:.1f}x |")
    print(f"| the train step consumes (fit on arrays) | {consumed:,.0f} | 1.0x |")
    print()
    print("| `fit` of the MNIST CNN | s per epoch | examples/s | vs in-memory |")
    print("|---|---|---|---|")
    for name, seconds in (("in-memory arrays", arrays_epoch), ("tfds source, 1 step per dispatch", source_epoch),
                          ("tfds source, 4 steps per dispatch", source_epoch_k4)):
        print(f"| {name} | {seconds:.2f} | {len(images) / seconds:,.0f} | {arrays_epoch / seconds:.2f}x |")
    print(f"\njax {jax.__version__}: source delivers {from_source / consumed:.1f}x what the step consumes "
          f"(goal >= 5x); fit from the source runs at {arrays_epoch / source_epoch:.2f}x the in-memory "
          f"throughput (goal >= 0.8x)")


if __name__ == "__main__":
    main()
