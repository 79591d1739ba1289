"""Layers in the form each backend runs fastest, for users' own Linen models as for jaxdl's.

`max_pool` is `flax.linen.max_pool` with the same results, chosen by backend: on XLA:CPU, non-overlapping
windows (stride = window, no padding: the common 2x2 / stride 2 case) are pooled as a reshape and a `max`
over the window axes. `nn.max_pool` lowers to `reduce_window`, whose gradient XLA:CPU runs as
`select-and-scatter`; in keras.io's MNIST convnet that gradient was the largest cost of the train step
(88.7 -> 55.3 ms per step of 128 on 2 cores, `../shared/perf.md`). GPUs and TPUs run `reduce_window` well,
so there `nn.max_pool` is kept. No library offers this switch, hence these few lines.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax

POOL_IMPLEMENTATIONS = ("auto", "reshape", "reduce_window")


def pool_implementation(implementation: str, window: Sequence[int], strides: Sequence[int], padding) -> str:
    """'reshape' or 'reduce_window': what `implementation` ("auto" picks by backend and shape) resolves to."""
    if implementation not in POOL_IMPLEMENTATIONS:
        raise ValueError(f"max_pool implementation must be one of {POOL_IMPLEMENTATIONS}, got {implementation!r}")
    reshapeable = tuple(window) == tuple(strides) and padding == "VALID"
    if implementation == "reshape" and not reshapeable:
        raise ValueError(f"max_pool implementation='reshape' needs strides equal to the window and VALID padding, "
                         f"got window {tuple(window)}, strides {tuple(strides)}, padding {padding!r}")
    if implementation == "auto":
        return "reshape" if reshapeable and jax.default_backend() == "cpu" else "reduce_window"
    return implementation


def max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int] | None = None, padding="VALID",
             implementation: str = "auto") -> jax.Array:
    """`nn.max_pool(x, window, strides, padding)` over the axes between batch and features.

    The two forms give the same outputs and the same gradients, ties
    included: the gradient goes to the first maximum of each window in
    row-major order, as XLA's `select-and-scatter` gives it.
    """
    window = tuple(window)
    strides = window if strides is None else tuple(strides)
    if pool_implementation(implementation, window, strides, padding) == "reduce_window":
        return nn.max_pool(x, window, strides=strides, padding=padding)
    batch, *spatial, features = x.shape
    if len(spatial) != len(window):
        raise ValueError(f"max_pool window {window} has {len(window)} axes, but the input of shape {x.shape} has "
                         f"{len(spatial)} between batch and features")
    kept = tuple(size // w * w for size, w in zip(spatial, window))  # VALID: a partial window at the end is dropped
    return _window_max(x[(slice(None), *(slice(0, k) for k in kept))], window)


def _windows_last(x: jax.Array, window: tuple) -> jax.Array:
    """(batch, *spatial, features) -> (batch, *spatial // window, features, prod(window)), row-major windows."""
    batch, *spatial, features = x.shape
    split = [batch]
    for size, w in zip(spatial, window):
        split += [size // w, w]
    x = x.reshape(*split, features)
    outer, inner = list(range(1, 2 * len(window), 2)), list(range(2, 2 * len(window) + 1, 2))
    x = x.transpose(0, *outer, 2 * len(window) + 1, *inner)
    return x.reshape(*x.shape[:len(window) + 2], -1)


# The gradient is written out rather than left to JAX's rule for `max`, which divides by the count of
# elements equal to the maximum: XLA may compute the pooled values and that comparison in two fusions that
# round differently (seen at --xla_backend_optimization_level=0 after a BatchNorm), and a count of zero made
# the gradient NaN. The argmax's one-hot cannot be zero, and it picks the first maximum, as select-and-scatter.
@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _window_max(x: jax.Array, window: tuple) -> jax.Array:
    return _windows_last(x, window).max(axis=-1)


def _window_max_forward(x, window):
    windows = _windows_last(x, window)
    return windows.max(axis=-1), (windows.argmax(axis=-1), x.shape)


def _window_max_backward(window, residuals, upstream):
    first_maximum, shape = residuals
    windows = upstream[..., None] * jax.nn.one_hot(first_maximum, math.prod(window), dtype=upstream.dtype)
    batch, *spatial, features = shape
    rank = len(window)
    windows = windows.reshape(*windows.shape[:-1], *window)  # (batch, *outer, features, *inner)
    order = [0]
    for axis in range(rank):
        order += [1 + axis, rank + 2 + axis]
    return (windows.transpose(*order, rank + 1).reshape(shape),)


_window_max.defvjp(_window_max_forward, _window_max_backward)
