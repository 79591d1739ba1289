"""Keras's optimizer names in `fit`: each the optax optimizer that updates as Keras's does, its rate reducible."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdl import MLP, ReduceLROnPlateau, fit
from jaxdl.training.optimizers import KERAS_OPTIMIZERS, keras_optimizer
from tests.support import tolerance
from tests.support.toy_data import CE, blobs


def test_each_name_updates_as_kerass_optimizer_of_that_name_does():
    """Three updates from the same gradients, ours and `keras.optimizers.get(name)`'s, from Keras's defaults.

    Seen failing with Adam's rate 1e-2 (a difference of 2e-2) and Adagrad's initial accumulator 0 (1e-3).
    """
    import keras

    rng = np.random.default_rng(0)
    start, gradients = rng.normal(size=5).astype(np.float32), rng.normal(size=(3, 5)).astype(np.float32)
    for name in KERAS_OPTIMIZERS:
        theirs, variable = keras.optimizers.get(name), keras.Variable(start)
        optimizer = keras_optimizer(name)
        ours, state = jnp.asarray(start), optimizer.init(jnp.asarray(start))
        for gradient in gradients:
            theirs.apply_gradients([(jnp.asarray(gradient), variable)])
            updates, state = optimizer.update(jnp.asarray(gradient), state, ours)
            ours = optax.apply_updates(ours, updates)
        assert np.abs(np.asarray(ours) - start).max() > 1e-3, name  # moved far beyond the tolerance
        # A few float32 operations per update (FEW_OPS). Keras's Adam adds epsilon (1e-7) to sqrt(v) where optax
        # adds it to sqrt(v_hat): with gradients of order 1 that moves an update by about 3e-6 of itself (a
        # few 1e-9 here), well inside; the largest difference seen is 1.5e-8 (Adam, AdamW).
        tolerance.assert_close(ours, np.asarray(variable.value), tolerance.FEW_OPS, name)
        assert float(state.hyperparams["learning_rate"]) == pytest.approx(float(theirs.learning_rate), rel=1e-7)
        assert keras_optimizer(type(theirs).__name__) is optimizer  # Keras's class name, one object per name


def test_a_name_in_fit_trains_with_a_rate_that_reduce_lr_on_plateau_lowers():
    x, y = blobs(24)
    # min_delta 10: no epoch improves on the first, so the rate halves after each epoch from the second on
    state, history = fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, epochs=3, batch_size=8, optimizer="sgd",
                         callbacks=[ReduceLROnPlateau("loss", factor=0.5, patience=1, min_delta=10)], verbose=0)
    tolerance.assert_close(history["learning_rate"], [0.01, 0.01, 0.005], tolerance.ONE_OP)  # Keras's SGD rate
    assert int(state.step) == 9


@pytest.mark.parametrize("optimizer, error, message", [
    ("nadam", ValueError, r"optimizer='nadam' is not one of Keras's optimizer names that jaxdl knows \('adam', "
                          r"'sgd', 'rmsprop', 'adamw', 'adagrad'\)"),
    (optax.adam, TypeError, r"optimizer must be an optax GradientTransformation .*; optax.adam makes an "
                            r"optimizer: call it, e.g. optax.adam\(1e-3\)"),
    (optax.chain(optax.adam(1e-3), optax.contrib.reduce_on_plateau()), ValueError,
     r"optax.contrib.reduce_on_plateau, whose update needs the loss as value=.*use jaxdl's ReduceLROnPlateau"),
])
def test_an_optimizer_fit_cannot_use_is_one_clear_error(optimizer, error, message):
    x, y = blobs(16)
    with pytest.raises(error, match=message):
        fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, optimizer=optimizer, verbose=0)
