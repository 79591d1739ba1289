"""Models and what every model needs: a parameter count, a plain-data config, the seam generic code calls them by.

jaxdl's Linen models (`small`: MLP and ConvNet; `mobilenet_v2`; `heads`: a
classifier head and a backbone with its head), their layers (`layers`: `Conv`
and `max_pool` in the forms XLA:CPU trains fast), how a model is called
(`contract`: its family, its train flag, its inference form), Flax NNX modules
as pure functions (`nnx_modules`: `trained_module` gives one back from a
state), MobileNetV2 as an NNX module (`nnx_mobilenet_v2`), the per-layer table (`summary`) and the export to a directory
(`saving`: `save_model`, `load_model`, reached as `jaxdl.save_model`).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np

from jaxdl.models.heads import ClassifierHead, FineTuneModel
from jaxdl.models.layers import Conv, max_pool
from jaxdl.models.mobilenet_v2 import MobileNetV2
from jaxdl.models.nnx_mobilenet_v2 import MobileNetV2NNX
from jaxdl.models.nnx_modules import is_nnx_module, trained_module
from jaxdl.models.small import MLP, ConvNet


def model_classes() -> dict:
    """Every class a saved model may name, by name."""
    classes = (MLP, ConvNet, MobileNetV2, ClassifierHead, FineTuneModel)
    return {cls.__name__: cls for cls in classes}


def count_params(variables) -> int:
    """Trainable plus non-trainable numbers, as Keras's `model.summary()` totals them.

    Keras counts BatchNorm's moving mean and variance as non-trainable
    parameters; in Flax they are the `batch_stats` collection.
    """
    return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(variables)))


def _plain(value, owner: str, field: str):
    if isinstance(value, nn.Module):
        return model_config(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, owner, field) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    try:
        return np.dtype(value).name  # dtypes
    except TypeError:
        raise TypeError(f"{owner}.{field} holds {value!r}, which a model config cannot hold (plain numbers, "
                        "strings, tuples, dtypes and modules only); save the variables alone with "
                        "jaxdl.models.saving.save_variables(directory, state.variables)") from None


def _hashable(value, custom_classes):
    if isinstance(value, dict) and "class" in value:  # a nested module
        return model_from_config(value, custom_classes)
    return tuple(_hashable(v, custom_classes) for v in value) if isinstance(value, list) else value


def class_path(cls) -> str:
    """How a saved config names a class of the user's: `module:QualifiedName`."""
    return f"{cls.__module__}:{cls.__qualname__}"


def model_config(model) -> dict:
    """A JSON-ready description from which `model_from_config` rebuilds the model.

    jaxdl's classes are named by name; any other Linen module by its import
    path, and loading it back needs the class itself (`custom_classes`).
    """
    cls = type(model)
    if is_nnx_module(model):
        raise TypeError(f"{cls.__name__} is a Flax NNX module, which has no config jaxdl can rebuild it from (its "
                        "constructor's arguments are not kept): save_model saves its state, and "
                        "load_model(directory, into=...) fills a module your code builds")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{cls.__name__} is not a Linen module; only Linen modules are saved by config")
    name = cls.__name__ if model_classes().get(cls.__name__) is cls else class_path(cls)
    fields = {f.name: _plain(getattr(model, f.name), cls.__name__, f.name) for f in dataclasses.fields(model)
              if f.init and f.name not in ("parent", "name")}
    return {"class": name, "config": fields}


def model_from_config(config: dict, custom_classes=()):
    """The model a `model_config` describes. A class of the user's must be among `custom_classes`:
    a config file only names it, and jaxdl never imports code that a file names (as Keras's
    `custom_objects`)."""
    name = config["class"]
    known = {**model_classes(), **{class_path(cls): cls for cls in custom_classes}}
    if name not in known:
        raise ValueError(f"the model's class is {name}, which is not a jaxdl model class; pass it to load it, "
                         f"e.g. load_model(directory, custom_classes=[{name.rpartition(':')[2] or name}])")
    kwargs = {k: _hashable(v, custom_classes) for k, v in config["config"].items()}
    if "dtype" in kwargs:
        kwargs["dtype"] = np.dtype(kwargs["dtype"])
    return known[name](**kwargs)


__all__ = ["MLP", "ConvNet", "MobileNetV2", "MobileNetV2NNX", "ClassifierHead", "FineTuneModel", "Conv", "max_pool",
           "model_classes", "count_params", "model_config", "model_from_config", "class_path", "trained_module"]
