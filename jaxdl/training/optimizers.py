"""Optimizers by Keras's names: `fit(optimizer="adam")` is an optax optimizer with Keras's default settings.

Each name is built with `optax.inject_hyperparams`, its learning rate held in
the optimizer state, so `ReduceLROnPlateau` can lower it and the history logs
it as `learning_rate`. One object per name, not one per call: the optimizer
is part of the compiled steps' cache key. This module also refuses, before
training, optimizers that `fit`'s steps cannot drive.
"""
from __future__ import annotations

import functools
import inspect

import jax
import optax
import optax.contrib

# Keras 3's defaults (keras/src/optimizers): `epsilon` is optax's `eps`, RMSprop's `rho` its `decay` (Keras adds
# epsilon inside the square root, as optax's `eps_in_sqrt` does), AdamW's decoupled `weight_decay` is optax's.
KERAS_OPTIMIZERS: dict[str, tuple] = {
    "adam": (optax.adam, {"learning_rate": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-7}),
    "sgd": (optax.sgd, {"learning_rate": 1e-2}),
    "rmsprop": (optax.rmsprop, {"learning_rate": 1e-3, "decay": 0.9, "eps": 1e-7}),
    "adamw": (optax.adamw, {"learning_rate": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-7, "weight_decay": 0.004}),
    "adagrad": (optax.adagrad, {"learning_rate": 1e-3, "initial_accumulator_value": 0.1, "eps": 1e-7}),
}


def keras_optimizer(name: str) -> optax.GradientTransformation:
    """The optax optimizer Keras's `optimizer=name` stands for, with Keras's defaults; the same object each call.

    Args:
      name: "adam", "sgd", "rmsprop", "adamw" or "adagrad", in any case
        (Keras's class names, "Adam", "RMSprop", ..., too).

    Returns:
      An `optax.inject_hyperparams` optimizer whose state holds the
      `learning_rate` (the other settings are constants of the program).

    Raises:
      ValueError: an unknown name, listing the accepted ones.
    """
    if name.lower() not in KERAS_OPTIMIZERS:
        raise ValueError(f"optimizer={name!r} is not one of Keras's optimizer names that jaxdl knows "
                         f"({', '.join(map(repr, KERAS_OPTIMIZERS))}); pass one of them, or an optax optimizer "
                         "such as optax.inject_hyperparams(optax.lion)(learning_rate=1e-4)")
    return _built(name.lower())


@functools.cache
def _built(name: str) -> optax.GradientTransformation:
    factory, settings = KERAS_OPTIMIZERS[name]
    constants = tuple(key for key in inspect.signature(factory).parameters if key != "learning_rate")
    return optax.inject_hyperparams(factory, static_args=constants)(**settings)


def resolve_optimizer(optimizer) -> optax.GradientTransformation | None:
    """`fit`'s `optimizer` argument as an optax optimizer: a Keras name looked up, None left for the default.

    Raises:
      ValueError: an unknown name (see `keras_optimizer`).
      TypeError: anything else that is not an optax `GradientTransformation`
        (an optax factory not yet called, another library's optimizer).
    """
    if optimizer is None or isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    if isinstance(optimizer, str):
        return keras_optimizer(optimizer)
    name = getattr(optimizer, "__name__", "")
    hint = (f"; optax.{name} makes an optimizer: call it, e.g. optax.{name}(1e-3)"
            if callable(optimizer) and getattr(optimizer, "__module__", "").startswith("optax") else "")
    raise TypeError(f"optimizer must be an optax GradientTransformation or one of Keras's names "
                    f"({', '.join(map(repr, KERAS_OPTIMIZERS))}), got {optimizer!r}{hint}")


def _is_plateau_state(node) -> bool:
    return isinstance(node, optax.contrib.ReduceLROnPlateauState)


def check_fit_can_update(opt_state) -> None:
    """Refuses an optimizer whose update needs the loss (`optax.contrib.reduce_on_plateau`), before training.

    `fit`'s steps update with `tx.update(grads, opt_state, params)`; optax's
    plateau transformation also needs `value=loss` at every step.

    Raises:
      ValueError: naming the transformation and jaxdl's `ReduceLROnPlateau`.
    """
    if any(_is_plateau_state(node) for node in jax.tree.leaves(opt_state, is_leaf=_is_plateau_state)):
        raise ValueError("the optimizer holds optax.contrib.reduce_on_plateau, whose update needs the loss as "
                         "value=..., which fit's steps do not pass; use jaxdl's ReduceLROnPlateau callback "
                         "instead: callbacks=[ReduceLROnPlateau('val_loss', factor=0.1, patience=10)] with "
                         "optax.inject_hyperparams(optax.adam)(learning_rate=1e-3) (or optimizer='adam'), "
                         "which lowers the rate between epochs as Keras's does")
