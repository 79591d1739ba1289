"""A run checkpoint cannot silently go wrong: other data, other callbacks, errors mid-save, a diverged run.

Each test here reproduces a defect of the earlier driver (issue 19, section 3)
and fails on it: a dataset of another size resumed into a stale checkpoint,
an error or Ctrl-C abandoning the save in flight, a full disk losing the
trained state, a NaN-stopped run trained past on resume, callbacks matched
by list position, remote paths made local, any restore error treated as
corruption.
"""
import asyncio
import os

import jax
import numpy as np
import optax
import pytest

from jaxdl import MLP, Callback, EarlyStopping, fit
from jaxdl.training.run_checkpoint import CheckpointSaveError, as_path
from tests.support.toy_data import CE, blobs


def checkpoint_ids(directory) -> list[int]:
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def leftovers(directory) -> list[str]:
    return [name for name in os.listdir(directory) if "tmp" in name]


def params_equal(a, b) -> bool:
    return all(np.array_equal(p, q) for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


MODEL = MLP(features=(4,), num_outputs=3)


def test_data_of_another_size_is_refused_and_ids_count_batches_seen(tmp_path):
    x, y = blobs(n=320)
    options = dict(loss=CE, epochs=2, batch_size=32, verbose=0, checkpoint_dir=tmp_path)
    fit(MODEL, x, y, **options)
    assert checkpoint_ids(tmp_path) == [10, 20]  # 10 batches an epoch: ids are batches seen
    with pytest.raises(ValueError, match=r"of another run \(examples: saved 320, now 64; batches_per_epoch: "
                                         r"saved 10, now 2; data_fingerprint: saved"):
        fit(MODEL, x[:64], y[:64], **options)
    with pytest.raises(ValueError, match=r"of another run \(data_fingerprint: saved"):  # same size, other rows
        fit(MODEL, x[::-1].copy(), y[::-1].copy(), **options)
    with pytest.raises(ValueError, match=r"examples: saved 320, now 256.*validation_split: saved null, now 0.2"):
        fit(MODEL, x, y, **options, validation_split=0.2)
    assert checkpoint_ids(tmp_path) == [10, 20]  # nothing was written by the refused runs


class Raising(Callback):
    def __init__(self, error: BaseException, at_epoch: int):
        self.error, self.at_epoch = error, at_epoch

    def on_epoch_end(self, run, epoch, logs):
        if epoch == self.at_epoch:
            raise self.error


@pytest.fixture
def slow_commits(monkeypatch):
    """Orbax commits each save a quarter second after writing it: an error can strike while one is in flight."""
    from orbax.checkpoint._src.path import atomicity

    commit = atomicity.AtomicRenameTemporaryPath.finalize

    async def slow_commit(self, *args, **kwargs):
        await asyncio.sleep(0.25)
        return await commit(self, *args, **kwargs)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", slow_commit)


@pytest.mark.parametrize("error", [ValueError("a callback's own error"), KeyboardInterrupt()],
                         ids=["error", "ctrl-c"])
def test_an_error_or_ctrl_c_lets_the_save_in_flight_complete(tmp_path, slow_commits, capsys, error):
    x, y = blobs(n=20)
    with pytest.raises(type(error)) as raised:
        fit(MODEL, x, y, loss=CE, epochs=4, batch_size=8, verbose=0, checkpoint_dir=tmp_path,
            callbacks=[Raising(error, at_epoch=1)])
    assert raised.value is error  # the user's error, not orbax's "cannot schedule new futures after shutdown"
    assert checkpoint_ids(tmp_path) == [3] and leftovers(tmp_path) == []  # epoch 0's save finished
    if isinstance(error, KeyboardInterrupt):
        assert f"interrupted: the run's checkpoints in {tmp_path} hold it" in capsys.readouterr().err
    # and the run resumes from it, with the message saying where
    state, history = fit(MODEL, x, y, loss=CE, epochs=4, batch_size=8, verbose=2, checkpoint_dir=tmp_path,
                         callbacks=[Raising(error, at_epoch=-1)])  # the same callback list, never raising now
    assert f"resumed from epoch 2, step 0 of {tmp_path}" in capsys.readouterr().out
    assert len(history["loss"]) == 4


def test_a_full_disk_is_named_keeps_the_previous_checkpoint_and_the_trained_state(tmp_path, monkeypatch):
    from orbax.checkpoint._src.path import atomicity

    commit = atomicity.AtomicRenameTemporaryPath.finalize

    async def full_on_second(self, *args, **kwargs):  # the disk fills up while checkpoint 6 is written
        if "/6" in str(self._final_path):
            raise OSError(28, "No space left on device")
        return await commit(self, *args, **kwargs)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", full_on_second)
    x, y = blobs(n=20)
    with pytest.raises(CheckpointSaveError, match=rf"checkpoint of the run in {tmp_path} failed \(.*No space left "
                                                  r"on device"
                                                  r".*checkpoints saved before it \(3\) are intact") as raised:
        fit(MODEL, x, y, loss=CE, epochs=3, batch_size=8, verbose=0, checkpoint_dir=tmp_path)
    assert raised.value.state is not None and int(raised.value.state.step) >= 6  # the trained state, not lost
    assert len(raised.value.history["loss"]) >= 2
    assert checkpoint_ids(tmp_path) == [3] and leftovers(tmp_path) == []  # no half-written checkpoint left
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", commit)
    expected, expected_history = fit(MODEL, x, y, loss=CE, epochs=3, batch_size=8, verbose=0)
    state, history = fit(MODEL, x, y, loss=CE, epochs=3, batch_size=8, verbose=0, checkpoint_dir=tmp_path)
    assert params_equal(state.params, expected.params) and history == expected_history  # resumed from 3


def test_a_run_stopped_by_the_nan_guard_stops_again_where_it_stopped(tmp_path):
    x, y = blobs(n=32)
    options = dict(loss=CE, optimizer=optax.sgd(1e3), epochs=5, batch_size=8, verbose=0, checkpoint_dir=tmp_path,
                   checkpoint_every=1, keep=100)
    with pytest.warns(RuntimeWarning, match="became NaN or infinite at epoch (\\d), step (\\d)") as first:
        state, history = fit(MLP(features=(8,), num_outputs=3), x * 1e3, y, **options)
    saved = checkpoint_ids(tmp_path)
    with pytest.warns(RuntimeWarning, match="became NaN or infinite") as again:
        resumed, resumed_history = fit(MLP(features=(8,), num_outputs=3), x * 1e3, y, **options)
    assert str(again[0].message) == str(first[0].message)  # the same epoch and step
    assert params_equal(resumed.params, state.params) and resumed_history == history
    assert checkpoint_ids(tmp_path) == saved  # nothing saved past the refused step, either time


def test_callbacks_are_matched_by_class_and_settings(tmp_path):
    x, y = blobs(n=20)
    options = dict(loss=CE, epochs=2, batch_size=8, verbose=0, validation_data=(x, y), checkpoint_dir=tmp_path)
    loss_stop, accuracy_stop = EarlyStopping("val_loss", patience=5), EarlyStopping("val_accuracy", patience=5)
    fit(MODEL, x, y, **options, callbacks=[loss_stop, accuracy_stop])
    with pytest.raises(ValueError, match=r"of another run \(callbacks: saved .*\"monitor\": \"val_loss\".*, now "
                                         r".*\"monitor\": \"val_accuracy\""):
        fit(MODEL, x, y, **{**options, "epochs": 3}, callbacks=[accuracy_stop, loss_stop])
    with pytest.raises(ValueError, match=r"callbacks: saved .*\"restore_best_weights\": false.*now .*true"):
        fit(MODEL, x, y, **{**options, "epochs": 3},
            callbacks=[EarlyStopping("val_loss", patience=5, restore_best_weights=True), accuracy_stop])
    with pytest.raises(ValueError, match=r"callbacks: saved .*EarlyStopping.*, now \[\]"):
        fit(MODEL, x, y, **{**options, "epochs": 3})
    fit(MODEL, x, y, **{**options, "epochs": 3}, callbacks=[EarlyStopping("val_loss", patience=5),
                                                           EarlyStopping("val_accuracy", patience=5)])


def test_remote_directories_stay_remote():
    assert os.fspath(as_path("gs://bucket/run")) == "gs://bucket/run"  # Path("gs://b").absolute() made it local
    assert os.fspath(as_path("relative/run")) == os.path.abspath("relative/run")


# How tensorstore and the file system report an access failure (the first as seen reading a checkpoint whose
# array files were made unreadable to the reader: jaxdl moved it aside, took it for damaged).
DENIED = ('PERMISSION_DENIED: Error opening "zarr" driver: Error reading "previous.dropout_key/.zarray" in OCDBT '
          'database at local file "/run/6/tree/": Error reading local file "/run/6/tree/d/0": Permission denied')
ACCESS_ERRORS = [ValueError(DENIED), ValueError("UNAUTHENTICATED: Error opening \"zarr\" driver: no credentials"),
                 ValueError("UNAVAILABLE: Error reading \"gs://bucket/run/6/tree/manifest.ocdbt\": 503"),
                 ValueError("DEADLINE_EXCEEDED: Error reading \"gs://bucket/run/6/tree/d/0\""),
                 PermissionError(13, "Permission denied")]


def test_an_access_error_is_raised_naming_the_checkpoint_and_moves_nothing(tmp_path, monkeypatch, capsys):
    """Before the fix, each denied checkpoint was renamed unreadable-N and the next call trained from epoch 1."""
    import orbax.checkpoint as ocp

    x, y = blobs(n=20)
    options = dict(loss=CE, epochs=3, batch_size=8, verbose=2, checkpoint_dir=tmp_path)
    expected, expected_history = fit(MODEL, x, y, **{**options, "checkpoint_dir": None, "verbose": 0})
    fit(MODEL, x, y, **{**options, "epochs": 2, "verbose": 0})
    restore = ocp.CheckpointManager.restore
    for error in ACCESS_ERRORS:
        def denied(self, step, *args, error=error, **kwargs):  # the metadata reads, the arrays are denied
            if "tree" in kwargs["args"].keys():
                raise error
            return restore(self, step, *args, **kwargs)

        monkeypatch.setattr(ocp.CheckpointManager, "restore", denied)
        with pytest.raises(type(error)) as raised:
            fit(MODEL, x, y, **options)
        assert raised.value is error  # raised as it is
        assert f"checkpoint {tmp_path / '6'} could not be read" in "".join(raised.value.__notes__)
        assert sorted(os.listdir(tmp_path)) == ["3", "6"], error  # nothing moved aside
    monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)  # access granted again: the run resumes
    capsys.readouterr()
    state, history = fit(MODEL, x, y, **options)
    assert f"resumed from epoch 3, step 0 of {tmp_path}" in capsys.readouterr().out
    assert params_equal(state.params, expected.params) and history == expected_history


def damage_arrays(checkpoint, how: str) -> None:
    """Truncates, or overwrites with other bytes, the files of a checkpoint's arrays (not its JSON metadata)."""
    for file in (checkpoint / "tree" / "d").iterdir():
        data = file.read_bytes()
        file.write_bytes(data[: len(data) // 2] if how == "truncated" else bytes(b ^ 0x5A for b in data))


@pytest.mark.parametrize("how", ["truncated", "overwritten"])
def test_damaged_array_bytes_are_moved_aside_and_a_directory_left_with_none_is_refused(tmp_path, how):
    """tensorstore's DATA_LOSS / OUT_OF_RANGE: the bytes are bad, so the checkpoint is moved aside.

    Once every checkpoint has been moved aside, a later call refuses to start afresh (before the fix it
    trained from epoch 1 over the directory), until the moved-aside checkpoints are taken out of it.
    """
    x, y = blobs(n=20)
    options = dict(loss=CE, epochs=3, batch_size=8, verbose=0, checkpoint_dir=tmp_path)
    fit(MODEL, x, y, **{**options, "epochs": 2})
    for checkpoint_id in (3, 6):
        damage_arrays(tmp_path / str(checkpoint_id), how)
    with pytest.warns(RuntimeWarning) as warned:
        with pytest.raises(ValueError, match=rf"none of the checkpoints in {tmp_path} \(6, 3\) can be read") \
                as none_readable:
            fit(MODEL, x, y, **options)
    code = "OUT_OF_RANGE" if how == "truncated" else "DATA_LOSS"  # shorter than its index says; bytes that fail
    moved = [warning for warning in warned if warning.category is RuntimeWarning]  # to decode or whose
    assert len(moved) == 2                                                           # checksum fails
    for warning, checkpoint_id in zip(moved, (6, 3)):
        assert str(warning.message).startswith(f"checkpoint {tmp_path / str(checkpoint_id)} cannot be read "
                                               f"(ValueError: {code}: ")
    assert sorted(os.listdir(tmp_path)) == ["unreadable-3", "unreadable-6"]
    with pytest.raises(ValueError, match=rf"{tmp_path} holds only checkpoints moved aside as unreadable "
                                         r"\(unreadable-3, unreadable-6\)"):
        fit(MODEL, x, y, **options)
    assert sorted(os.listdir(tmp_path)) == ["unreadable-3", "unreadable-6"]  # nothing trained, nothing written
    assert "(moved aside as unreadable-3, unreadable-6, as the warnings say)" in str(none_readable.value)
    for name in ("unreadable-3", "unreadable-6"):  # asked: the moved-aside checkpoints taken away
        os.rename(tmp_path / name, tmp_path.parent / f"{tmp_path.name}-{name}")
    _, history = fit(MODEL, x, y, **options)
    assert len(history["loss"]) == 3 and checkpoint_ids(tmp_path) == [3, 6, 9]


def test_only_process_zero_moves_an_unreadable_checkpoint(tmp_path, monkeypatch):
    from jaxdl.training import run_checkpoint

    x, y = blobs(n=20)
    options = dict(loss=CE, epochs=2, batch_size=8, verbose=0, checkpoint_dir=tmp_path)
    fit(MODEL, x, y, **options)
    (tmp_path / "6" / "meta" / "metadata").write_text("{not json")
    monkeypatch.setattr(run_checkpoint, "_is_first_process", lambda: False)
    with pytest.warns(RuntimeWarning, match="checkpoint .*6 cannot be read"):
        fit(MODEL, x, y, **{**options, "epochs": 1})  # reads past 6 to 3, the end of the run asked for
    assert not [name for name in os.listdir(tmp_path) if name.startswith("unreadable")]  # process 1 moved nothing
