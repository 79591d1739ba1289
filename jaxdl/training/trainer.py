"""`fit`, `evaluate` and `predict`: the run of a training, read as its outline.

`fit` resolves the model's contract (`jaxdl.models.contract`: its train flag),
makes an input adapter (`jaxdl.training.adapters`: arrays or a source), makes or
continues the state, restores a run checkpoint (`jaxdl.training.run_checkpoint`),
then for each epoch runs the epoch loop (`jaxdl.training.epoch_loop`), validates,
logs, calls back and saves; whatever ends the run, the checkpoint being
written is completed or cleaned up.

This module owns epochs, validation, logs, callbacks and messages; batching
belongs to the adapters, steps to the epoch loop and `jaxdl.training.steps`,
and what a checkpoint holds to `jaxdl.training.run_checkpoint`. It is named
`trainer`, not `fit`, so that `jaxdl.training.fit` stays the function (a
module of that name would be shadowed by it).
"""
from __future__ import annotations

import difflib
import functools
import inspect
import sys
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdl.data import arrays, prefetch, sources
from jaxdl.models.contract import AUTO, inference_form, model_family, resolve_train_flag, traced_outputs
from jaxdl.models.nnx_modules import NNXApply, is_nnx_module, nnx_train_flag, split_module, update_module
from jaxdl.runtime import compilation_cache, sharding
from jaxdl.training.adapters import ArrayInput, InputAdapter, SourceInput, example_weights
from jaxdl.training.callbacks import (
    BATCH_HOOKS,
    Callback,
    FitRun,
    History,
    checked_callbacks,
    defines,
    injected_learning_rates,
)
from jaxdl.training.epoch_loop import EpochLoop, ScannedEpochs, StreamedEpochs
from jaxdl.training.optimizers import check_fit_can_update, resolve_optimizer
from jaxdl.training.plan import RunPlan
from jaxdl.training.precision import with_precision
from jaxdl.training.progress import EpochLine, Progress, dynamic_display
from jaxdl.training.run_checkpoint import CheckpointStore, RunCheckpoints, run_config
from jaxdl.training.steps import (
    TrainState,
    adopted_state,
    canonical,
    checked_metric_names,
    compiled_epoch,
    compiled_eval_step,
    compiled_evaluate,
    compiled_steps,
    create_train_state,
    loops_are_slow,
    metrics_from_sums,
    predict_all,
    seed_rngs,
    zero_totals,
)

# Keras's default. One object, not one per call: the optimizer is part of the compiled steps' cache
# key, so a new `optax.adam` per `fit` would compile every step again. Optax transformations are
# immutable pairs of functions, so sharing one is safe.
DEFAULT_OPTIMIZER = optax.adam(1e-3)


# Arguments jaxdl has renamed, and what they are called now.
_RENAMED = {"steps_per_dispatch": "steps_per_execution"}


def _named_arguments(function: Callable) -> Callable:
    """`function`, refusing an unknown keyword argument with one TypeError naming it and what to pass instead:
    its new name (`_RENAMED`) or the nearest of the function's own, before anything runs. The wrapper is one
    more frame between the caller and the warnings of `fit` and `evaluate`: their `stacklevel`s count it."""
    parameters = inspect.signature(function).parameters

    @functools.wraps(function)
    def call(*args, **kwargs):
        for name in kwargs:
            if name not in parameters:
                nearest = difflib.get_close_matches(name, parameters, n=1)
                hint = (f": it is called {_RENAMED[name]} now, as Keras names it" if name in _RENAMED else
                        f"; did you mean {nearest[0]}?" if nearest else "")
                raise TypeError(f"{function.__name__}() got an unexpected keyword argument {name!r}{hint}")
        return function(*args, **kwargs)

    return call


def _read_source(x, what: str, *, batch_size: int, features, transform, input_shape, needs_labels: bool,
                 y=None, shuffle: bool = False, **options):
    """`sources.as_batches` for `evaluate`/`predict`/`fit`, refusing a `y` beside a source."""
    if y is not None:
        raise ValueError(f"{what} was given a {type(x).__name__} as x and labels as y: a source carries its labels; "
                         "name them with features=(input, label) or a transform, and leave y out")
    return sources.as_batches(x, batch_size=batch_size, features=features, transform=transform,
                           input_shape=input_shape, shuffle=shuffle, needs_labels=needs_labels, **options)


def _check_array_arguments(x, features, transform) -> None:
    if features is not None or transform is not None:
        raise ValueError("features and transform name how to read a source's examples; x is an in-memory "
                         f"array ({type(x).__name__}), whose examples are the inputs already")


def _evaluate_batches(state: TrainState, batches, eval_step, put: Callable) -> dict:
    """Sums of `eval_step` over host batches, each placed by `put`."""
    totals = None
    for batch in prefetch.to_device(batches, put=put):
        sums = eval_step(state, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError("the source yielded no batches to evaluate on")
    return totals


@_named_arguments
def evaluate(state: TrainState, x, y=None, *, loss, metrics: Sequence[str] = ("accuracy",),
             batch_size: int = 256, features: Sequence[str] | None = None,
             transform: Callable | None = None, mesh=None, train_flag: str | None = AUTO,
             device_data_bytes: int | str = "auto") -> dict[str, float]:
    """Loss and metrics of a trained state over a whole dataset, in inference mode, as Keras's `evaluate`.

    The data are read in order, in batches of one compiled evaluation step
    (a smaller last batch padded and masked out), and the sums over all
    examples give the means returned. Labels are checked against the loss
    and the model's outputs as `fit` checks them, before anything compiles.

    Args:
      state: the `TrainState` to evaluate (e.g. the one `fit` returned, or
        Flax's `train_state.TrainState` from a loop of your own).
      x: an array of inputs (with labels `y`) or a source carrying its own
        labels (a random-access source or an iterable of batch dicts; see
        `fit`).
      y: the labels of array `x`; None for a source.
      loss: a loss name from `jaxdl.training.losses` or a function
        `(outputs, batch) -> per-example loss`. Required.
      metrics: metrics as `fit` takes them (names, `Metric`s, your
        functions); default accuracy.
      batch_size: examples per compiled step; it must split evenly over the
        `mesh`'s devices. Default 256.
      features: for a source, the `(input, label)` feature names (see `fit`).
      transform: for a random-access source, what computes `(x, y)` from an
        example (see `fit`).
      mesh: a `jax.sharding.Mesh` whose `data` axis splits each batch; None
        (default) is `jaxdl.runtime.sharding.data_mesh()`, all devices.
      train_flag: the model's training keyword, passed False; "auto"
        (default) reads it from the model's `__call__` (see `fit`).
      device_data_bytes: the bytes per device that array data may take to go
        to the devices whole; larger arrays go batch by batch. "auto"
        (default) as in `fit`; 0 always streams.

    Returns:
      A dict of floats: `loss`, then each metric.

    Raises:
      TypeError: an unknown keyword argument (named with the nearest name).
      ValueError: for bad input, naming the argument at fault: a
        non-positive `batch_size`, an unknown loss or metric, a batch that
        does not split over the mesh, mismatched or ill-shaped `x` and `y`,
        labels that do not fit the loss or the model's outputs, labels `y`
        beside a source, `features` or `transform` with array `x`, or a
        source that yields no batches.
    """
    compilation_cache.ensure_enabled()  # before any computation, eager ones included
    state = adopted_state(state, where="evaluate(state, ...)")
    batch_size = arrays.check_batch_size(batch_size)
    mesh = sharding.resolve_mesh(mesh)
    sharding.check_global_batch(batch_size, mesh)
    plan = RunPlan(loss=loss, metrics=checked_metric_names(metrics), batch_size=batch_size, mesh=mesh,
                   whole_limit=prefetch.device_data_limit(mesh.devices.flat, device_data_bytes),
                   train_flag=resolve_train_flag(state.apply_fn, train_flag), features=features, transform=transform)
    state = sharding.put_replicated(state, mesh)
    if sources.is_source(x):
        batches = _read_source(x, "evaluate", y=y, batch_size=batch_size, features=features, transform=transform,
                               input_shape=state.input_shape, needs_labels=True, **_split_over(batch_size))
        inputs = SourceInput(batches)
        state = _with_input_shape(state, inputs.input_shape)
        _check_outputs_fit_the_loss(state, plan, {inputs.labels_name: inputs.labels}, inputs.input_dtype)
        eval_step = compiled_eval_step(plan.loss, plan.metrics, mesh, plan.train_flag)
        return metrics_from_sums(_evaluate_batches(state, batches.epoch(0), eval_step, _batch_placer(mesh, True)))
    _check_array_arguments(x, features, transform)
    x, y = arrays.check_dataset(x, y, input_shape=state.input_shape, purpose="evaluating")
    state = _with_input_shape(state, x.shape[1:])
    _check_outputs_fit_the_loss(state, plan, {"y": y}, x.dtype)
    return metrics_from_sums(_array_evaluator(state, x, y, plan)(state))


def _with_input_shape(state: TrainState, input_shape) -> TrainState:
    """`state`, its example shape taken from the data where it has none (an NNX module's state built without
    an example: the module was initialised already)."""
    return state if state.input_shape is not None else state.replace(input_shape=tuple(input_shape))


def _split_over(pad_to: int, masked: bool = True) -> dict:
    """How a source is read for data-parallel steps: this process's part of each batch, a smaller last batch
    filled up to a multiple of `pad_to` (and masked). Evaluation and models without BatchNorm statistics pad
    to the whole batch and mask every batch, so that one compiled step serves them all; BatchNorm models,
    which cannot be masked, to the device count only.
    """
    return {"multiple": pad_to, "process": (jax.process_index(), jax.process_count()), "masked": masked}


def _batch_placer(mesh, per_process: bool = False, stacked: bool = False) -> Callable:
    """`put(host batch)` onto the mesh: a source's batches are this process's part already (`per_process`),
    arrays' are whole."""
    if per_process:
        return lambda batch: sharding.put_batch(batch, mesh, stacked)
    return lambda batch: sharding.put_global_batch(batch, mesh, stacked)


def prediction_batch_size(num_examples: int, batch_size: int, multiple: int = 1) -> int:
    """The batch `predict` compiles for: `batch_size`, or the power of two that holds a smaller input.

    Padding a few examples up to a large batch wastes the compute; rounding
    up to powers of two keeps the number of compiled shapes small. The size
    is then rounded up to a `multiple` (the devices that split the batch).
    """
    size = min(batch_size, 1 << max(num_examples - 1, 0).bit_length())
    return -(-size // multiple) * multiple


def predict(model_or_state, x, *, variables=None, batch_size: int = 256, features: Sequence[str] | None = None,
            transform: Callable | None = None, mesh=None, precision: str | None = None,
            train_flag: str | None = AUTO, device_data_bytes: int | str = "auto") -> np.ndarray:
    """The model's outputs (logits, as the model returns them) for every example of `x`, in inference mode.

    The examples are run in batches of one compiled shape: `batch_size`, or
    the power of two that holds a smaller input (`prediction_batch_size`), the
    last batch filled up and its extra outputs dropped. A model with an
    inference form of its own (`jaxdl.models.contract.inference_form`; the
    pretrained image models fold their BatchNorm and run images in chunks,
    as `jaxdl.pretrained.classifier` does) runs in that form. Every process
    gets all outputs.

    Args:
      model_or_state: a `TrainState`, a Flax Linen module together with
        its `variables`, or a Flax NNX module instance (which holds its
        variables; run in evaluation mode).
      x: an array of inputs, or a source read in order (only its input
        feature, `features[0]`, is read; see `fit`).
      variables: the module's variables (`{"params": ..., ...}`), needed
        with a module and ignored with a state.
      batch_size: the largest batch compiled; default 256.
      features: for a source, the feature names; only the first is read.
      transform: for a random-access source, what computes the input from an
        example (see `fit`).
      mesh: a `jax.sharding.Mesh` whose `data` axis splits each batch; None
        (default) is `jaxdl.runtime.sharding.data_mesh()`, all devices.
      precision: another computation dtype than the model's own
        ("bfloat16", ...; see `jaxdl.training.precision`); None (default) keeps the
        model's. Outputs come back as float32 either way.
      train_flag: the model's training keyword, passed False; "auto"
        (default) reads it from the model's `__call__` (see `fit`).
      device_data_bytes: the bytes per device that `x` may take to go to the
        devices whole; a larger array goes batch by batch. "auto" (default)
        as in `fit`; 0 always streams.

    Returns:
      A float32 numpy array of the outputs, one row per example of `x`, in
      its order.

    Raises:
      TypeError: `model_or_state` is neither a `TrainState` nor a Flax
        module instance (see `jaxdl.models.contract.model_family`).
      ValueError: a module given without `variables`; `precision` with a
        state whose model is unknown (not built by `create_train_state`); a
        non-positive `batch_size`; ill-shaped or empty `x`; `features` or
        `transform` with array `x`; a source that yields no batches.
    """
    compilation_cache.ensure_enabled()  # before any computation, eager ones included
    batch_size = arrays.check_batch_size(batch_size)
    mesh = sharding.resolve_mesh(mesh)
    whole_limit = prefetch.device_data_limit(mesh.devices.flat, device_data_bytes)
    if isinstance(model_or_state, TrainState):
        input_shape = model_or_state.input_shape
        model = getattr(model_or_state.apply_fn, "__self__", None)
        apply_fn, variables = model_or_state.apply_fn, model_or_state.variables
    else:
        if model_family(model_or_state, "predict(model, x, variables=...)") == "nnx":
            # An NNX module holds its variables: split once, run through its pure apply (`variables` ignored).
            apply_fn, trained, carried = split_module(model_or_state)
            input_shape, model, variables = None, None, {"params": trained, "batch_stats": carried}
        elif variables is None:
            raise ValueError("predict(model, x) needs variables=...; or pass a TrainState")
        else:
            input_shape, model = None, canonical(model_or_state)
            apply_fn = model.apply
    if precision is not None and isinstance(apply_fn, NNXApply):  # an NNX module's copy in `precision`
        module = with_precision(apply_fn.module(variables), precision)
        apply_fn, trained, carried = split_module(module, apply_fn.wrt)
        variables, precision = {"params": trained, "batch_stats": carried}, None
    if precision is not None:
        if model is None:
            raise ValueError("predict(..., precision=...) needs the state's model: build the state with "
                             "create_train_state, or pass the module and its variables")
        model = canonical(with_precision(model, precision))
        apply_fn = model.apply
    chunked = False
    if model is not None:  # the model's own inference form, where it has one
        form = inference_form(model, variables)
        chunked, variables = form.chunked, form.variables
        if form.model is not model:
            model = canonical(form.model)
            apply_fn = model.apply
    train_flag = None if chunked else resolve_train_flag(apply_fn, train_flag)
    variables = sharding.put_replicated(variables, mesh)
    parts = sharding.data_parallelism(mesh)

    def outputs_of(images, size=None):  # size: the batch compiled for, the images' own rounded up by default
        size = size or -(-len(images) // parts) * parts
        return np.asarray(predict_all(apply_fn, variables, images, size, chunked, mesh, train_flag=train_flag),
                          np.float32)

    put = functools.partial(sharding.put_replicated, mesh=mesh)
    if sources.is_source(x):
        batches = _read_source(x, "predict", batch_size=batch_size, features=features, transform=transform,
                               input_shape=input_shape, needs_labels=False)
        outputs = [outputs_of(batch["x"]) for batch in prefetch.to_device(batches.epoch(0), put=put)]
        if not outputs:
            raise ValueError("the source yielded no batches to predict")
        return np.concatenate(outputs)
    _check_array_arguments(x, features, transform)
    x = arrays.check_dataset(x, input_shape=input_shape, purpose="predicting")
    size = prediction_batch_size(len(x), batch_size, parts)
    if len(x) > size and (x.nbytes > whole_limit or (
            not chunked and loops_are_slow(apply_fn, variables, x.shape[1:], train_flag, x.dtype))):
        # Batch by batch, each of one compiled shape (the last filled up and its extra outputs dropped).
        batches = ({"x": batch["x"]} for batch in arrays.ordered_batches({"x": x}, np.arange(len(x)), size,
                                                                       multiple=size))
        outputs = [outputs_of(batch["x"], size) for batch in prefetch.to_device(batches, put=put)]
        return np.concatenate(outputs)[:len(x)]
    return outputs_of(put(x), size)


# --- fit ---------------------------------------------------------------------------------------


def learning_rate_of(opt_state) -> float | None:
    """The learning rate an `optax.inject_hyperparams` optimizer holds in its state, or None without one.

    Searches the optimizer state (chains and masks nest it), as Keras logs
    `learning_rate`; callbacks such as ReduceLROnPlateau change it there.
    """
    found = injected_learning_rates(opt_state)
    return float(found[0].hyperparams["learning_rate"]) if found else None


_CLASS_LOSSES = ("sparse_categorical_crossentropy", "categorical_crossentropy", "binary_crossentropy")


def _check_outputs_fit_the_loss(state: TrainState, plan: RunPlan, labels: dict[str, np.ndarray],
                                input_dtype) -> None:
    """Labels shaped and valued as the loss reads them, and outputs that are logits: checked before compiling.

    `labels` maps each argument's name to its labels; the model is traced
    once for all of them, on an example of the data's `input_dtype`, through
    the model's contract (its train flag). A
    model whose outputs come out of a sigmoid or softmax gets a warning:
    jaxdl's named losses take logits, as Keras's do with `from_logits=True`.
    """
    loss = plan.loss
    if not isinstance(loss, str) or loss not in _CLASS_LOSSES:
        return
    activation, output_shape = traced_outputs(state.apply_fn, state.variables, state.input_shape, plan.train_flag,
                                              input_dtype)
    if activation is not None:
        warnings.warn(f"the model's outputs come out of a {activation} (probabilities), but loss={loss!r} takes "
                      f"logits (it applies the {'sigmoid' if loss.startswith('binary') else 'softmax'} itself, as "
                      "Keras's losses do with from_logits=True): remove the final activation (jaxdl's ConvNet: "
                      "('dense', units) without one), or training will crawl and accuracy read the outputs wrongly",
                      UserWarning, stacklevel=4)  # the caller of fit or evaluate (see _named_arguments)
    if loss == "binary_crossentropy":
        return
    for name, y in labels.items():
        _check_class_labels(y, loss, output_shape[-1], name)


def _check_class_labels(y: np.ndarray, loss: str, num_classes: int, name: str) -> None:
    """One argument's labels against a cross-entropy loss and the model's `num_classes` outputs."""
    if loss == "categorical_crossentropy":
        if y.ndim != 2 or y.shape[1] != num_classes:
            raise ValueError(f"{name} has shape {y.shape}, but categorical_crossentropy takes one-hot labels of "
                             f"shape (N, {num_classes}); for integer class labels use "
                             "loss='sparse_categorical_crossentropy'")
        return
    if y.ndim == 2 and y.shape[1] == num_classes and num_classes > 1:
        raise ValueError(f"{name} has shape {y.shape}: one-hot labels, but sparse_categorical_crossentropy takes "
                         "integer class labels of shape (N,); use loss='categorical_crossentropy', or pass "
                         f"{name}.argmax(axis=-1)")
    if y.ndim != 1:
        raise ValueError(f"{name} has shape {y.shape}, but sparse_categorical_crossentropy takes integer class "
                         "labels of shape (N,)")
    if not np.issubdtype(y.dtype, np.integer) and not np.array_equal(y, np.round(y)):
        raise ValueError(f"{name} must hold integer class labels for sparse_categorical_crossentropy")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"{name} holds classes {int(y.min())}..{int(y.max())}, but the model has "
                         f"{num_classes} outputs (classes 0..{num_classes - 1})")


def _verbosity(verbose) -> int:
    """Keras's verbose: 0, 1 or 2; "auto" and True mean 1 where a bar can be redrawn (a terminal, a notebook's
    widgets), 2 when output goes to a file or pipe (`jaxdl.training.progress`)."""
    if verbose == "auto" or verbose is True:  # not `in`: 1 == True, and verbose=1 is a choice, not "auto"
        return 1 if dynamic_display() else 2
    if verbose is False or verbose in (0, 1, 2):
        return int(verbose)
    raise ValueError(f"verbose must be 0, 1, 2 or 'auto', got {verbose!r}")


def _state_to_continue(model, optimizer, state: TrainState, precision) -> TrainState:
    """A private copy of the caller's state, after checking that `model` and `optimizer` do not contradict it.

    The copy is what `fit` donates to its compiled epochs, so the caller's
    state stays usable after `fit` returns.
    """
    if precision is not None:
        raise ValueError("fit(state=..., precision=...): a state computes in its model's dtype; build a new "
                         "state with create_train_state(..., precision=...) to change it")
    if optimizer is not None:
        raise ValueError("fit(state=...) continues with the optimizer the state was built with (state.tx); "
                         "pass optimizer=None, or build a new state with create_train_state to change it")
    trained = getattr(state.apply_fn, "__self__", None)
    if model is not None and trained is not None and model != trained:
        raise ValueError(f"fit(state=...) trains the model the state was built for ({type(trained).__name__}); "
                         f"the model argument ({type(model).__name__}) differs: pass model=None or the same model")
    return sharding.copied(state)


def _check_last_batch_splits(num_examples: int | None, batch_size: int, parts: int) -> None:
    """A BatchNorm model's last batch must split over the devices as it is: its statistics cannot mask padding.

    `num_examples` None (an iterable): each batch is checked as it comes (`StreamedEpochs`).
    """
    last = 0 if num_examples is None else num_examples % batch_size
    if last % parts:
        raise ValueError(f"the last batch of each epoch holds {last} examples ({num_examples} examples, batch_size="
                         f"{batch_size}), which the mesh's {parts} devices cannot split, and this model's BatchNorm "
                         "statistics cannot leave out padding rows; pass drop_remainder=True, or a batch_size that "
                         f"leaves a multiple of {parts}")


def _non_negative_epochs(epochs, initial_epoch) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if (isinstance(initial_epoch, bool) or not isinstance(initial_epoch, (int, np.integer))
            or not 0 <= initial_epoch <= epochs):
        raise ValueError(f"initial_epoch must be an integer from 0 to epochs={epochs}, got {initial_epoch!r}")


def _training_input(x, y, plan: RunPlan, *, input_shape, validation_split, validation_data, class_weight,
                    sample_weight, shuffle_rng) -> tuple[InputAdapter, object]:
    """`(adapter, validation_data)`: the training input checked and read, with a validation split taken off."""
    if validation_split is not None and validation_data is not None:
        raise ValueError("pass validation_split or validation_data, not both")
    if sources.is_source(x):
        if validation_split is not None:
            raise ValueError("validation_split holds out the end of in-memory arrays; with a source, pass "
                             "validation_data=(another source), e.g. tfds_source(name, 'test')")
        if sample_weight is not None:
            raise ValueError("sample_weight is for in-memory arrays; a source's batches may carry a 'weight' "
                             "entry, or pass class_weight")
        batches = _read_source(x, "fit", y=y, batch_size=plan.batch_size, features=plan.features,
                               transform=plan.transform, input_shape=input_shape, needs_labels=True, seed=plan.seed,
                               shuffle=plan.shuffle, drop_remainder=plan.drop_remainder,
                               steps_per_epoch=plan.steps_per_epoch, class_weight=class_weight, cache=plan.cache,
                               **_split_over(sharding.data_parallelism(plan.mesh), masked=False))
        return SourceInput(batches), validation_data
    _check_array_arguments(x, plan.features, plan.transform)
    if plan.steps_per_epoch is not None:
        raise ValueError("steps_per_epoch is for iterable sources; in-memory arrays make "
                         "ceil(len(x) / batch_size) steps per epoch")
    if y is None:
        raise ValueError("fit(model, x, y) needs labels y for in-memory arrays (a source carries its own)")
    x, y = arrays.check_dataset(x, y, input_shape=input_shape)
    weights = example_weights(y, class_weight, sample_weight)
    if validation_split is not None:
        (x, y), validation_data = arrays.split_validation(x, y, validation_split)
        weights = weights[:len(x)]
    if plan.drop_remainder and len(x) < plan.batch_size:
        raise ValueError(f"drop_remainder with batch_size={plan.batch_size} drops all {len(x)} examples")
    return ArrayInput(x, y, weights, plan.batch_size, plan.shuffle, plan.drop_remainder, shuffle_rng,
                      validation_split), validation_data


def _epoch_loop(inputs: InputAdapter, state: TrainState, plan: RunPlan, *, stream: bool) -> EpochLoop:
    """The epoch loop for this input: a scanned epoch over data placed whole on the device, or streamed batches.

    Data go to the devices whole only within `plan.whole_limit` bytes (see `fit`'s `device_data_bytes`), and only
    where the adapter has them whole (`InputAdapter.whole`: arrays, a cached source).
    """
    mesh = plan.mesh
    stream = stream or inputs.nbytes is None or inputs.nbytes > plan.whole_limit
    whole = None if stream else inputs.whole()
    if whole is not None:
        run_epoch = compiled_epoch(plan.loss, plan.metrics, plan.batch_size, whole.shuffle, inputs.drop_remainder,
                                   mesh, plan.train_flag, plan.rng_streams)
        return ScannedEpochs(*sharding.put_replicated((whole.x, whole.y, whole.weights), mesh), whole.shuffle_rng,
                             run_epoch, inputs.batches_per_epoch, orders=whole.orders)
    return StreamedEpochs(inputs.host_batches,
                          compiled_steps(plan.loss, plan.metrics, mesh, plan.train_flag, plan.rng_streams),
                          plan.metrics, plan.steps_per_execution,
                          _batch_placer(mesh, inputs.per_process, stacked=True),
                          functools.partial(sharding.put_replicated, mesh=mesh), bool(state.batch_stats))


@_named_arguments
def fit(model, x, y=None, *, loss, optimizer: optax.GradientTransformation | str | None = None,
        metrics: Sequence[str] = ("accuracy",), epochs: int = 1, batch_size: int = 32, seed: int = 0,
        validation_split: float | None = None, validation_data=None, shuffle: bool = True,
        drop_remainder: bool = False, callbacks: Sequence[Callback] = (), state: TrainState | None = None,
        initial_epoch: int = 0, class_weight: dict | None = None, sample_weight=None,
        features: Sequence[str] | None = None, transform: Callable | None = None,
        steps_per_epoch: int | None = None, steps_per_execution: int = 1,
        checkpoint_dir=None, checkpoint_every: int | str = "epoch", keep: int = 3,
        resume_with_new_optimizer: bool = False,
        mesh=None, precision: str | None = None, train_flag: str | None = AUTO,
        rng_streams: Sequence[str] = ("dropout", "augment"), cache: bool | int | str = "auto",
        device_data_bytes: int | str = "auto", wrt=None,
        verbose: int | bool | str = "auto") -> tuple[TrainState, History]:
    """Trains `model` on in-memory arrays or on a source, as Keras's `Model.fit` does.

    Each epoch shuffles the data (from `seed` and the state's step count, or
    the epoch number for sources), runs the compiled train step over its
    batches and evaluates `validation_data` or the `validation_split`; the
    history gathers the per-epoch means. An update that makes the loss, a
    gradient or a parameter non-finite stops training with a warning, and the
    returned state is the last finite one. In-memory arrays train a whole
    epoch in one compiled call where that is fast; larger data, sources and
    convolutional models on CPU feed batches to a compiled step: both paths
    train the same model, seed and data in the same order to the same
    parameters (up to float rounding). The concepts, with examples:
    docs/training.md (what `fit` does, weights, callbacks), docs/data.md
    (sources, transforms, the cache), docs/checkpoints.md (resuming),
    docs/scale.md (devices, processes, half precision).

    A Flax NNX module is split once (`nnx.split`), trained by the same
    compiled steps in training mode (`model.train()`, its own `nnx.Rngs`
    streams drawing the dropout masks) and evaluated in evaluation mode; when
    `fit` returns, the module holds the trained variables (`nnx.update`), as
    `nnx.Optimizer.update` leaves it (docs/training.md#flax-nnx-modules).

    Args:
      model: the Flax Linen module, or Flax NNX module instance, to train;
        None (or the same model) when `state` is given.
      x: the inputs: an array of examples (with labels `y`), or a source that
        carries its own labels: a random-access source
        (`jaxdl.data.tfds_source(...)`, a grain `MapDataset`, or anything with
        `__len__` and `__getitem__` returning a dict of features), or an
        iterable of batch dicts `{"x": ..., "y": ...}`.
      y: the labels of array `x` (integer classes, one-hot rows or targets, as
        `loss` takes them); None for a source.
      loss: a loss name from `jaxdl.training.losses` (sparse/one-hot softmax
        cross-entropy, binary cross-entropy, MSE, Huber) or a function
        `(outputs, batch) -> per-example loss`. Required.
      optimizer: an optax `GradientTransformation`, or a Keras optimizer
        name ("adam", "sgd", "rmsprop", "adamw", "adagrad"): that optax
        optimizer with Keras's defaults, its learning rate injected
        (`jaxdl.training.optimizers`). None (default) is Adam(1e-3), or the
        state's own optimizer when `state` is given.
      metrics: the metrics reported for training and validation: names
        ("accuracy", "mae", "mse", "rmse", "sparse_top_k_categorical_accuracy",
        "top_k_categorical_accuracy", "precision", "recall", "auc"), `Metric`s
        of `jaxdl.training.metrics` (`sparse_top_k_categorical_accuracy(k=3)`)
        or your own functions `(outputs, batch) -> per-example values` (or a
        pair `(sums, counts)` per example, for a ratio of totals), logged under
        their `__name__`; default accuracy.
      epochs: the epoch number to stop before (training runs epochs
        `initial_epoch` to `epochs - 1`); default 1.
      batch_size: the global batch size; it must split evenly over the
        `mesh`'s devices. Default 32. The last smaller batch is filled up and
        masked out of the loss (a model with BatchNorm statistics takes it as
        it is).
      seed: the run's seed, for initialisation, shuffling and the models'
        random streams; default 0.
      validation_split: the share (between 0 and 1) of array `x`, `y` held out
        at its end for validation, as Keras does; None (default) holds out
        nothing. Not for sources.
      validation_data: a pair `(x_val, y_val)` or a source to evaluate after
        every epoch (its metrics prefixed `val_`); not with
        `validation_split`.
      shuffle: whether each epoch reads the examples in a new order; default
        True.
      drop_remainder: drop each epoch's last smaller batch instead of padding
        it; default False.
      callbacks: `jaxdl.training.callbacks.Callback`s (EarlyStopping, ModelCheckpoint,
        a learning-rate schedule, your own), called as Keras calls them;
        batch hooks once per compiled call of `steps_per_execution` steps
        (see `Callback`).
      state: a `TrainState` to continue training (its model and optimizer
        carry on; `model` must be None or that model, `optimizer` None):
        jaxdl's, or Flax's `train_state.TrainState` (with `batch_stats`
        and a `dropout_rng` or `key` where a subclass has them) from a loop
        of your own, continued at its step; `fit` returns jaxdl's. It
        is copied, never consumed: two calls (`epochs=2`, then `epochs=5,
        initial_epoch=2` from the returned state) train exactly as one call
        of 5 epochs with the same seed. None (default) builds a new state.
      initial_epoch: the number of the first epoch, for callbacks, messages
        and checkpoints, as in Keras; default 0.
      class_weight: `{class: weight}` scaling each example's loss by its
        class; the loss is the sum of weighted losses over the number of
        examples and metrics stay unweighted, as in Keras. None (default)
        weighs every class 1.
      sample_weight: one loss weight per example of array `x` (a source's
        batches may carry a "weight" feature instead); None (default) is 1.
      features: for a source, the `(input, label)` feature names to read
        (default `("image", "label")`; for an iterable, the batch keys,
        default `("x", "y")`). Not with array `x`.
      transform: for a random-access source, what computes `(x, y)` from an
        example instead of `features`: a function `example -> (x, y)`, run on
        every read since it may draw random numbers; a
        `grain.transforms.RandomMap`, whose `random_map(example, rng)` gets a
        generator of (seed, epoch, example number); or a
        `grain.transforms.Map`, declared deterministic (its output may be
        cached). None (default) reads `features`.
      steps_per_epoch: for an iterable of batches, the batches that make an
        epoch; None (default) is one pass of the iterable.
      steps_per_execution: K train steps run per compiled call when batches
        are fed from the host (or when a callback defines a batch hook),
        cutting the per-step dispatch cost; default 1.
      checkpoint_dir: a directory where orbax saves the whole run after every
        epoch (or every `checkpoint_every` steps), and from which the same
        call resumes, inside an epoch if the checkpoint was taken there,
        ending with bitwise the parameters and history of a run never
        interrupted. A checkpoint of another run (model, optimizer, batch
        size, data, loss, callbacks, PRNG implementation) is refused, naming
        the difference; one whose own bytes are bad is moved aside as
        `unreadable-N` with a warning, an access error is raised as it is
        (docs/checkpoints.md, docs/reliability.md). Needs arrays or a
        random-access source. None (default) saves nothing.
      checkpoint_every: "epoch" (default) or a number of steps between
        checkpoints.
      keep: how many of the newest checkpoints to keep; default 3.
      resume_with_new_optimizer: resume a checkpoint whose optimizer had
        other hyperparameters (a learning rate, a momentum, a schedule's
        settings), going on from its saved state (moments, step count) with
        this call's optimizer, whose hyperparameters `optax.inject_hyperparams`
        keeps in the state replacing the saved ones. False (default) refuses
        such a checkpoint, naming what differs. Only with `checkpoint_dir`;
        an optimizer whose state has another structure (Adam against SGD)
        is refused either way.
      mesh: a `jax.sharding.Mesh` to train data-parallel over its `data`
        axis (each batch split over the devices, state and arrays
        replicated, gradients summed by `jax.jit`). None (default) is
        `jaxdl.runtime.sharding.data_mesh()`, all devices. With several processes
        (`jaxdl.runtime.distributed.initialize`), each reads only its part of every
        batch of a source.
      precision: "bfloat16", or "float16" with dynamic loss scaling, to
        compute in half precision while parameters and optimizer state stay
        float32 (see `jaxdl.training.precision`); None (default) keeps the model's
        dtype. Not with `state`.
      train_flag: the keyword that switches the model between training and
        inference ("train", "training", "deterministic" (passed inverted) or
        None). The default "auto" reads it from the model's `__call__`, so
        `def __call__(self, x, train: bool)` as in Flax's examples needs
        nothing (see `jaxdl.models.contract`). Every call of the model, checks
        included, goes through it.
      rng_streams: the random streams the model draws from in training, a
        key each from the run's seed and the step; default
        ("dropout", "augment").
      cache: for a random-access source (and `validation_data`'s), keep its
        examples in memory once read, as tf.data's `.cache()`: "auto"
        (default) when they need at most a quarter of the memory available,
        True, False, or a bound in bytes (an error names the sizes when they
        do not fit); nothing is decoded twice. What is cached is deterministic
        (the mapped examples without a transform or with a
        `grain.transforms.Map`, else the decoded examples, the transform
        running again every epoch). A source cached after mapping, where
        arrays would train in scanned epochs and one process reads the data,
        is read whole before the first step and trains as arrays do.
      device_data_bytes: the bytes per device that in-memory data (x, y and
        the weights, validation arrays, a source cached after mapping) may
        take to go to each device whole; larger data stream batch by batch,
        at most `jaxdl.data.PREFETCH_DEPTH + 2` batches on a device at once. "auto"
        (default): on CPU a quarter of the memory available over this
        process's devices, on a GPU or TPU an eighth of a device's memory
        (`jaxdl.data.device_data_limit`); 0 always streams.
      wrt: for an NNX `model`, the filter of the variables trained, as
        `nnx.Optimizer(wrt=...)` takes it; None (default) is `nnx.Param`.
        Every other variable (batch statistics, random streams, your own
        `nnx.Variable`s) is carried, updated and saved, not trained.
      verbose: 0 silent; 1 a line per epoch, kept, with a bar over its
        steps and then its metrics (where a bar can be redrawn: a terminal,
        a notebook's widgets; elsewhere 2's line); 2 one plain line per
        epoch; "auto" (default) and True are 1 on a terminal, 2 otherwise
        (`jaxdl.training.progress`).

    Returns:
      `(state, history)`: the trained `TrainState` (the last finite one if
      training diverged) and a `History`, a dict of per-epoch lists: `loss`,
      each metric and their `val_` counterparts; like Keras's `History` it
      also has `.history` (the same dict), `.epoch` and `.params`.

    Raises:
      TypeError: `model` is not a Flax module instance (a function, a module
        class, another library's module; see
        `jaxdl.models.contract.model_family`); an unknown keyword argument
        (named with what it is called now, or the nearest name); an
        `optimizer` that is neither optax's nor a name; `callbacks` that are
        not a list of `Callback`s.
      ValueError: for bad input, naming the argument at fault: mismatched
        `x`/`y` lengths, a wrong example shape, empty data, NaN, a
        non-positive `batch_size` or `steps_per_execution`, `epochs` or
        `initial_epoch` out of range, `validation_split` outside (0, 1) or
        with a source or beside `validation_data`, labels that do not fit the
        loss or the model's outputs, `y`, `sample_weight`, `features`,
        `transform`, `class_weight`, `cache` or `steps_per_epoch` given with a
        kind of `x` that does not take them, a batch that does not split over
        the mesh, a bad `verbose`, `cache` or `device_data_bytes`, a `state`
        given with another model, optimizer or a `precision`,
        `checkpoint_dir` with an iterable of batches, `resume_with_new_optimizer`
        without it, or a checkpoint in `checkpoint_dir` of another run
        (another optimizer's hyperparameters included, unless
        `resume_with_new_optimizer`) or unreadable altogether; an unknown
        optimizer name; an optimizer whose update needs the loss
        (`optax.contrib.reduce_on_plateau`); a callback defining an `on_*`
        method `fit` never calls.
      jaxdl.training.run_checkpoint.CheckpointSaveError: when saving a checkpoint
        fails (a full disk); it names the directory and carries the trained
        `state` and `history`.
    """
    compilation_cache.ensure_enabled()  # before any computation, eager ones included (jaxdl.runtime.compilation_cache)
    init_rng, shuffle_rng = seed_rngs(seed)
    if state is not None:  # Flax's own TrainState (a loop of your own) continues as jaxdl's
        state = adopted_state(state, jax.random.split(init_rng)[1])
    family = model_family(model, "fit(model, ...)") if state is None else \
        ("nnx" if isinstance(state.apply_fn, NNXApply) else "linen")
    if family == "nnx" and state is None:
        train_flag = nnx_train_flag(train_flag)
    elif wrt is not None:
        raise ValueError("wrt= chooses the trained variables of a Flax NNX module given as fit's model; a Linen "
                         "module trains its 'params' collection, and a state keeps what it was built with")
    batch_size, metrics, verbosity = arrays.check_batch_size(batch_size), checked_metric_names(metrics), \
        _verbosity(verbose)
    mesh = sharding.resolve_mesh(mesh)
    sharding.check_global_batch(batch_size, mesh)
    steps_per_execution = arrays.positive_int("steps_per_execution", steps_per_execution)
    whole_limit = prefetch.device_data_limit(mesh.devices.flat, device_data_bytes)
    _non_negative_epochs(epochs, initial_epoch)
    callbacks, optimizer = checked_callbacks(callbacks), resolve_optimizer(optimizer)
    every_steps = None
    if checkpoint_dir is not None and checkpoint_every != "epoch":
        every_steps = arrays.positive_int("checkpoint_every (steps, or 'epoch')", checkpoint_every)
    if resume_with_new_optimizer not in (False, True) or (resume_with_new_optimizer and checkpoint_dir is None):
        raise ValueError("resume_with_new_optimizer=True resumes the run in checkpoint_dir with another optimizer: "
                         f"pass it with checkpoint_dir, as True or False (got {resume_with_new_optimizer!r})")
    plan = RunPlan(
        loss=loss, metrics=metrics, batch_size=batch_size, mesh=mesh, whole_limit=whole_limit,
        train_flag=resolve_train_flag(model if state is None else state.apply_fn, train_flag),
        rng_streams=tuple(rng_streams), features=features, transform=transform, cache=cache, epochs=epochs,
        initial_epoch=initial_epoch, seed=seed, shuffle=shuffle, drop_remainder=drop_remainder,
        steps_per_epoch=steps_per_epoch, steps_per_execution=steps_per_execution, every_steps=every_steps,
        verbosity=verbosity)

    # The model's contract (in the plan), then the input adapter, then the state.
    inputs, validation_data = _training_input(
        x, y, plan, input_shape=None if state is None else state.input_shape, validation_split=validation_split,
        validation_data=validation_data, class_weight=class_weight, sample_weight=sample_weight,
        shuffle_rng=shuffle_rng)
    if state is None:
        state = create_train_state(model, optimizer or DEFAULT_OPTIMIZER, inputs.input_shape, init_rng,
                                   input_dtype=inputs.input_dtype, precision=precision, train_flag=plan.train_flag,
                                   wrt=wrt)
    else:
        state = _state_to_continue(model, optimizer, state, precision)
        state = _with_input_shape(state, inputs.input_shape)
    state = sharding.put_replicated(state, mesh)
    check_fit_can_update(state.opt_state)
    parts = sharding.data_parallelism(mesh)
    if state.batch_stats and not drop_remainder and parts > 1:
        _check_last_batch_splits(inputs.num_examples, batch_size, parts)
    pad_to, masked = (parts, False) if state.batch_stats else (batch_size, True)  # see `_split_over`
    inputs.use_padding(pad_to, masked)
    validate, labels = None, {inputs.labels_name: inputs.labels}
    if validation_data is not None:
        validate, labels["labels of validation_data"] = _validator(state, validation_data, plan)
    _check_outputs_fit_the_loss(state, plan, labels, inputs.input_dtype)

    stream = every_steps is not None or defines(callbacks, BATCH_HOOKS) or loops_are_slow(
        state.apply_fn, state.variables, state.input_shape, plan.train_flag, inputs.input_dtype)
    loop = _epoch_loop(inputs, state, plan, stream=stream)
    trained_model = getattr(state.apply_fn, "__self__", None) or model
    run = FitRun(state=state, history={}, model=trained_model, verbose=plan.verbosity, epochs=plan.epochs,
                 steps=inputs.batches_per_epoch)
    checkpoints = None
    if checkpoint_dir is not None:
        checkpoints = _run_checkpoints(checkpoint_dir, keep, run, inputs, callbacks, plan, resume_with_new_optimizer)
    state, history = _run_epochs(run, loop, checkpoints, callbacks, validate, plan)
    if family == "nnx" and is_nnx_module(model):  # trained in place, as nnx.Optimizer.update leaves a module
        update_module(model, state)
    return state, history


def _run_checkpoints(directory, keep, run: FitRun, inputs: InputAdapter, callbacks, plan: RunPlan,
                     new_optimizer: bool = False) -> RunCheckpoints:
    """The run checkpoint of this call, described once (`run_checkpoint.run_config`)."""
    if not inputs.resumable:
        raise ValueError("checkpoint_dir needs in-memory arrays or a random-access source: an iterable of "
                         "batches cannot be rewound to where a checkpoint stood")
    config = run_config(run.model, run.state, plan, inputs, callbacks)
    return RunCheckpoints(CheckpointStore(directory, keep), callbacks, plan, inputs.batches_per_epoch, config,
                          new_optimizer=new_optimizer)


def _say(verbosity: int, message: str) -> None:
    if verbosity:
        print(message, flush=True)


def _run_epochs(run: FitRun, loop: EpochLoop, checkpoints: RunCheckpoints | None, callbacks, validate,
                plan: RunPlan):
    """Epochs, validation, logs, callbacks and saves; on any exit the checkpoint being written is finished."""
    previous = sharding.copied(run.state)  # the fallback when a state's own loss is not finite
    resume, initial_epoch = None, plan.initial_epoch
    try:
        if checkpoints is not None:
            previous, resume = checkpoints.restore(run, previous, zero_totals(plan.metrics))
            run.state, previous = sharding.put_replicated((run.state, previous), plan.mesh)
            if run.resumed_epoch is not None:
                initial_epoch = run.resumed_epoch
                finished = run.stop_training or (initial_epoch >= plan.epochs and resume is None)
                _say(run.verbose, f"the run in {checkpoints.directory} had already finished (epoch {initial_epoch} "
                                  "of its epochs); returning its result" if finished else
                     f"resumed from epoch {initial_epoch + 1}, step {run.resumed_batches} of "
                     f"{checkpoints.directory}")
        for callback in callbacks:
            callback.on_train_begin(run)
        if checkpoints is not None:
            checkpoints.restore_callbacks(run)
        logged_to = _epochs(run, loop, checkpoints, callbacks, validate, resume, previous, plan, initial_epoch)
    except KeyboardInterrupt:
        if checkpoints is not None:
            checkpoints.saver.close_quietly()
            print(f"\ninterrupted: the run's checkpoints in {checkpoints.directory} hold it up to its last save; "
                  "call fit again with the same checkpoint_dir to resume", file=sys.stderr, flush=True)
        raise
    except BaseException as error:
        if checkpoints is not None:
            failed = checkpoints.saver.close_quietly()
            if failed is not None and not isinstance(error, type(failed)):
                error.add_note(f"the checkpoint being saved when this happened failed too: {failed}")
        raise
    if checkpoints is not None:
        checkpoints.close(run)
    for callback in callbacks:
        callback.on_train_end(run)
    logged = len(next(iter(run.history.values()), []))
    return run.state, History(run.history, epoch=range(logged_to - logged, logged_to),
                              params={"verbose": run.verbose, "epochs": run.epochs, "steps": run.steps})


def _epochs(run: FitRun, loop: EpochLoop, checkpoints, callbacks, validate, resume, previous, plan: RunPlan,
            initial_epoch: int) -> int:
    """Each epoch from `initial_epoch` (the plan's, or a resumed run's): run it, validate, log, call back, save;
    stop on a callback's word or a refused step. Returns the epoch after the last one logged."""
    epochs, steps_per_epoch = plan.epochs, plan.steps_per_epoch
    display, logged_to = Progress(plan.verbosity, epochs), initial_epoch
    for epoch in range(initial_epoch, epochs):
        if run.stop_training:
            break
        resumed_here = resume if resume is not None and epoch == initial_epoch else None
        before = 0 if resumed_here is None else resumed_here.batches_done  # batches done before a resume
        _call_back(run, callbacks, plan, "on_epoch_begin", epoch)
        line = display.epoch(epoch, run.steps, before)
        before_call, after_call = _dispatch_hooks(run, callbacks, line,
                                                  checkpoints and checkpoints.within_epoch(run, epoch))
        run.state, previous, sums, steps, accepted = loop.run(run.state, previous, epoch, resumed_here, after_call,
                                                              before_call)
        if steps == 0 and resumed_here is None:
            line.close()
            warnings.warn(f"fit stopped: the source gave no batches for epoch {epoch + 1} (a generator or "
                          "iterator runs out after one pass: pass steps_per_epoch, or an iterable that can be "
                          "iterated again)", RuntimeWarning, stacklevel=5)  # fit's caller
            break
        if accepted < steps:
            line.close()
            warnings.warn("fit stopped: the loss, a gradient or an updated parameter became NaN or infinite at "
                          f"epoch {epoch + 1}, step {before + accepted + 1} of {before + steps}; the returned "
                          "state is the last one "
                          "whose loss, gradients and parameters were all finite (lower the learning rate or check "
                          "the data)", RuntimeWarning, stacklevel=5)
            break
        logs = metrics_from_sums(sums)
        if validate is not None:
            _call_back(run, callbacks, plan, "on_test_begin")
            validation = metrics_from_sums(validate(run.state))
            _call_back(run, callbacks, plan, "on_test_end", validation)
            logs.update({f"val_{name}": value for name, value in validation.items()})
        rate = learning_rate_of(run.state.opt_state)
        if rate is not None:
            logs["learning_rate"] = rate
        for key, value in logs.items():
            run.history.setdefault(key, []).append(value)
        run.epoch, logged_to = epoch, epoch + 1
        line.end(before + steps, logs)
        _call_back(run, callbacks, plan, "on_epoch_end", epoch, logs)
        if checkpoints is not None:
            checkpoints.save(run, previous, zero_totals(plan.metrics), epoch + 1, 0, int(run.state.step))
        if steps_per_epoch is not None and steps < steps_per_epoch and not run.stop_training:
            warnings.warn(f"fit stopped: the iterable ran out of batches in epoch {epoch + 1} ({steps} of "
                          f"steps_per_epoch={steps_per_epoch}); make it yield steps_per_epoch * epochs batches",
                          RuntimeWarning, stacklevel=5)
            break
        if run.stop_training:
            break
    return logged_to


def _call_back(run: FitRun, callbacks, plan: RunPlan, hook: str, *args) -> None:
    """Calls `hook(run, *args)` of each callback; a state a callback put in its place is placed as the steps
    expect it."""
    held = run.state
    for callback in callbacks:
        getattr(callback, hook)(run, *args)
    if run.state is not held:  # a callback replaced it (a learning rate)
        run.state = sharding.put_replicated(run.state, plan.mesh)


def _dispatch_hooks(run: FitRun, callbacks, line: EpochLine, save_within_epoch) -> tuple:
    """`(before_dispatch, after_dispatch)` for a streamed epoch (`epoch_loop.StreamedEpochs.run`): the batch
    hooks, the progress bar and the checkpoints within the epoch. The running means are fetched for
    `on_train_batch_end` only where a callback defines it; `after_dispatch` ends the epoch on
    `run.stop_training` where a callback has a batch hook (as Keras does after a batch)."""
    begins = [c for c in callbacks if defines([c], ("on_train_batch_begin",))]
    ends = [c for c in callbacks if defines([c], ("on_train_batch_end",))]

    def calling(hooks, name: str, *args) -> None:
        held = run.state
        for callback in hooks:
            getattr(callback, name)(run, *args)
            if run.state is not held:
                raise ValueError(f"{type(callback).__qualname__}.{name} replaced run.state: a batch hook may read "
                                 "the state, not replace it, since the epoch's steps go on from their own; "
                                 "replace it in on_epoch_begin or on_epoch_end")

    def before(done: int, count: int) -> None:
        if begins:
            calling(begins, "on_train_batch_begin", done)

    def after(state, previous, totals, done: int, start_step: int) -> bool:
        if save_within_epoch is not None:
            save_within_epoch(state, previous, totals, done, start_step)
        line.advance_to(done)
        if begins or ends:
            run.state = state  # what the batch hooks read
        if ends:
            calling(ends, "on_train_batch_end", done - 1,
                    metrics_from_sums({k: v for k, v in totals.items() if k != "accepted_steps"}))
        return bool(begins or ends) and run.stop_training  # else the epoch runs whole, as a scanned one does

    return before, after


def _validator(state: TrainState, validation_data, plan: RunPlan):
    """`(validate(state) -> sums, labels to check)` for validation arrays `(x_val, y_val)` or a source."""
    if sources.is_source(validation_data):
        batches = _read_source(validation_data, "fit's validation_data", batch_size=plan.batch_size,
                               features=plan.features, transform=plan.transform, input_shape=state.input_shape,
                               needs_labels=True, cache=plan.cache, **_split_over(plan.batch_size))
        if isinstance(batches, sources.IterableBatches) and batches.one_shot:
            raise ValueError(f"validation_data is a one-shot {type(validation_data).__name__}: it would run out "
                             "after the first epoch's validation; pass a random-access source or an iterable "
                             "that can be iterated again")
        inputs = SourceInput(batches)
        eval_step = compiled_eval_step(plan.loss, plan.metrics, plan.mesh, plan.train_flag)
        put = _batch_placer(plan.mesh, inputs.per_process)
        return (lambda trained: _evaluate_batches(trained, batches.epoch(0), eval_step, put)), inputs.labels
    if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
        raise ValueError("validation_data must be a pair (x_val, y_val) or a source")
    x_val, y_val = arrays.check_dataset(*validation_data, name="validation_data", input_shape=state.input_shape)
    return _array_evaluator(state, x_val, y_val, plan), y_val


def _array_evaluator(state: TrainState, x: np.ndarray, y: np.ndarray, plan: RunPlan):
    """`evaluate(state) -> sums` over arrays: one compiled scan over them placed whole (within the plan's
    `whole_limit` bytes per device), or batch by batch where they are larger or loops are slow."""
    mesh, batch_size = plan.mesh, plan.batch_size
    if x.nbytes + y.nbytes > plan.whole_limit or loops_are_slow(state.apply_fn, state.variables, state.input_shape,
                                                                plan.train_flag, x.dtype):
        eval_step = compiled_eval_step(plan.loss, plan.metrics, mesh, plan.train_flag)
        put, columns = _batch_placer(mesh), {"x": x, "y": y}
        return lambda trained: _evaluate_batches(
            trained, arrays.ordered_batches(columns, np.arange(len(x)), batch_size, multiple=batch_size, masked=True),
            eval_step, put)
    evaluate_all = compiled_evaluate(plan.loss, plan.metrics, batch_size, mesh, plan.train_flag)
    x_device, y_device = sharding.put_replicated((x, y), mesh)
    return lambda trained: evaluate_all(trained, x_device, y_device)
