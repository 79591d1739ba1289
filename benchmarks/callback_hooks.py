"""ms per epoch of `fit` by the hooks it calls: the scanned epoch stays unless a callback has a batch hook.

The "learning to round" network of `benchmarks/train_small.py` (10,000
examples, batch 32, 20 epochs; `--quick`: 2,000 examples, 4 epochs), its
epochs timed by a callback's `on_epoch_end`, in four runs of one process:

- epoch hooks only (the timer): the epoch is one compiled `lax.scan`, the
  figure to compare with `train_small`'s jaxdl `fit` (the same run);
- the same with `verbose=1` drawing its per-epoch bar into a pseudo-terminal
  (the bar moves between compiled calls only: once a scanned epoch);
- a callback defining `on_train_batch_end`, `steps_per_execution=1`: the
  epoch streams one step per compiled call, the running means fetched after
  each for the hook, as Keras calls batch hooks;
- the same with `steps_per_execution=32`: one hook call per 32 steps.

The first epoch (which compiles) is excluded and the median of the others is
taken. Run: `python -m benchmarks.callback_hooks [--quick] [--json PATH]`.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import threading
import time

import numpy as np
import optax

from benchmarks import report
from experiments.basics import model, rounding_data
from jaxdl import Callback, fit

EPOCHS, BATCH = 20, 32
QUICK_EPOCHS, QUICK_EXAMPLES = 4, 2_000
HOOK_FREE = "epoch hooks only (one scan an epoch)"
ON_A_TERMINAL = "epoch hooks, verbose=1 bar on a terminal"


class EpochTimer(Callback):
    def on_train_begin(self, run):
        self.times = [time.perf_counter()]

    def on_epoch_end(self, run, epoch, logs):
        self.times.append(time.perf_counter())


class BatchHook(EpochTimer):
    def on_train_batch_end(self, run, batch, logs):
        self.last_loss = logs["loss"]  # what a logging hook reads


@contextlib.contextmanager
def on_a_terminal():
    """stdout and stderr go to a pseudo-terminal, drained by a thread (its buffer would otherwise fill)."""
    reader, writer = os.openpty()
    stream = os.fdopen(writer, "w", buffering=1)

    def drain():
        with contextlib.suppress(OSError):
            while os.read(reader, 65536):
                pass

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = stream
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
        stream.close()
        thread.join(timeout=5)
        os.close(reader)


def ms_per_epoch(x, y, epochs: int, timer: EpochTimer, **options) -> float:
    fit(model(), x, y, loss="sparse_categorical_crossentropy", optimizer=optax.adam(1e-3), epochs=epochs,
        batch_size=BATCH, callbacks=[timer], **options)
    return statistics.median(np.diff(timer.times)[1:]) * 1e3


def measure(quick: bool) -> dict:
    """ms per epoch of each run, and each against the hook-free scanned epoch."""
    x, y = rounding_data()
    epochs = QUICK_EPOCHS if quick else EPOCHS
    if quick:
        x, y = x[:QUICK_EXAMPLES], y[:QUICK_EXAMPLES]
    figures = {HOOK_FREE: report.figure(ms_per_epoch(x, y, epochs, EpochTimer(), verbose=0), "ms/epoch")}
    with on_a_terminal():
        figures[ON_A_TERMINAL] = report.figure(ms_per_epoch(x, y, epochs, EpochTimer(), verbose=1), "ms/epoch")
    ratios = [report.ratio(ON_A_TERMINAL, HOOK_FREE)]
    for per_call in (1, 32):
        name = f"on_train_batch_end, steps_per_execution={per_call}"
        figures[name] = report.figure(ms_per_epoch(x, y, epochs, BatchHook(), verbose=0,
                                                   steps_per_execution=per_call), "ms/epoch")
        ratios.append(report.ratio(name, HOOK_FREE))
    return report.result(
        "Callback hooks and the progress bar",
        f"The `basics` \"learning to round\" network, {len(x):,} examples, batch {BATCH}, {epochs} epochs; ms per "
        f"epoch, median of epochs 2-{epochs}, one run each in one process. The hook-free figure is "
        "`train_small`'s jaxdl `fit` run: compare it across versions to see that hooks cost it nothing.",
        figures, ratios)


def main(argv=None):
    report.run_cli(measure, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
