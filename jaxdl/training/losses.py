"""Per-example losses, and the per-example values of some metrics, built on optax.

Every function here maps a batch of model outputs and labels to one value per
example, so that a train step can mask padded examples and `fit` can average
exactly over the real ones. Models return logits; the softmax or sigmoid
lives in the loss, as with Keras's `from_logits=True`. The metrics themselves
(their names, your own functions, precision, AUC) are `jaxdl.training.metrics`.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import optax

PerExample = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def _per_example_mean(values: jnp.ndarray) -> jnp.ndarray:
    """Averages every axis but the first (the batch axis)."""
    return values.reshape(values.shape[0], -1).mean(axis=1)


def _as_output_shape(outputs: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    """Lets (N,) targets meet (N, 1) outputs, as Keras does for one-unit heads."""
    if labels.ndim == outputs.ndim - 1 and outputs.shape[-1] == 1:
        labels = labels[..., None]
    return labels.astype(outputs.dtype)


def sparse_categorical_crossentropy(logits, labels):
    """Softmax cross-entropy with integer class labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))


def categorical_crossentropy(logits, labels):
    """Softmax cross-entropy with one-hot (or soft) labels."""
    return optax.softmax_cross_entropy(logits, labels.astype(logits.dtype))


def binary_crossentropy(logits, labels):
    """Sigmoid cross-entropy for 0/1 labels, averaged over output units."""
    return _per_example_mean(optax.sigmoid_binary_cross_entropy(logits, _as_output_shape(logits, labels)))


def mean_squared_error(outputs, targets):
    return _per_example_mean(optax.squared_error(outputs, _as_output_shape(outputs, targets)))


def huber(outputs, targets, delta: float = 1.0):
    return _per_example_mean(optax.huber_loss(outputs, _as_output_shape(outputs, targets), delta=delta))


LOSSES: dict[str, PerExample] = {
    "sparse_categorical_crossentropy": sparse_categorical_crossentropy,
    "categorical_crossentropy": categorical_crossentropy,
    "binary_crossentropy": binary_crossentropy,
    "mse": mean_squared_error,
    "huber": huber,
}


def get_loss(loss: str | PerExample) -> PerExample:
    if callable(loss):
        return loss
    try:
        return LOSSES[loss]
    except KeyError:
        raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)} or pass a function") from None


def predicted_classes(logits: jnp.ndarray) -> jnp.ndarray:
    """Class indices: argmax for multi-class heads, logit > 0 for one-unit heads."""
    if logits.shape[-1] == 1:
        return (logits[..., 0] > 0).astype(jnp.int32)
    return jnp.argmax(logits, axis=-1)


def correct(logits, labels):
    """1.0 where the predicted class equals the label (integer, one-hot or 0/1)."""
    if logits.shape[-1] != 1 and labels.ndim == logits.ndim:
        labels = jnp.argmax(labels, axis=-1)
    labels = labels.reshape(labels.shape[0], -1)[:, 0] if logits.shape[-1] == 1 else labels
    return (predicted_classes(logits) == labels.astype(jnp.int32)).astype(jnp.float32)


def absolute_error(outputs, targets):
    return _per_example_mean(jnp.abs(outputs - _as_output_shape(outputs, targets)))


def confusion_matrix(labels, predictions, num_classes: int) -> jnp.ndarray:
    """Counts, with true classes as rows and predicted classes as columns."""
    labels = jnp.asarray(labels, jnp.int32)
    predictions = jnp.asarray(predictions, jnp.int32)
    return jnp.zeros((num_classes, num_classes), jnp.int32).at[labels, predictions].add(1)
