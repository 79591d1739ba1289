"""class_weight reads labels as Keras does: (N,) classes, (N, 1) binary labels rounded, (N, C) one-hot argmaxed;
weighted epochs against a float64 reference."""
import jax
import numpy as np
import optax
import pytest

from jaxdl import MLP, create_train_state, data, fit
from jaxdl.training.adapters import example_weights
from jaxdl.training.steps import seed_rngs
from tests.support import tolerance
from tests.support.toy_data import CE, blobs

WEIGHTS = {0: 1.0, 1: 10.0}


def weights_of(y, class_weight=WEIGHTS):
    return [class_weight[c] for c in data.arrays.class_indices(np.asarray(y)).tolist()]


def test_binary_labels_shaped_n_by_1_are_rounded_and_squeezed():
    assert weights_of([[0], [1], [1], [0]]) == [1, 10, 10, 1]
    np.testing.assert_array_equal(data.arrays.class_indices(np.asarray([[0.1], [0.9], [0.51], [0.0]], np.float32)),
                                  [0, 1, 1, 0])  # probabilities (label smoothing) as Keras: rounded


def test_class_labels_one_hot_labels_and_whole_float_labels():
    indices = data.arrays.class_indices(np.asarray([2, 0, 1], np.uint8))
    assert indices.tolist() == [2, 0, 1] and indices.shape == (3,) and np.issubdtype(indices.dtype, np.integer)
    assert data.arrays.class_indices(np.asarray([2.0, 0.0, 1.0], np.float32)).tolist() == [2, 0, 1]
    assert data.arrays.class_indices(np.eye(3, dtype=np.float32)[[1, 2, 0, 1]]).tolist() == [1, 2, 0, 1]
    assert data.arrays.class_indices(np.asarray([True, False])).tolist() == [1, 0]


@pytest.mark.parametrize("y, message", [
    (np.asarray([0.5, 1.0]), r"y holds 0\.5 \(example 0\), not a class number: class_weight reads whole-number"),
    (np.zeros((2, 3, 3)), r"y has labels of shape \(3, 3\) per example; class_weight reads"),
    (np.asarray([[np.nan], [1.0]]), r"y holds NaN or infinite labels \(example 0\)"),
    (np.asarray(["a", "b"]), r"y holds <U1 values; class_weight reads numeric labels"),
])
def test_labels_class_weight_cannot_read_are_named(y, message):
    with pytest.raises(ValueError, match=message):
        data.arrays.class_indices(y)


def binary_examples(n=16, seed=0):
    """Example dicts with labels shaped (1,), as a Keras-style binary dataset stores them."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 4 == 1) | (np.arange(n) % 4 == 2)
    x = rng.normal(size=(n, 2)).astype(np.float32) + y[:, None]
    return [{"image": row, "label": np.asarray([label], np.float32)} for row, label in zip(x, y)]


def test_a_sources_binary_labels_shaped_1_get_their_class_weight():
    source = binary_examples(4)
    batches = data.as_batches(source, batch_size=4, shuffle=False, class_weight=WEIGHTS)
    batch = next(iter(batches.epoch(0)))
    np.testing.assert_array_equal(batch["y"], [[0], [1], [1], [0]])
    np.testing.assert_array_equal(batch["weight"], [1, 10, 10, 1])
    one_hot = [{"image": np.zeros(2, np.float32), "label": np.eye(3, dtype=np.float32)[c]} for c in (2, 0, 1)]
    batch = next(iter(data.as_batches(one_hot, batch_size=3, shuffle=False,
                                      class_weight={0: 1.0, 1: 2.0, 2: 3.0}).epoch(0)))
    np.testing.assert_array_equal(batch["weight"], [3, 1, 2])


def test_a_weighted_binary_fit_on_a_source_differs_from_an_unweighted_one():
    options = dict(loss="binary_crossentropy", epochs=2, batch_size=8, shuffle=False, verbose=0)
    runs = [fit(MLP(features=(4,), num_outputs=1), binary_examples(), **options, **extra)
            for extra in ({}, {"class_weight": {0: 1.0, 1: 1.0}}, {"class_weight": WEIGHTS})]
    (plain, _), (ones, _), (weighted, _) = runs
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(ones.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6)  # weights of 1 change nothing
    difference = max(float(np.abs(a - b).max())
                     for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(weighted.params)))
    assert difference > 1e-3


def float64_sgd_epochs(params, x, y, weights, batch_size, epochs, rate):
    """A linear softmax model trained by SGD in numpy float64, as fit's epochs do, written out.

    Each step minimises `sum(weight * cross-entropy) / (real examples in the batch)`; an epoch
    logs the weighted losses and the (unweighted) correct answers of every batch, summed over the
    epoch and divided by its number of examples. Returns the final (kernel, bias) and the logs, with
    the accuracy a weighted metric would log besides.
    """
    kernel, bias = (np.asarray(params["logits"][name], np.float64) for name in ("kernel", "bias"))
    x, weights = np.asarray(x, np.float64), np.asarray(weights, np.float64)
    history = {"loss": [], "accuracy": [], "weighted accuracy": []}
    for _ in range(epochs):
        loss_sum = correct = weighted_correct = 0.0
        for start in range(0, len(x), batch_size):  # the last batch: fewer real examples, no padding in the sums
            rows = slice(start, start + batch_size)
            logits = x[rows] @ kernel + bias
            logits -= logits.max(axis=1, keepdims=True)
            probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
            picked = np.arange(len(probabilities)), y[rows]
            loss_sum += np.sum(weights[rows] * -np.log(probabilities[picked]))
            correct += np.sum(probabilities.argmax(axis=1) == y[rows])
            weighted_correct += np.sum(weights[rows] * (probabilities.argmax(axis=1) == y[rows]))
            gradient = probabilities.copy()
            gradient[picked] -= 1.0
            gradient *= weights[rows, None] / len(probabilities)
            kernel, bias = kernel - rate * x[rows].T @ gradient, bias - rate * gradient.sum(axis=0)
        history["loss"].append(loss_sum / len(x))
        history["accuracy"].append(correct / len(x))
        history["weighted accuracy"].append(weighted_correct / len(x))  # what a weighted metric would log
    return {"logits": {"kernel": kernel, "bias": bias}}, history


@pytest.mark.parametrize("weighting", ["class_weight", "sample_weight"])
def test_weighted_epochs_match_a_float64_reference_and_metrics_stay_unweighted(weighting):
    """Weighted losses over three batches, the last one padded (22 examples, batches of 8), two epochs of SGD:
    fit's logged loss, accuracy and final parameters against the float64 reference above.

    Seen failing on two broken variants: padding rows let into a weighted loss (a mask dropped where weights
    are given), and the accuracy weighted as the loss is (Keras's metrics, and jaxdl's, are unweighted).
    """
    x, y = blobs(22)
    extra = ({"class_weight": {0: 1.0, 1: 4.0, 2: 0.25}} if weighting == "class_weight" else
             {"sample_weight": np.linspace(0.1, 3.0, 22).astype(np.float32)})
    weights = [{0: 1.0, 1: 4.0, 2: 0.25}[c] for c in y] if weighting == "class_weight" else extra["sample_weight"]
    np.testing.assert_array_equal(example_weights(y, extra.get("class_weight"), extra.get("sample_weight")), weights)
    model, optimizer = MLP(features=(), num_outputs=3), optax.sgd(0.3)
    start = create_train_state(model, optimizer, (3,), seed_rngs(0)[0]).params
    state, history = fit(model, x, y, loss=CE, optimizer=optimizer, epochs=2, batch_size=8, shuffle=False, seed=0,
                         verbose=0, **extra)
    expected_params, expected = float64_sgd_epochs(start, x, y, weights, batch_size=8, epochs=2, rate=0.3)
    tolerance.assert_close(history["loss"], expected["loss"], tolerance.FEW_OPS, "loss")
    tolerance.assert_close(state.params, expected_params, tolerance.FEW_OPS, "parameters")
    assert history["accuracy"] == expected["accuracy"]  # counts out of 22: exact
    assert all(abs(a - b) > 0.05 for a, b in zip(expected["accuracy"], expected["weighted accuracy"]))
