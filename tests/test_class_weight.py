"""class_weight reads labels as Keras does: (N,) classes, (N, 1) binary labels rounded, (N, C) one-hot argmaxed."""
import jax
import numpy as np
import pytest

from jaxdl import MLP, data, fit

WEIGHTS = {0: 1.0, 1: 10.0}


def weights_of(y, class_weight=WEIGHTS):
    return [class_weight[c] for c in data.class_indices(np.asarray(y)).tolist()]


def test_binary_labels_shaped_n_by_1_are_rounded_and_squeezed():
    assert weights_of([[0], [1], [1], [0]]) == [1, 10, 10, 1]
    np.testing.assert_array_equal(data.class_indices(np.asarray([[0.1], [0.9], [0.51], [0.0]], np.float32)),
                                  [0, 1, 1, 0])  # probabilities (label smoothing) as Keras: rounded


def test_class_labels_one_hot_labels_and_whole_float_labels():
    indices = data.class_indices(np.asarray([2, 0, 1], np.uint8))
    assert indices.tolist() == [2, 0, 1] and indices.shape == (3,) and np.issubdtype(indices.dtype, np.integer)
    assert data.class_indices(np.asarray([2.0, 0.0, 1.0], np.float32)).tolist() == [2, 0, 1]
    assert data.class_indices(np.eye(3, dtype=np.float32)[[1, 2, 0, 1]]).tolist() == [1, 2, 0, 1]
    assert data.class_indices(np.asarray([True, False])).tolist() == [1, 0]


@pytest.mark.parametrize("y, message", [
    (np.asarray([0.5, 1.0]), r"y holds 0\.5 \(example 0\), not a class number: class_weight reads whole-number"),
    (np.zeros((2, 3, 3)), r"y has labels of shape \(3, 3\) per example; class_weight reads"),
    (np.asarray([[np.nan], [1.0]]), r"y holds NaN or infinite labels \(example 0\)"),
    (np.asarray(["a", "b"]), r"y holds <U1 values; class_weight reads numeric labels"),
])
def test_labels_class_weight_cannot_read_are_named(y, message):
    with pytest.raises(ValueError, match=message):
        data.class_indices(y)


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
