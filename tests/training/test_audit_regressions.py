"""Regression tests for the bugs a mutation audit planted and no other test caught (issue 34).

Each test watches what a user can see: the examples a model is given in
each epoch, the dropout masks and random draws it makes, the accuracy
`evaluate` reports, the statistics and parameters `fit` returns, and
whether a resumed run is refused or stops where an uninterrupted run
stops.
"""
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdl import MLP, EarlyStopping, create_train_state, evaluate, fit, predict
from tests.support.tolerance import FEW_OPS, assert_close
from tests.support.toy_data import CE, blobs


class Recorder(nn.Module):
    """Dense logits of its inputs after dropout and added noise, handing `record` what it saw in training.

    `record(x, kept, noise)` gets, at every training step, the batch's
    inputs, the dropout mask (1 kept, 0 dropped) and the noise drawn from
    the `augment` stream, as the model computed them.
    """

    record: Callable
    num_outputs: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False):
        kept = nn.Dropout(0.5, deterministic=not train)(jnp.ones_like(x)) * 0.5  # undo the 1/(1-rate) scale
        noise = jax.random.uniform(self.make_rng("augment"), x.shape) if train else jnp.zeros_like(x)
        if train:
            jax.debug.callback(self.record, x, kept, noise, ordered=True)
        return nn.Dense(self.num_outputs)(x * kept + noise)


def recorded_fit(x, y, **options):
    """`(seen, state, history)`: fit of a `Recorder`, `seen` one (x, kept, noise) per training step, in order."""
    seen = []
    model = Recorder(lambda *arrays: seen.append(tuple(np.asarray(a) for a in arrays)))
    state, history = fit(model, x, y, loss=CE, verbose=0, **options)
    jax.effects_barrier()
    return seen, state, history


# --- 1. each epoch's shuffle -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["arrays, scanned", "arrays, streamed", "a source"])
def test_each_epoch_is_read_in_a_new_order(tmp_path, path):
    # One feature per example, its own number: the inputs the model sees in a step name the examples.
    x = np.arange(12, dtype=np.float32)[:, None]
    y = np.arange(12, dtype=np.int32) % 3
    options = dict(epochs=3, batch_size=4, seed=0)
    if path == "arrays, streamed":  # checkpoints every few steps stream host batches instead of the scan
        options.update(checkpoint_dir=tmp_path / "run", checkpoint_every=3)
    if path == "a source":  # read batch by batch (uncached), in orders drawn from (seed, epoch)
        x, y = [{"image": row, "label": label} for row, label in zip(x, y)], None
        options["cache"] = False
    seen, _, _ = recorded_fit(x, y, **options)
    assert len(seen) == 9  # 3 epochs of 3 batches, every step recorded once
    orders = [np.concatenate([inputs[:, 0] for inputs, _, _ in seen[e * 3:(e + 1) * 3]]).astype(int)
              for e in range(3)]
    for order in orders:  # each epoch is one pass over every example
        assert sorted(order.tolist()) == list(range(12)), orders
    assert not np.array_equal(orders[0], np.arange(12)), orders  # shuffled at all
    # The epochs' orders differ from each other: the shuffle key is folded with the epoch (or its first step).
    assert len({tuple(order) for order in orders}) == 3, orders


# --- 2. accuracy on (N, 1) binary labels -----------------------------------------------------


def test_accuracy_of_a_one_unit_head_on_column_labels_is_the_hand_computed_fraction():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 2)).astype(np.float32)
    y = rng.integers(0, 2, (10, 1)).astype(np.float32)  # binary labels as a column, Keras's usual form
    model = MLP(features=(), num_outputs=1)
    state = create_train_state(model, optax.sgd(0.1), (2,), jax.random.key(1))
    logits = predict(state, x, batch_size=4)[:, 0]
    hand = float(np.mean((logits > 0).astype(np.float32) == y[:, 0]))
    assert 0.0 < hand < 1.0  # a fraction that a broadcast (N, N) comparison would not reproduce
    got = evaluate(state, x, y, loss="binary_crossentropy", batch_size=4)["accuracy"]
    assert got == pytest.approx(hand, abs=1e-6)  # 10 ones and zeros summed: exact in float32; 1e-6 for the mean


# --- 3. BatchNorm and drop_remainder in the scanned epoch ------------------------------------


def test_a_batchnorm_run_with_drop_remainder_never_sees_the_dropped_last_batch():
    x, y = blobs(n=10, features=2, classes=2, seed=1)
    x[8:] = 1000.0  # the last, partial batch (8 + 2 with batch_size 4): outliers drop_remainder must leave out
    model = MLP(features=(), num_outputs=2, input_batch_norm=True)  # BatchNorm on the inputs themselves
    options = dict(loss=CE, epochs=2, batch_size=4, shuffle=False, drop_remainder=True, verbose=0, seed=0)
    state, _ = fit(model, x, y, **options)
    only_full, _ = fit(model, x[:8], y[:8], **options)
    mean = state.batch_stats["input_batch_norm"]["mean"]
    assert np.abs(np.asarray(mean)).max() < 10.0  # the inputs of the full batches are blobs within ~8 of 0
    # The same steps on the same full batches: equal up to the rounding of two compiled programs.
    assert_close(state.batch_stats, only_full.batch_stats, FEW_OPS)
    assert_close(state.params, only_full.params, FEW_OPS)


# --- 4. validation_split and per-example weights ---------------------------------------------


@pytest.mark.parametrize("weighting", ["sample_weight", "class_weight"])
def test_validation_split_keeps_each_weight_with_its_example(weighting):
    x, y = blobs(n=16, features=3, classes=3, seed=2)
    weights = {"sample_weight": np.linspace(0.1, 3.0, 16).astype(np.float32)} if weighting == "sample_weight" \
        else {"class_weight": {0: 0.2, 1: 1.0, 2: 5.0}}
    options = dict(loss=CE, epochs=2, batch_size=4, verbose=0, seed=0)
    split, split_history = fit(MLP(features=(4,), num_outputs=3), x, y, validation_split=0.25, **weights,
                               **options)
    head = {"sample_weight": weights["sample_weight"][:12]} if weighting == "sample_weight" else weights
    given, given_history = fit(MLP(features=(4,), num_outputs=3), x[:12], y[:12], validation_data=(x[12:], y[12:]),
                               **head, **options)
    # The first 12 examples with their own weights, the last 4 to validate: the same run twice.
    assert_close(split_history["loss"], given_history["loss"], FEW_OPS)
    assert_close(split_history["val_loss"], given_history["val_loss"], FEW_OPS)
    assert_close(split.params, given.params, FEW_OPS)


# --- 5. the data fingerprint of a resumed run ------------------------------------------------


@pytest.mark.parametrize("change", ["one label", "sample weights", "a source's labels", "a source's class weights"])
def test_a_resume_over_changed_labels_or_weights_is_refused(tmp_path, change):
    x, y = blobs(n=24, features=3, classes=3, seed=3)
    weight, class_weight = np.ones(24, np.float32), {0: 1.0, 1: 1.0, 2: 1.0}
    options = dict(loss=CE, batch_size=8, verbose=0, seed=0, checkpoint_dir=tmp_path / "run")

    def train(epochs):
        if change.startswith("a source"):
            source = [{"image": row, "label": label} for row, label in zip(x, y)]
            return fit(MLP(features=(4,), num_outputs=3), source, epochs=epochs, class_weight=class_weight,
                       **options)
        return fit(MLP(features=(4,), num_outputs=3), x, y, epochs=epochs, sample_weight=weight, **options)

    train(1)
    if change == "one label":
        y = y.copy()
        y[5] = (y[5] + 1) % 3
    elif change == "sample weights":
        weight = weight.copy()
        weight[5] = 2.0
    elif change == "a source's labels":
        y = (y + 1) % 3  # every example relabelled
    else:
        class_weight = {0: 5.0, 1: 1.0, 2: 1.0}
    with pytest.raises(ValueError, match="is of another run .*data_fingerprint"):
        train(2)


# --- 6. EarlyStopping across a resume ------------------------------------------------------


def test_early_stopping_resumed_mid_patience_stops_at_the_uninterrupted_runs_epoch(tmp_path):
    x, y = blobs(n=16, features=3, classes=3, seed=4)
    # A learning rate of 0: the loss never improves after the first epoch (min_delta covers the rounding of
    # summing the same losses in another order), so the run stops once `patience` epochs have passed.
    options = dict(loss=CE, batch_size=8, verbose=0, seed=0, optimizer=optax.sgd(0.0))

    def train(epochs, directory):
        stop = EarlyStopping("loss", patience=2, min_delta=1e-3)
        _, history = fit(MLP(features=(4,), num_outputs=3), x, y, epochs=epochs, callbacks=[stop],
                         checkpoint_dir=directory, **options)
        return history, stop

    uninterrupted, stop = train(10, tmp_path / "uninterrupted")
    assert len(uninterrupted["loss"]) == 3 and stop.stopped_epoch == 2  # best at epoch 0, then 2 without gain
    train(2, tmp_path / "run")  # ends after epoch 1, one epoch into its patience
    resumed, stop = train(10, tmp_path / "run")
    assert stop.stopped_epoch == 2, resumed
    assert resumed["loss"] == uninterrupted["loss"]


# --- 7. dropout and augmentation keys per step ---------------------------------------------


def test_dropout_masks_and_augmentation_draws_differ_from_step_to_step():
    x = np.ones((8, 6), np.float32)
    y = np.zeros(8, np.int32)
    seen, _, _ = recorded_fit(x, y, epochs=2, batch_size=4, seed=0, shuffle=False)
    assert len(seen) == 4  # 2 epochs of 2 batches
    masks = [kept for _, kept, _ in seen]
    draws = [noise for _, _, noise in seen]
    for mask in masks:  # a real dropout mask: some units kept, some dropped
        assert set(np.unique(mask).tolist()) == {0.0, 1.0}, mask
    # Each step draws its own mask and its own noise, also in the second epoch over the same batches.
    assert len({mask.tobytes() for mask in masks}) == 4, masks
    assert len({draw.tobytes() for draw in draws}) == 4, draws


# --- 8. the label range check ----------------------------------------------------------------


def test_a_label_equal_to_the_number_of_classes_is_refused():
    x, y = blobs(n=12, features=3, classes=3, seed=5)
    y = y.copy()
    y[7] = 3  # the model has 3 outputs: classes 0..2
    with pytest.raises(ValueError, match=r"y holds classes 0\.\.3, but the model has 3 outputs"):
        fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, epochs=1, batch_size=4, verbose=0)
    state = create_train_state(MLP(features=(4,), num_outputs=3), optax.sgd(0.1), (3,), jax.random.key(0))
    with pytest.raises(ValueError, match=r"y holds classes 0\.\.3, but the model has 3 outputs"):
        evaluate(state, x, y, loss=CE)
