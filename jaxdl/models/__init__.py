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
import functools
import importlib
import sys
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

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


# Where a field's function or class is looked for by name first, so that a config names it as users write it
# (`flax.linen:relu`, not `jax._src.nn.functions:relu`); and the libraries whose names a config may hold
# without the loader being given them (`custom_classes`), as they are jaxdl's own dependencies.
_PUBLIC_NAMESPACES = ("flax.linen", "flax.linen.initializers", "flax.nnx", "jax.nn", "jax.nn.initializers",
                      "jax.numpy", "jax.lax", "jax", "optax")
_LIBRARIES = ("flax", "jax", "optax")


def _is_scalar_type(value) -> bool:
    """A numpy or jax.numpy scalar type (`np.float32`, `jnp.bfloat16`): a dtype, though callable."""
    return (isinstance(value, type) and issubclass(value, np.generic)) or isinstance(value, type(jnp.float32))


def _resolve(path: str):
    """The object `module:qualified.name` names in an imported module, or None."""
    module_name, _, qualname = path.partition(":")
    found = sys.modules.get(module_name)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found


def _import_path(value, where: str) -> str:
    """`module:qualified.name` of a function or class, by which `model_from_config` finds it again.

    Flax's, JAX's and optax's are named by their public module (`flax.linen:relu`, `flax.linen:Conv`); any
    other by the module that defines it, which must give it back by that name (a module-level function or
    class).

    Raises:
      TypeError: `value` has no import path (a lambda, a function made inside another, a `functools.partial`),
        naming `where` (the field) and what to give instead.
    """
    name = getattr(value, "__name__", None)
    for namespace in _PUBLIC_NAMESPACES:
        if name and getattr(sys.modules.get(namespace), name, None) is value:
            return f"{namespace}:{name}"
    module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    # Defined at the top of a module: its module gives it back by name (or, run from a string, has no module
    # to ask: `load_model` takes it from `custom_classes` anyway).
    if module and qualname and "<" not in qualname and (module not in sys.modules
                                                         or _resolve(f"{module}:{qualname}") is value):
        return f"{module}:{qualname}"
    what = ("a lambda" if qualname and "<lambda>" in qualname else
            f"a function made inside another ({qualname}, a closure)" if qualname and "<locals>" in qualname else
            f"a functools.partial of {value.func!r:.60}" if isinstance(value, functools.partial) else
            f"{value!r:.80}, which no module holds by name")
    raise TypeError(f"{where} holds {what}: a model config names a function or class by its import path, and "
                    "this one has none; define it at the top of a module (and pass it to load_model's "
                    "custom_classes), or save the variables alone with "
                    "jaxdl.models.saving.save_variables(directory, state.variables)")


def _plain(value, owner: str, field: str):
    if isinstance(value, nn.Module):
        return model_config(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, owner, field) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, Mapping):  # a FrozenDict (or dict) of plain values, string keys as JSON takes them
        if not all(isinstance(key, str) for key in value):
            raise TypeError(f"{owner}.{field} is a mapping with keys {list(value)[:5]}: a model config holds "
                            "mappings with string keys only")
        kind = "frozen_dict" if isinstance(value, FrozenDict) else "dict"
        return {kind: {key: _plain(v, owner, f"{field}[{key!r}]") for key, v in value.items()}}
    if isinstance(value, np.dtype) or _is_scalar_type(value):
        return np.dtype(value).name  # dtypes
    if callable(value):  # an activation, an initializer, a module class: by its import path
        return {"import": _import_path(value, f"{owner}.{field}")}
    raise TypeError(f"{owner}.{field} holds {value!r:.80}, which a model config cannot hold (plain numbers, "
                    "strings, tuples, mappings, dtypes, modules and importable functions and classes only); save "
                    "the variables alone with jaxdl.models.saving.save_variables(directory, state.variables)")


def _imported(path: str, custom_classes):
    """The function or class a config names: flax's, JAX's or optax's, or one of `custom_classes`; jaxdl never
    imports what a file names beyond those libraries."""
    given = {class_path(obj): obj for obj in (*model_classes().values(), *custom_classes)}
    if path in given:
        return given[path]
    module_name = path.partition(":")[0]
    if module_name.split(".")[0] in _LIBRARIES:
        importlib.import_module(module_name)
        found = _resolve(path)
        if found is not None and str(getattr(found, "__module__", module_name)).split(".")[0] in _LIBRARIES:
            return found
        raise ValueError(f"the model's config names {path}, which this version of {module_name} does not have")
    raise ValueError(f"the model's config names {path}, which is neither flax's, jax's nor optax's: pass it to "
                     f"load it, e.g. load_model(directory, custom_classes=[..., {path.rpartition(':')[2]}])")


def _hashable(value, custom_classes):
    if isinstance(value, dict) and "class" in value:  # a nested module
        return model_from_config(value, custom_classes)
    if isinstance(value, dict) and len(value) == 1:  # `_plain`'s tagged values
        (kind, inner), = value.items()
        if kind == "import":
            return _imported(inner, custom_classes)
        if kind in ("frozen_dict", "dict"):
            items = {key: _hashable(v, custom_classes) for key, v in inner.items()}
            return FrozenDict(items) if kind == "frozen_dict" else items
    return tuple(_hashable(v, custom_classes) for v in value) if isinstance(value, list) else value


def class_path(cls) -> str:
    """How a saved config names a class of the user's: `module:QualifiedName`."""
    return f"{cls.__module__}:{cls.__qualname__}"


def model_config(model) -> dict:
    """A JSON-ready description from which `model_from_config` rebuilds the model.

    jaxdl's classes are named by name; any other Linen module by its import
    path, and loading it back needs the class itself (`custom_classes`).
    Fields hold plain numbers, strings, tuples, dtypes, nested modules,
    mappings with string keys (a `FrozenDict` comes back a `FrozenDict`),
    and functions and classes by import path: flax's, JAX's and optax's
    (`act=nn.relu`, `conv=nn.Conv`) as `{"import": "flax.linen:relu"}`, any
    other defined at the top of a module by its module's path.

    Raises:
      TypeError: a field holds what a config cannot name (a lambda, a
        closure such as `nn.initializers.lecun_normal()`'s result, a
        `functools.partial`, an array), naming the field.
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
    """The model a `model_config` describes. A class or function of the user's must be among
    `custom_classes`: a config file only names it, and jaxdl never imports code that a file names
    beyond flax, JAX and optax (as Keras's `custom_objects`)."""
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
