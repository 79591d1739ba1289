"""What `fit` calls at the start, after each epoch and at the end of training: Keras-style callbacks.

A callback sees a `FitRun` (the current state, the history, the epoch and a
stop flag) and may replace its state or ask training to stop. `fit` imports
this module, never the reverse.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class FitRun:
    """What callbacks see and may change: the current state, the history, a stop flag.

    `model` is the Linen module being trained (None when `fit` was given only
    a state whose `apply_fn` is not a module's `apply`).
    """

    state: Any  # a jaxdl.train.TrainState
    history: dict[str, list]
    epoch: int = 0
    stop_training: bool = False
    model: Any = None


class Callback:
    """Hooks into `fit`. Override what you need; each hook may replace `run.state`."""

    def on_train_begin(self, run: FitRun) -> None:
        pass

    def on_epoch_end(self, run: FitRun, epoch: int, logs: dict[str, float]) -> None:
        pass

    def on_train_end(self, run: FitRun) -> None:
        pass


class EarlyStopping(Callback):
    """Stops when `monitor` has not improved by `min_delta` for `patience` epochs.

    With `restore_best_weights`, the run ends on the state of the best epoch,
    whether training stopped early or ran all its epochs, as Keras 3 does.
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 0, min_delta: float = 0.0,
                 mode: str = "auto", restore_best_weights: bool = False):
        if mode == "auto":
            mode = "max" if ("acc" in monitor or monitor.endswith("auc")) else "min"
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping mode must be 'min', 'max' or 'auto', got {mode!r}")
        self.monitor, self.patience, self.min_delta, self.mode = monitor, patience, abs(min_delta), mode
        self.restore_best_weights = restore_best_weights

    def on_train_begin(self, run):
        self.best, self.best_epoch, self.best_state, self.wait = None, None, None, 0
        self.stopped_epoch = None

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta

    def on_epoch_end(self, run, epoch, logs):
        if self.monitor not in logs:
            raise ValueError(f"EarlyStopping monitors {self.monitor!r}, but fit logs only {sorted(logs)}; "
                             "pass validation data to monitor a val_ metric")
        value = logs[self.monitor]
        if self._improved(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:  # the live state is donated to the next epoch: keep a copy
                self.best_state = jax.tree.map(jnp.copy, run.state)
            return
        self.wait += 1
        if self.wait >= self.patience:
            run.stop_training, self.stopped_epoch = True, epoch

    def on_train_end(self, run):
        if self.best_state is not None and self.best_epoch != run.epoch:
            run.state = self.best_state
