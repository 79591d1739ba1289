"""Layers in the form each backend runs fastest, for users' own Linen models as for jaxdl's.

`Conv` is `flax.linen.Conv` (stride 1, no dilation or groups) with the same
forward pass and input gradient. Its "shifted_products" form computes the
kernel gradient as one matrix product per kernel offset. That pays on XLA:CPU
only while YNNPACK runs the convolutions (XLA's default); under
`jaxdl.runtime.compiler`'s options (XLA's own convolutions) XLA's form is faster
still. So "auto" takes the products only where the convolutions stay with
YNNPACK (docs/numerics.md#conv-kernel-gradients-as-shifted-products).

`max_pool` is `flax.linen.max_pool` with the same results, chosen by backend: on XLA:CPU, non-overlapping
windows (stride = window, no padding: the common 2x2 / stride 2 case) are pooled as a reshape and a `max`
over the window axes, whose gradient is an argmax's one-hot. `nn.max_pool` lowers to `reduce_window`,
whose gradient XLA:CPU runs as `select-and-scatter`, the largest cost of keras.io's MNIST convnet step
(docs/numerics.md#max-pooling-on-cpu). GPUs and TPUs run
`reduce_window` well, so there `nn.max_pool` is kept. No library offers this switch, hence these lines.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxdl.runtime import compiler

POOL_IMPLEMENTATIONS = ("auto", "reshape", "reduce_window")
CONV_IMPLEMENTATIONS = ("auto", "shifted_products", "xla")


def _unpadded(padding) -> bool:
    """Whether `padding` ("SAME", "VALID" or (low, high) pairs) adds nothing."""
    if isinstance(padding, str):
        return padding == "VALID"
    return all(tuple(pair) == (0, 0) for pair in padding)


def pool_implementation(implementation: str, window: Sequence[int], strides: Sequence[int], padding) -> str:
    """'reshape' or 'reduce_window': what `implementation` ("auto" picks by backend and shape) resolves to."""
    if implementation not in POOL_IMPLEMENTATIONS:
        raise ValueError(f"max_pool implementation must be one of {POOL_IMPLEMENTATIONS}, got {implementation!r}")
    reshapeable = tuple(window) == tuple(strides) and _unpadded(padding)
    if implementation == "reshape" and not reshapeable:
        raise ValueError(f"max_pool implementation='reshape' needs strides equal to the window and VALID padding, "
                         f"got window {tuple(window)}, strides {tuple(strides)}, padding {padding!r}")
    if implementation == "auto":
        return "reshape" if reshapeable and jax.default_backend() == "cpu" else "reduce_window"
    return implementation


def max_pool(inputs: jax.Array, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding="VALID", implementation: str = "auto") -> jax.Array:
    """`flax.linen.max_pool(inputs, window_shape, strides, padding)`, in the form this backend runs fastest.

    The arguments mean what they mean in Flax; the forms give the same
    outputs and the same gradients, ties included: the gradient goes to the
    first maximum of each window in row-major order, as XLA's
    `select-and-scatter` gives it. Forward mode (`jax.jvp`, `jax.jacfwd`,
    `jax.hessian`) works through every form.

    Args:
      inputs: `(batch axes..., window axes..., features)`, with any number of
        batch axes, none included.
      window_shape: the window's size along each window axis.
      strides: the step between windows along each window axis; None is 1
        (Flax's default: overlapping windows), so pass `strides=window_shape`
        for non-overlapping ones.
      padding: "VALID", "SAME", or one `(low, high)` pair per window axis.
      implementation: "auto" (the reshape form on XLA:CPU where windows do
        not overlap and nothing is padded, `nn.max_pool` otherwise),
        "reshape" or "reduce_window" (`nn.max_pool`).

    Returns:
      The maximum of each window: `(batch axes..., pooled axes..., features)`.

    Raises:
      ValueError: `inputs` has fewer axes than the window plus features,
        `strides` has another number of axes than the window, or
        `implementation` is unknown or "reshape" where windows overlap or are padded.
    """
    window = tuple(window_shape)
    strides = (1,) * len(window) if strides is None else tuple(strides)
    if len(strides) != len(window):
        raise ValueError(f"max_pool strides {strides} has {len(strides)} axes, the window {window} has {len(window)}")
    if inputs.ndim < len(window) + 1:
        raise ValueError(f"max_pool window {window} has {len(window)} axes, but the input of shape {inputs.shape} "
                         f"has {inputs.ndim} in all: it needs the window's axes and a features axis after any "
                         "batch axes")
    if pool_implementation(implementation, window, strides, padding) == "reduce_window":
        return nn.max_pool(inputs, window, strides=strides, padding=padding)
    batch_shape = inputs.shape[:inputs.ndim - len(window) - 1]
    *spatial, features = inputs.shape[len(batch_shape):]
    x = inputs.reshape(math.prod(batch_shape), *spatial, features)  # one batch axis, as _window_max takes
    kept = tuple(size // w * w for size, w in zip(spatial, window))  # VALID: a partial window at the end is dropped
    pooled = _window_max(x[(slice(None), *(slice(0, k) for k in kept))], window)
    return pooled.reshape(*batch_shape, *pooled.shape[1:])


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


# The derivative is written out rather than left to JAX's rule for `max`, which divides by the count of
# elements equal to the maximum: XLA may compute the pooled values and that comparison in two fusions that
# round differently (seen at --xla_backend_optimization_level=0 after a BatchNorm), and a count of zero made
# the gradient NaN. The argmax's one-hot cannot be zero, and it picks the first maximum, as select-and-scatter.
# The tangent is linear in the input's tangent (a product with that fixed one-hot and a sum), so JAX derives
# the gradient by transposing it (the one-hot times the upstream gradient, put back in place), and forward
# mode and higher derivatives work as well.
@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _window_max(x: jax.Array, window: tuple) -> jax.Array:
    return _windows_last(x, window).max(axis=-1)


@_window_max.defjvp
def _window_max_jvp(window, primals, tangents):
    (x,), (tangent,) = primals, tangents
    first_maximum = jax.nn.one_hot(_windows_last(x, window).argmax(axis=-1), math.prod(window), dtype=tangent.dtype)
    return _window_max(x, window), (_windows_last(tangent, window) * first_maximum).sum(axis=-1)


# "auto" takes the products for inputs of at most this many channels (see the module's docstring).
PRODUCTS_MAX_CHANNELS = 3


def conv_implementation(implementation: str, in_channels: int) -> str:
    """'shifted_products' or 'xla': what `implementation` resolves to ("auto": the products on CPU where
    YNNPACK runs the convolutions, that is without `jaxdl.runtime.compiler`'s options, for inputs of at most
    `PRODUCTS_MAX_CHANNELS` channels; XLA's convolution otherwise)."""
    if implementation not in CONV_IMPLEMENTATIONS:
        raise ValueError(f"Conv implementation must be one of {CONV_IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "auto":
        ynnpack_convolutions = jax.default_backend() == "cpu" and compiler.compiler_options() is None
        return "shifted_products" if ynnpack_convolutions and in_channels <= PRODUCTS_MAX_CHANNELS else "xla"
    return implementation


_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _xla_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=_DIMENSIONS)


def _shifted_products(x: jax.Array, kernel: jax.Array, height: int, width: int) -> jax.Array:
    """`_xla_conv(x, kernel)` as one (in, out) product per kernel offset, summed: (N, height, width, out)."""
    rows = x.shape[0] * height * width
    total = 0
    for dy in range(kernel.shape[0]):
        for dx in range(kernel.shape[1]):
            total = total + x[:, dy:dy + height, dx:dx + width, :].reshape(rows, x.shape[-1]) @ kernel[dy, dx]
    return total.reshape(x.shape[0], height, width, kernel.shape[-1])


@jax.custom_jvp
def valid_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A 2-D VALID convolution of NHWC `x` with an HWIO `kernel` (stride 1), its kernel gradient as products.

    The kernel's tangent goes through the products (`_shifted_products`), so
    the kernel gradient JAX derives by transposing it is one (in, out)
    product per kernel offset over every output position; the input's goes
    through XLA's convolution. Both are linear, so `jax.grad`, `jax.jvp` and
    higher derivatives all work.
    """
    return _xla_conv(x, kernel)


@functools.partial(valid_conv.defjvp, symbolic_zeros=True)
def _valid_conv_jvp(primals, tangents):
    x, kernel = primals
    x_tangent, kernel_tangent = tangents
    outputs = valid_conv(x, kernel)
    terms = []
    if not isinstance(x_tangent, SymbolicZero):
        terms.append(_xla_conv(x_tangent, kernel))
    if not isinstance(kernel_tangent, SymbolicZero):
        terms.append(_shifted_products(x, kernel_tangent, *outputs.shape[1:3]).astype(outputs.dtype))
    return outputs, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(outputs)


class Conv(nn.Module):
    """`nn.Conv` for 2-D NHWC inputs, stride 1: "SAME" or "VALID" padding, a bias, Keras-like initialisers.

    The parameters are named and shaped as `nn.Conv`'s (`kernel` HWIO,
    `bias`), so variables move between the two. `implementation`: "auto"
    (see `conv_implementation` and the module's docstring), "shifted_products"
    or "xla" (`nn.Conv`'s lowering).
    """

    features: int
    kernel_size: tuple[int, int]
    padding: str = "SAME"
    use_bias: bool = True
    dtype: Any = None
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    implementation: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"Conv takes NHWC inputs (4 axes), got shape {x.shape}")
        if self.padding not in ("SAME", "VALID"):
            raise ValueError(f"Conv padding must be 'SAME' or 'VALID', got {self.padding!r}")
        kernel_size = tuple(self.kernel_size)
        kernel = self.param("kernel", self.kernel_init, (*kernel_size, x.shape[-1], self.features))
        dtype = self.dtype or jnp.result_type(x, kernel)
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        if self.padding == "SAME":  # as lax's SAME for stride 1: the extra row or column goes after
            x = jnp.pad(x, ((0, 0), *(((size - 1) // 2, size // 2) for size in kernel_size), (0, 0)))
        if conv_implementation(self.implementation, x.shape[-1]) == "shifted_products":
            y = valid_conv(x, kernel)
        else:
            y = _xla_conv(x, kernel)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,)).astype(dtype)
        return y
