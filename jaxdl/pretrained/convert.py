"""Converts pretrained MobileNetV2 weights from Keras and torchvision files into Flax variables.

Both converters return `(model, variables)` ready for `model.apply`. Source
layers are matched to `layer_plan()` by order, as Keras itself loads legacy
files, with a shape check at every tensor; alpha and include_top are
inferred from the shapes, and the first layer that does not fit is named.

Keras files are read with h5py alone:
- legacy HDF5 weights (`keras.applications` downloads, which still carry the
  original port's names such as `mobl1_conv_1_expand` and `Logits`) and full
  legacy `.h5` models (`model_weights/` inside);
- Keras 3 `.weights.h5`, whose groups are named per layer type
  (`conv2d_3`, `batch_normalization_12`), and `.keras` archives holding one.
torchvision state dicts are read by `jaxdl.pretrained.torchfile`, without PyTorch.
"""
from __future__ import annotations

import functools
import io
import os
import re
import zipfile
from pathlib import Path
from typing import Callable

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from jaxdl.models.mobilenet_v2 import ALPHAS, MobileNetV2, layer_plan, make_divisible
from jaxdl.pretrained.torchfile import load_state_dict

SourceLayer = tuple[str, list[np.ndarray]]  # (name in the file, its arrays in the file's layout)


class ConversionError(ValueError):
    """The file's weights do not fit MobileNetV2."""


# --- from each source's layout to Flax's -------------------------------------------------------

def _keras_to_flax(kind: str, arrays: list[np.ndarray]) -> dict:
    if kind == "depthwise":  # Keras (3, 3, C, 1) -> Flax grouped-conv layout (3, 3, 1, C)
        return {"params": {"kernel": arrays[0].transpose(0, 1, 3, 2)}}
    if kind == "bn":
        gamma, beta, mean, var = arrays
        return {"params": {"scale": gamma, "bias": beta}, "batch_stats": {"mean": mean, "var": var}}
    if kind == "dense":
        return {"params": {"kernel": arrays[0], "bias": arrays[1]}}
    return {"params": {"kernel": arrays[0]}}


def _torch_to_flax(kind: str, arrays: list[np.ndarray]) -> dict:
    if kind in ("conv", "depthwise"):  # OIHW -> HWIO; depthwise (C, 1, 3, 3) -> (3, 3, 1, C)
        return {"params": {"kernel": arrays[0].transpose(2, 3, 1, 0)}}
    if kind == "dense":
        return {"params": {"kernel": arrays[0].T, "bias": arrays[1]}}
    weight, bias, mean, var = arrays
    return {"params": {"scale": weight, "bias": bias}, "batch_stats": {"mean": mean, "var": var}}


# --- matching source layers to the network -----------------------------------------------------

@functools.lru_cache(maxsize=32)
def _expected_shapes(model: MobileNetV2) -> dict:
    """The variables' shapes of `model` (a frozen, hashable module): traced once per configuration."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    return jax.tree.map(lambda leaf: tuple(leaf.shape), shapes)


def _fit_layers(layers: list[SourceLayer], model: MobileNetV2, to_flax: Callable, path) -> tuple[dict, str | None]:
    """Variables for `model` from `layers`, or the first mismatch as a message."""
    plan = layer_plan(model.include_top)
    if len(layers) != len(plan):  # before tracing the model for its shapes: a wrong file is told at once
        return {}, (f"the file has {len(layers)} layers with weights, MobileNetV2(alpha={model.alpha}, "
                    f"include_top={model.include_top}) has {len(plan)}")
    expected = _expected_shapes(model)
    variables: dict = {"params": {}, "batch_stats": {}}
    for index, ((source_name, arrays), (name, kind)) in enumerate(zip(layers, plan)):
        try:
            _check_array_count(kind, arrays)
            converted = to_flax(kind, arrays)
        except (ValueError, IndexError) as error:
            return {}, f"layer #{index} {source_name!r} does not fit MobileNetV2 layer {name!r} ({kind}): {error}"
        for collection, values in converted.items():
            for param, value in values.items():
                want = expected[collection][name][param]
                if tuple(value.shape) != want:
                    return {}, (f"layer #{index} {source_name!r} has {param} of shape {tuple(value.shape)}, but "
                                f"MobileNetV2(alpha={model.alpha}) layer {name!r} needs {want}")
                variables[collection].setdefault(name, {})[param] = np.asarray(value, np.float32)
    return variables, None


def _check_array_count(kind: str, arrays) -> None:
    needed = {"conv": 1, "depthwise": 1, "bn": 4, "dense": 2}[kind]
    if len(arrays) != needed:
        raise ValueError(f"it has {len(arrays)} arrays, a {kind} layer has {needed}")


def assemble(layers: list[SourceLayer], to_flax: Callable, path, convention: str, **model_kwargs):
    """Infers alpha and include_top from the shapes and returns `(model, variables)`."""
    if not layers:
        raise ConversionError(f"{path}: no layers with weights found")
    last = layers[-1][1]
    include_top = len(last) == 2 and last[0].ndim == 2
    num_classes = int(to_flax("dense", last)["params"]["bias"].shape[0]) if include_top else 1000
    try:  # try first the alphas whose stem width matches the file's, as tracing each candidate costs time
        stem_width = to_flax("conv", layers[0][1])["params"]["kernel"].shape[-1]
    except (IndexError, KeyError, ValueError, AttributeError):
        stem_width = None
    candidates = sorted(ALPHAS, key=lambda a: make_divisible(32 * a) != stem_width)
    errors = []
    for alpha in candidates:
        model = MobileNetV2(alpha=alpha, include_top=include_top, num_classes=num_classes,
                            convention=convention, **model_kwargs)
        variables, error = _fit_layers(layers, model, to_flax, path)
        if error is None:
            return model, variables
        errors.append(error)
    # The first candidate is the likeliest alpha (its stem fits): its first mismatch is the one to read.
    raise ConversionError(f"{path}: not MobileNetV2 weights for any alpha in {ALPHAS}: {errors[0]}")


# --- Keras ------------------------------------------------------------------------------------

def _legacy_layers(group: h5py.Group) -> list[SourceLayer]:
    layers = []
    for raw_name in group.attrs["layer_names"]:
        name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
        layer = group[name]
        weight_names = [w.decode() if isinstance(w, bytes) else str(w) for w in layer.attrs.get("weight_names", [])]
        if weight_names:
            layers.append((name, [np.asarray(layer[w]) for w in weight_names]))
    return layers


_TYPED_NAME = re.compile(r"^(conv2d|depthwise_conv2d|batch_normalization|dense)(?:_(\d+))?$")
_TYPE_KIND = {"conv2d": "conv", "depthwise_conv2d": "depthwise", "batch_normalization": "bn", "dense": "dense"}


def _keras3_layers(group: h5py.Group) -> list[SourceLayer]:
    """Keras 3 names groups per layer type in creation order (`conv2d`, `conv2d_1`, ...).

    HDF5 lists them alphabetically, so the network order is rebuilt by
    taking each type's layers by their number, in the order `layer_plan` asks
    for that type.
    """
    by_kind: dict[str, list[tuple[int, SourceLayer]]] = {kind: [] for kind in _TYPE_KIND.values()}
    for name, layer in group.items():
        if "vars" not in layer or not len(layer["vars"]):
            continue
        match = _TYPED_NAME.match(name)
        if not match:
            raise ConversionError(f"{group.file.filename}: unexpected layer {name!r} with weights for MobileNetV2")
        arrays = [np.asarray(layer["vars"][str(i)]) for i in range(len(layer["vars"]))]
        by_kind[_TYPE_KIND[match.group(1)]].append((int(match.group(2) or 0), (name, arrays)))
    queues = {kind: [layer for _, layer in sorted(items)] for kind, items in by_kind.items()}
    include_top = bool(queues["dense"])
    layers = []
    for _, kind in layer_plan(include_top):
        if not queues[kind]:
            break
        layers.append(queues[kind].pop(0))
    leftovers = [layer for queue in queues.values() for layer in queue]
    return layers + leftovers


def _keras_layers(file: h5py.File) -> list[SourceLayer]:
    if "layer_names" in file.attrs:
        return _legacy_layers(file)
    if "model_weights" in file and "layer_names" in file["model_weights"].attrs:
        return _legacy_layers(file["model_weights"])
    if "layers" in file:
        return _keras3_layers(file["layers"])
    raise ConversionError(f"{file.filename}: not a Keras weights file (no layer_names, model_weights or layers/)")


def from_keras(path: str | os.PathLike, **model_kwargs):
    """`(model, variables)` from a Keras MobileNetV2 `.h5`, `.weights.h5` or `.keras` file.

    `model_kwargs` (pooling, classifier_activation, depthwise, ...) go to
    `MobileNetV2`; alpha, include_top and num_classes come from the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Keras weight file at {path}")
    try:
        if zipfile.is_zipfile(path):  # a .keras archive: config.json, metadata.json, model.weights.h5
            with zipfile.ZipFile(path) as archive:
                if "model.weights.h5" not in archive.namelist():
                    raise ConversionError(f"{path}: a zip file without model.weights.h5; not a .keras model")
                with h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as file:
                    layers = _keras_layers(file)
        else:
            with h5py.File(path, "r") as file:
                layers = _keras_layers(file)
    except ConversionError:
        raise
    # h5py raises ValueError and TypeError too for damaged type descriptions (found by tests/project/test_fuzz_loaders)
    except (OSError, zipfile.BadZipFile, KeyError, ValueError, TypeError) as error:
        raise ConversionError(f"{path}: not a readable Keras weight file (truncated or corrupt?): {error}") from error
    return assemble(layers, _keras_to_flax, path, "keras", **model_kwargs)


# --- torchvision ------------------------------------------------------------------------------

def from_torchvision(path: str | os.PathLike, **model_kwargs):
    """`(model, variables)` from a torchvision MobileNetV2 state dict (`.pth`), without PyTorch."""
    state_dict = load_state_dict(path)
    modules: dict[str, list[np.ndarray]] = {}
    for name, array in state_dict.items():
        module, _, leaf = name.rpartition(".")
        if leaf != "num_batches_tracked":
            modules.setdefault(module, []).append(array)
    return assemble(list(modules.items()), _torch_to_flax, path, "torchvision", **model_kwargs)
