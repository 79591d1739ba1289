"""Small Linen models for the introductory tutorials: a Dense stack and a conv net.

Both take `train` as an explicit argument (dropout and BatchNorm follow it) and
initialise like Keras (Glorot-uniform kernels, zero biases), so a tutorial
trained in jaxdl starts from the same distribution as its Keras original.
Configs are plain data (ints, floats, strings, tuples) so they can be saved
beside a checkpoint and rebuilt in another process.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxdl.models.layers import Conv, max_pool

ACTIVATIONS = {
    "relu": nn.relu,
    "relu6": nn.relu6,
    "tanh": nn.tanh,
    "sigmoid": nn.sigmoid,
    "softmax": nn.softmax,  # probabilities: a final layer's, for losses told so (jaxdl's losses take logits)
    "gelu": nn.gelu,
    "elu": nn.elu,
    "linear": lambda x: x,
}

kernel_init = nn.initializers.glorot_uniform()


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}") from None


def rescaled(x, scale: float | None, dtype: Any):
    """`x` as `dtype`, times `scale` when given (Keras's `Rescaling`)."""
    x = x.astype(dtype)
    return x if scale is None else x * jnp.asarray(scale, dtype)


def keras_batch_norm(train: bool, dtype: Any, name: str | None = None) -> nn.BatchNorm:
    """BatchNorm with Keras's defaults (momentum 0.99, epsilon 1e-3)."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3, dtype=dtype, name=name)


class MLP(nn.Module):
    """Dense layers of `features` units with `activation`, then `num_outputs` logits.

    Inputs of any rank are flattened per example. `input_batch_norm` puts a
    BatchNorm on the (flattened) inputs, Keras's `BatchNormalization()` right
    after `Input` (unscaled features of different magnitudes: 2 trainable and
    2 non-trainable numbers per feature). `batch_norm` puts BatchNorm
    before each activation; `dropout_rate` drops after it. `input_scale`
    multiplies the inputs first, as Keras's `Rescaling` layer: 1/255 lets
    uint8 pixels travel to the device as uint8 and become [0, 1] there.
    """

    features: Sequence[int]
    num_outputs: int
    activation: str = "relu"
    dropout_rate: float = 0.0
    batch_norm: bool = False
    input_scale: float | None = None
    dtype: Any = jnp.float32
    input_batch_norm: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        act = activation(self.activation)
        x = rescaled(x.reshape((x.shape[0], -1)), self.input_scale, self.dtype)
        if self.input_batch_norm:
            x = keras_batch_norm(train, self.dtype, name="input_batch_norm")(x)
        for i, width in enumerate(self.features):
            x = nn.Dense(width, dtype=self.dtype, kernel_init=kernel_init, name=f"dense_{i}")(x)
            if self.batch_norm:
                x = keras_batch_norm(train, self.dtype, name=f"batch_norm_{i}")(x)
            x = act(x)
            if self.dropout_rate:
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_outputs, dtype=self.dtype, kernel_init=kernel_init, name="logits")(x)


LAYER_KINDS = ("conv", "maxpool", "dropout", "flatten", "dense", "batchnorm")


class ConvNet(nn.Module):
    """A Keras-Sequential-like stack described by plain tuples.

    `layers` items: ("conv", features, kernel_size[, activation]),
    ("maxpool", window), ("dropout", rate), ("batchnorm",), ("flatten",),
    ("dense", features[, activation]). The last item should be a dense layer
    without activation: the logits. Convs use `padding` ("SAME", or "VALID"
    as Keras's default); inputs are NHWC (a 3-D batch gets a channel axis),
    multiplied by `input_scale` first when given (see `MLP`).
    """

    layers: Sequence[Sequence[Any]]
    padding: str = "SAME"
    input_scale: float | None = None
    dtype: Any = jnp.float32

    def setup_check(self):
        for i, spec in enumerate(self.layers):
            if not spec or spec[0] not in LAYER_KINDS:
                raise ValueError(f"ConvNet layers[{i}] = {spec!r}: the first item must be one of {LAYER_KINDS}")
        if self.padding not in ("SAME", "VALID"):
            raise ValueError(f"ConvNet padding must be 'SAME' or 'VALID', got {self.padding!r}")

    @nn.compact
    def __call__(self, x, train: bool = False):
        self.setup_check()
        x = rescaled(x, self.input_scale, self.dtype)
        if x.ndim == 3:
            x = x[..., None]
        for i, (kind, *args) in enumerate(self.layers):
            if kind == "conv":
                features, size, *act = args
                x = Conv(features, (size, size), padding=self.padding, dtype=self.dtype,  # see jaxdl.models.layers
                         kernel_init=kernel_init, name=f"conv_{i}")(x)
                x = activation(act[0] if act else "relu")(x)
            elif kind == "maxpool":
                window = (args[0], args[0])  # Keras's MaxPooling2D(n): non-overlapping windows
                x = max_pool(x, window, strides=window)  # a reshape and a max on CPU (see jaxdl.models.layers)
            elif kind == "dropout":
                x = nn.Dropout(args[0], deterministic=not train)(x)
            elif kind == "batchnorm":
                x = keras_batch_norm(train, self.dtype, name=f"batch_norm_{i}")(x)
            elif kind == "flatten":
                x = x.reshape((x.shape[0], -1))
            else:  # dense
                features, *act = args
                x = nn.Dense(features, dtype=self.dtype, kernel_init=kernel_init, name=f"dense_{i}")(x)
                x = activation(act[0] if act else "linear")(x)
        return x
