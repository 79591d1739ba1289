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
runs 3 epochs (the MLP from arrays and from the cache 10, its epochs being
short); the first (which compiles) is excluded and the median of the
others is reported. Goals: the source delivers at least 5x the examples/s
the step consumes, and `fit` from the source reaches at least 0.8x the
in-memory throughput. `--quick`: 1,280 examples, 2 epochs.
Run: `python -m benchmarks.input_pipeline [--quick] [--json PATH] [--examples N]`.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import report
from benchmarks.train_small import EpochTimer, steady
from experiments.mnist import CNN_MODEL, MLP_MODEL
from jaxdl import data, fit

BATCH, EPOCHS = 128, 3
# The MLP's epochs from arrays and from the cache take about 40 ms: with 3 epochs the median of 2, one
# hiccup of the machine decided it (0.0369 and 0.081 s/epoch in the two repeats of one run). 10 epochs
# cost under a second more and give the median of 9.
MLP_EPOCHS = 10
EXAMPLES, QUICK_EXAMPLES, QUICK_EPOCHS = 10_000, 1_280, 2


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


def fit_seconds_per_epoch(x, y=None, epochs: int = EPOCHS, model=CNN_MODEL, **options) -> float:
    timer = EpochTimer()
    fit(model, x, y, loss="sparse_categorical_crossentropy", epochs=epochs, batch_size=BATCH,
        callbacks=[timer], verbose=0, **options)
    return steady(timer.times)


def measure(quick: bool, examples: int | None = None) -> dict:
    """Examples/s of the batch iterators alone, and `fit`'s seconds per epoch from a source and from arrays."""
    examples = examples or (QUICK_EXAMPLES if quick else EXAMPLES)
    epochs = QUICK_EPOCHS if quick else EPOCHS
    images, labels = mnist_like(examples)
    with tempfile.TemporaryDirectory() as root:
        started = time.perf_counter()
        data.write_image_dataset(root, "mnist", {"train": (images, labels)}, num_classes=10, version="3.0.1")
        written = time.perf_counter() - started
        source = data.tfds_source("mnist", "train", data_dir=root)

        from_source = delivered_per_second(data.SourceBatches(source, BATCH, data.Features(), seed=0).epoch(0))
        order = np.random.default_rng(0).permutation(len(images))
        from_arrays = delivered_per_second(data.arrays.ordered_batches({"x": images, "y": labels}, order, BATCH))

        arrays_epoch = fit_seconds_per_epoch(images, labels, epochs)
        source_epoch = fit_seconds_per_epoch(source, epochs=epochs)
        source_epoch_k4 = fit_seconds_per_epoch(source, epochs=epochs, steps_per_execution=4)
        # A fast model, whose step no longer hides the decoding: the source decoded every epoch, and cached.
        mlp_epochs = epochs if quick else MLP_EPOCHS
        mlp_arrays_epoch = fit_seconds_per_epoch(images, labels, mlp_epochs, model=MLP_MODEL)
        mlp_source_epoch = fit_seconds_per_epoch(source, epochs=epochs, model=MLP_MODEL, cache=False)
        mlp_cached_epoch = fit_seconds_per_epoch(source, epochs=mlp_epochs, model=MLP_MODEL, cache="auto")

    consumed = "the train step consumes (`fit` on arrays)"
    figures = {"tfds ArrayRecord source (grain) alone": report.figure(from_source, "examples/s"),
               "in-memory host batches alone": report.figure(from_arrays, "examples/s"),
               consumed: report.figure(len(images) / arrays_epoch, "examples/s"),
               "`fit` from in-memory arrays": report.figure(arrays_epoch, "s/epoch"),
               "`fit` from the tfds source, 1 step per dispatch": report.figure(source_epoch, "s/epoch"),
               "`fit` from the tfds source, 4 steps per dispatch": report.figure(source_epoch_k4, "s/epoch"),
               "MLP: `fit` from in-memory arrays": report.figure(mlp_arrays_epoch, "s/epoch"),
               "MLP: `fit` from the tfds source, decoded every epoch (cache=False)":
                   report.figure(mlp_source_epoch, "s/epoch"),
               "MLP: `fit` from the tfds source, cached (cache='auto')": report.figure(mlp_cached_epoch, "s/epoch")}
    ratios = [report.ratio("tfds ArrayRecord source (grain) alone", consumed),
              report.ratio("in-memory host batches alone", consumed),
              report.ratio("`fit` from in-memory arrays", "`fit` from the tfds source, 1 step per dispatch",
                           readme=True),
              report.ratio("`fit` from in-memory arrays", "`fit` from the tfds source, 4 steps per dispatch"),
              report.ratio("MLP: `fit` from in-memory arrays",
                           "MLP: `fit` from the tfds source, decoded every epoch (cache=False)"),
              report.ratio("MLP: `fit` from in-memory arrays",
                           "MLP: `fit` from the tfds source, cached (cache='auto')", readme=True)]
    return report.result(
        "Input pipeline", f"The MNIST CNN (and the MLP, whose fast step shows the decoding) on CPU, batch {BATCH}, "
        f"{len(images):,} MNIST-shaped examples written as a "
        f"tfds ArrayRecord directory of PNGs (in {written:.1f} s), grain read threads {data.sources.READ_THREADS}; "
        f"`fit` runs {epochs} epochs, median of epochs 2-{epochs} (the MLP from arrays and from the cache "
        f"{mlp_epochs}: its epochs are short). Goals: the source delivers >= 5x what the step "
        "consumes; `fit` from the source reaches >= 0.8x the in-memory throughput (the arrays' s/epoch over the "
        "source's).", figures, ratios)


def print_table(measured: dict) -> None:
    figures = measured["figures"]
    print(measured["about"])
    print()
    print("| figure | value | unit |")
    print("|---|---|---|")
    for label, fig in figures.items():
        print(f"| {label} | {fig['value']:,.2f} | {fig['unit']} |")
    for pair in measured["ratios"]:
        ratio = figures[pair['ours']]['value'] / figures[pair['peer']]['value']
        print(f"{pair['ours']} / {pair['peer']}: {ratio:.2f}x")


def main(argv=None):
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--examples", type=int, help=f"training examples (default {EXAMPLES:,}; MNIST has 60,000)")
    cli.add_argument("--quick", action="store_true")
    cli.add_argument("--json", type=Path)
    args = cli.parse_args(argv)
    measured = measure(args.quick, args.examples)
    if args.json:
        args.json.write_text(json.dumps(measured, indent=1))
    else:
        print_table(measured)


if __name__ == "__main__":
    main()
