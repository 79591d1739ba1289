"""Layers in the form each backend runs fastest, for users' own Linen models as for jaxdl's.

`max_pool` is `flax.linen.max_pool` with the same results, chosen by backend: on XLA:CPU, non-overlapping
windows (stride = window, no padding: the common 2x2 / stride 2 case) are pooled as a reshape and a `max`
over the window axes. `nn.max_pool` lowers to `reduce_window`, whose gradient XLA:CPU runs as
`select-and-scatter`; in keras.io's MNIST convnet that gradient was the largest cost of the train step
(88.7 -> 55.3 ms per step of 128 on 2 cores, `../shared/perf.md`). GPUs and TPUs run `reduce_window` well,
so there `nn.max_pool` is kept. No library offers this switch, hence these few lines.
"""
from __future__ import annotations

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

    The two forms give the same outputs. Their gradients are equal too except
    where a window holds several equal maxima: the reshape form shares the
    gradient among them (JAX's rule for `max`), `select-and-scatter` gives it
    to the first. After a ReLU, tied zeros get no gradient either way, and
    windows whose inputs are equal patches (a blank background) give the
    layers below the same gradient either way.
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
    x = x[(slice(None), *(slice(0, k) for k in kept))]
    split = [batch]
    for size, w in zip(kept, window):
        split += [size // w, w]
    return x.reshape(*split, features).max(axis=tuple(range(2, 2 * len(window) + 1, 2)))
