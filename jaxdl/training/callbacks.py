"""What `fit` calls as training goes: Keras-style callbacks, and the `History` it returns.

A callback sees a `FitRun` (the current state, the history, the epoch and a
stop flag) and may replace its state or ask training to stop. `fit` calls
Keras's hooks (`HOOKS`), each only where some callback defines it, and
refuses a callback defining an `on_*` method it would never call. `fit`
imports this module, never the reverse.
"""
from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdl.models import model_config, saving as checkpoint
from jaxdl.models.nnx_modules import is_nnx_module
from jaxdl.runtime import sharding


@dataclasses.dataclass
class FitRun:
    """What callbacks see and may change: the current state, the history, a stop flag.

    `model` is the Linen module being trained (None when `fit` was given only
    a state whose `apply_fn` is not a module's `apply`). `epochs` and `steps`
    are Keras's `params`: the epoch `fit` stops before and the batches of an
    epoch (None for an iterable without `steps_per_epoch`).
    """

    state: Any  # a jaxdl.training.steps.TrainState
    history: dict[str, list]
    epoch: int = 0
    stop_training: bool = False
    model: Any = None
    resumed_epoch: int | None = None  # the epoch a run restored from a checkpoint goes on from
    resumed_batches: int = 0  # the batches of that epoch already done
    verbose: int = 0  # fit's verbosity: 0 silent; callbacks print their messages when it is not
    epochs: int = 0
    steps: int | None = None


class Callback:
    """Hooks into `fit`, Keras's set (`HOOKS`). Override what you need; most hooks may replace `run.state`.

    `fit` calls `on_train_begin(run)`, then for each epoch
    `on_epoch_begin(run, epoch)`, `on_train_batch_begin(run, batch)` and
    `on_train_batch_end(run, batch, logs)` around each compiled call of
    steps, `on_test_begin(run)` and `on_test_end(run, logs)` around the
    validation, `on_epoch_end(run, epoch, logs)`; and `on_train_end(run)`.
    As Keras does with `steps_per_execution` > 1, a batch hook is called
    once per compiled call (`steps_per_execution` steps), with the epoch's
    index of its first step (`..._begin`) or its last (`..._end`); the logs
    of `on_train_batch_end` are the epoch's running means so far. Batch hooks
    are called only where a callback defines one: then the epoch runs
    `steps_per_execution` steps per call instead of in one compiled scan, and
    fetches the running means after each call. A batch hook may read
    `run.state` (the state after that call; copy what you keep, the next call
    consumes it) and set `run.stop_training`, which ends the epoch after
    that call; it may not replace `run.state`. `on_test_end`'s logs are the
    validation metrics without their `val_` prefix.
    """

    def on_train_begin(self, run: FitRun) -> None:
        pass

    def on_epoch_begin(self, run: FitRun, epoch: int) -> None:
        pass

    def on_train_batch_begin(self, run: FitRun, batch: int) -> None:
        pass

    def on_train_batch_end(self, run: FitRun, batch: int, logs: dict[str, float]) -> None:
        pass

    def on_test_begin(self, run: FitRun) -> None:
        pass

    def on_test_end(self, run: FitRun, logs: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, run: FitRun, epoch: int, logs: dict[str, float]) -> None:
        pass

    def on_train_end(self, run: FitRun) -> None:
        pass

    def settings(self) -> dict:
        """The arguments that decide what this callback does to a run and keeps of it (JSON-able).

        `fit` saves them with each checkpoint, beside the class, and refuses to
        resume with a callback list whose classes or settings differ (a saved
        `best` means nothing to a callback monitoring another metric). Where a
        callback only writes (a log file's path), leave it out: it may change.
        """
        return {}

    def checkpoint_state(self) -> tuple[dict, Any]:
        """`(JSON-able counters, a TrainState or None)` a resumed run needs to go on as if never stopped."""
        return {}, None

    def restore_checkpoint_state(self, values: dict, state) -> None:
        """Takes back what `checkpoint_state` gave; called after `on_train_begin` when `fit` resumes."""


HOOKS = ("on_train_begin", "on_epoch_begin", "on_train_batch_begin", "on_train_batch_end", "on_test_begin",
         "on_test_end", "on_epoch_end", "on_train_end")
BATCH_HOOKS = ("on_train_batch_begin", "on_train_batch_end")

# Keras's hooks that `fit` does not call, and what to do instead.
_NOT_CALLED = {
    "on_batch_begin": "Keras's older name of on_train_batch_begin: rename it",
    "on_batch_end": "Keras's older name of on_train_batch_end: rename it",
    "on_test_batch_begin": "validation runs as one compiled evaluation: use on_test_begin/on_test_end",
    "on_test_batch_end": "validation runs as one compiled evaluation: use on_test_begin/on_test_end",
    "on_predict_begin": "predict takes no callbacks",
    "on_predict_end": "predict takes no callbacks",
    "on_predict_batch_begin": "predict takes no callbacks",
    "on_predict_batch_end": "predict takes no callbacks",
}


def checked_callbacks(callbacks) -> tuple[Callback, ...]:
    """`fit`'s callbacks, each a `Callback` defining only hooks `fit` calls; checked before anything runs.

    Raises:
      TypeError: `callbacks` is not a list of `Callback` instances (one
        callback not in a list, Keras's own callbacks).
      ValueError: a callback defines an `on_*` method that is not one of
        `HOOKS`, which `fit` would never call; named with the hint for
        Keras's hooks that `fit` does not call.
    """
    if callbacks is None:
        return ()
    if isinstance(callbacks, Callback) or not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"callbacks must be a list of jaxdl Callbacks, got {type(callbacks).__name__}; "
                        "pass callbacks=[...]")
    for index, callback in enumerate(callbacks):
        if not isinstance(callback, Callback):
            raise TypeError(f"callbacks[{index}] is a {type(callback).__module__}.{type(callback).__qualname__}, "
                            "not a jaxdl.Callback: subclass jaxdl.Callback (its hooks take the run first: "
                            "on_epoch_end(self, run, epoch, logs))")
        unknown = sorted(name for name in dir(type(callback))
                         if name.startswith("on_") and name not in HOOKS and callable(getattr(callback, name)))
        if unknown:
            name = unknown[0]
            why = _NOT_CALLED.get(name, "not a hook fit calls")
            raise ValueError(f"callbacks[{index}] ({type(callback).__qualname__}) defines {name}, which fit never "
                             f"calls ({why}); fit calls {', '.join(HOOKS)}")
    return tuple(callbacks)


def defines(callbacks, hooks) -> bool:
    """Whether any of `callbacks` overrides one of `hooks` (names of `Callback`'s methods)."""
    return any(getattr(type(callback), hook) is not getattr(Callback, hook)
               for callback in callbacks for hook in hooks)


class History(dict):
    """What `fit` returns beside the state: a dict of per-epoch lists that also answers as Keras's `History`.

    `history["loss"]` as before; `history.history` is the same dict (Keras's
    `fit(...).history`), `history.epoch` the epoch numbers the lists hold
    (0-based, from `initial_epoch`), `history.params` Keras's
    `{"verbose", "epochs", "steps"}`. A pytree as a dict is (its keys sorted,
    its structure the keys only), so `jax.tree.map` goes into it as it went
    into the dict; what it builds is a `History` without `epoch` or `params`.
    """

    def __init__(self, logs: dict | None = None, epoch=(), params: dict | None = None):
        super().__init__(logs or {})
        self.epoch, self.params = list(epoch), dict(params or {})

    @property
    def history(self) -> dict[str, list]:
        """The per-epoch lists themselves (this dict), as Keras's `History.history`."""
        return self


jax.tree_util.register_pytree_with_keys(
    History, lambda history: ([(jax.tree_util.DictKey(key), history[key]) for key in sorted(history)],
                              tuple(sorted(history))),
    lambda keys, values: History(dict(zip(keys, values))),
    lambda history: ([history[key] for key in sorted(history)], tuple(sorted(history))))


def _direction(owner: str, monitor: str, mode: str) -> str:
    """'min' or 'max'. 'auto' maximises accuracies, AUCs, precisions and recalls and minimises everything else
    (losses, errors, your own metrics: give those a mode)."""
    if mode == "auto":
        mode = "max" if ("acc" in monitor or monitor.endswith(("auc", "precision", "recall"))) else "min"
    if mode not in ("min", "max"):
        raise ValueError(f"{owner} mode must be 'min', 'max' or 'auto', got {mode!r}")
    return mode


def _monitored(owner: str, monitor: str, logs: dict[str, float]) -> float:
    """The monitored value of this epoch, or an error naming what `fit` did log."""
    if monitor not in logs:
        hint = "; pass validation data to monitor a val_ metric" if monitor.startswith("val_") else ""
        raise ValueError(f"{owner} monitors {monitor!r}, but fit logs only {sorted(logs)}{hint}")
    return logs[monitor]


def _improves(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    """Keras's rule: better than `best` by more than `min_delta` (any value improves on no best yet)."""
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class EarlyStopping(Callback):
    """Stops when `monitor` has not improved by `min_delta` for `patience` epochs.

    With `restore_best_weights`, the run ends on the state of the best epoch,
    whether training stopped early or ran all its epochs, as Keras 3 does.
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 0, min_delta: float = 0.0,
                 mode: str = "auto", restore_best_weights: bool = False):
        self.monitor, self.patience, self.min_delta = monitor, patience, abs(min_delta)
        self.mode = _direction("EarlyStopping", monitor, mode)
        self.restore_best_weights = restore_best_weights

    def settings(self):
        return {"monitor": self.monitor, "patience": self.patience, "min_delta": self.min_delta,
                "mode": self.mode, "restore_best_weights": self.restore_best_weights}

    def on_train_begin(self, run):
        self.best, self.best_epoch, self.best_state, self.wait = None, None, None, 0
        self.stopped_epoch = None

    def _improved(self, value: float) -> bool:
        return _improves(value, self.best, self.mode, self.min_delta)

    def on_epoch_end(self, run, epoch, logs):
        value = _monitored("EarlyStopping", self.monitor, logs)
        if self._improved(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:  # the live state is donated to the next epoch: keep a copy
                self.best_state = sharding.copied(run.state)
            return
        self.wait += 1
        if self.wait >= self.patience:
            run.stop_training, self.stopped_epoch = True, epoch

    def on_train_end(self, run):
        if self.restore_best_weights and self.best_state is not None and self.best_epoch != run.epoch:
            run.state = self.best_state
            if run.verbose:  # as Keras says it
                print(f"Restoring model weights from the end of the best epoch: {self.best_epoch + 1}.", flush=True)

    def checkpoint_state(self):
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
                "stopped_epoch": self.stopped_epoch}, self.best_state

    def restore_checkpoint_state(self, values, state):
        self.best, self.best_epoch, self.wait = values["best"], values["best_epoch"], values["wait"]
        self.stopped_epoch = values["stopped_epoch"]
        self.best_state = state if self.restore_best_weights else None


class ModelCheckpoint(Callback):
    """Saves the model whenever `monitor` improves (or after every epoch), so the best epoch survives training.

    Each save is `checkpoint.save_model(directory, run.model, run.state.variables,
    overwrite=True)`, a directory that `load_model` reads back in any process,
    with metadata `{"epoch": epoch, monitor: value}`; `epoch` is fit's 0-based
    epoch index (the history's). save_model writes into a temporary sibling and
    renames it into place, so a save that fails while writing leaves the
    previous best untouched, and the bar for "best" rises only once a save
    has succeeded.

    Without `save_best_only` every epoch is saved, whether or not `monitor` was
    logged. `directory` may hold `str.format` fields, filled in at each save:
    `{epoch}` (1-based, as in Keras's file names) and any log key, e.g.
    `"ckpt/{epoch:02d}-{val_loss:.3f}"` keeps one directory per saved epoch.

    Differs from Keras: it saves a jaxdl model directory rather than a `.keras`
    file, so `directory` takes no extension and there is no `save_weights_only`
    or `save_freq` (epochs only); `save_best_only` defaults to True; and
    `mode="auto"` maximises accuracies and AUCs and minimises the rest, as
    EarlyStopping does. As in Keras, the best value is kept across `fit` calls
    with the same callback, so continuing training never overwrites a better
    model saved earlier.
    """

    def __init__(self, directory: str | os.PathLike, monitor: str = "val_loss", mode: str = "auto",
                 save_best_only: bool = True):
        self.directory, self.monitor, self.save_best_only = os.fspath(directory), monitor, save_best_only
        self.mode = _direction("ModelCheckpoint", monitor, mode)
        self.best = None
        self.last_saved: Path | None = None

    def settings(self):  # not the directory: where the model is written may change between runs
        return {"monitor": self.monitor, "mode": self.mode, "save_best_only": self.save_best_only}

    def on_train_begin(self, run):
        if run.model is None:
            raise ValueError("ModelCheckpoint saves the model by its config, but this fit has no Linen module: "
                             "the state's apply_fn is not a module's apply (a state built by new_train_state from "
                             "a plain function). Pass the model to fit, or build the state with create_train_state")
        if not is_nnx_module(run.model):  # an NNX module saves its state; a Linen one needs a config
            model_config(run.model)  # the TypeError save_model would raise for a class it cannot save

    def on_epoch_end(self, run, epoch, logs):
        value = logs.get(self.monitor)
        if self.save_best_only:
            value = _monitored("ModelCheckpoint", self.monitor, logs)
            if not _improves(value, self.best, self.mode, 0.0):
                return
        try:
            directory = self.directory.format(epoch=epoch + 1, **logs)
        except (KeyError, IndexError) as error:
            raise ValueError(f"ModelCheckpoint cannot fill in {self.directory!r}: no field {error}; it may use "
                             f"{{epoch}} and the log keys {sorted(logs)}") from None
        metadata = {"epoch": int(epoch)} | ({self.monitor: float(value)} if value is not None else {})
        self.last_saved = checkpoint.save_model(directory, run.model, run.state.variables, metadata=metadata,
                                                overwrite=True)
        if self.save_best_only:  # only once saved: a failed save must not raise the bar for the next epoch
            self.best = value

    def checkpoint_state(self):
        return {"best": self.best}, None

    def restore_checkpoint_state(self, values, state):
        self.best = values["best"]


class CSVLogger(Callback):
    """Writes one CSV row per epoch to `path`: the epoch (0-based, as Keras numbers it) and every log.

    The columns are `epoch` and the first epoch's log keys in sorted order, as
    in Keras; a key missing from a later epoch is written as `NA`. Values are
    Python's `repr` of each float, so they read back exactly. With `append`,
    rows go after an existing file's, and the header is written only when the
    file is new or empty (continuing training). Each row is flushed.

    Differs from Keras: without validation data Keras still adds `val_`
    columns filled with `NA`; here the columns are only what `fit` logs.
    """

    def __init__(self, path: str | os.PathLike, separator: str = ",", append: bool = False):
        self.path, self.separator, self.append = Path(path), separator, append
        self._file, self._writer, self._keys = None, None, None

    def on_train_begin(self, run):
        self._close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        resumed_epoch = getattr(run, "resumed_epoch", None)
        append = self.append or resumed_epoch is not None
        if resumed_epoch is not None and self.path.exists():  # rows of epochs the run will redo go
            with open(self.path, newline="") as file:
                rows = list(csv.reader(file, delimiter=self.separator))
            kept = rows[:1] + [row for row in rows[1:] if row and int(row[0]) < resumed_epoch]
            with open(self.path, "w", newline="") as file:
                csv.writer(file, delimiter=self.separator).writerows(kept)
        write_header = not (append and self.path.exists() and self.path.stat().st_size > 0)
        self._file = open(self.path, "a" if append else "w", newline="")
        self._write_header, self._writer, self._keys = write_header, None, None

    def on_epoch_end(self, run, epoch, logs):
        if self._writer is None:
            self._keys = sorted(logs)
            self._writer = csv.writer(self._file, delimiter=self.separator)
            if self._write_header:
                self._writer.writerow(["epoch", *self._keys])
        self._writer.writerow([epoch, *(repr(float(logs[k])) if k in logs else "NA" for k in self._keys)])
        self._file.flush()

    def on_train_end(self, run):
        self._close()

    def _close(self):
        if self._file is not None and not self._file.closed:
            self._file.close()
        self._file = None


class TensorBoard(Callback):
    """Writes every epoch's logs as TensorBoard scalars, laid out as Keras 3 does, with tensorboardX (no TensorFlow).

    Training logs (loss, metrics, `learning_rate`) go to the run `log_dir/train`
    and validation logs to `log_dir/validation`, each tagged `epoch_` plus the
    name without its `val_` prefix, at step `epoch` (0-based), so `val_loss`
    and `loss` are the two curves of one `epoch_loss` chart. Writers are
    opened at the first epoch (no empty runs), flushed after every epoch so
    TensorBoard shows a live run, and closed when training ends.

    Differs from Keras: epoch scalars only, no model graph, weight histograms,
    images, embeddings, per-batch scalars nor profiling.
    """

    def __init__(self, log_dir: str | os.PathLike = "logs"):
        self.log_dir = os.fspath(log_dir)
        self._writers: dict[str, Any] = {}

    def _writer(self, run_name: str):
        if run_name not in self._writers:
            from tensorboardX import SummaryWriter  # imported when used: it imports torch when that is installed

            self._writers[run_name] = SummaryWriter(os.path.join(self.log_dir, run_name))
        return self._writers[run_name]

    def on_train_begin(self, run):
        self._close()

    def on_epoch_end(self, run, epoch, logs):
        for name, value in logs.items():
            run_name, name = ("validation", name.removeprefix("val_")) if name.startswith("val_") else ("train", name)
            self._writer(run_name).add_scalar(f"epoch_{name}", float(value), global_step=epoch)
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, run):
        self._close()

    def _close(self):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


_INJECTED = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def _is_injected(node) -> bool:
    return isinstance(node, _INJECTED)


def injected_learning_rates(opt_state) -> list:
    """The `optax.inject_hyperparams` states holding a `learning_rate`, anywhere in `opt_state` (chains nest them)."""
    return [node for node in jax.tree.leaves(opt_state, is_leaf=_is_injected)
            if _is_injected(node) and "learning_rate" in node.hyperparams]


class ReduceLROnPlateau(Callback):
    """Multiplies the learning rate by `factor` after `patience` epochs without improvement of `monitor`.

    The rate must live in the optimizer state, as `optax.inject_hyperparams`
    puts it: there it is an input of the compiled epoch, not a constant of
    the program, so changing it between epochs recompiles nothing. Every
    injected `learning_rate` in `run.state.opt_state` (chains and masks nest
    them) is reduced, keeping its dtype. As in Keras: an improvement means
    better than the best by more than `min_delta`; after a reduction `wait`
    restarts, and epochs without improvement count again from the `cooldown`-th
    epoch after it (Keras's count: `cooldown=2` leaves one epoch uncounted,
    `cooldown=1` none); the rate never goes below `min_lr`, and once there it
    is left alone. The history's `learning_rate` of an epoch is the rate that
    epoch trained with; a reduction shows from the next epoch on.

    Differs from Keras: a monitor missing from the logs is an error (as for
    EarlyStopping) rather than a warning, and `mode="auto"` maximises
    accuracies and AUCs and minimises the rest.
    """

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10, mode: str = "auto",
                 min_delta: float = 1e-4, cooldown: int = 0, min_lr: float = 0.0):
        if factor >= 1.0:
            raise ValueError(f"ReduceLROnPlateau does not support a factor >= 1.0, got factor={factor}")
        self.monitor, self.factor, self.patience = monitor, factor, patience
        self.mode = _direction("ReduceLROnPlateau", monitor, mode)
        self.min_delta, self.cooldown, self.min_lr = abs(min_delta), cooldown, min_lr
        self.best, self.wait, self.cooldown_counter = None, 0, 0

    def settings(self):
        return {"monitor": self.monitor, "factor": self.factor, "patience": self.patience, "mode": self.mode,
                "min_delta": self.min_delta, "cooldown": self.cooldown, "min_lr": self.min_lr}

    def on_train_begin(self, run):
        injected = injected_learning_rates(run.state.opt_state)
        if not injected:
            raise ValueError("ReduceLROnPlateau changes the learning rate held in the optimizer state, but this "
                             "optimizer has none: build it with optax.inject_hyperparams, e.g. "
                             "optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)")
        if any("learning_rate" in getattr(node, "hyperparams_states", {}) for node in injected):
            raise ValueError("ReduceLROnPlateau needs a constant learning rate, but this optimizer's is a schedule, "
                             "which recomputes it every step; pass a number to optax.inject_hyperparams")
        self.best, self.wait, self.cooldown_counter = None, 0, 0

    def on_epoch_end(self, run, epoch, logs):
        value = _monitored("ReduceLROnPlateau", self.monitor, logs)
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if _improves(value, self.best, self.mode, self.min_delta):
            self.best, self.wait = value, 0
        elif self.cooldown_counter <= 0:
            self.wait += 1
            if self.wait >= self.patience:
                opt_state, reduced = self._reduced(run.state.opt_state)
                if reduced:
                    run.state = run.state.replace(opt_state=opt_state)
                    self.cooldown_counter, self.wait = self.cooldown, 0

    def checkpoint_state(self):  # the reduced rate itself lives in the optimizer state, which is saved
        return {"best": self.best, "wait": self.wait, "cooldown_counter": self.cooldown_counter}, None

    def restore_checkpoint_state(self, values, state):
        self.best, self.wait, self.cooldown_counter = values["best"], values["wait"], values["cooldown_counter"]

    def _reduced(self, opt_state):
        """`(opt_state with every injected rate above min_lr multiplied by factor, whether any was)`."""
        reduced = False

        def reduce(node):
            nonlocal reduced
            if not (_is_injected(node) and "learning_rate" in node.hyperparams):
                return node
            old = node.hyperparams["learning_rate"]
            old_value, dtype = float(old), jnp.asarray(old).dtype
            if not old_value > float(np.asarray(self.min_lr, dtype)):  # compared in the rate's own precision
                return node
            reduced = True
            new = jnp.asarray(max(old_value * self.factor, self.min_lr), dtype)
            return node._replace(hyperparams={**node.hyperparams, "learning_rate": new})

        return jax.tree.map(reduce, opt_state, is_leaf=_is_injected), reduced
