"""Keras-style callbacks beyond EarlyStopping: ModelCheckpoint, CSVLogger, TensorBoard, ReduceLROnPlateau; Keras's
hook set and when fit calls each hook."""
import contextlib
import csv
import os
import types
import warnings
from typing import Callable

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from jaxdl import MLP, Callback, EarlyStopping, create_train_state, fit, load_model, predict
from jaxdl.models import saving as checkpoint
from jaxdl.runtime.sharding import data_mesh
from jaxdl.training.callbacks import (
    CSVLogger,
    FitRun,
    ModelCheckpoint,
    ReduceLROnPlateau,
    TensorBoard,
    injected_learning_rates,
)
from jaxdl.training.epoch_loop import ScannedEpochs, StreamedEpochs
from jaxdl.training.steps import compiled_epoch, new_train_state, seed_rngs
from tests.support import tolerance
from tests.support.toy_data import CE, blobs


def sgd(learning_rate):
    return optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate)


def rate_of(state) -> float:
    (node,) = injected_learning_rates(state.opt_state)
    return float(node.hyperparams["learning_rate"])


# --- EarlyStopping --------------------------------------------------------------------------------


class KerasModel:
    """What Keras's EarlyStopping and ModelCheckpoint touch of a model; its weights are the epoch they are from."""

    def __init__(self):
        self.epoch, self.stop_training, self.saved = None, False, []

    def get_weights(self):
        return [np.asarray(self.epoch)]

    def set_weights(self, weights):
        self.epoch = int(weights[0])

    def save(self, filepath, overwrite=True):
        self.saved.append((self.epoch, filepath))


# Monitored values with ties, a gain smaller than 0.05, a long plateau, and the best before the last epoch.
MONITORED = {"val_loss": [1.0, 0.8, 0.8, 0.9, 0.77, 0.7, 0.72, 0.74, 0.73, 0.71, 0.75, 0.76],
             "val_accuracy": [0.5, 0.6, 0.6, 0.55, 0.63, 0.7, 0.7, 0.68, 0.69, 0.7, 0.66, 0.6]}


def test_early_stopping_stops_and_restores_as_keras_does():
    """Keras 3's EarlyStopping and ours, given the same monitored values: the same stop epoch, best epoch and
    restored weights, for patience 0, 1, 3 and one longer than the run (all epochs run, the best not the last:
    Keras restores the best weights then too), with and without min_delta, minimising and maximising.

    Seen failing on three broken variants: patience=0 read as "never stop" (`if self.patience and ...`), a
    patience counted one epoch late (`wait > patience`), and best weights restored only after an early stop.
    """
    import keras

    cases = 0
    for monitor, values in MONITORED.items():
        for patience in (0, 1, 3, 20):
            for min_delta in (0.0, 0.05):
                theirs = keras.callbacks.EarlyStopping(monitor, patience=patience, min_delta=min_delta,
                                                       mode="min" if monitor == "val_loss" else "max",
                                                       restore_best_weights=True)
                model = KerasModel()
                theirs.set_model(model)
                ours = EarlyStopping(monitor, patience=patience, min_delta=min_delta, restore_best_weights=True)
                run = FitRun(state={"epoch": np.asarray(-1)}, history={})
                theirs.on_train_begin()
                ours.on_train_begin(run)
                case = f"{monitor}, patience={patience}, min_delta={min_delta}"
                for epoch, value in enumerate(values):  # as fit's loop: train, call back, stop if asked
                    model.epoch, run.epoch, run.state = epoch, epoch, {"epoch": np.asarray(epoch)}
                    theirs.on_epoch_end(epoch, {"loss": 0.5, monitor: value})
                    ours.on_epoch_end(run, epoch, {"loss": 0.5, monitor: value})
                    assert run.stop_training == model.stop_training, f"{case}, epoch {epoch}"
                    if run.stop_training:
                        break
                theirs.on_train_end()
                ours.on_train_end(run)
                assert (ours.best_epoch, ours.stopped_epoch or 0) == (theirs.best_epoch, theirs.stopped_epoch), case
                assert int(run.state["epoch"]) == model.epoch == theirs.best_epoch, case
                if patience == 0:  # stops at the first epoch that does not improve on the best by min_delta
                    assert ours.stopped_epoch is not None and ours.stopped_epoch <= 2, case
                if patience == 20:  # ran all its epochs, the best before the last
                    assert ours.stopped_epoch is None and ours.best_epoch < len(values) - 1, case
                cases += 1
    assert cases == 16


def test_early_stopping_with_patience_0_and_best_weights_after_all_epochs_in_fit():
    """In `fit`: patience=0 stops at the first epoch whose val_loss is no better than the best before it
    (read off the history), and a run that ran all its epochs ends on the best epoch's parameters (recorded by a
    callback of our own), not the last's.

    Seen failing on two broken variants: patience=0 read as "never stop" (all 30 epochs ran), and best weights
    restored only after an early stop (the last epoch's parameters returned).
    """
    x, y = blobs(40, seed=2)
    x_val, y_val = blobs(20, seed=3)

    class Recorder(Callback):
        def on_train_begin(self, run):
            self.params = []

        def on_epoch_end(self, run, epoch, logs):
            self.params.append(jax.tree.map(np.asarray, run.state.params))

    def train(stop, epochs):
        recorder = Recorder()
        state, history = fit(MLP(features=(16,), num_outputs=3), x, y, loss=CE, epochs=epochs, batch_size=8,
                             optimizer=optax.adam(0.1), validation_data=(x_val, y_val), callbacks=[recorder, stop],
                             verbose=False)
        return state, history, recorder.params

    state, history, params = train(EarlyStopping("val_loss", patience=0), epochs=30)
    losses = history["val_loss"]
    first_worse = next(i for i in range(1, len(losses)) if losses[i] >= min(losses[:i]))
    assert len(losses) == first_worse + 1 < 30
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params[-1])))

    # The training loss maximised: its best (epoch 0, before training has lowered it) is not the last epoch,
    # and patience 10 never runs out in 4 epochs.
    state, history, params = train(EarlyStopping("loss", mode="max", patience=10, restore_best_weights=True), 4)
    best = int(np.argmax(history["loss"]))
    assert len(history["loss"]) == 4 and best < 3
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params[best])))
    assert not np.array_equal(params[best]["logits"]["kernel"], params[-1]["logits"]["kernel"])


# --- ModelCheckpoint ------------------------------------------------------------------------------


def overfitting_run(callbacks, epochs=200):
    """Stops two epochs after the best val_loss, restoring the best state: the best epoch is never the last."""
    x, y = blobs(80, seed=2)
    x_val, y_val = blobs(40, seed=3)
    stop = EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    state, history = fit(MLP(features=(32,), num_outputs=3), x, y, loss=CE, epochs=epochs, batch_size=8,
                         optimizer=optax.adam(0.05), validation_data=(x_val, y_val),
                         callbacks=[*callbacks, stop], verbose=False)
    return state, history, stop, x_val


def test_model_checkpoint_keeps_the_best_epoch(tmp_path):
    save = ModelCheckpoint(tmp_path / "best")  # monitors val_loss, saves the best only
    best_state, history, stop, x_val = overfitting_run([save])
    best = int(np.argmin(history["val_loss"]))
    assert stop.best_epoch == best < len(history["val_loss"]) - 1
    model, variables, metadata = load_model(tmp_path / "best")
    assert model == MLP(features=(32,), num_outputs=3) and metadata["epoch"] == best
    tolerance.assert_close(metadata["val_loss"], history["val_loss"][best], tolerance.ONE_OP)
    tolerance.assert_close(predict(model, x_val, variables=variables), predict(best_state, x_val), tolerance.ONE_OP)
    assert save.last_saved == (tmp_path / "best").absolute()


def test_model_checkpoint_every_epoch_formats_the_directory(tmp_path):
    x, y = blobs(24)
    save = ModelCheckpoint(tmp_path / "epoch{epoch:02d}-loss{loss:.2f}", monitor="val_loss", save_best_only=False)
    _, history = fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, epochs=2, batch_size=8, callbacks=[save],
                     verbose=False)
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == [f"epoch{i + 1:02d}-loss{history['loss'][i]:.2f}" for i in range(2)]  # {epoch} 1-based, as Keras
    assert [load_model(tmp_path / name)[2] for name in names] == [{"epoch": 0}, {"epoch": 1}]  # no val_loss logged


def test_model_checkpoint_saves_the_epochs_and_names_keras_saves(tmp_path, monkeypatch):
    """Keras 3's ModelCheckpoint and ours, given the same logs: the same epochs saved under the same formatted
    names (ours without Keras's `.keras`), for the best val_loss (ties, a NaN), the best val_accuracy, and
    every epoch. Saving itself is recorded, not done, on both sides: which epoch and where is compared.

    Seen failing on two broken variants: one that saves a tie with the best (Keras saves strict improvements),
    and one that fills `{epoch}` 0-based (Keras's names count from 1).
    """
    import keras

    ours_saved = []
    monkeypatch.setattr(checkpoint, "save_model", lambda directory, model, variables, metadata, overwrite:
                        ours_saved.append((metadata["epoch"], os.path.basename(directory))))
    val_loss = MONITORED["val_loss"][:6] + [float("nan")] + MONITORED["val_loss"][6:]
    logs = [{"loss": 1.0 / (epoch + 1), "val_loss": value, "val_accuracy": accuracy}
            for epoch, (value, accuracy) in enumerate(zip(val_loss, MONITORED["val_accuracy"] + [0.75]))]
    name = "{epoch:02d}-{val_loss:.3f}"
    for monitor, mode, best_only in (("val_loss", "min", True), ("val_accuracy", "max", True),
                                     ("val_loss", "min", False)):
        theirs = keras.callbacks.ModelCheckpoint(str(tmp_path / f"{name}.keras"), monitor=monitor, mode=mode,
                                                 save_best_only=best_only)
        model = KerasModel()
        theirs.set_model(model)
        ours = ModelCheckpoint(tmp_path / name, monitor=monitor, save_best_only=best_only)  # mode "auto"
        run, ours_saved[:] = FitRun(state=types.SimpleNamespace(variables={}), history={},
                                    model=MLP(features=(2,), num_outputs=2)), []
        theirs.on_train_begin()
        ours.on_train_begin(run)
        for epoch, epoch_logs in enumerate(logs):
            model.epoch = epoch
            theirs.on_epoch_end(epoch, dict(epoch_logs))
            ours.on_epoch_end(run, epoch, dict(epoch_logs))
        keras_saved = [(epoch, os.path.basename(path).removesuffix(".keras")) for epoch, path in model.saved]
        assert ours_saved == keras_saved, (monitor, best_only)
        assert len(keras_saved) == (13 if not best_only else 4 if monitor == "val_loss" else 5)


def test_a_failed_save_keeps_the_previous_best(tmp_path, monkeypatch):
    saved = []
    real_save_variables = checkpoint.save_variables

    def failing_after_the_first(directory, variables):
        if saved:
            raise OSError("disk full")
        real_save_variables(directory, variables)
        saved.append(jax.tree.map(np.asarray, variables))

    monkeypatch.setattr(checkpoint, "save_variables", failing_after_the_first)
    x, y = blobs(40)
    save = ModelCheckpoint(tmp_path / "best", monitor="loss")  # the training loss improves every epoch here
    with pytest.raises(OSError, match="disk full"):
        fit(MLP(features=(8,), num_outputs=3), x, y, loss=CE, epochs=5, batch_size=8, optimizer=optax.adam(0.01),
            callbacks=[save], verbose=False)
    _, variables, metadata = load_model(tmp_path / "best")
    assert metadata["epoch"] == 0 and save.best == metadata["loss"]
    tolerance.assert_close(variables, saved[0], tolerance.ONE_OP)
    assert [path.name for path in tmp_path.iterdir()] == ["best"]  # no staging directory left behind


def test_model_checkpoint_names_a_missing_monitor(tmp_path):
    x, y = blobs(20)
    with pytest.raises(ValueError, match=r"ModelCheckpoint monitors 'val_loss', but fit logs only "
                                         r"\['accuracy', 'loss'\]; pass validation data"):
        fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, epochs=1, callbacks=[ModelCheckpoint(tmp_path)],
            verbose=False)


def test_model_checkpoint_needs_a_model_it_can_save_by_config(tmp_path):
    x, y = blobs(20)
    model = MLP(features=(4,), num_outputs=3)
    params = model.init(seed_rngs(0)[0], x[:1])["params"]
    plain = new_train_state(lambda variables, inputs, **kw: model.apply(variables, inputs, **kw), params,
                            optax.adam(1e-3), batch_stats={}, dropout_rng=seed_rngs(0)[1], input_shape=(3,))
    with pytest.raises(ValueError, match="no Linen module.*create_train_state"):
        fit(None, x, y, loss=CE, epochs=1, state=plain, callbacks=[ModelCheckpoint(tmp_path / "m", "loss")],
            verbose=False, train_flag="train")  # a **kw function: its flag cannot be read, so it is named

    class Custom(nn.Module):  # a lambda in a field: no config can name it (nn.relu it names by import path)
        act: Callable = lambda x: x

        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(3)(self.act(x))

    with pytest.raises(TypeError) as direct:
        checkpoint.save_model(tmp_path / "m", Custom(), {})
    with pytest.raises(TypeError) as through_fit:  # before the first epoch, with save_model's own message
        fit(Custom(), x, y, loss=CE, epochs=1, callbacks=[ModelCheckpoint(tmp_path / "m", "loss")], verbose=False)
    assert str(through_fit.value) == str(direct.value)
    assert not (tmp_path / "m").exists()


# --- CSVLogger ------------------------------------------------------------------------------------


def read_rows(path, separator=","):
    with open(path, newline="") as file:
        return list(csv.reader(file, delimiter=separator))


def test_csv_logger_rows_are_the_history(tmp_path):
    x, y = blobs(40)
    path = tmp_path / "logs" / "training.csv"
    _, history = fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, epochs=3, batch_size=8,
                     validation_split=0.25, optimizer=sgd(0.1), callbacks=[CSVLogger(path)], verbose=False)
    header, *rows = read_rows(path)
    assert header == ["epoch", "accuracy", "learning_rate", "loss", "val_accuracy", "val_loss"]  # sorted, as Keras
    assert [int(row[0]) for row in rows] == [0, 1, 2]
    for column, key in enumerate(header[1:], start=1):
        tolerance.assert_close([float(row[column]) for row in rows], history[key], tolerance.ONE_OP, key)


def test_csv_logger_appends_without_a_second_header(tmp_path):
    x, y = blobs(24)
    path = tmp_path / "training.tsv"
    logger = CSVLogger(path, separator="\t", append=True)
    state, first = fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, epochs=2, batch_size=8,
                       callbacks=[logger], verbose=False)
    _, second = fit(None, x, y, loss=CE, epochs=3, initial_epoch=2, batch_size=8, state=state, callbacks=[logger],
                    verbose=False)
    header, *rows = read_rows(path, "\t")
    assert header == ["epoch", "accuracy", "loss"] and [row[0] for row in rows] == ["0", "1", "2"]
    tolerance.assert_close([float(row[2]) for row in rows], first["loss"] + second["loss"], tolerance.ONE_OP)


def test_csv_logger_writes_what_keras_writes(tmp_path):
    import keras

    epochs_logs = [{"loss": 1.25, "accuracy": 0.5, "val_loss": 1.5, "val_accuracy": 1 / 3, "learning_rate": 0.1},
                   {"loss": 0.75, "accuracy": 0.625, "val_loss": 0.875, "val_accuracy": 2 / 3, "learning_rate": 0.1}]
    ours, theirs = CSVLogger(tmp_path / "ours.csv"), keras.callbacks.CSVLogger(str(tmp_path / "keras.csv"))
    ours.on_train_begin(None)
    theirs.on_train_begin()
    for epoch, logs in enumerate(epochs_logs):
        ours.on_epoch_end(None, epoch, dict(logs))
        theirs.on_epoch_end(epoch, dict(logs))
    ours.on_train_end(None)
    theirs.on_train_end()
    assert (tmp_path / "ours.csv").read_bytes() == (tmp_path / "keras.csv").read_bytes()


# --- TensorBoard ----------------------------------------------------------------------------------


def scalars(run_dir) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar of a TensorBoard run directory, read by TensorBoard's own loader: tag -> (steps, values)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)])
            for tag in events.Tags()["scalars"]}


def test_tensorboard_writes_the_history_as_keras_lays_it_out(tmp_path):
    x, y = blobs(40)
    _, history = fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, epochs=3, batch_size=8,
                     validation_split=0.25, optimizer=sgd(0.1), callbacks=[TensorBoard(tmp_path)], verbose=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["train", "validation"]
    train, validation = scalars(tmp_path / "train"), scalars(tmp_path / "validation")
    assert sorted(train) == ["epoch_accuracy", "epoch_learning_rate", "epoch_loss"]
    assert sorted(validation) == ["epoch_accuracy", "epoch_loss"]
    for key, values in history.items():
        run, name = (validation, key[4:]) if key.startswith("val_") else (train, key)
        steps, stored = run[f"epoch_{name}"]
        assert steps == [0, 1, 2]
        tolerance.assert_close(stored, values, tolerance.ONE_OP, key)  # stored as float32


class TfSummaryOverTensorboardX:
    """The part of `tf.summary` Keras's TensorBoard callback calls for epoch scalars, written with tensorboardX.

    TensorFlow is not installed: Keras's callback decides the runs, tags, steps and values, this writes them
    as our callback writes its own, so the two event directories differ only where the callbacks do.
    """

    def __init__(self):
        self.default = []

    def create_file_writer(self, logdir):
        from tensorboardX import SummaryWriter

        summary, writer = self, SummaryWriter(logdir)

        class Writer:
            @contextlib.contextmanager
            def as_default(self, step=None):
                summary.default.append(writer)
                yield
                summary.default.pop()

            def flush(self):
                writer.flush()

            def close(self):
                writer.close()

        return Writer()

    def record_if(self, condition):
        return contextlib.nullcontext()

    def scalar(self, name, data, step):
        self.default[-1].add_scalar(name, float(data), global_step=int(step))


def test_tensorboard_writes_what_keras_writes_for_the_same_logs(tmp_path):
    """Keras 3's TensorBoard callback and ours, given the same epochs' logs: the same run directories, tags, steps
    and float32 values.

    Seen failing on two broken variants: validation scalars tagged with their `val_` names, and steps counted
    from 1.
    """
    import keras

    epochs_logs = [{"loss": 1.25, "accuracy": 0.5, "val_loss": 1.5, "val_accuracy": 1 / 3, "learning_rate": 0.1},
                   {"loss": 0.75, "accuracy": 0.625, "val_loss": 0.875, "val_accuracy": 2 / 3, "learning_rate": 0.05},
                   {"loss": 0.5, "accuracy": 0.75, "val_loss": 0.625, "val_accuracy": 0.7, "learning_rate": 0.05}]
    theirs = keras.callbacks.TensorBoard(str(tmp_path / "keras"), write_graph=False)
    theirs._summary_module = TfSummaryOverTensorboardX()
    theirs.set_model(types.SimpleNamespace(optimizer=None))  # the learning rate comes from the logs, as fit's
    ours = TensorBoard(tmp_path / "ours")
    theirs.on_train_begin()
    ours.on_train_begin(None)
    for epoch, logs in enumerate(epochs_logs):
        theirs.on_epoch_end(epoch, dict(logs))
        ours.on_epoch_end(None, epoch, dict(logs))
    theirs.on_train_end()
    ours.on_train_end(None)
    runs = sorted(path.name for path in (tmp_path / "keras").iterdir())
    assert runs == sorted(path.name for path in (tmp_path / "ours").iterdir()) == ["train", "validation"]
    for run in runs:
        written = scalars(tmp_path / "ours" / run)
        assert written == scalars(tmp_path / "keras" / run), run
        assert len(written) == (3 if run == "train" else 2) and all(steps == [0, 1, 2] for steps, _ in
                                                                    written.values())


# --- ReduceLROnPlateau ----------------------------------------------------------------------------


def test_reduce_lr_on_plateau_reduces_after_patience_without_recompiling():
    x, y = blobs(40)
    epoch_fn = compiled_epoch(CE, ("accuracy",), 8, True, False, data_mesh())  # fit's mesh: all devices
    epoch_fn.clear_cache()
    # min_delta=1e9: only the first epoch "improves", so every `patience` epochs the rate halves.
    reduce = ReduceLROnPlateau(monitor="loss", factor=0.5, patience=2, min_delta=1e9)
    model, optimizer = MLP(features=(8,), num_outputs=3), sgd(0.1)
    state, history = fit(model, x, y, loss=CE, epochs=5, batch_size=8, optimizer=optimizer, callbacks=[reduce],
                         verbose=False)
    tolerance.assert_close(np.asarray(history["learning_rate"]), np.float32([0.1, 0.1, 0.1, 0.05, 0.05]),
                           tolerance.ONE_OP)
    tolerance.assert_close(rate_of(state), np.float32(0.025), tolerance.ONE_OP)  # reduced after the last epoch too
    assert np.asarray(state.opt_state.hyperparams["learning_rate"]).dtype == np.float32
    assert epoch_fn._cache_size() == 1  # the rate is an input of the compiled epoch, not a constant

    # The same 5 epochs by hand: 3 at 0.1, then 2 more with the state's rate set to 0.05.
    by_hand, _ = fit(model, x, y, loss=CE, epochs=3, batch_size=8, optimizer=optimizer, verbose=False)
    by_hand = by_hand.replace(opt_state=by_hand.opt_state._replace(
        hyperparams={**by_hand.opt_state.hyperparams, "learning_rate": np.float32(0.05)}))
    by_hand, _ = fit(None, x, y, loss=CE, epochs=2, batch_size=8, state=by_hand, verbose=False)
    tolerance.assert_close(state.params, by_hand.params, tolerance.ONE_OP)
    unreduced, _ = fit(model, x, y, loss=CE, epochs=5, batch_size=8, optimizer=optimizer, verbose=False)
    difference = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), state.params, unreduced.params)
    assert max(jax.tree.leaves(difference)) > 1e-3  # the reduced rates did change training


def test_reduce_lr_on_plateau_respects_min_lr_and_cooldown():
    x, y = blobs(24)
    reduce = ReduceLROnPlateau(monitor="loss", factor=0.1, patience=1, min_delta=1e9, cooldown=2, min_lr=0.005)
    _, history = fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, epochs=7, batch_size=8, optimizer=sgd(0.1),
                     callbacks=[reduce], verbose=False)
    # Reduced after epoch 1; cooldown 2 (counted from the next epoch, as Keras does) then patience 1: after epoch 3,
    # to max(0.001, min_lr); then never below min_lr.
    expected = [0.1, 0.1, 0.01, 0.01, 0.005, 0.005, 0.005]
    tolerance.assert_close(np.asarray(history["learning_rate"]), np.float32(expected), tolerance.ONE_OP)


def test_reduce_lr_on_plateau_follows_keras_epoch_by_epoch():
    """Keras's own callback, given the same monitored values, changes the rate at the same epochs to the same values."""
    import keras

    class KerasOptimizer:  # a float32 rate, as Keras's optimizers hold it
        def __init__(self, rate):
            self.learning_rate = rate

        def __setattr__(self, name, value):
            super().__setattr__(name, np.float32(value))

    values = [1.0, 0.99995, 0.9, 0.9, 0.95, 0.8, 0.8, 0.8, 0.8, 0.8] + [0.7] * 10  # ends on the min_lr floor
    options = dict(monitor="val_loss", factor=0.3, patience=2, min_delta=1e-4, cooldown=2, min_lr=0.002)
    theirs = keras.callbacks.ReduceLROnPlateau(mode="min", **options)
    theirs.set_model(types.SimpleNamespace(optimizer=KerasOptimizer(0.1)))
    theirs.on_train_begin()
    ours = ReduceLROnPlateau(mode="auto", **options)
    run = FitRun(state=create_train_state(MLP(features=(2,), num_outputs=2), sgd(0.1), (2,), jax.random.key(0)),
                 history={})
    ours.on_train_begin(run)
    ours_rates, keras_rates = [], []
    for epoch, value in enumerate(values):
        ours.on_epoch_end(run, epoch, {"loss": 0.0, "val_loss": value})
        theirs.on_epoch_end(epoch, {"loss": 0.0, "val_loss": value})
        ours_rates.append(rate_of(run.state))
        keras_rates.append(float(theirs.model.optimizer.learning_rate))
        assert (ours.wait, ours.cooldown_counter) == (theirs.wait, theirs.cooldown_counter), f"epoch {epoch}"
    assert len(set(keras_rates)) >= 4  # the sequence exercises several reductions and the min_lr floor
    tolerance.assert_close(ours_rates, keras_rates, tolerance.ONE_OP)


def test_reduce_lr_on_plateau_reduces_every_injected_rate_in_a_chain():
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.multi_transform({"a": sgd(0.1), "b": optax.inject_hyperparams(optax.adam)(0.01)},
                                                  {"dense_0": "a", "logits": "b"}))
    run = FitRun(state=create_train_state(MLP(features=(2,), num_outputs=2), optimizer, (2,), jax.random.key(0)),
                 history={})
    reduce = ReduceLROnPlateau(monitor="loss", patience=0, factor=0.5)
    reduce.on_train_begin(run)
    reduce.on_epoch_end(run, 0, {"loss": 1.0})  # the first value is the best so far
    reduce.on_epoch_end(run, 1, {"loss": 1.0})
    rates = [float(node.hyperparams["learning_rate"]) for node in injected_learning_rates(run.state.opt_state)]
    tolerance.assert_close(np.sort(rates), np.float32([0.005, 0.05]), tolerance.ONE_OP)


def test_reduce_lr_on_plateau_needs_an_injected_constant_rate():
    x, y = blobs(20)
    model = MLP(features=(4,), num_outputs=3)
    with pytest.raises(ValueError, match=r"no.*inject_hyperparams\(optax.adam\)\(learning_rate=1e-3\)"):
        fit(model, x, y, loss=CE, epochs=1, optimizer=optax.adam(1e-3), callbacks=[ReduceLROnPlateau("loss")],
            verbose=False)
    scheduled = optax.inject_hyperparams(optax.adam)(learning_rate=optax.exponential_decay(1e-3, 10, 0.5))
    with pytest.raises(ValueError, match="schedule"):
        fit(model, x, y, loss=CE, epochs=1, optimizer=scheduled, callbacks=[ReduceLROnPlateau("loss")],
            verbose=False)
    with pytest.raises(ValueError, match="factor >= 1.0"):
        ReduceLROnPlateau(factor=1.5)


# --- Keras's hook set -----------------------------------------------------------------------------


class HookRecorder(Callback):
    """Each hook's calls in order, with their arguments; batch hooks with the step count of the state they see."""

    def __init__(self):
        self.calls = []

    def on_train_begin(self, run):
        self.calls.append(("on_train_begin",))

    def on_epoch_begin(self, run, epoch):
        self.calls.append(("on_epoch_begin", epoch))

    def on_train_batch_begin(self, run, batch):
        self.calls.append(("on_train_batch_begin", batch, int(run.state.step)))

    def on_train_batch_end(self, run, batch, logs):
        self.calls.append(("on_train_batch_end", batch, int(run.state.step), logs))

    def on_test_begin(self, run):
        self.calls.append(("on_test_begin",))

    def on_test_end(self, run, logs):
        self.calls.append(("on_test_end", logs))

    def on_epoch_end(self, run, epoch, logs):
        self.calls.append(("on_epoch_end", epoch, logs, jax.tree.map(np.asarray, run.state.params)))

    def on_train_end(self, run):
        self.calls.append(("on_train_end",))


class EpochHooks(HookRecorder):
    """Every hook but the batch hooks."""

    on_train_batch_begin = Callback.on_train_batch_begin
    on_train_batch_end = Callback.on_train_batch_end


def loop_runs(monkeypatch) -> dict[str, int]:
    """Counts the epochs run by each epoch loop: one compiled scan, or streamed calls of steps."""
    counts = {"scanned": 0, "streamed": 0}
    for name, loop in (("scanned", ScannedEpochs), ("streamed", StreamedEpochs)):
        def counted(self, *args, _run=loop.run, _name=name, **kwargs):
            counts[_name] += 1
            return _run(self, *args, **kwargs)

        monkeypatch.setattr(loop, "run", counted)
    return counts


def test_each_keras_hook_is_called_and_batch_hooks_once_per_compiled_call(monkeypatch):
    """6 steps an epoch, 3 per compiled call: each batch hook twice an epoch, with the epoch's index of the call's
    first step (begin) or last (end), as Keras calls them with steps_per_execution; a run whose callbacks define
    no batch hook keeps the epoch one compiled scan and trains to the same parameters.

    Seen failing: with the streamed loop forced for every callback (`scanned` 0 of 2 epochs), and with the batch
    hooks called per step (12 calls of each, not 4).
    """
    x, y = blobs(48)
    validation = blobs(16, seed=1)
    options = dict(loss=CE, epochs=2, batch_size=8, steps_per_execution=3, optimizer=optax.adam(0.01),
                   validation_data=validation, verbose=0)
    runs = loop_runs(monkeypatch)
    every, epoch_only = HookRecorder(), EpochHooks()
    fit(MLP(features=(4,), num_outputs=3), x, y, callbacks=[every], **options)
    assert runs == {"scanned": 0, "streamed": 2}
    fit(MLP(features=(4,), num_outputs=3), x, y, callbacks=[epoch_only], **options)
    assert runs == {"scanned": 2, "streamed": 2}

    expected = [("on_train_begin",)]
    for epoch in range(2):
        done = 6 * epoch  # the state's step count at the epoch's start
        expected += [("on_epoch_begin", epoch), ("on_train_batch_begin", 0, done), ("on_train_batch_end", 2, done + 3),
                     ("on_train_batch_begin", 3, done + 3), ("on_train_batch_end", 5, done + 6), ("on_test_begin",),
                     ("on_test_end",), ("on_epoch_end", epoch)]
    expected.append(("on_train_end",))
    assert [call[:3] if "batch" in call[0] else call[:2 if call[0] in ("on_epoch_begin", "on_epoch_end") else 1]
            for call in every.calls] == expected
    assert [call[0] for call in epoch_only.calls] == [call[0] for call in expected if "batch" not in call[0]]

    for epoch in range(2):
        batch_ends = [call[3] for call in every.calls if call[0] == "on_train_batch_end"][2 * epoch: 2 * epoch + 2]
        (test_logs,) = [call[1] for call in every.calls if call[0] == "on_test_end"][epoch: epoch + 1]
        ((_, _, logs, params),) = [call for call in every.calls if call[0] == "on_epoch_end"][epoch: epoch + 1]
        # The last call's running means are the epoch's means (the same sums), the first call's are its half's
        assert batch_ends[1] == {k: v for k, v in logs.items() if not k.startswith("val_")} != batch_ends[0]
        assert test_logs == {k.removeprefix("val_"): v for k, v in logs.items() if k.startswith("val_")}
        ((_, _, scanned_logs, scanned_params),) = [c for c in epoch_only.calls if c[0] == "on_epoch_end"][epoch:
                                                                                                          epoch + 1]
        # The same steps, 3 per call and in one scan: the scanned epoch's tolerance (tests/support/tolerance.py)
        tolerance.assert_close(list(logs.values()), list(scanned_logs.values()), tolerance.FEW_OPS)
        for ours, scanned in zip(jax.tree.leaves(params), jax.tree.leaves(scanned_params)):
            tolerance.assert_close(ours, scanned, tolerance.FEW_OPS)


def test_stop_training_in_a_batch_hook_ends_the_epoch_after_that_call():
    """As Keras: the epoch ends after the compiled call whose hook set the flag; on_epoch_end still sees it. Set
    elsewhere, the flag ends training at the epoch's end, whichever loop runs it. Seen failing with the flag read
    only at the epoch's end (state.step 6, not 2), and with a streamed epoch cut short by it (2, not 6)."""

    class StopAfterTwoSteps(HookRecorder):
        def on_train_batch_end(self, run, batch, logs):
            super().on_train_batch_end(run, batch, logs)
            run.stop_training = batch >= 1

    x, y = blobs(48)
    stop = StopAfterTwoSteps()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "ran out of batches" or other warning
        state, history = fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, epochs=3, batch_size=8,
                             steps_per_execution=2, callbacks=[stop], verbose=0)
    assert int(state.step) == 2 and len(history["loss"]) == 1 and history.epoch == [0]
    assert [call[0] for call in stop.calls] == ["on_train_begin", "on_epoch_begin", "on_train_batch_begin",
                                                "on_train_batch_end", "on_epoch_end", "on_train_end"]


    class StopAtTheStart(Callback):
        def on_epoch_begin(self, run, epoch):
            run.stop_training = True

    # Without a batch hook the flag ends training at the epoch's end, streamed (device_data_bytes=0) as scanned
    state, history = fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, epochs=3, batch_size=8,
                         steps_per_execution=2, device_data_bytes=0, callbacks=[StopAtTheStart()], verbose=0)
    assert int(state.step) == 6 and len(history["loss"]) == 1


def test_a_batch_hook_may_not_replace_the_state():
    class Replacing(Callback):
        def on_train_batch_end(self, run, batch, logs):
            run.state = run.state.replace(step=run.state.step + 100)

    x, y = blobs(16)
    with pytest.raises(ValueError, match="Replacing.on_train_batch_end replaced run.state: a batch hook may read"):
        fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, batch_size=8, callbacks=[Replacing()], verbose=0)


class Unbuildable(nn.Module):
    """A model whose first call fails: an error raised before it is the argument check's."""

    @nn.compact
    def __call__(self, x):
        raise RuntimeError("the model was called")


@pytest.mark.parametrize("hook, why", [
    ("on_batch_end", r"Keras's older name of on_train_batch_end: rename it"),
    ("on_test_batch_end", "validation runs as one compiled evaluation: use on_test_begin/on_test_end"),
    ("on_epoch_finish", "not a hook fit calls"),
])
def test_a_callback_defining_a_hook_fit_never_calls_is_refused_before_training(hook, why):
    unknown = type("Unknown", (Callback,), {hook: lambda self, *args: None})
    x, y = blobs(16)
    with pytest.raises(ValueError, match=rf"callbacks\[1\] \(Unknown\) defines {hook}, which fit never calls "
                                         rf"\({why}\); fit calls on_train_begin, on_epoch_begin, "):
        fit(Unbuildable(), x, y, loss=CE, callbacks=[EpochHooks(), unknown()], verbose=0)


def test_callbacks_must_be_a_list_of_jaxdl_callbacks():
    class KerasStyle:  # not a jaxdl Callback: its hooks would take (epoch, logs)
        def on_epoch_end(self, epoch, logs=None):
            pass

    x, y = blobs(16)
    with pytest.raises(TypeError, match=r"callbacks\[0\] is a .*KerasStyle, not a jaxdl.Callback"):
        fit(Unbuildable(), x, y, loss=CE, callbacks=[KerasStyle()], verbose=0)
    with pytest.raises(TypeError, match="callbacks must be a list of jaxdl Callbacks, got EpochHooks"):
        fit(Unbuildable(), x, y, loss=CE, callbacks=EpochHooks(), verbose=0)
