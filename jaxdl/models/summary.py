"""A Keras-like `model.summary()` for Linen models: Flax's layer table plus Keras's three totals.

The table is `flax.linen.Module.tabulate`'s: one row per layer (the module
path, its type, input and output shapes for a batch of one), and one column
per variable collection with each layer's variables and their count. The
`params` column is what Keras calls trainable; every other collection (in
jaxdl, `batch_stats`: BatchNorm's moving mean and variance) is what Keras
calls non-trainable. Below it, the totals as Keras prints them.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdl.models.contract import AUTO, flag_kwargs, model_family, resolve_train_flag

TRAINABLE = "params"
# Values a module records with `sow` (or `capture_intermediates`): outputs, not parameters.
NOT_PARAMETERS = ("intermediates",)


def _rngs() -> dict:
    # Dropout is deterministic in inference mode; the key is there for models that ask for one anyway.
    return {"params": jax.random.key(0), "dropout": jax.random.key(1)}


def count_by_kind(variables: Mapping[str, Any]) -> dict:
    """{"total", "trainable", "non_trainable"} numbers in a variables dict (arrays or shape structs).

    Trainable: the `params` collection; non-trainable: every other collection
    but `intermediates` (Keras counts BatchNorm's moving statistics so).
    """
    def size(tree) -> int:
        return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(tree)))

    trainable = size(variables.get(TRAINABLE, {}))
    non_trainable = sum(size(tree) for name, tree in variables.items()
                        if name != TRAINABLE and name not in NOT_PARAMETERS)
    return {"total": trainable + non_trainable, "trainable": trainable, "non_trainable": non_trainable}


def _printed(table: str, totals: dict, print_fn) -> dict:
    """The table, then Keras's three totals' lines, through `print_fn`; returns the totals."""
    print_fn(table.strip("\n"))
    print_fn(f"Total params: {totals['total']:,}")
    print_fn(f"Trainable params: {totals['trainable']:,}")
    print_fn(f"Non-trainable params: {totals['non_trainable']:,}")
    return totals


def _nnx_summary(model, input_shape: tuple, *, print_fn, depth, console_kwargs, input_dtype) -> dict:
    """`summary` of a Flax NNX module: Flax's own `nnx.tabulate` table, in evaluation mode, and Keras's totals.

    Trainable: its `nnx.Param`s; non-trainable: its other variables (batch
    statistics, a user's own) but not its random streams' keys and counts,
    which are not parameters.
    """
    def size(tree) -> int:
        return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(tree)))

    _, trainable, _, others = nnx.split(model, nnx.Param, nnx.RngState, ...)
    totals = {"trainable": size(trainable), "non_trainable": size(others)}
    totals = {"total": totals["trainable"] + totals["non_trainable"], **totals}
    copy = nnx.clone(model)  # tabulate calls the module: its own one stays as it was (mode, random counts)
    copy.eval()
    table = nnx.tabulate(copy, jnp.zeros((1, *input_shape), input_dtype), depth=depth,
                         console_kwargs={"force_terminal": False, "width": 160, **(console_kwargs or {})})
    return _printed(table, totals, print_fn)


def summary(model: nn.Module, input_shape: Sequence[int], *, print_fn: Callable[[str], Any] = print,
            depth: int | None = 1, console_kwargs: Mapping[str, Any] | None = None,
            train_flag: str | None = AUTO, input_dtype=jnp.float32) -> dict:
    """Prints `model`'s layers and its parameter totals as Keras's `model.summary()` counts them.

    The model is traced (`jax.eval_shape`, nothing is computed) on zeros of
    shape `(1, *input_shape)` and `input_dtype`, in inference mode, called as `fit`
    calls it (`jaxdl.models.contract`): by its own train flag (`train`, `training`,
    `deterministic`, or none).

    "Trainable" is the `params` collection. Which of them an optimizer
    actually updates is the training's choice (`jaxdl.pretrained.finetune` freezes a
    backbone's), not the model's, so a frozen backbone still counts here.

    Args:
      model: a Linen module, or an NNX module instance (its table is Flax's
        `nnx.tabulate`; random streams' keys and counts are not counted).
      input_shape: one example's shape (a tuple, or an int for a vector),
        without the batch axis.
      print_fn: called with the table, then each total's line.
      depth: how many levels of submodules get a row (1: the model's own
        layers; None: all).
      console_kwargs: for the `rich` console Flax renders with (plain text,
        160 columns at most, by default).
      train_flag: "auto" (read from the model's `__call__`), the keyword's
        name, or None for a model that takes none; as in `fit`.
      input_dtype: the inputs' dtype; float32 by default, an integer type
        for a model on tokens (`nn.Embed`).

    Returns:
      The totals: `{"total": ..., "trainable": ..., "non_trainable": ...}`.

    Raises:
      TypeError: `model` is not a Flax module instance
        (`jaxdl.models.contract.model_family`).
      ValueError: the train flag cannot be told from the signature (several
        flags, or only `**kwargs`) or `train_flag` is not a keyword name.
    """
    family = model_family(model, "summary(model, ...)")
    if isinstance(input_shape, int):
        input_shape = (input_shape,)
    if family == "nnx":
        return _nnx_summary(model, input_shape, print_fn=print_fn, depth=depth, console_kwargs=console_kwargs,
                            input_dtype=input_dtype)
    inference = flag_kwargs(resolve_train_flag(model, train_flag), train=False)
    inputs = jnp.zeros((1, *input_shape), input_dtype)
    variables = jax.eval_shape(lambda x: model.init(_rngs(), x, **inference), inputs)
    totals = count_by_kind(variables)
    table = model.tabulate(_rngs(), inputs, **inference, depth=depth, compute_flops=False,
                           console_kwargs={"force_terminal": False, "width": 160, **(console_kwargs or {})})
    return _printed(table, totals, print_fn)
