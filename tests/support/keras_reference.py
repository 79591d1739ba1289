"""Keras MobileNetV2 models with random weights, saved in each file layout the converters read."""
from __future__ import annotations

import re

import h5py
import numpy as np


def legacy_name(name: str) -> str:
    """The layer names of the released `keras.applications` weight files (the original port's)."""
    match = re.match(r"block_(\d+)_(expand|depthwise|project)(_BN)?$", name)
    if match:
        block, part, bn = match.groups()
        return f"bn{block}_conv_{block}_bn_{part}" if bn else f"mobl{block}_conv_{block}_{part}"
    return "Logits" if name == "predictions" else name


def build(alpha: float, size: int, include_top: bool, pooling: str | None, seed: int):
    """A Keras MobileNetV2 with random kernels, random BatchNorm parameters and statistics, and a random
    classifier bias; with the top, its output is the logits (no softmax), so that parity is checked on values
    of order 1 rather than on 1000 probabilities near 0.001.

    The bias is drawn from N(0, 1), the logits' own scale: Keras initialises it to zeros, and a converter that
    dropped it would then agree with Keras.
    """
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=alpha, include_top=include_top,
                                           pooling=pooling, weights=None,
                                           classifier_activation=None if include_top else "softmax")
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, channels), rng.normal(0, 0.1, channels),
                               rng.normal(0, 0.1, channels), rng.uniform(0.5, 1.5, channels)])
    if include_top:
        head = model.get_layer("predictions")
        kernel, bias = head.get_weights()
        head.set_weights([kernel, rng.normal(0, 1, bias.shape).astype(bias.dtype)])
    return model


def save_legacy_h5(model, path) -> None:
    """Writes the Keras 2 HDF5 weights layout with the released files' legacy layer names."""
    with h5py.File(path, "w") as file:
        names = [legacy_name(layer.name) for layer in model.layers]
        file.attrs["layer_names"] = [n.encode() for n in names]
        file.attrs["backend"] = b"tensorflow"
        file.attrs["keras_version"] = b"2.1.6"
        for layer, name in zip(model.layers, names):
            group = file.create_group(name)
            weight_names = [f"{name}/{w.name}:0" for w in layer.weights]
            group.attrs["weight_names"] = [w.encode() for w in weight_names]
            for weight_name, value in zip(weight_names, layer.get_weights()):
                group.create_dataset(weight_name, data=value)


# Together these cover alpha 0.35, 1.0 and 1.4, inputs 96, 160 and 224 (and an odd 97),
# with and without top, pooling avg and max, and every file layout.
CONFIGS = {
    "a0.35-96-top-legacy": dict(alpha=0.35, size=96, include_top=True, pooling=None, layout="legacy"),
    "a1.0-224-avg-weights.h5": dict(alpha=1.0, size=224, include_top=False, pooling="avg", layout="weights.h5"),
    "a1.4-160-max-legacy": dict(alpha=1.4, size=160, include_top=False, pooling="max", layout="legacy"),
    "a1.0-160-top-keras": dict(alpha=1.0, size=160, include_top=True, pooling=None, layout="keras"),
    "a0.5-97-features-model.h5": dict(alpha=0.5, size=97, include_top=False, pooling=None, layout="model.h5"),
}

# The layers whose outputs the block-by-block parity test compares: each block's projection, then the
# last convolution's activation.
BLOCK_ENDS = [f"{prefix}project_BN" for prefix in ["expanded_conv_"] + [f"block_{i}_" for i in range(1, 17)]] + [
    "out_relu"]
