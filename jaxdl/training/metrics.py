"""Metrics: what `fit`, `evaluate` and the steps report beside the loss, as sums that add up over batches.

A metric is computed in three parts, so that it is exact under masking (a
padded last batch), across batches and across devices: statistics per
example (`Metric.per_example`), which a step multiplies by the batch's mask
and sums over the batch; those sums, which add up over batches and devices
(a step's `sums[name]`); and the metric itself, computed from the totals once
the data are seen (`metric_value`, which `metrics_from_sums` calls).

The totals take one of three forms, each telling how it is read:

- a number: the sum of a value per example, divided by the count of real
  examples and then `finalize`d (accuracy, MAE, MSE, RMSE's root, top-k);
- `{"sum", "count"}`: the sums of a numerator and a denominator per example,
  read as sum / count, 0 when the count is 0 (precision, recall, and every
  metric function of yours);
- `{"true_positives", "false_positives"}` at fixed thresholds (AUC).

Your own metric is a function with a custom loss's signature,
`(outputs, batch) -> values`: one value per example, averaged over the real
examples; or a pair `(sums, counts)`, one numerator and one denominator per
example, reported as their totals' ratio (for metrics that are not means).
Its `__name__` names it in the history, in `val_` names and in callbacks'
monitors. Models return logits, and so the metrics read logits.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdl.training import losses

# Keys of a step's sums that are not metrics, and the key `fit` adds to its logs.
RESERVED = ("loss", "count", "accepted_steps", "learning_rate")


def _identity(value: float) -> float:
    return value


def _zero() -> jax.Array:
    return jnp.zeros((), jnp.float32)


def _ratio_zeros() -> dict:
    return {"sum": _zero(), "count": _zero()}


@dataclasses.dataclass(frozen=True)
class Metric:
    """A metric: its name, its statistics per example, what its totals start from.

    Attributes:
      name: the metric's name in sums, logs and the history.
      per_example: `(outputs, labels) -> statistics` with a leading example
        axis (`(outputs, batch)` where `reads_batch`): one of the three forms
        of the module's docstring, per example.
      finalize: for a mean, what turns it into the metric (RMSE's root).
      zeros: `() -> totals` of no example, shaped as the sums.
      settings: `(name, value)` pairs besides the name that make the metric
        what it is (a top-k's `k`): a run checkpoint compares them.
      reads_batch: `per_example` takes the whole batch (a function of yours),
        not the labels.
    """

    name: str
    per_example: Callable
    finalize: Callable[[float], float] = _identity
    zeros: Callable[[], Any] = _zero
    settings: tuple = ()
    reads_batch: bool = False

    def description(self):
        """What a run checkpoint records of the metric: its name, with its settings where it has any."""
        return self.name if not self.settings else {"name": self.name, **dict(self.settings)}


# --- top-k accuracy -----------------------------------------------------------------------------


def _in_top_k(logits, labels, k: int):
    """1.0 where the label's logit is among the `k` largest (Keras's `in_top_k`: ties count as in)."""
    labels = labels.astype(jnp.int32).reshape(labels.shape[0])
    target = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    return (jnp.sum(logits > target, axis=-1) < k).astype(jnp.float32)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


@functools.lru_cache(maxsize=None)  # one object per settings: metrics are part of compiled steps' cache keys
def sparse_top_k_categorical_accuracy(k: int = 5, *, name: str | None = None) -> Metric:
    """Top-k accuracy for integer class labels, as Keras's `SparseTopKCategoricalAccuracy`.

    An example counts as right when its label's logit is among the `k`
    largest (ties count as right, as in Keras).

    Args:
      k: how many of the largest logits may hold the label; default 5.
      name: the history's name; default Keras's,
        "sparse_top_k_categorical_accuracy", or "sparse_top_{k}_categorical_accuracy"
        for a `k` other than 5 (so that two of them do not share a name).

    Returns:
      The `Metric`, for `fit(metrics=[...])`.

    Raises:
      ValueError: `k` is not a positive integer.
    """
    k = _positive_int("k", k)
    name = name or ("sparse_top_k_categorical_accuracy" if k == 5 else f"sparse_top_{k}_categorical_accuracy")
    return Metric(name, functools.partial(_sparse_top_k, k=k), settings=(("k", k),))


@functools.lru_cache(maxsize=None)
def top_k_categorical_accuracy(k: int = 5, *, name: str | None = None) -> Metric:
    """Top-k accuracy for one-hot labels, as Keras's `TopKCategoricalAccuracy` (the label: its row's argmax).

    Args:
      k: how many of the largest logits may hold the label; default 5.
      name: the history's name; default Keras's, "top_k_categorical_accuracy",
        or "top_{k}_categorical_accuracy" for a `k` other than 5.

    Returns:
      The `Metric`, for `fit(metrics=[...])`.

    Raises:
      ValueError: `k` is not a positive integer.
    """
    k = _positive_int("k", k)
    name = name or ("top_k_categorical_accuracy" if k == 5 else f"top_{k}_categorical_accuracy")
    return Metric(name, functools.partial(_top_k, k=k), settings=(("k", k),))


def _sparse_top_k(logits, labels, k: int):
    return _in_top_k(logits, labels, k)


def _top_k(logits, labels, k: int):
    return _in_top_k(logits, jnp.argmax(labels, axis=-1), k)


# --- binary labels: precision, recall, AUC -----------------------------------------------------


def _binary(metric: str, outputs, labels):
    """`(logits, positive)`, each `(N, L)`: a logit and a 0/1 label per output unit of each example.

    One-unit heads (`(N,)` or `(N, 1)` outputs) and multi-label heads (labels
    shaped as the outputs) are read unit by unit, micro-averaged as Keras
    does; a two-class softmax head with integer labels `(N,)` has class 1 as
    the positive one (its logit: the difference of the two).
    """
    if outputs.ndim == 1:
        outputs = outputs[:, None]
    if outputs.shape[-1] == 2 and labels.ndim == outputs.ndim - 1:
        outputs = (outputs[..., 1] - outputs[..., 0])[..., None]
    if labels.ndim == outputs.ndim - 1 and outputs.shape[-1] == 1:
        labels = labels[..., None]
    if labels.shape != outputs.shape:
        raise ValueError(f"the metric {metric!r} compares one logit with one binary label, but the outputs have "
                         f"shape {outputs.shape} and the labels {labels.shape}: give it a one-unit head (or one "
                         "unit per label, labels shaped as the outputs), or a two-class head with integer labels "
                         "of shape (N,)")
    n = outputs.shape[0]
    return outputs.reshape(n, -1), labels.reshape(n, -1) != 0


def _precision(logits, labels):
    logits, positive = _binary("precision", logits, labels)
    predicted = logits > 0
    return {"sum": jnp.sum(predicted & positive, axis=1, dtype=jnp.float32),
            "count": jnp.sum(predicted, axis=1, dtype=jnp.float32)}


def _recall(logits, labels):
    logits, positive = _binary("recall", logits, labels)
    return {"sum": jnp.sum((logits > 0) & positive, axis=1, dtype=jnp.float32),
            "count": jnp.sum(positive, axis=1, dtype=jnp.float32)}


@functools.lru_cache(maxsize=None)
def precision(*, name: str = "precision") -> Metric:
    """Precision for binary labels, as Keras's `Precision()`: true positives over predicted positives.

    An output unit predicts positive where its logit is above 0 (its
    probability above 0.5, as `accuracy` reads it); labels are positive where
    not 0. Counted over every real example (and every unit of a multi-label
    head), then divided once: 0 when nothing was predicted positive.

    Args:
      name: the history's name; default "precision".

    Returns:
      The `Metric`, for `fit(metrics=[...])` (or pass "precision").
    """
    return Metric(name, _precision, zeros=_ratio_zeros)


@functools.lru_cache(maxsize=None)
def recall(*, name: str = "recall") -> Metric:
    """Recall for binary labels, as Keras's `Recall()`: true positives over positive labels.

    Read as `precision` reads outputs and labels; 0 when no label is positive.

    Args:
      name: the history's name; default "recall".

    Returns:
      The `Metric`, for `fit(metrics=[...])` (or pass "recall").
    """
    return Metric(name, _recall, zeros=_ratio_zeros)


def auc_thresholds(num_thresholds: int) -> np.ndarray:
    """Keras's thresholds for `AUC(num_thresholds)`: just below 0, `i / (num_thresholds - 1)`, just above 1."""
    epsilon = 1e-7
    inner = [(i + 1) / (num_thresholds - 1) for i in range(num_thresholds - 2)]
    return np.asarray([-epsilon, *inner, 1.0 + epsilon], np.float32)


def _roc_counts(logits, labels, thresholds: np.ndarray):
    logits, positive = _binary("auc", logits, labels)
    above = jax.nn.sigmoid(logits)[..., None] > jnp.asarray(thresholds)  # (N, L, T)
    return {"true_positives": jnp.sum(above & positive[..., None], axis=1, dtype=jnp.float32),
            "false_positives": jnp.sum(above & ~positive[..., None], axis=1, dtype=jnp.float32)}


def _roc_zeros(num_thresholds: int) -> dict:
    zeros = jnp.zeros((num_thresholds,), jnp.float32)
    return {"true_positives": zeros, "false_positives": zeros}


@functools.lru_cache(maxsize=None)
def auc(num_thresholds: int = 200, *, name: str = "auc") -> Metric:
    """The area under the ROC curve for binary labels, as Keras's `AUC(num_thresholds=200)` computes it.

    Definition: each output's probability (the sigmoid of its logit) is
    compared with Keras's `num_thresholds` thresholds (`auc_thresholds`: just
    below 0, `i / (num_thresholds - 1)` for i = 1..num_thresholds-2, just
    above 1); the true and false positives above each threshold are counted
    over all real examples, and the ROC curve through those points
    (false positive rate, true positive rate) is integrated by the trapezoid
    rule (Keras's `summation_method="interpolation"` for ROC). That is the
    exact AUC (scikit-learn's `roc_auc_score`) of the probabilities rounded to
    their bucket between two thresholds: a positive and a negative example
    in the same bucket count as a tie (one half), so the area differs from
    the exact one by at most half the share of (positive, negative) pairs
    that share a bucket. Read as `precision` reads outputs and labels; 0
    when the labels hold only one class (as Keras).

    Args:
      num_thresholds: the number of thresholds, at least 3; default 200.
      name: the history's name; default "auc".

    Returns:
      The `Metric`, for `fit(metrics=[...])` (or pass "auc").

    Raises:
      ValueError: `num_thresholds` is not an integer above 2.
    """
    num_thresholds = _positive_int("num_thresholds", num_thresholds)
    if num_thresholds < 3:
        raise ValueError(f"num_thresholds must be at least 3 (Keras's bound), got {num_thresholds}")
    return Metric(name, functools.partial(_roc_counts, thresholds=auc_thresholds(num_thresholds)),
                  zeros=functools.partial(_roc_zeros, num_thresholds), settings=(("num_thresholds", num_thresholds),))


def _roc_area(true_positives: np.ndarray, false_positives: np.ndarray) -> float:
    """The trapezoid area under the ROC points of the thresholds (the first threshold: every example above)."""
    positives, negatives = float(true_positives[0]), float(false_positives[0])
    if positives == 0 or negatives == 0:
        return 0.0
    tpr, fpr = true_positives / positives, false_positives / negatives
    return float(np.sum((fpr[:-1] - fpr[1:]) * (tpr[:-1] + tpr[1:]) / 2))


# --- the registry, and your own functions -------------------------------------------------------


METRICS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", losses.correct),
    "mae": Metric("mae", losses.absolute_error),
    "mse": Metric("mse", losses.mean_squared_error),
    "rmse": Metric("rmse", losses.mean_squared_error, finalize=lambda mean: mean ** 0.5),
    "sparse_top_k_categorical_accuracy": sparse_top_k_categorical_accuracy(),
    "top_k_categorical_accuracy": top_k_categorical_accuracy(),
    "precision": precision(),
    "recall": recall(),
    "auc": auc(),
}

# The factories above, given themselves instead of called: their defaults (`metrics=[auc]` is "auc").
_FACTORIES = (sparse_top_k_categorical_accuracy, top_k_categorical_accuracy, precision, recall, auc)


def _is_factory(metric) -> bool:
    return any(metric is factory for factory in _FACTORIES)


def _function_statistics(function: Callable, name: str) -> Callable:
    """`(outputs, batch) -> {"sum", "count"}` per example from a function of yours (values, or (sums, counts))."""

    def per_example(outputs, batch):
        returned = function(outputs, batch)
        parts = tuple(returned) if isinstance(returned, (tuple, list)) else (returned,)
        n = outputs.shape[0]
        shapes = [jnp.shape(part) for part in parts]
        if len(parts) not in (1, 2) or any(shape != (n,) for shape in shapes):
            raise ValueError(f"the metric {name!r} returned {'a pair of shapes ' if len(parts) == 2 else ''}"
                             f"{shapes[0] if len(parts) == 1 else shapes} for a batch of {n} examples; a metric "
                             f"function returns one value per example (shape ({n},)), or a pair (sums, counts) "
                             "of that shape for a metric that is their totals' ratio")
        values = [jnp.asarray(part, jnp.float32) for part in parts]
        return {"sum": values[0], "count": values[1] if len(values) == 2 else jnp.ones((n,), jnp.float32)}

    return per_example


def name_of(metric) -> str:
    """A metric's name in sums, logs and the history: a built-in's name, a function's `__name__`."""
    if isinstance(metric, str):
        return metric
    if isinstance(metric, Metric):
        return metric.name
    if _is_factory(metric):
        return metric().name
    return getattr(metric, "__name__", repr(metric))


def get_metric(metric) -> Metric:
    """The `Metric` of a name, a `Metric`, a factory of this module or a function `(outputs, batch) -> values`.

    Raises:
      ValueError: an unknown name, or neither a name nor a function.
    """
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        try:
            return METRICS[metric]
        except KeyError:
            raise ValueError(f"unknown metric {metric!r}; choose from {sorted(METRICS)} or pass a function "
                             "(outputs, batch) -> one value per example") from None
    if _is_factory(metric):
        return metric()
    if callable(metric):
        name = name_of(metric)
        return Metric(name, _function_statistics(metric, name), zeros=_ratio_zeros, reads_batch=True)
    raise ValueError(f"unknown metric {metric!r}: a metric is a name from {sorted(METRICS)}, a function "
                     "(outputs, batch) -> one value per example, or a Metric of jaxdl.training.metrics")


def checked(metrics: Sequence) -> tuple:
    """The metrics, each looked up now so that a typo or a clash of names fails before anything compiles.

    Names (strings), this module's `Metric`s and functions are kept as given
    (they are part of the compiled steps' cache keys).

    Raises:
      ValueError: a string given for the list, an unknown name, a nameless
        function (a lambda, a `functools.partial`), a function named as a
        built-in metric, a `Metric` of your own with a `finalize`, a name
        reserved for the loss or the logs, or two metrics of one name.
    """
    if isinstance(metrics, str) or not isinstance(metrics, Sequence):
        raise ValueError(f"metrics must be a list of metric names or functions, got {metrics!r}; "
                         f"e.g. metrics=[{metrics!r}]")
    seen = {}
    for metric in metrics:
        get_metric(metric)
        name = name_of(metric)
        if not isinstance(metric, (str, Metric)) and not _is_factory(metric):
            if not isinstance(getattr(metric, "__name__", None), str) or name == "<lambda>":
                raise ValueError(f"the metric function {metric!r} has no name for the history: define it with "
                                 "def (its __name__ names it in the logs), or set its __name__")
            if name in METRICS:
                raise ValueError(f"the metric function {metric!r} is named {name!r}, as the built-in metric; "
                                 f"rename it, or pass {name!r} for the built-in one")
        if isinstance(metric, Metric) and metric.finalize is not _identity and METRICS.get(name) is not metric:
            # The finalizer is applied by name, from this module's registry (`metric_value` sees only totals):
            # one of another Metric would be skipped, silently.
            raise ValueError(f"the Metric {name!r} has its own finalize, which jaxdl cannot apply to its totals: "
                             "return (sums, counts) per example for a ratio, or finalize the logged mean yourself")
        if name in RESERVED:
            raise ValueError(f"a metric may not be named {name!r}: fit's logs use that name for {name}")
        if name in seen:
            raise ValueError(f"two metrics are named {name!r} ({seen[name]!r} and {metric!r}): each names one "
                             "entry of the history; give one of them another name")
        seen[name] = metric
    return tuple(metrics)


def reads_labels(metrics: Sequence) -> bool:
    """Whether any of the metrics reads the batch's labels (a function of yours reads what it takes)."""
    return any(not get_metric(metric).reads_batch for metric in metrics)


def batch_sums(metric, outputs, batch: dict, label_key: str, mask) -> Any:
    """The metric's statistics summed over the batch's real examples (`mask` 1), in the form its totals take."""
    found = get_metric(metric)
    statistics = found.per_example(outputs, batch if found.reads_batch else batch[label_key])
    return jax.tree.map(lambda s: jnp.sum(s * mask.reshape(mask.shape + (1,) * (s.ndim - 1)), axis=0),
                        statistics)


def zeros(metrics: Sequence) -> dict:
    """`{name: totals of no example}` for the metrics."""
    return {name_of(metric): get_metric(metric).zeros() for metric in metrics}


def metric_value(name: str, totals, count: float) -> float:
    """The metric of its totals (fetched to the host) over `count` real examples, read by their form."""
    if isinstance(totals, dict) and "true_positives" in totals:
        return _roc_area(np.asarray(totals["true_positives"], np.float64),
                         np.asarray(totals["false_positives"], np.float64))
    if isinstance(totals, dict):
        denominator = float(totals["count"])
        return float(totals["sum"]) / denominator if denominator else 0.0
    found = METRICS.get(name)
    return float((found.finalize if found is not None else _identity)(float(totals) / count))
