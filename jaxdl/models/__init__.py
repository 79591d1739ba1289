"""Linen models and what every model needs: a parameter count and a plain-data config."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np

from jaxdl.models.heads import ClassifierHead, FineTuneModel
from jaxdl.models.mobilenet_v2 import MobileNetV2
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


def _plain(value):
    if isinstance(value, nn.Module):
        return model_config(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return np.dtype(value).name  # dtypes


def _hashable(value):
    if isinstance(value, dict) and "class" in value:  # a nested module
        return model_from_config(value)
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def model_config(model) -> dict:
    """A JSON-ready description from which `model_from_config` rebuilds the model."""
    name = type(model).__name__
    known = model_classes()
    if known.get(name) is not type(model):
        raise TypeError(f"{name} is not a jaxdl model class ({sorted(known)}); it cannot be saved "
                        "by config")
    fields = {f.name: _plain(getattr(model, f.name)) for f in dataclasses.fields(model)
              if f.init and f.name not in ("parent", "name")}
    return {"class": name, "config": fields}


def model_from_config(config: dict):
    cls = model_classes()[config["class"]]
    kwargs = {k: _hashable(v) for k, v in config["config"].items()}
    if "dtype" in kwargs:
        kwargs["dtype"] = np.dtype(kwargs["dtype"])
    return cls(**kwargs)


__all__ = ["MLP", "ConvNet", "MobileNetV2", "ClassifierHead", "FineTuneModel", "model_classes", "count_params", "model_config", "model_from_config"]
