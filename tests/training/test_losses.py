import jax.numpy as jnp
import numpy as np
import pytest

from jaxdl.training import losses, metrics
from tests.support import tolerance

LOGITS = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
LABELS = jnp.array([0, 1])


def reference_softmax_ce(logits, labels):
    logits = np.asarray(logits, np.float64)
    log_z = np.log(np.exp(logits).sum(axis=1))
    return log_z - logits[np.arange(len(labels)), labels]


def test_cross_entropy_integer_and_one_hot_agree_with_formula():
    expected = reference_softmax_ce(LOGITS, np.asarray(LABELS))
    tolerance.assert_close(losses.sparse_categorical_crossentropy(LOGITS, LABELS), expected, tolerance.ONE_OP)
    one_hot = jnp.eye(3)[LABELS]
    tolerance.assert_close(losses.categorical_crossentropy(LOGITS, one_hot), expected, tolerance.ONE_OP)


def test_binary_crossentropy_accepts_flat_labels():
    logits = jnp.array([[0.0], [2.0]])
    expected = [np.log(2.0), np.log1p(np.exp(-2.0))]
    tolerance.assert_close(losses.binary_crossentropy(logits, jnp.array([1, 1])), expected, tolerance.ONE_OP)


def test_regression_losses():
    out, target = jnp.array([[1.0], [4.0]]), jnp.array([0.0, 1.0])
    tolerance.assert_close(losses.mean_squared_error(out, target), [1.0, 9.0], tolerance.ONE_OP)
    tolerance.assert_close(losses.huber(out, target), [0.5, 2.5], tolerance.ONE_OP)
    tolerance.assert_close(losses.absolute_error(out, target), [1.0, 3.0], tolerance.ONE_OP)
    assert metrics.get_metric("rmse").finalize(9.0) == 3.0


def test_accuracy_for_integer_one_hot_and_binary_labels():
    np.testing.assert_array_equal(losses.correct(LOGITS, jnp.array([0, 1])), [1.0, 0.0])
    np.testing.assert_array_equal(losses.correct(LOGITS, jnp.eye(3)[jnp.array([0, 2])]), [1.0, 1.0])
    np.testing.assert_array_equal(losses.correct(jnp.array([[0.3], [-0.2]]), jnp.array([1, 1])), [1.0, 0.0])


def test_confusion_matrix_counts_rows_as_truth():
    matrix = losses.confusion_matrix([0, 0, 1, 2, 2], [0, 1, 1, 2, 0], 3)
    np.testing.assert_array_equal(matrix, [[1, 1, 0], [0, 1, 0], [1, 0, 1]])


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown loss 'crossentropy'"):
        losses.get_loss("crossentropy")
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        metrics.get_metric("f1")
