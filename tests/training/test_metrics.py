"""Metrics: your own functions by name in fit, evaluate, callbacks and checkpoints; the built-ins against scikit-learn.

Every comparison runs the metric through `evaluate` (or `fit`'s validation) over a number of examples that
leaves a padded last batch, so the masking and the sums across batches are what is checked, not one call.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.metrics import (
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
    top_k_accuracy_score,
)

from jaxdl import MLP, EarlyStopping, create_train_state, evaluate, fit, predict
from jaxdl.training import metrics
from tests.support import tolerance

BCE = "binary_crossentropy"


class Given(nn.Module):
    """Outputs its input (times a parameter of 1.0, exact), so that a test chooses the logits themselves."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return x * self.param("one", nn.initializers.ones, ())


def given_logits(width: int):
    return create_train_state(Given(), optax.sgd(0.1), (width,), jax.random.key(0))


def binary_data(n=203, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(np.int32)
    logits = (rng.normal(size=n) + 1.2 * (y - 0.5)).astype(np.float32)
    return logits, y


# --- your own metrics -----------------------------------------------------------------------------


def log_loss_of_logit(outputs, batch):
    """Per-example binary log loss of a one-unit head: a mean, as a custom loss's values."""
    logit, label = outputs[:, 0], batch["y"].astype(jnp.float32)
    return jax.nn.softplus(logit) - label * logit


def positives_found(outputs, batch):
    """(hits, positives) per example: their totals' ratio is the recall, not a mean of anything."""
    positive = batch["y"] == 1
    return (outputs[:, 0] > 0) & positive, positive


def test_a_function_of_yours_is_a_metric_by_its_name_in_fit_evaluate_and_a_callbacks_monitor():
    logits, y = binary_data()
    x = logits[:, None]
    custom = [log_loss_of_logit, positives_found]
    state, history = fit(MLP(features=(4,), num_outputs=1), x, y, loss=BCE, metrics=custom, epochs=2,
                         batch_size=16, verbose=0, validation_data=(x[:53], y[:53]),
                         callbacks=[EarlyStopping("val_positives_found", patience=5, mode="max")])
    assert sorted(history) == ["log_loss_of_logit", "loss", "positives_found", "val_log_loss_of_logit", "val_loss",
                               "val_positives_found"]
    outputs = predict(state, x)[:, 0].astype(np.float64)
    by_hand = np.mean(np.logaddexp(0.0, outputs) - y * outputs)  # log(1 + e^z) - y z, per example
    found = evaluate(state, x, y, loss=BCE, metrics=custom, batch_size=16)  # 203 = 12 x 16 + 11: a padded batch
    # float32 per-example values summed over 203 examples in another order than numpy's float64: FEW_OPS.
    tolerance.assert_close(found["log_loss_of_logit"], by_hand, tolerance.FEW_OPS)
    tolerance.assert_close(found["log_loss_of_logit"], log_loss(y, 1 / (1 + np.exp(-outputs))), tolerance.FEW_OPS)
    # Counts of examples: exact integers in float32, one division on the host.
    tolerance.assert_close(found["positives_found"], recall_score(y, outputs > 0), tolerance.ONE_OP)
    tolerance.assert_close(found["loss"], by_hand, tolerance.FEW_OPS)
    # The last epoch's validation ran on the returned state: the same computation on the first 53 examples.
    tolerance.assert_close(history["val_positives_found"][-1], recall_score(y[:53], outputs[:53] > 0),
                           tolerance.ONE_OP)
    monitors = ("val_precision", "recall", "val_auc", "val_sparse_top_k_categorical_accuracy", "log_loss_of_logit")
    assert [EarlyStopping(monitor).mode for monitor in monitors] == ["max", "max", "max", "max", "min"]


def test_bad_metrics_are_named_before_anything_compiles():
    def margin(outputs, batch):
        return outputs  # (N, 1): not one value per example

    cases = [(["accuracy", lambda outputs, batch: outputs[:, 0]], "has no name for the history"),
             (["f1"], "unknown metric 'f1'"),
             ("accuracy", "metrics must be a list"),
             (["auc", metrics.auc(num_thresholds=50)], "two metrics are named 'auc'"),
             ([log_loss_of_logit, log_loss_of_logit], "two metrics are named 'log_loss_of_logit'")]
    for given, message in cases:
        with pytest.raises(ValueError, match=message):
            metrics.checked(given)

    def precision(outputs, batch):
        return outputs[:, 0]

    with pytest.raises(ValueError, match="is named 'precision', as the built-in metric"):
        metrics.checked([precision])
    count = precision
    count.__name__ = "count"
    with pytest.raises(ValueError, match="may not be named 'count'"):
        metrics.checked([count])
    # A finalizer is applied by name from the registry: another Metric's would have been skipped, silently.
    root = metrics.Metric("root_mse", metrics.METRICS["mse"].per_example, finalize=lambda mean: mean ** 0.5)
    with pytest.raises(ValueError, match="the Metric 'root_mse' has its own finalize, which jaxdl cannot apply"):
        metrics.checked([root])
    metrics.checked([metrics.METRICS["rmse"]])  # the registry's own, whose finalizer is applied
    named = metrics.checked([metrics.recall, metrics.sparse_top_k_categorical_accuracy(3)])
    assert [metrics.name_of(metric) for metric in named] == ["recall", "sparse_top_3_categorical_accuracy"]
    logits, y = binary_data(n=8)
    with pytest.raises(ValueError, match=r"the metric 'margin' returned \(8, 1\) for a batch of 8 examples"):
        evaluate(given_logits(1), logits[:, None], y, loss=BCE, metrics=[margin], batch_size=8)


# --- the built-ins against scikit-learn -----------------------------------------------------------


def test_top_k_accuracy_for_integer_and_one_hot_labels_against_scikit_learn():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(203, 10)).astype(np.float32)
    y = rng.integers(0, 10, 203).astype(np.int32)
    state = given_logits(10)
    chosen = ["sparse_top_k_categorical_accuracy", metrics.sparse_top_k_categorical_accuracy(k=2)]
    sparse = evaluate(state, logits, y, loss="sparse_categorical_crossentropy", metrics=chosen, batch_size=64)
    one_hot = evaluate(state, logits, np.eye(10, dtype=np.float32)[y], loss="categorical_crossentropy",
                       metrics=["top_k_categorical_accuracy", metrics.top_k_categorical_accuracy(k=2)],
                       batch_size=64)
    for k, name in [(5, "top_k_categorical_accuracy"), (2, "top_2_categorical_accuracy")]:
        expected = top_k_accuracy_score(y, logits, k=k, labels=np.arange(10))
        # Counts of examples: exact in float32, one division.
        tolerance.assert_close(sparse[f"sparse_{name}"], expected, tolerance.ONE_OP, name)
        tolerance.assert_close(one_hot[name], expected, tolerance.ONE_OP, name)
    assert 0.1 < sparse["sparse_top_2_categorical_accuracy"] < sparse["sparse_top_k_categorical_accuracy"] < 0.9


@pytest.mark.parametrize("head", ["one unit", "two-class softmax", "multi-label"])
def test_precision_recall_and_auc_against_scikit_learn(head):
    rng = np.random.default_rng(2)
    logits, y = binary_data(seed=3)
    if head == "one unit":
        outputs, labels, scores, truth = logits[:, None], y, logits, y
    elif head == "two-class softmax":  # class 1's logit minus class 0's decides, as the softmax does
        other = rng.normal(size=203).astype(np.float32)
        outputs, labels = np.stack([other, other + logits], axis=1), y
        scores, truth = outputs[:, 1] - outputs[:, 0], y
    else:  # three labels per example, micro-averaged over every (example, label) as Keras does
        labels = rng.integers(0, 2, (203, 3)).astype(np.float32)
        outputs = (rng.normal(size=(203, 3)) + 1.2 * (labels - 0.5)).astype(np.float32)
        scores, truth = outputs.ravel(), labels.ravel()
    loss = "sparse_categorical_crossentropy" if head == "two-class softmax" else BCE
    found = evaluate(given_logits(outputs.shape[1]), outputs, labels, loss=loss,
                     metrics=["precision", "recall", "auc"], batch_size=64)
    # Counts of examples: exact in float32, one division on the host.
    tolerance.assert_close(found["precision"], precision_score(truth, scores > 0), tolerance.ONE_OP)
    tolerance.assert_close(found["recall"], recall_score(truth, scores > 0), tolerance.ONE_OP)
    assert 0.55 < found["precision"] < 0.95 and 0.55 < found["recall"] < 0.95
    # AUC from 200 thresholds: a positive and a negative example in one bucket count as a tie (1/2), so the
    # area is at most half the share of such pairs away from the exact one; the bound is computed on this data.
    probabilities = np.asarray(jax.nn.sigmoid(jnp.asarray(scores, jnp.float32)))
    bucket = np.sum(probabilities[:, None] > metrics.auc_thresholds(200), axis=1)
    positive, negative = bucket[truth == 1], bucket[truth == 0]
    shared = np.mean(positive[:, None] == negative[None, :])
    assert 0 < shared < 2 / 199  # the bound is the threshold count's: about 1/199 of the pairs share a bucket
    assert abs(found["auc"] - roc_auc_score(truth, scores)) <= shared / 2 + tolerance.ONE_OP.atol


def test_auc_is_the_exact_auc_of_the_probabilities_rounded_to_their_buckets():
    """Scores in the middle of buckets (100 thresholds, some buckets shared by both classes): the thresholded
    area is scikit-learn's exact AUC of those scores, ties counted as halves in both."""
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 203).astype(np.int32)
    bucket = np.clip(rng.integers(0, 40, 203) + 25 * y, 0, 98)
    probabilities = (bucket + 0.5) / 99  # the middle of the bucket between thresholds bucket/99 and (bucket+1)/99
    logits = np.log(probabilities / (1 - probabilities)).astype(np.float32)[:, None]
    found = evaluate(given_logits(1), logits, y, loss=BCE, metrics=[metrics.auc(num_thresholds=100)],
                     batch_size=64)
    expected = roc_auc_score(y, probabilities)
    assert 0.7 < expected < 0.99
    # Integer counts, exact in float32; the area in float64 on the host as scikit-learn's: float64 roundings only.
    tolerance.assert_close(found["auc"], expected, tolerance.ONE_OP)


# --- checkpoints ----------------------------------------------------------------------------------


def margin_over(threshold: float):
    """A metric made by a factory: the same code, told apart by the value it closes over."""

    def margin(outputs, batch):
        return (outputs[:, 0] * (2 * batch["y"] - 1) > threshold).astype(jnp.float32)

    return margin


def test_a_resume_takes_the_same_metric_function_built_again_and_refuses_another_by_name(tmp_path):
    logits, y = binary_data(n=40)
    x = logits[:, None]

    def train(metric, epochs):
        return fit(MLP(features=(4,), num_outputs=1), x, y, loss=BCE, metrics=["auc", metric], epochs=epochs,
                   batch_size=16, verbose=0, checkpoint_dir=tmp_path)

    _, first = train(margin_over(0.5), 1)
    with pytest.raises(ValueError, match=r"metrics: 'margin' is another metric than the saved run's"):
        train(margin_over(0.25), 2)
    state, history = train(margin_over(0.5), 2)  # the function built again: another object, the same metric
    assert int(state.step) == 6 and history["margin"][0] == first["margin"][0] and len(history["margin"]) == 2
    description = metrics.get_metric(margin_over(0.5))
    assert description.name == "margin" and description.reads_batch
