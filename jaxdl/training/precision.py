"""Mixed precision: activations and gradients in half precision, parameters and optimizer state in float32.

The policy of Flax's ImageNet example: a model's `dtype` field is the
precision it computes in, its parameters are stored in float32 (Linen's
`param_dtype`) and cast where they are used, so the optimizer updates a
float32 master copy. Losses and metrics are computed from float32 outputs.
float16, whose range is narrow, adds dynamic loss scaling (flax's
`DynamicScale`): the loss is multiplied before differentiating, a step whose
gradients overflow is skipped and the scale halved.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx
from flax.training.dynamic_scale import DynamicScale

PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(precision: str):
    """The dtype named by `precision` ("float32", "bfloat16" or "float16")."""
    try:
        return PRECISIONS[precision]
    except (KeyError, TypeError):
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}") from None


def with_precision(model, precision: str | None):
    """`model` computing in `precision`: its `dtype` field, or its submodules' (a backbone and a head).

    A Flax NNX module is copied (`nnx.clone`) and every layer of the copy
    that has a `dtype` attribute computes in `precision` (its `param_dtype`,
    float32, unchanged), as Flax's layers take `dtype=` when built; the
    user's module stays as it is. None leaves the model as it is.
    """
    if precision is None:
        return model
    dtype = compute_dtype(precision)
    if isinstance(model, nnx.Module):
        copy = nnx.clone(model)
        layers = [module for _, module in nnx.iter_graph(copy) if isinstance(module, nnx.Module)
                  and hasattr(module, "dtype")]
        if not layers:
            raise ValueError(f"precision={precision!r} sets the layers' computation dtype, but "
                             f"{type(model).__name__} has no layer with a `dtype` attribute (as Flax's nnx.Linear, "
                             "nnx.Conv and nnx.BatchNorm have); leave precision out")
        for module in layers:
            module.dtype = dtype
        return copy
    fields = [field.name for field in dataclasses.fields(model) if field.name not in ("parent", "name")]
    if "dtype" in fields:
        return model.clone(dtype=dtype)
    parts = {name: getattr(model, name) for name in fields if isinstance(getattr(model, name), nn.Module)}
    if not parts:
        raise ValueError(f"precision={precision!r} sets the model's computation dtype, but "
                         f"{type(model).__name__} has no `dtype` field; give it one (as Flax's layers take) "
                         "or leave precision out")
    return model.clone(**{name: with_precision(part, precision) for name, part in parts.items()})


def loss_scale(precision: str | None) -> DynamicScale | None:
    """A dynamic loss scale for float16 training, None for the other precisions.

    Its counters are arrays, not Python numbers: a weakly typed scalar in the
    state would make the second call of a compiled step compile again.
    """
    if precision is None or compute_dtype(precision) != jnp.float16:
        return None
    return DynamicScale(fin_steps=jnp.zeros((), jnp.int32), scale=jnp.asarray(2.0 ** 15, jnp.float32))
