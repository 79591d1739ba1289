"""Checkpoint and resume: interrupted runs end bitwise where uninterrupted ones do; bad checkpoints are named."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxdl import MLP, CSVLogger, EarlyStopping, fit, load_model
from jaxdl.training.callbacks import ModelCheckpoint, ReduceLROnPlateau
from tests.support.toy_data import CE, NNXNet, blobs
from tests.support.trees import raw

REPOSITORY = Path(__file__).resolve().parents[2]


def params_equal(a, b) -> bool:
    """Every array of `a` equals `b`'s bitwise (random keys by their data)."""
    a, b = [raw(leaf) for leaf in jax.tree.leaves(a)], [raw(leaf) for leaf in jax.tree.leaves(b)]
    return len(a) == len(b) and all(np.array_equal(p, q) for p, q in zip(a, b))


def checkpoint_ids(directory) -> list[int]:
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def crash_after(directory, checkpoint_id: int) -> None:
    """The directory as a run that died right after writing `checkpoint_id` left it."""
    for later in [i for i in checkpoint_ids(directory) if i > checkpoint_id]:
        shutil.rmtree(Path(directory) / str(later))


@pytest.mark.parametrize("path", ["arrays", "source", "arrays, epochs only"])
def test_a_run_resumed_from_any_checkpoint_ends_bitwise_as_the_uninterrupted_run(tmp_path, path):
    x, y = blobs(n=44)
    data = [{"image": row, "label": label} for row, label in zip(x, y)] if path == "source" else x
    labels = None if path == "source" else y
    every = "epoch" if path.endswith("epochs only") else 3
    model = MLP(features=(8,), num_outputs=3, dropout_rate=0.2, batch_norm=path == "source")

    def train(directory):
        stop = EarlyStopping("val_loss", patience=10, restore_best_weights=True)
        return fit(model, data, labels, loss=CE, epochs=3, batch_size=8, verbose=0, seed=3,
                   validation_data=(x[:10], y[:10]), callbacks=[stop, CSVLogger(directory.with_suffix(".csv"))],
                   checkpoint_dir=directory, checkpoint_every=every, keep=100)

    expected, expected_history = train(tmp_path / "uninterrupted")
    ids = checkpoint_ids(tmp_path / "uninterrupted")
    # 6 batches per epoch, ids count batches seen (e * 6 + batches done): every 3 steps gives 3 inside epoch 0,
    # 6 at its end (its last batch is saved by the epoch's end, not twice), 9 inside epoch 1
    assert ids == ([6, 12, 18] if every == "epoch" else [3, 6, 9, 12, 15, 18])
    shutil.copytree(tmp_path / "uninterrupted", tmp_path / "run")
    shutil.copy(tmp_path / "uninterrupted.csv", tmp_path / "run.csv")  # the log the run had been writing
    for checkpoint_id in ids[:3]:  # inside epoch 0, at its end, inside epoch 1 (epochs only: the ends of 0, 1, 2)
        crash_after(tmp_path / "run", checkpoint_id)
        state, history = train(tmp_path / "run")
        assert params_equal(state.params, expected.params), checkpoint_id
        assert history == expected_history, checkpoint_id
    assert (tmp_path / "run.csv").read_text() == (tmp_path / "uninterrupted.csv").read_text()


def test_reduce_lr_on_plateau_and_model_checkpoint_resume_where_they_stood(tmp_path):
    """A run that died after epoch 3 of 5, resumed: the rate is reduced at the same epochs, the saved best is
    the same model, the parameters and history are bitwise the uninterrupted run's.

    ReduceLROnPlateau (min_delta 1e9: only epoch 0 improves) is inside its cooldown at the crash, its best
    kept; ModelCheckpoint maximises a falling loss, so its best stays epoch 0 and any save after the resume
    is a forgotten best. Seen failing on a variant whose callbacks restore nothing of their checkpointed
    state (other parameters: the rate was not reduced after epoch 3), and on one where ModelCheckpoint alone
    forgets its best (epoch 3 saved over epoch 0).
    """
    import optax

    x, y = blobs(n=24)

    def train(directory):
        callbacks = [ReduceLROnPlateau("loss", factor=0.5, patience=1, min_delta=1e9, cooldown=2),
                     ModelCheckpoint(directory.with_suffix(".best"), monitor="loss", mode="max")]
        return fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, epochs=5, batch_size=8, verbose=0,
                   optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), callbacks=callbacks,
                   checkpoint_dir=directory, keep=10)

    expected, expected_history = train(tmp_path / "uninterrupted")
    # Reduced after epochs 1 and 3 (cooldown 2), shown from the next epoch.
    assert expected_history["learning_rate"] == [float(np.float32(r)) for r in (0.1, 0.1, 0.05, 0.05, 0.025)]
    assert all(np.diff(expected_history["loss"]) < 0)  # ModelCheckpoint's best stays epoch 0
    shutil.copytree(tmp_path / "uninterrupted", tmp_path / "run")
    shutil.copytree(tmp_path / "uninterrupted.best", tmp_path / "run.best")  # saved at epoch 0 only
    crash_after(tmp_path / "run", 9)  # 3 batches an epoch: the end of epoch 3
    state, history = train(tmp_path / "run")
    assert params_equal(state.params, expected.params) and history == expected_history
    assert params_equal(state.opt_state, expected.opt_state)
    _, saved, metadata = load_model(tmp_path / "run.best")
    _, expected_saved, expected_metadata = load_model(tmp_path / "uninterrupted.best")
    assert metadata == expected_metadata == {"epoch": 0, "loss": history["loss"][0]}
    assert params_equal(saved, expected_saved)


def test_a_finished_run_called_again_returns_its_result_without_training(tmp_path):
    x, y = blobs(n=20)
    options = dict(loss=CE, epochs=2, batch_size=8, verbose=0, checkpoint_dir=tmp_path)
    state, history = fit(MLP(features=(4,), num_outputs=3), x, y, **options)
    again, again_history = fit(MLP(features=(4,), num_outputs=3), x, y, **options)
    assert params_equal(again.params, state.params) and again_history == history and int(again.step) == 6


def test_a_checkpoint_of_another_run_is_refused_naming_the_difference(tmp_path):
    x, y = blobs(n=20)
    fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, epochs=1, batch_size=8, verbose=0, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError,
                       match=r"of another run \(batch_size: saved 8, now 4; batches_per_epoch: saved 3, now 5\)"):
        fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, epochs=2, batch_size=4, verbose=0,
            checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"of another run \(model: saved .*\"features\": \[4\].*, now .*"
                                         r"\"features\": \[5\].*parameters: saved .*\[3, 4\].*now .*\[3, 5\]"):
        fit(MLP(features=(5,), num_outputs=3), x, y, loss=CE, epochs=2, batch_size=8, verbose=0,
            checkpoint_dir=tmp_path)
    for bad, match in ((dict(checkpoint_every=0), r"checkpoint_every \(steps, or 'epoch'\) must be a positive "
                                                  r"integer, got 0"),
                       (dict(checkpoint_every="weekly"), "got 'weekly'"), (dict(keep=0), "keep must be a positive")):
        with pytest.raises(ValueError, match=match):
            fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, verbose=0, checkpoint_dir=tmp_path / "new", **bad)
    import optax
    with pytest.raises(ValueError, match=r"of another run \(optimizer: saved "):
        fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, epochs=2, batch_size=8, verbose=0,
            optimizer=optax.sgd(0.1), checkpoint_dir=tmp_path)


def test_a_corrupted_latest_checkpoint_falls_back_to_the_one_before_with_a_warning(tmp_path):
    x, y = blobs(n=20)
    options = dict(loss=CE, epochs=3, batch_size=8, verbose=0, keep=5, seed=1)
    expected, expected_history = fit(MLP(features=(4,), num_outputs=3), x, y, **options)
    fit(MLP(features=(4,), num_outputs=3), x, y, **{**options, "epochs": 2}, checkpoint_dir=tmp_path)
    latest = tmp_path / str(checkpoint_ids(tmp_path)[-1])
    for file in latest.rglob("*"):
        if file.is_file():
            file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])  # truncated
    with pytest.warns(RuntimeWarning, match=f"checkpoint {latest} cannot be read"):
        state, history = fit(MLP(features=(4,), num_outputs=3), x, y, **options, checkpoint_dir=tmp_path)
    assert params_equal(state.params, expected.params) and history == expected_history


CHILD = """
import asyncio, sys, time
sys.path.insert(0, {repository!r})
from tests.support.toy_data import CE, NNXNet, blobs
from jaxdl import MLP, fit

mode, directory = sys.argv[1:3]
x, y = blobs(n=44)

class Slow:  # a source slow enough for the parent to catch the run inside an epoch
    def __len__(self):
        return len(x)

    def __getitem__(self, index):
        time.sleep(0.02)
        return {{"image": x[index], "label": y[index]}}

if mode in ("arrays", "nnx"):  # in-memory arrays, their host batches slowed as the source's examples are
    from jaxdl.training.adapters import ArrayInput
    batches_of = ArrayInput.host_batches

    def slow_batches(self, *args):
        for batch in batches_of(self, *args):
            time.sleep(0.15)
            yield batch

    ArrayInput.host_batches = slow_batches
if mode == "slow-save":  # a save that takes a second between writing and committing its files
    from orbax.checkpoint._src.path import atomicity
    commit = atomicity.AtomicRenameTemporaryPath.finalize

    async def slow_commit(self, *args, **kwargs):
        await asyncio.sleep(1.0)
        return await commit(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = slow_commit
if mode == "nnx":  # a Flax NNX module: its BatchNorm statistics and dropout stream resume too
    from flax import nnx
    model = NNXNet(nnx.Rngs(3))
else:
    model = MLP(features=(8,), num_outputs=3, dropout_rate=0.2)
fit(model, *((x, y) if mode in ("arrays", "nnx") else (Slow(),)), loss=CE, epochs=3, batch_size=8, verbose=0,
    seed=3, checkpoint_dir=directory, checkpoint_every=2)
"""


def kill_when(runs: dict) -> None:
    """Starts a child per `{directory: (mode, ready)}` at once and SIGKILLs each as soon as `ready(directory)`."""
    children = {directory: subprocess.Popen([sys.executable, "-c", CHILD.format(repository=str(REPOSITORY)), mode,
                                             str(directory)]) for directory, (mode, _) in runs.items()}
    deadline = time.monotonic() + 120
    try:
        waiting = dict(children)
        while waiting:
            for directory, child in list(waiting.items()):
                if directory.is_dir() and runs[directory][1](directory):
                    child.send_signal(signal.SIGKILL)
                    del waiting[directory]
                else:
                    assert child.poll() is None, f"the run in {directory} ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        for child in children.values():
            child.send_signal(signal.SIGKILL)
            child.wait()
    assert all(child.returncode == -signal.SIGKILL for child in children.values())


def test_runs_killed_inside_an_epoch_and_inside_a_save_resume_bitwise(tmp_path):
    """Sources killed inside an epoch and inside a save, and in-memory arrays killed inside an epoch, training a
    Linen module and a Flax NNX one.

    The arrays' run was seen failing on a variant whose resumed epoch draws its shuffle order from the step
    it resumed at rather than the step the epoch started at (the source runs, ordered by epoch, passed on it).
    """
    x, y = blobs(n=44)
    source = [{"image": row, "label": label} for row, label in zip(x, y)]
    options = dict(loss=CE, epochs=3, batch_size=8, verbose=0, seed=3, checkpoint_every=2)
    model = MLP(features=(8,), num_outputs=3, dropout_rate=0.2)
    inputs = {"source": (source,), "arrays": (x, y)}
    expected = {kind: fit(model, *data, **options, checkpoint_dir=tmp_path / f"uninterrupted-{kind}")
                for kind, data in inputs.items()}
    expected["nnx"] = fit(NNXNet(nnx.Rngs(3)), x, y, **options, checkpoint_dir=tmp_path / "uninterrupted-nnx")

    inside_epoch = lambda d: any(i % 6 and i > 6 for i in checkpoint_ids(d))  # inside epoch 2
    in_a_save = lambda d: checkpoint_ids(d) and any("tmp" in name for name in os.listdir(d))
    kill_when({tmp_path / "killed-in-epoch": ("slow-steps", inside_epoch),
               tmp_path / "killed-in-save": ("slow-save", in_a_save),
               tmp_path / "arrays-killed-in-epoch": ("arrays", inside_epoch),
               tmp_path / "nnx-killed-in-epoch": ("nnx", inside_epoch)})
    assert any("tmp" in name for name in os.listdir(tmp_path / "killed-in-save"))  # killed mid-save indeed

    for run, kind in (("killed-in-epoch", "source"), ("killed-in-save", "source"),
                      ("arrays-killed-in-epoch", "arrays"), ("nnx-killed-in-epoch", "nnx")):
        state, history = fit(NNXNet(nnx.Rngs(3)) if kind == "nnx" else model, *inputs.get(kind, (x, y)), **options,
                             checkpoint_dir=tmp_path / run)
        assert params_equal(state.params, expected[kind][0].params), run
        assert params_equal(state.batch_stats, expected[kind][0].batch_stats), run  # NNX: statistics, RNG counts
        assert history == expected[kind][1], run
        assert json.dumps(history)  # the history is plain data


def test_experiments_checkpoint_with_checkpoint_dir_and_continue_only_with_resume(tmp_path, capsys):
    from experiments import basics

    options = ["--quiet", "--out", str(tmp_path / "runs"), "--checkpoint-dir", str(tmp_path / "checkpoints")]
    metrics = basics.run(options)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["model", "validated"]
    with pytest.raises(SystemExit, match="already holds checkpoints; pass --resume to continue"):
        basics.run(options)
    assert basics.run(options + ["--resume"]) == metrics  # the finished runs, restored
    with pytest.raises(SystemExit, match="--resume needs --checkpoint-dir"):
        basics.run(["--quiet", "--out", str(tmp_path / "runs"), "--resume"])


def test_a_diverging_run_saves_only_finite_states(tmp_path):
    import optax
    import orbax.checkpoint as ocp

    x, y = blobs(n=32)
    with pytest.warns(RuntimeWarning, match="became NaN or infinite"):
        state, _ = fit(MLP(features=(8,), num_outputs=3), x * 1e3, y, loss=CE, optimizer=optax.sgd(1e3), epochs=5,
                       batch_size=8, verbose=0, checkpoint_dir=tmp_path, checkpoint_every=1, keep=100)
    ids = checkpoint_ids(tmp_path)
    assert ids and all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params))
    with ocp.StandardCheckpointer() as reader:
        for checkpoint_id in ids:
            saved = reader.restore(tmp_path / str(checkpoint_id) / "tree")
            assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(saved["state"]["params"])), checkpoint_id


def test_a_resume_under_another_prng_implementation_is_refused_by_name(tmp_path):
    """Before the fix: a TypeError "expected key_data.shape to end with (4,); got shape=(2,)" out of the restore."""
    x, y = blobs(n=20)
    options = dict(loss=CE, epochs=2, batch_size=8, verbose=0, checkpoint_dir=tmp_path)
    expected, expected_history = fit(MLP(features=(4,), num_outputs=3), x, y, **{**options, "checkpoint_dir": None})
    fit(MLP(features=(4,), num_outputs=3), x, y, **{**options, "epochs": 1})  # threefry2x32, JAX's default
    with jax.default_prng_impl("rbg"):
        with pytest.raises(ValueError, match=rf"the checkpoint in {tmp_path} was saved with threefry2x32 keys and "
                                             r"this call's keys are rbg \(jax_default_prng_impl\).*"
                                             r"jax.config.update\('jax_default_prng_impl', 'threefry2x32'\)"):
            fit(MLP(features=(4,), num_outputs=3), x, y, **options)
    assert checkpoint_ids(tmp_path) == [3]  # nothing moved aside or written
    state, history = fit(MLP(features=(4,), num_outputs=3), x, y, **options)  # threefry again: it resumes
    assert params_equal(state.params, expected.params) and history == expected_history


def test_a_resume_with_another_learning_rate_is_refused_by_name_and_taken_when_asked(tmp_path):
    """Before: adam(1e-1) resumed a run saved with adam(1e-3) unremarked (optax keeps the rate in a closure, not in
    the optimizer state that the checkpoint compared)."""
    import optax

    x, y = blobs(n=20)

    def train(optimizer, epochs, **options):
        return fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, epochs=epochs, batch_size=8, verbose=0,
                   optimizer=optimizer, **{"checkpoint_dir": tmp_path, **options})

    expected, expected_history = train(optax.adam(1e-3), 2, checkpoint_dir=None)
    after_one, _ = train(optax.adam(1e-3), 1)
    with pytest.raises(ValueError, match=r"\(optimizer_hyperparameters: scale.step_size saved -0.001, now -0.1 "
                                         r"\(minus the learning rate\)\);.* or pass resume_with_new_optimizer=True"):
        train(optax.adam(1e-1), 2)
    assert checkpoint_ids(tmp_path) == [3]  # nothing written
    state, history = train(optax.adam(1e-3), 2)  # the same optimizer, built again
    assert params_equal(state.params, expected.params) and history == expected_history
    crash_after(tmp_path, 3)
    state, history = train(optax.adam(1e-1), 2, resume_with_new_optimizer=True)
    # Asked for: epoch 1 trains on from the saved state (Adam's moments, its step count) with the new rate.
    by_hand, _ = fit(None, x, y, loss=CE, epochs=2, initial_epoch=1, batch_size=8, verbose=0,
                     state=after_one.replace(tx=optax.adam(1e-1)))
    assert params_equal(state.params, by_hand.params) and not params_equal(state.params, expected.params)
    assert history["loss"][0] == expected_history["loss"][0] != history["loss"][1]
    with pytest.raises(ValueError, match="resume_with_new_optimizer=True resumes the run in checkpoint_dir"):
        train(optax.adam(1e-1), 2, checkpoint_dir=None, resume_with_new_optimizer=True)


class Scaled:
    """An optimizer whose rate lives in an object, where only its steps show it: `-rate * gradient`."""

    def __init__(self, rate):
        self.rate = rate

    def init(self, params):
        import optax

        return optax.EmptyState()

    def update(self, updates, state, params=None):
        return jax.tree.map(lambda g: -self.rate * g, updates), state


def test_another_momentum_or_a_rate_seen_only_in_the_steps_is_refused_and_a_new_injected_rate_is_taken(tmp_path):
    import optax

    x, y = blobs(n=20)

    def train(optimizer, directory, epochs, **options):
        return fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, epochs=epochs, batch_size=8, verbose=0,
                   optimizer=optimizer, checkpoint_dir=tmp_path / directory, **options)

    train(optax.sgd(0.1), "sgd", 1)
    for asked in (False, True):  # another state's structure: no optimizer can go on from it
        with pytest.raises(ValueError, match=r"optimizer: saved .*EmptyState.*now .*TraceState.*; "
                                             r"optimizer_hyperparameters: trace.accumulator_dtype .*trace.decay "
                                             r"saved \(absent\), now 0.9" if not asked else "optimizer: saved"):
            train(optax.sgd(0.1, momentum=0.9), "sgd", 2, resume_with_new_optimizer=asked)
    train(optax.GradientTransformation(Scaled(0.1).init, Scaled(0.1).update), "object", 1)
    train(optax.GradientTransformation(Scaled(0.1).init, Scaled(0.1).update), "object", 2)  # built again: taken
    # The probe [0.5, -1.5] after gradients summing to [-0.25, 0.75]: minus 0.1 or 0.05 times them.
    with pytest.raises(ValueError, match=r"\(optimizer_probe: its steps on a probe go elsewhere \(saved "
                                         r"\[0.52499.*, -1.575.*\], now \[0.5125.*, -1.5375.*\]\)"):
        train(optax.GradientTransformation(Scaled(0.05).init, Scaled(0.05).update), "object", 3)
    train(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), "injected", 1)
    state, history = train(optax.inject_hyperparams(optax.sgd)(learning_rate=0.5), "injected", 2,
                           resume_with_new_optimizer=True)
    assert history["learning_rate"] == [float(np.float32(0.1)), 0.5]  # the new rate, not the saved state's
