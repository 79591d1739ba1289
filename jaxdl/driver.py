"""`fit`, `evaluate` and `predict`: the driver that picks an input path, runs epochs and calls callbacks.

Two input paths share one `TrainState`, one guarded step, one history and
the same callbacks:

- **in-memory arrays** go to the device once and each epoch is one compiled
  `lax.scan` over its batches (`train.compiled_epoch`), which removes the
  per-step dispatch that dominates small models; convolutional models on
  CPU, where a compiled loop is slow (`train.loops_are_slow`), take host
  batches of the arrays through the streamed steps instead;
- **sources** (tfds data sources, grain datasets, iterables of batch dicts;
  see `jaxdl.data.sources`) stream: grain reads and batches on the host,
  `data.to_device` keeps two batches in flight, and each compiled call runs
  `steps_per_dispatch` steps (`train.compiled_steps`).

The module is named `driver`, not `fit` as the design sketch has it, so that
`jaxdl.fit` stays the function.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import sys
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxdl import checkpoint, data, sharding
from jaxdl.callbacks import Callback, FitRun, injected_learning_rates
from jaxdl.models import FineTuneModel, MobileNetV2
from jaxdl.models.heads import fast_inference
from jaxdl.precision import with_precision
from jaxdl.train import (TrainState, _checked_metric_names, _predict_all, canonical, compiled_epoch,
                         compiled_eval_step, compiled_evaluate, compiled_steps, create_train_state, loops_are_slow,
                         seed_rngs, summarize, zero_totals)

# Keras's default. One object, not one per call: the optimizer is part of the compiled steps' cache
# key, so a new `optax.adam` per `fit` would compile every step again. Optax transformations are
# immutable pairs of functions, so sharing one is safe.
DEFAULT_OPTIMIZER = optax.adam(1e-3)


def _read_source(x, what: str, *, batch_size: int, features, transform, input_shape, needs_labels: bool,
                 y=None, shuffle: bool = False, **options):
    """`data.as_batches` for `evaluate`/`predict`/`fit`, refusing a `y` beside a source."""
    if y is not None:
        raise ValueError(f"{what} was given a {type(x).__name__} as x and labels as y: a source carries its labels; "
                         "name them with features=(input, label) or a transform, and leave y out")
    return data.as_batches(x, batch_size=batch_size, features=features, transform=transform,
                           input_shape=input_shape, shuffle=shuffle, needs_labels=needs_labels, **options)


def _check_array_arguments(x, features, transform) -> None:
    if features is not None or transform is not None:
        raise ValueError("features and transform name how to read a source's examples; x is an in-memory "
                         f"array ({type(x).__name__}), whose examples are the inputs already")


def _evaluate_batches(state: TrainState, batches, eval_step, put: Callable) -> dict:
    """Sums of `eval_step` over host batches, each placed by `put`."""
    totals = None
    for batch in data.to_device(batches, put=put):
        sums = eval_step(state, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError("the source yielded no batches to evaluate on")
    return totals


def evaluate(state: TrainState, x, y=None, *, loss, metrics: Sequence[str] = ("accuracy",),
             batch_size: int = 256, features: Sequence[str] | None = None,
             transform: Callable | None = None, mesh=None) -> dict[str, float]:
    """Loss and metrics over a whole dataset, in inference mode; labels are checked as `fit` checks them.

    `x` is an array (with labels `y`) or a source, read in order (see `fit`,
    also for `mesh`).
    """
    batch_size = data.check_batch_size(batch_size)
    metrics = _checked_metric_names(metrics)
    mesh = sharding.resolve_mesh(mesh)
    sharding.check_global_batch(batch_size, mesh)
    state = sharding.put_replicated(state, mesh)
    if data.is_source(x):
        batches = _read_source(x, "evaluate", y=y, batch_size=batch_size, features=features, transform=transform,
                               input_shape=state.input_shape, needs_labels=True, **_split_over(batch_size))
        _check_labels_fit_the_loss(state, loss, {"the labels of the source": _first_labels(batches)})
        return summarize(_evaluate_batches(state, batches.epoch(0), compiled_eval_step(loss, metrics, mesh),
                                           _batch_placer(mesh, batches)))
    _check_array_arguments(x, features, transform)
    x, y = data.check_dataset(x, y, input_shape=state.input_shape, purpose="evaluating")
    _check_labels_fit_the_loss(state, loss, {"y": y})
    return summarize(_array_evaluator(state, x, y, loss, metrics, batch_size, mesh)(state))


def _split_over(pad_to: int, masked: bool = True) -> dict:
    """How a source is read for data-parallel steps: this process's part of each batch, a smaller last batch
    filled up to a multiple of `pad_to` (and masked). Evaluation and models without BatchNorm statistics pad
    to the whole batch and mask every batch, so that one compiled step serves them all; BatchNorm models,
    which cannot be masked, to the device count only.
    """
    return {"multiple": pad_to, "process": (jax.process_index(), jax.process_count()), "masked": masked}


def _batch_placer(mesh, batches=None, stacked: bool = False) -> Callable:
    """`put(host batch)` onto the mesh: a source's batches are this process's part already, arrays' are whole."""
    if isinstance(batches, (data.SourceBatches, data.IterableBatches)):
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
            transform: Callable | None = None, mesh=None, precision: str | None = None) -> np.ndarray:
    """Model outputs (logits) for `x`, in batches, in inference mode.

    Takes a TrainState, or a Linen module together with its `variables`.
    `x` is an array or a source read in order (only its input feature,
    `features[0]`, is read). MobileNetV2 models run their fast inference form
    (BatchNorm folded, images in chunks, as `jaxdl.classifier` does).
    `precision` ("bfloat16", ...) computes in another dtype than the
    model's own (see `jaxdl.precision`); outputs come back as float32.
    Batches are split over the `mesh` (see `fit`); every process gets all outputs.
    """
    batch_size = data.check_batch_size(batch_size)
    mesh = sharding.resolve_mesh(mesh)
    if isinstance(model_or_state, TrainState):
        input_shape = model_or_state.input_shape
        model = getattr(model_or_state.apply_fn, "__self__", None)
        apply_fn, variables = model_or_state.apply_fn, model_or_state.variables
    else:
        if variables is None:
            raise ValueError("predict(model, x) needs variables=...; or pass a TrainState")
        input_shape, model = None, canonical(model_or_state)
        apply_fn = model.apply
    if precision is not None:
        if model is None:
            raise ValueError("predict(..., precision=...) needs the state's model: build the state with "
                             "create_train_state, or pass the module and its variables")
        model = canonical(with_precision(model, precision))
        apply_fn = model.apply
    chunked = isinstance(model, (MobileNetV2, FineTuneModel))
    if chunked:
        model, variables = fast_inference(model, variables)
        model = canonical(model)
        apply_fn = model.apply
    variables = sharding.put_replicated(variables, mesh)
    parts = sharding.data_parallelism(mesh)

    def outputs_of(images, size=None):  # size: the batch compiled for, the images' own rounded up by default
        size = size or -(-len(images) // parts) * parts
        return np.asarray(_predict_all(apply_fn, variables, images, size, chunked, mesh), np.float32)

    put = functools.partial(sharding.put_replicated, mesh=mesh)
    if data.is_source(x):
        batches = _read_source(x, "predict", batch_size=batch_size, features=features, transform=transform,
                               input_shape=input_shape, needs_labels=False)
        outputs = [outputs_of(batch["x"]) for batch in data.to_device(batches.epoch(0), put=put)]
        if not outputs:
            raise ValueError("the source yielded no batches to predict")
        return np.concatenate(outputs)
    _check_array_arguments(x, features, transform)
    x = data.check_dataset(x, input_shape=input_shape, purpose="predicting")
    size = prediction_batch_size(len(x), batch_size, parts)
    if not chunked and len(x) > size and loops_are_slow(apply_fn, variables, x.shape[1:]):
        return np.concatenate([outputs_of(batch["x"]) for batch in
                               data.to_device(data.ordered_batches({"x": x}, np.arange(len(x)), size), put=put)])
    return outputs_of(put(x), size)


# --- fit ---------------------------------------------------------------------------------------


def learning_rate_of(opt_state) -> float | None:
    """The learning rate an `optax.inject_hyperparams` optimizer holds in its state, or None without one.

    Searches the optimizer state (chains and masks nest it), as Keras logs
    `learning_rate`; callbacks such as ReduceLROnPlateau change it there.
    """
    found = injected_learning_rates(opt_state)
    return float(found[0].hyperparams["learning_rate"]) if found else None


def _check_labels_fit_the_loss(state: TrainState, loss, labels: dict[str, np.ndarray]) -> None:
    """Labels shaped and valued as the loss reads them: checked on the host, named, before compiling.

    `labels` maps each argument's name to its labels; the model is traced once for all of them.
    """
    if not isinstance(loss, str) or loss not in ("sparse_categorical_crossentropy", "categorical_crossentropy"):
        return
    outputs = jax.eval_shape(state.apply_fn, state.variables, jnp.zeros((1, *state.input_shape)))
    for name, y in labels.items():
        _check_class_labels(y, loss, outputs.shape[-1], name)


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
    """Keras's verbose: 0, 1 or 2; "auto" and True mean 1 on a terminal, 2 when output goes to a file or pipe."""
    if verbose in ("auto", True):
        return 1 if sys.stderr.isatty() else 2
    if verbose is False or verbose in (0, 1, 2):
        return int(verbose)
    raise ValueError(f"verbose must be 0, 1, 2 or 'auto', got {verbose!r}")


def example_weights(y: np.ndarray, class_weight: dict | None, sample_weight) -> np.ndarray:
    """Per-example loss weights from Keras's `class_weight` ({class: weight}) and `sample_weight` (N,)."""
    weights = np.ones(len(y), np.float32)
    if class_weight is not None and sample_weight is not None:
        raise ValueError("pass class_weight or sample_weight, not both (as Keras); fold the class weights into "
                         "sample_weight to combine them")
    if sample_weight is not None:
        sample_weight = np.asarray(sample_weight, np.float32)
        if sample_weight.shape != (len(y),) or not np.isfinite(sample_weight).all():
            raise ValueError(f"sample_weight must hold one finite weight per example, shape ({len(y)},); "
                             f"got shape {sample_weight.shape}")
        weights *= sample_weight
    if class_weight is not None:
        classes = y if y.ndim == 1 else y.argmax(axis=-1)
        missing = sorted(set(np.unique(classes).tolist()) - set(class_weight))
        if missing:
            raise ValueError(f"class_weight has no weight for classes {missing} found in y")
        weights *= np.asarray([class_weight[c] for c in classes.tolist()], np.float32)
    return weights


def _state_to_continue(model, optimizer, state: TrainState) -> TrainState:
    """A private copy of the caller's state, after checking that `model` and `optimizer` do not contradict it.

    The copy is what `fit` donates to its compiled epochs, so the caller's
    state stays usable after `fit` returns.
    """
    if optimizer is not None:
        raise ValueError("fit(state=...) continues with the optimizer the state was built with (state.tx); "
                         "pass optimizer=None, or build a new state with create_train_state to change it")
    trained = getattr(state.apply_fn, "__self__", None)
    if model is not None and trained is not None and model != trained:
        raise ValueError(f"fit(state=...) trains the model the state was built for ({type(trained).__name__}); "
                         f"the model argument ({type(model).__name__}) differs: pass model=None or the same model")
    return jax.tree.map(jnp.copy, state)


def _first_labels(batches) -> np.ndarray:
    """The labels of a source's first example (as a batch of one) or first batch, to check against the loss."""
    if isinstance(batches, data.SourceBatches):
        return np.asarray(batches.first_example["y"])[None]
    return np.asarray(batches.first_batch()["y"])


def _input_shape_of(batches) -> tuple:
    """The per-example input shape a source's first example (or first batch) shows."""
    if isinstance(batches, data.SourceBatches):
        return tuple(np.shape(batches.first_example["x"]))
    return tuple(np.shape(batches.first_batch()["x"])[1:])


@dataclasses.dataclass
class _ArrayEpochs:
    """The in-memory path: the arrays live on the device, an epoch is one compiled scan."""

    x: jax.Array
    y: jax.Array
    weights: jax.Array
    shuffle_rng: jax.Array
    run_epoch: Callable
    steps_per_epoch: int

    def run(self, state, previous, epoch: int, resume=None, after_dispatch=None):
        """`(state, previous, sums, steps run, steps accepted)` of one epoch (whole: no `resume` within it)."""
        del epoch, resume, after_dispatch  # orders follow the step count, so training on from a state sees new ones
        order_key = jax.random.fold_in(self.shuffle_rng, int(state.step))
        state, previous, sums, accepted = self.run_epoch(state, previous, self.x, self.y, self.weights, order_key)
        return state, previous, sums, self.steps_per_epoch, int(accepted)


@dataclasses.dataclass
class _Resume:
    """Where a checkpoint taken inside an epoch stood: batches done, the epoch's first step, its running sums."""

    batches_done: int
    start_step: int
    totals: dict
    totals_accepted: int = 0


@dataclasses.dataclass
class _StreamedEpochs:
    """Host batches prefetched to the device, `steps_per_dispatch` steps per compiled call.

    The path of sources, and of in-memory arrays where a compiled loop is
    slow (`train.loops_are_slow`) or checkpointed within epochs.
    `batches_of(epoch, start_step, skip)` gives an epoch's host batches after
    its first `skip`: a source's order follows the epoch, an array's the step
    the epoch started at (as on the scan path).
    """

    batches_of: Callable
    run_steps: Callable
    metrics: tuple
    steps_per_dispatch: int
    put: Callable
    put_state: Callable
    batch_norm: bool = False

    def run(self, state, previous, epoch: int, resume: _Resume | None = None, after_dispatch=None):
        """`(state, previous, sums, steps run, steps accepted)` of one epoch.

        `resume` goes on from a checkpoint taken inside this epoch;
        `after_dispatch(state, previous, totals, batches done, start step)` is
        called after every compiled call (the checkpoints within an epoch).
        """
        start_step = int(state.step) if resume is None else resume.start_step
        done = 0 if resume is None else resume.batches_done
        totals = zero_totals(self.metrics) if resume is None else resume.totals
        # Placed as the state is: an argument placed otherwise than the call before's output would recompile.
        healthy, totals = self.put_state((jnp.bool_(True), totals))
        steps = 0
        host_batches = self.batches_of(epoch, start_step, done)
        for group in data.to_device(data.stacked(host_batches, self.steps_per_dispatch), put=self.put):
            if self.batch_norm and "mask" in group:
                raise ValueError(f"a batch of {group['mask'].shape[-1]} examples (padded to split over the "
                                 "devices) reached a model with BatchNorm statistics, which padding rows would "
                                 "enter; make every batch a multiple of the mesh's device count")
            state, previous, healthy, totals = self.run_steps(state, previous, healthy, totals, group)
            steps += group["x"].shape[0]
            if after_dispatch is not None:
                after_dispatch(state, previous, totals, done + steps, start_step)
        accepted = int(totals.pop("accepted_steps")) - (0 if resume is None else int(resume.totals_accepted))
        return state, previous, totals, steps, accepted


def _check_last_batch_splits(num_examples: int | None, batch_size: int, parts: int) -> None:
    """A BatchNorm model's last batch must split over the devices as it is: its statistics cannot mask padding.

    `num_examples` None (an iterable): each batch is checked as it comes (`_StreamedEpochs`).
    """
    last = 0 if num_examples is None else num_examples % batch_size
    if last % parts:
        raise ValueError(f"the last batch of each epoch holds {last} examples ({num_examples} examples, batch_size="
                         f"{batch_size}), which the mesh's {parts} devices cannot split, and this model's BatchNorm "
                         "statistics cannot leave out padding rows; pass drop_remainder=True, or a batch_size that "
                         f"leaves a multiple of {parts}")


def _array_order(shuffle_rng, step: int, num_examples: int) -> np.ndarray:
    """The order the scan path draws on the device for this step, drawn here for host batches."""
    return np.asarray(jax.random.permutation(jax.random.fold_in(shuffle_rng, step), num_examples))


def fit(model, x, y=None, *, loss, optimizer: optax.GradientTransformation | None = None,
        metrics: Sequence[str] = ("accuracy",), epochs: int = 1, batch_size: int = 32, seed: int = 0,
        validation_split: float | None = None, validation_data=None, shuffle: bool = True,
        drop_remainder: bool = False, callbacks: Sequence[Callback] = (), state: TrainState | None = None,
        initial_epoch: int = 0, class_weight: dict | None = None, sample_weight=None,
        features: Sequence[str] | None = None, transform: Callable | None = None,
        steps_per_epoch: int | None = None, steps_per_dispatch: int = 1,
        checkpoint_dir=None, checkpoint_every: int | str = "epoch", keep: int = 3,
        mesh=None, precision: str | None = None,
        verbose: int | bool | str = "auto") -> tuple[TrainState, dict[str, list]]:
    """Trains `model` on in-memory arrays or on a source, as Keras's `Model.fit` does.

    Returns the final state and a history: per-epoch lists of `loss`, each
    metric and their `val_` counterparts. The optimizer defaults to Adam(1e-3).
    An update that makes the loss, a gradient or a parameter non-finite stops
    training with a warning, and the returned state is the last finite one.

    `x` is an array of inputs (with labels `y`), or a source, which carries
    its own labels:
    - a random-access source (`jaxdl.data.tfds_source(...)`, a grain
      `MapDataset`, or anything with `__len__` and `__getitem__` returning a
      dict of features): `features=(input, label)` names what to read
      (default `("image", "label")`), or `transform(example) -> (x, y)`
      computes it. Shuffling is per epoch from `(seed, epoch)`; batches are
      read by grain's threads and put on the device ahead of their step;
    - an iterable of batch dicts `{"x": ..., "y": ...}`: an epoch is
      `steps_per_epoch` batches, or one pass when that is None.
    `steps_per_dispatch=K` runs K steps of a source per compiled call.
    The same model, seed and data in the same order train to the same
    parameters on both paths (up to float rounding: the array path pads
    its last batch and masks the padding out).

    Pass `state` to continue training it: it carries its model and optimizer,
    so `model` must be None or that same model and `optimizer` None. The
    caller's state is copied, never consumed. Each epoch's shuffle order
    follows from `seed` and the state's step count (the epoch number for
    sources), so two calls (`epochs=2`, then `epochs=5, initial_epoch=2`
    from the returned state) train exactly as one call of 5 epochs with the
    same seed. As in Keras, `initial_epoch` numbers the first epoch (for
    callbacks and messages) and training runs epochs `initial_epoch` to
    `epochs - 1`.

    `class_weight` ({class: weight}) and `sample_weight` (one per example,
    arrays only) scale each example's loss as Keras does: the loss is the
    sum of weighted losses over the number of examples; metrics stay
    unweighted. `verbose`: 0 silent, 1 a progress bar, 2 one line per epoch;
    "auto" (and True) is 1 on a terminal and 2 otherwise, so logs do not
    fill with progress-bar updates.

    `checkpoint_dir` saves the whole run there with orbax (see
    `checkpoint.TrainingCheckpoints`) after every epoch, or every
    `checkpoint_every` steps, keeping the last `keep`; calling the same `fit`
    again with the same directory resumes from the newest readable checkpoint,
    inside an epoch if it was taken there, and ends with bitwise the
    parameters and history of a run never interrupted. A checkpoint of
    another run (model, optimizer, batch size, data order, loss) is refused
    with the difference named. Needs arrays or a random-access source.

    `mesh` (default: `jaxdl.sharding.data_mesh()`, all devices) trains
    data-parallel: each batch is split over the mesh's `data` axis, state
    and arrays are replicated, and `jax.jit` sums the gradients over devices;
    `batch_size` is the global batch and must split evenly. A smaller last
    batch is filled up and masked, as the in-memory scan does; a BatchNorm
    model, whose statistics cannot leave padding out, takes it as it is,
    which the devices must be able to split (else an error names the sizes:
    pass drop_remainder=True). With several
    processes (`jaxdl.distributed.initialize`), each reads only its part of
    every batch of a source. `precision` ("bfloat16", or "float16" with
    dynamic loss scaling) computes in half precision while parameters and
    optimizer state stay float32 (see `jaxdl.precision`).
    """
    batch_size = data.check_batch_size(batch_size)
    mesh = sharding.resolve_mesh(mesh)
    sharding.check_global_batch(batch_size, mesh)
    parts = sharding.data_parallelism(mesh)
    steps_per_dispatch = data.positive_int("steps_per_dispatch", steps_per_dispatch)
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if (isinstance(initial_epoch, bool) or not isinstance(initial_epoch, (int, np.integer))
            or not 0 <= initial_epoch <= epochs):
        raise ValueError(f"initial_epoch must be an integer from 0 to epochs={epochs}, got {initial_epoch!r}")
    if validation_split is not None and validation_data is not None:
        raise ValueError("pass validation_split or validation_data, not both")
    metrics = _checked_metric_names(metrics)
    verbosity = _verbosity(verbose)
    init_rng, shuffle_rng = seed_rngs(seed)
    every_steps = None
    if checkpoint_dir is not None and checkpoint_every != "epoch":
        every_steps = data.positive_int("checkpoint_every (steps, or 'epoch')", checkpoint_every)
    input_shape = state.input_shape if state is not None else None

    if data.is_source(x):
        if validation_split is not None:
            raise ValueError("validation_split holds out the end of in-memory arrays; with a source, pass "
                             "validation_data=(another source), e.g. tfds_source(name, 'test')")
        if sample_weight is not None:
            raise ValueError("sample_weight is for in-memory arrays; a source's batches may carry a 'weight' "
                             "entry, or pass class_weight")
        batches = _read_source(x, "fit", y=y, batch_size=batch_size, features=features, transform=transform,
                               input_shape=input_shape, needs_labels=True, seed=seed, shuffle=shuffle,
                               drop_remainder=drop_remainder, steps_per_epoch=steps_per_epoch,
                               class_weight=class_weight, **_split_over(parts, masked=False))
        input_shape = input_shape or _input_shape_of(batches)
        train_labels = _first_labels(batches)
        train_size = len(batches.source) if isinstance(batches, data.SourceBatches) else None
    else:
        _check_array_arguments(x, features, transform)
        if steps_per_epoch is not None:
            raise ValueError("steps_per_epoch is for iterable sources; in-memory arrays make "
                             "ceil(len(x) / batch_size) steps per epoch")
        if y is None:
            raise ValueError("fit(model, x, y) needs labels y for in-memory arrays (a source carries its own)")
        x, y = data.check_dataset(x, y, input_shape=input_shape)
        weights = example_weights(y, class_weight, sample_weight)
        if validation_split is not None:
            (x, y), validation_data = data.split_validation(x, y, validation_split)
            weights = weights[:len(x)]
        if drop_remainder and len(x) < batch_size:
            raise ValueError(f"drop_remainder with batch_size={batch_size} drops all {len(x)} examples")
        input_shape, train_labels, train_size = x.shape[1:], y, len(x)

    if state is None:
        state = create_train_state(model, optimizer or DEFAULT_OPTIMIZER, input_shape, init_rng, precision=precision)
    else:
        if precision is not None:
            raise ValueError("fit(state=..., precision=...): a state computes in its model's dtype; build a new "
                             "state with create_train_state(..., precision=...) to change it")
        state = _state_to_continue(model, optimizer, state)
    state = sharding.put_replicated(state, mesh)
    if state.batch_stats and not drop_remainder and parts > 1:
        _check_last_batch_splits(train_size, batch_size, parts)
    pad_to, masked = (parts, False) if state.batch_stats else (batch_size, True)  # see `_split_over`
    if data.is_source(x) and isinstance(batches, data.SourceBatches):
        batches = dataclasses.replace(batches, multiple=pad_to, masked=masked)
    validate = None
    labels = {"y" if not data.is_source(x) else "the labels of the source": train_labels}
    if validation_data is not None:
        validate, labels["labels of validation_data"] = _validator(
            state, validation_data, loss, metrics, batch_size, features, transform, mesh)
    _check_labels_fit_the_loss(state, loss, labels)

    run_steps = compiled_steps(loss, metrics, mesh)
    put_state = functools.partial(sharding.put_replicated, mesh=mesh)
    if data.is_source(x):
        epochs_of = _StreamedEpochs(lambda epoch, step, skip: batches.epoch(epoch, skip or None), run_steps,
                                    metrics, steps_per_dispatch, _batch_placer(mesh, batches, stacked=True),
                                    put_state, bool(state.batch_stats))
    elif loops_are_slow(state.apply_fn, state.variables, state.input_shape) or every_steps is not None:
        def array_batches(epoch, step, skip):
            del epoch
            order = _array_order(shuffle_rng, step, len(x)) if shuffle else np.arange(len(x))
            return itertools.islice(data.ordered_batches({"x": x, "y": y, "weight": weights}, order, batch_size,
                                                         drop_remainder, pad_to, masked), skip, None)

        epochs_of = _StreamedEpochs(array_batches, run_steps, metrics, steps_per_dispatch,
                                    _batch_placer(mesh, stacked=True), put_state)
    else:
        epochs_of = _ArrayEpochs(*sharding.put_replicated((x, y, weights), mesh), shuffle_rng,
                                 compiled_epoch(loss, metrics, batch_size, shuffle, drop_remainder, mesh),
                                 data.num_batches(len(x), batch_size, drop_remainder))

    trained_model = getattr(state.apply_fn, "__self__", None) or model
    run = FitRun(state=state, history={}, model=trained_model)
    previous = jax.tree.map(jnp.copy, state)  # the fallback when a state's own loss is not finite
    checkpoints = resume = None
    if checkpoint_dir is not None:
        if data.is_source(x) and isinstance(batches, data.IterableBatches):
            raise ValueError("checkpoint_dir needs in-memory arrays or a random-access source: an iterable of "
                             "batches cannot be rewound to where a checkpoint stood")
        checkpoints = _Checkpoints(
            checkpoint.TrainingCheckpoints(checkpoint_dir, keep), callbacks, metrics, every_steps, steps_per_dispatch,
            len(batches) if data.is_source(x) else data.num_batches(len(x), batch_size, drop_remainder),
            _run_config(trained_model, run.state, loss, metrics, batch_size, seed, shuffle, drop_remainder,
                        every_steps, data.is_source(x)))
        previous, resume = checkpoints.restore(run, previous)
        run.state, previous = sharding.put_replicated((run.state, previous), mesh)
        initial_epoch = initial_epoch if run.resumed_epoch is None else run.resumed_epoch
    for callback in callbacks:
        callback.on_train_begin(run)
    if checkpoints is not None:
        checkpoints.restore_callbacks(run)

    progress = tqdm(range(initial_epoch, epochs), desc="fit", unit="epoch", disable=verbosity != 1, leave=True)
    for epoch in progress:
        if run.stop_training:
            break
        resumed_here = resume if resume is not None and epoch == initial_epoch else None
        run.state, previous, sums, steps, accepted = epochs_of.run(
            run.state, previous, epoch, resumed_here, checkpoints and checkpoints.within_epoch(run, epoch))
        if steps == 0 and resumed_here is None:
            warnings.warn(f"fit stopped: the source gave no batches for epoch {epoch + 1} (a generator or "
                          "iterator runs out after one pass: pass steps_per_epoch, or an iterable that can be "
                          "iterated again)", RuntimeWarning, stacklevel=2)
            break
        if accepted < steps:
            warnings.warn("fit stopped: the loss, a gradient or an updated parameter became NaN or infinite at "
                          f"epoch {epoch + 1}, step {accepted + 1} of {steps}; the returned state is the last one "
                          "whose loss, gradients and parameters were all finite (lower the learning rate or check "
                          "the data)", RuntimeWarning, stacklevel=2)
            break
        logs = summarize(sums)
        if validate is not None:
            logs.update(summarize(validate(run.state), prefix="val_"))
        rate = learning_rate_of(run.state.opt_state)
        if rate is not None:
            logs["learning_rate"] = rate
        for key, value in logs.items():
            run.history.setdefault(key, []).append(value)
        run.epoch = epoch
        progress.set_postfix({k: f"{v:.4f}" for k, v in logs.items()}, refresh=False)
        if verbosity == 2:
            print(f"Epoch {epoch + 1}/{epochs} - " + " - ".join(f"{k}: {v:.4f}" for k, v in logs.items()), flush=True)
        for callback in callbacks:
            callback.on_epoch_end(run, epoch, logs)
        run.state = sharding.put_replicated(run.state, mesh)  # what a callback replaced (a learning rate), placed
        if checkpoints is not None:
            checkpoints.save(run, previous, zero_totals(metrics), epoch + 1, 0, int(run.state.step))
        if steps_per_epoch is not None and steps < steps_per_epoch:
            warnings.warn(f"fit stopped: the iterable ran out of batches in epoch {epoch + 1} ({steps} of "
                          f"steps_per_epoch={steps_per_epoch}); make it yield steps_per_epoch * epochs batches",
                          RuntimeWarning, stacklevel=2)
            break
        if run.stop_training:
            break
    progress.close()
    if checkpoints is not None:
        checkpoints.saver.close()
    for callback in callbacks:
        callback.on_train_end(run)
    return run.state, run.history


# --- checkpoints of a run ----------------------------------------------------------------------


@dataclasses.dataclass
class _Checkpoints:
    """What `fit` saves of a run and takes back: its state, position, history and callbacks' counters."""

    saver: checkpoint.TrainingCheckpoints
    callbacks: Sequence[Callback]
    metrics: tuple
    every_steps: int | None
    steps_per_dispatch: int
    batches_per_epoch: int
    config: dict
    restored: tuple | None = None

    def restore(self, run: FitRun, previous):
        """Puts the newest readable checkpoint into `run`; returns `(previous, _Resume or None)`."""
        self.restored = self.saver.restore(lambda meta: _checkpoint_like(run.state, self.metrics, meta),
                                           lambda meta: _check_same_run(meta.get("config"), self.config,
                                                                        self.saver.directory))
        if self.restored is None:
            return previous, None
        meta, tree = self.restored
        run.state, previous = _with_arrays(run.state, tree["state"]), _with_arrays(run.state, tree["previous"])
        run.history, run.resumed_epoch, run.stop_training = meta["history"], meta["epoch"], meta["stop_training"]
        if not meta["batches_done"]:
            return previous, None
        totals = jax.tree.map(jnp.asarray, tree["totals"])
        return previous, _Resume(meta["batches_done"], meta["start_step"], totals, int(totals["accepted_steps"]))

    def restore_callbacks(self, run: FitRun) -> None:
        """Callbacks' counters, after their `on_train_begin` reset them."""
        if self.restored is None:
            return
        meta, tree = self.restored
        for index, (callback, values) in enumerate(zip(self.callbacks, meta["callbacks"])):
            kept = tree["callbacks"].get(str(index))
            callback.restore_checkpoint_state(values, None if kept is None else _with_arrays(run.state, kept))

    def save(self, run: FitRun, previous, totals, epoch: int, batches_done: int, start_step: int,
             state=None) -> None:
        state = run.state if state is None else state
        meta = {"config": self.config, "epoch": epoch, "batches_done": batches_done, "start_step": start_step,
                "history": run.history, "stop_training": run.stop_training and not batches_done, "callbacks": []}
        kept = {}
        for index, callback in enumerate(self.callbacks):
            values, callback_state = callback.checkpoint_state()
            meta["callbacks"].append(values)
            if callback_state is not None:
                kept[str(index)] = _arrays_of(callback_state)
        meta["kept_callbacks"] = sorted(kept)
        tree = {"state": _arrays_of(state), "previous": _arrays_of(previous), "totals": totals, "callbacks": kept}
        # A checkpoint's id counts batches: epoch e's saves are e * (B + 1) + batches done (1..B), its end's
        # (e + 1) * (B + 1). Steps would not do: a step the NaN guard refuses leaves the step count as it was.
        self.saver.save(epoch * (self.batches_per_epoch + 1) + batches_done, tree, meta)

    def within_epoch(self, run: FitRun, epoch: int):
        """The `after_dispatch` hook that saves every `every_steps` batches, or None for epoch checkpoints."""
        if self.every_steps is None:
            return None

        def after_dispatch(state, previous, totals, batches_done, start_step):
            if batches_done // self.every_steps > (batches_done - self.steps_per_dispatch) // self.every_steps:
                self.save(run, previous, totals, epoch, batches_done, start_step, state=state)

        return after_dispatch


def _arrays_of(state: TrainState) -> dict:
    """What a checkpoint keeps of a train state: everything training changes (the key as its raw data)."""
    arrays = {"params": state.params, "opt_state": state.opt_state, "batch_stats": state.batch_stats,
              "step": state.step, "dropout_key": jax.random.key_data(state.dropout_rng)}
    if state.dynamic_scale is not None:  # float16's loss scale and its count of finite steps
        arrays["loss_scale"] = {"scale": state.dynamic_scale.scale, "fin_steps": state.dynamic_scale.fin_steps}
    return arrays


def _with_arrays(state: TrainState, arrays: dict) -> TrainState:
    """`state` with a checkpoint's arrays (its model, optimizer and frozen variables are the caller's)."""
    key = jax.random.wrap_key_data(jnp.asarray(arrays["dropout_key"]), impl=jax.random.key_impl(state.dropout_rng))
    as_device = lambda tree: jax.tree.map(jnp.asarray, tree)  # noqa: E731
    scale = state.dynamic_scale
    if scale is not None:
        scale = scale.replace(**as_device(arrays["loss_scale"]))
    return state.replace(params=as_device(arrays["params"]), opt_state=as_device(arrays["opt_state"]),
                         batch_stats=as_device(arrays["batch_stats"]), step=jnp.asarray(arrays["step"], jnp.int32),
                         dropout_rng=key, dynamic_scale=scale)


def _checkpoint_like(state: TrainState, metrics: tuple, meta: dict) -> dict:
    """The structure of a checkpoint's arrays, for orbax to restore into."""
    like = {"state": _arrays_of(state), "previous": _arrays_of(state), "totals": zero_totals(metrics),
            "callbacks": {key: _arrays_of(state) for key in meta.get("kept_callbacks", [])}}
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(np.shape(leaf), np.asarray(leaf).dtype), like)


def _run_config(model, state: TrainState, loss, metrics, batch_size, seed, shuffle, drop_remainder, every_steps,
                from_source: bool) -> dict:
    """What must be equal for a checkpoint to continue this run (JSON): a difference is named, not loaded."""
    from jaxdl.models import model_config

    try:
        described = model_config(model) if model is not None else None
    except (TypeError, ValueError):  # a module whose config is not plain data: its class names it
        described = type(model).__name__
    shapes = [list(np.shape(leaf)) for leaf in jax.tree.leaves(state.opt_state)]
    return {"model": json.loads(json.dumps(described, default=str)),
            "parameters": [list(np.shape(leaf)) for leaf in jax.tree.leaves(state.params)],
            "optimizer": f"{jax.tree.structure(state.opt_state)} {shapes}",
            "input_shape": list(state.input_shape), "batch_size": batch_size, "seed": seed, "shuffle": shuffle,
            "drop_remainder": drop_remainder, "loss": loss if isinstance(loss, str) else getattr(
                loss, "__qualname__", repr(loss)), "metrics": list(metrics), "checkpoint_every": every_steps,
            "data": "source" if from_source else "arrays"}


def _check_same_run(saved: dict | None, current: dict, directory) -> None:
    if not isinstance(saved, dict):
        raise ValueError(f"{directory} holds checkpoints that jaxdl's fit did not write; pass another "
                         "checkpoint_dir")
    differences = [key for key in current if saved.get(key) != current[key]]
    if differences:
        named = "; ".join(f"{key}: {_difference(saved.get(key), current[key])}" for key in differences)
        raise ValueError(f"the checkpoint in {directory} is of another run ({named}); pass another "
                         "checkpoint_dir, or delete it to start afresh")


def _difference(saved, now) -> str:
    """`saved X, now Y`, each shown around where their JSON texts first differ."""
    saved_text, now_text = json.dumps(saved, default=str), json.dumps(now, default=str)
    first = next((i for i, (a, b) in enumerate(zip(saved_text, now_text)) if a != b),
                 min(len(saved_text), len(now_text)))
    start = max(first - 40, 0)

    def around(text):
        return ("..." if start else "") + text[start:first + 40] + ("..." if len(text) > first + 40 else "")

    return f"saved {around(saved_text)}, now {around(now_text)}"


def _validator(state: TrainState, validation_data, loss, metrics: tuple, batch_size: int, features, transform,
               mesh):
    """`(validate(state) -> sums, labels to check)` for validation arrays `(x_val, y_val)` or a source."""
    if data.is_source(validation_data):
        batches = _read_source(validation_data, "fit's validation_data", batch_size=batch_size,
                               features=features, transform=transform, input_shape=state.input_shape,
                               needs_labels=True, **_split_over(batch_size))
        if isinstance(batches, data.IterableBatches) and batches.one_shot:
            raise ValueError(f"validation_data is a one-shot {type(validation_data).__name__}: it would run out "
                             "after the first epoch's validation; pass a random-access source or an iterable "
                             "that can be iterated again")
        eval_step, put = compiled_eval_step(loss, metrics, mesh), _batch_placer(mesh, batches)
        return (lambda trained: _evaluate_batches(trained, batches.epoch(0), eval_step, put)), _first_labels(batches)
    if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
        raise ValueError("validation_data must be a pair (x_val, y_val) or a source")
    x_val, y_val = data.check_dataset(*validation_data, name="validation_data", input_shape=state.input_shape)
    return _array_evaluator(state, x_val, y_val, loss, metrics, batch_size, mesh), y_val


def _array_evaluator(state: TrainState, x: np.ndarray, y: np.ndarray, loss, metrics: tuple, batch_size: int, mesh):
    """`evaluate(state) -> sums` over arrays: one compiled scan, or batch by batch where loops are slow."""
    if loops_are_slow(state.apply_fn, state.variables, state.input_shape):
        eval_step, put, arrays = compiled_eval_step(loss, metrics, mesh), _batch_placer(mesh), {"x": x, "y": y}
        return lambda trained: _evaluate_batches(
            trained, data.ordered_batches(arrays, np.arange(len(x)), batch_size, multiple=batch_size, masked=True),
            eval_step, put)
    evaluate_all = compiled_evaluate(loss, metrics, batch_size, mesh)
    x_device, y_device = sharding.put_replicated((x, y), mesh)
    return lambda trained: evaluate_all(trained, x_device, y_device)
