"""Train state and jit-compiled train/eval steps: pure functions of `(state, batch)`.

The steps are pure functions that users can put in their own loops:

    train_step = make_train_step("sparse_categorical_crossentropy")  # jitted, donates the state
    for batch in jaxdl.data.batches(x, y, 32, seed=epoch):
        state, sums = train_step(state, batch)
    print(metrics_from_sums(sums))

Steps return *sums* over the batch's real (unmasked) examples plus their
`count`, in the manner of clu's `Average` metric: sums add up exactly across
batches, including a padded last batch, and `metrics_from_sums` turns them into means.

For `jaxdl.fit` (in `jaxdl.training.trainer`) this module also compiles steps
repeated: a whole epoch over in-memory data as one `jax.lax.scan`, and K
streamed batches per call, which removes the per-step Python dispatch that
dominates the cost of training small models.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Sequence

import flax.errors
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from jaxdl.data import arrays
from jaxdl.models.contract import (
    AUTO,
    apply_binding_axis_names,
    flag_kwargs,
    inference,
    inference_jaxpr,
    model_family,
    resolve_train_flag,
)
from jaxdl.models.nnx_modules import nnx_param_filter, nnx_train_flag, split_module
from jaxdl.runtime import compiler, sharding
from jaxdl.runtime.inference import apply_in_chunks
from jaxdl.training import losses, metrics as metric_sums
from jaxdl.training.precision import loss_scale, with_precision


class TrainState(train_state.TrainState):
    """Flax's TrainState plus BatchNorm statistics, a dropout key, the input shape and frozen variables.

    The random key of a step is `fold_in(dropout_rng, step)`, so a run is
    reproducible from its seed without threading keys through the loop.
    `frozen` holds variable collections that `apply_fn` reads but training
    never differentiates nor changes (a pretrained backbone, for instance).
    `dynamic_scale` (flax's `DynamicScale`) scales the loss of a float16 run
    (see `jaxdl.training.precision`); None otherwise.
    """

    batch_stats: Any
    dropout_rng: jax.Array
    input_shape: tuple = flax.struct.field(pytree_node=False)
    frozen: Any = flax.struct.field(default_factory=dict)
    dynamic_scale: Any = None

    @property
    def variables(self) -> dict:
        """The collections `apply_fn` takes: params, batch_stats when the model has any, and the frozen ones."""
        variables = {"params": self.params, **self.frozen}
        if self.batch_stats:
            variables["batch_stats"] = self.batch_stats
        return variables


def create_train_state(model, optimizer: optax.GradientTransformation, input_shape: Sequence[int] | None = None,
                       rng: jax.Array | None = None, *, input_dtype=jnp.float32, precision: str | None = None,
                       train_flag: str | None = AUTO, wrt=None) -> TrainState:
    """Initialises `model` for examples of `input_shape` and pairs it with `optimizer` in a `TrainState`.

    The model is initialised in inference mode on one zero example (compiled
    once per model), so a shape it cannot take fails here, before any step
    compiles. The state carries what `fit` and the step factories need: the
    parameters, BatchNorm statistics, frozen collections, a dropout key and,
    for float16, a dynamic loss scale.

    A Flax NNX module is initialised already: it is split once
    (`nnx.split(model, wrt, ...)`) into the state's `apply_fn` (its graph),
    `params` (the variables trained) and `batch_stats` (every other variable
    it carries), and neither `input_shape` nor `rng` is needed.

    Args:
      model: a Flax Linen module (jaxdl's or your own), or a Flax NNX module
        instance.
      optimizer: an optax `GradientTransformation`; its state is initialised
        from the parameters.
      input_shape: one example's shape, without the batch axis (e.g.
        `(28, 28, 1)`); required for a Linen module, optional for an NNX one
        (given, the module is traced on it here, to fail early).
      rng: a `jax.random` key, split into the initialisation key and the
        state's dropout key; required for a Linen module, optional for an
        NNX one (which draws from its own `nnx.Rngs`).
      input_dtype: the dtype of the examples (`fit` passes its data's: int32
        for token ids given to an `nn.Embed`), that of the zero example the
        model is initialised on; float32 by default.
      precision: the model's computation dtype ("float32", "bfloat16",
        "float16"; see `jaxdl.training.precision`), the parameters staying float32.
        None (default) keeps the model's own dtype.
      train_flag: the model's training keyword ("train", "training",
        "deterministic" or None). The default "auto" reads it from the
        model's `__call__` (see `jaxdl.models.contract`). An NNX module is put
        in its modes by `model.train()` / `model.eval()`: leave it "auto".
      wrt: for an NNX module, the filter of the variables trained
        (`nnx.Optimizer(wrt=...)`'s); None (default) is `nnx.Param`.

    Returns:
      A `jaxdl.training.steps.TrainState` whose `apply_fn` is the model's `apply`, with
      `input_shape` recorded and `step` 0.

    Raises:
      TypeError: `model` is not a Flax module instance (a function, a module
        class, another library's module; see
        `jaxdl.models.contract.model_family`).
      ValueError: if the model cannot take examples of `input_shape` (the
        message names the shape and, for a 2-D example given to a
        convolutional model, the missing channel axis); if `precision` or
        `train_flag` is not one jaxdl knows, or the flag cannot be read from
        the model's signature.
    """
    if model_family(model, "create_train_state(model, ...)") == "nnx":
        return _nnx_train_state(model, optimizer, input_shape, rng, input_dtype=input_dtype, precision=precision,
                                train_flag=train_flag, wrt=wrt)
    if input_shape is None or rng is None:
        raise ValueError(f"create_train_state({type(model).__name__}(...), optimizer, input_shape, rng): a Linen "
                         "module is initialised here, which needs one example's shape and a jax.random key")
    if wrt is not None:
        raise ValueError("wrt= chooses the trained variables of a Flax NNX module; a Linen module trains its "
                         "'params' collection")
    model = canonical(with_precision(model, precision))
    train_flag = resolve_train_flag(model, train_flag)
    input_shape, dtype = tuple(int(d) for d in input_shape), jax.dtypes.canonicalize_dtype(input_dtype)
    try:
        variables, dropout_rng = _compiled_init(model, train_flag, input_shape, dtype)(rng)
    except (TypeError, ValueError, ZeroDivisionError, IndexError) as error:
        hint = (" Convolutional models take (height, width, channels) per example: add a channel axis "
                "(x[..., None])." if len(input_shape) == 2 else "")
        raise ValueError(f"{type(model).__name__} cannot take examples of shape {input_shape} and dtype "
                         f"{dtype} (a batch of shape {(1, *input_shape)}): {type(error).__name__}: {error}.{hint}"
                         ) from error
    kernels = [leaf.shape for leaf in jax.tree.leaves(variables["params"]) if leaf.ndim == 4]
    if len(input_shape) == 2 and kernels and kernels[0][2] == input_shape[-1]:
        # Flax's Conv reads an (N, H, W) batch as one unbatched (H, W, channels) image: no error, wrong model.
        raise ValueError(f"{type(model).__name__} has 2-D convolutions (first kernel {kernels[0]}), which take "
                         f"(height, width, channels) per example, but the examples have shape {tuple(input_shape)}: "
                         "its last axis was read as channels; add a channel axis (x[..., None])")
    return new_train_state(model.apply, variables["params"], optimizer, batch_stats=variables.get("batch_stats", {}),
                           dropout_rng=dropout_rng, input_shape=input_shape, dynamic_scale=loss_scale(precision))


def _nnx_train_state(model, optimizer, input_shape, rng, *, input_dtype, precision, train_flag, wrt) -> TrainState:
    """A `TrainState` of an NNX module, initialised already: split once (`jaxdl.models.nnx_modules`)."""
    nnx_train_flag(train_flag)
    model = with_precision(model, precision)
    apply, trained, carried = split_module(model, nnx_param_filter(wrt))
    if input_shape is not None:
        _check_nnx_takes(apply, trained, carried, tuple(input_shape), input_dtype, type(model).__name__)
    dropout_rng = jax.random.split(rng)[1] if rng is not None else jax.random.key(0)
    return new_train_state(apply, trained, optimizer, batch_stats=carried, dropout_rng=dropout_rng,
                           input_shape=input_shape, dynamic_scale=loss_scale(precision))


def _check_nnx_takes(apply, trained, carried, input_shape: tuple, input_dtype, name: str) -> None:
    """An NNX module that cannot take examples of `input_shape` fails here, traced (nothing computed)."""
    sample = jax.ShapeDtypeStruct((1, *input_shape), jax.dtypes.canonicalize_dtype(input_dtype))
    try:
        jax.eval_shape(lambda v, x: apply(v, x, train=False), {"params": trained, "batch_stats": carried}, sample)
    except (TypeError, ValueError, ZeroDivisionError, IndexError) as error:
        raise ValueError(f"{name} cannot take examples of shape {input_shape} and dtype {sample.dtype} (a batch of "
                         f"shape {sample.shape}): {type(error).__name__}: {error}") from error


def canonical(model):
    """The first instance seen of a model equal to `model` (or `model`, if unhashable).

    A state's `apply_fn` is a static part of every compiled step's cache key,
    and Python compares bound methods by their instance's identity: two equal
    models built separately (a script run twice in one process, a test per
    model) would compile every step again. One instance per model shares them.
    """
    try:
        return _first_equal(model)
    except TypeError:
        return model


@functools.lru_cache(maxsize=64)
def _first_equal(model):
    return model


def _compiled_init(model, train_flag: str | None, input_shape: tuple, dtype) -> Callable:
    """`rng -> (variables, dropout key)`: the key split, and `model.init` in inference mode on one zero example of
    `input_shape` and `dtype`, as one program compiled once per model and example (a new jit per call would
    compile anew; eager splits and zeros would be programs of their own, each read back from the compilation
    cache in a new process)."""
    try:
        return _cached_init(model, train_flag, input_shape, dtype)
    except TypeError:  # a module with unhashable fields (lists, dicts): compile for this call only
        return _cached_init.__wrapped__(model, train_flag, input_shape, dtype)


@functools.lru_cache(maxsize=32)
def _cached_init(model, train_flag: str | None, input_shape: tuple, dtype) -> Callable:
    flags = flag_kwargs(train_flag, False)

    def init(rng):
        init_rng, dropout_rng = jax.random.split(rng)
        return model.init(init_rng, jnp.zeros((1, *input_shape), dtype), **flags), dropout_rng

    return compiler.jit(init)


def new_train_state(apply_fn, params, optimizer: optax.GradientTransformation, *, batch_stats, dropout_rng,
                    input_shape: Sequence[int], frozen: dict | None = None, dynamic_scale=None) -> TrainState:
    """A TrainState at step 0 from already initialised variables.

    As `TrainState.create`, with the optimizer's state initialised in one compiled program (`_optimizer_init`)
    and the step an int32 on the device (Flax's Python int 0 is weakly typed: a compiled step's second call would
    see int32 and compile again).
    """
    return TrainState(step=jax.device_put(np.zeros((), np.int32)), apply_fn=apply_fn, params=params, tx=optimizer,
                      opt_state=_optimizer_init(optimizer)(params), batch_stats=batch_stats, dropout_rng=dropout_rng,
                      input_shape=None if input_shape is None else tuple(int(d) for d in input_shape),
                      frozen=frozen or {}, dynamic_scale=dynamic_scale)


def _optimizer_init(optimizer: optax.GradientTransformation) -> Callable:
    """`optimizer.init` compiled once per optimizer: eagerly, each of its zeros is a program of its own (read back
    from the compilation cache one by one in a new process). An unhashable optimizer's runs eagerly."""
    try:
        return _cached_optimizer_init(optimizer)
    except TypeError:
        return optimizer.init


@functools.lru_cache(maxsize=32)
def _cached_optimizer_init(optimizer: optax.GradientTransformation) -> Callable:
    return compiler.jit(optimizer.init)


def adopted_state(state, rng: jax.Array | None = None, where: str = "fit(state=...)") -> TrainState:
    """jaxdl's `TrainState` holding a state from a loop of your own: Flax's `train_state.TrainState`, or a
    subclass of it with `batch_stats` (and a dropout key, `dropout_rng` or `key`), as Flax's examples write it.

    The step count, parameters, optimizer and its state carry over as they
    are, so `fit` continues the run where the loop left it; only the input
    shape (read from the data) and, for a state without one, the dropout key
    are new.

    Args:
      state: jaxdl's `TrainState` (returned as it is) or Flax's.
      rng: the dropout key for a state without one; `jax.random.key(0)` when None.
      where: the entry point, for the message.

    Returns:
      A jaxdl `TrainState`.

    Raises:
      TypeError: `state` is neither.
    """
    if isinstance(state, TrainState):
        return state
    if not isinstance(state, train_state.TrainState):
        raise TypeError(f"{where} takes a TrainState (jaxdl's, or flax.training.train_state.TrainState and its "
                        f"subclasses); got {type(state).__name__}")
    dropout_rng = getattr(state, "dropout_rng", None)
    dropout_rng = getattr(state, "key", None) if dropout_rng is None else dropout_rng
    if dropout_rng is None:
        dropout_rng = jax.random.key(0) if rng is None else rng
    return TrainState(step=jnp.asarray(state.step, jnp.int32), apply_fn=state.apply_fn, params=state.params,
                      tx=state.tx, opt_state=state.opt_state, batch_stats=getattr(state, "batch_stats", None) or {},
                      dropout_rng=dropout_rng, input_shape=None)


def _batch_sums(outputs, batch, loss_fn: Callable, metrics, label_key: str) -> dict:
    """Loss and metric sums over the batch's real examples, and their count.

    `mask` (1 real, 0 padding) leaves padding out of everything; `weight`
    scales each example's loss, not its metrics, as Keras's `sample_weight`
    and `class_weight` do (its `metrics` are unweighted). Each metric's sums
    take the form its totals take (`jaxdl.training.metrics`).
    """
    outputs = outputs.astype(jnp.promote_types(outputs.dtype, jnp.float32))  # half-precision models: float32 loss
    mask = batch.get("mask")
    if mask is None:
        mask = jnp.ones(outputs.shape[0], jnp.float32)
    weight = batch.get("weight")
    per_example_loss = loss_fn(outputs, batch)
    weighted = per_example_loss * mask if weight is None else per_example_loss * mask * weight
    sums = {"loss": jnp.sum(weighted), "count": jnp.sum(mask)}
    for metric in metrics:
        sums[metric_sums.name_of(metric)] = metric_sums.batch_sums(metric, outputs, batch, label_key, mask)
    return sums


def _all_finite(tree) -> jax.Array:
    """True when every floating-point number in `tree` is finite."""
    leaves = [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])) if leaves else jnp.bool_(True)


def checked_metric_names(metrics: Sequence) -> tuple:
    """The metrics (names, functions, `Metric`s), each looked up now so that a typo fails before anything
    compiles (`jaxdl.training.metrics.checked`)."""
    return metric_sums.checked(metrics)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """How a step reads a batch and calls a model: plain data, so that equal contracts give equal steps.

    The model is called as `apply_fn(variables, batch[input_key], **{train_flag: True}, rngs=...)`,
    Flax's own convention: `train_flag` names the model's keyword (None: the
    model takes none; "deterministic" is passed inverted, as Flax's Dropout
    reads it; "auto", the default, reads it from the model's `__call__` when
    the step is traced, see `jaxdl.models.contract`), `rng_streams` the random
    streams it draws from in training.
    `loss` is a name from `jaxdl.training.losses` (comparing outputs with
    `batch[label_key]`) or a function `(outputs, batch) -> per-example loss`;
    `metrics` are names, functions `(outputs, batch) -> per-example values`
    or `Metric`s (`jaxdl.training.metrics`).
    `mesh` (see `jaxdl.runtime.sharding`) splits the batch over its `data` axis and
    keeps the state whole on every device; None leaves placement to JAX.
    An axis name the model's collectives use (flax's `BatchNorm(axis_name="batch")`,
    written for `jax.pmap`) is bound to the whole global batch
    (`jaxdl.models.contract.apply_binding_axis_names`).
    """

    loss: Any
    metrics: tuple = ("accuracy",)
    input_key: str = "x"
    label_key: str = "y"
    train_flag: str | None = AUTO
    rng_streams: tuple[str, ...] = ("dropout", "augment")
    mesh: Any = None

    def loss_fn(self) -> Callable:
        """`(outputs, batch) -> per-example loss`."""
        if callable(self.loss):
            return self.loss
        named = losses.get_loss(self.loss)
        return lambda outputs, batch: named(outputs, batch[self.label_key])

    def check_batch(self, batch) -> None:
        """A clear error when the batch lacks what this contract reads (raised while tracing)."""
        reads_labels = metric_sums.reads_labels(self.metrics) or not callable(self.loss)
        needed = [self.input_key] + ([self.label_key] if reads_labels else [])
        if not isinstance(batch, dict) or any(key not in batch for key in needed):
            present = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"the step reads batch[{self.input_key!r}] (the model's input) and batch"
                             f"[{self.label_key!r}] (the labels), but the batch has {present}; name yours with "
                             "make_train_step(..., input_key=..., label_key=...)")

    def apply(self, state, params, batch: dict, *, train: bool, rngs: dict | None = None):
        """`(outputs, batch_stats updates)` of the state's model on the batch's input."""
        stats = getattr(state, "batch_stats", None)
        variables = {"params": params, **getattr(state, "frozen", {})}
        if stats:
            variables["batch_stats"] = stats
        train_flag = resolve_train_flag(state.apply_fn, self.train_flag)
        kwargs = flag_kwargs(train_flag, train)
        if train and rngs:
            kwargs["rngs"] = rngs
        if train and stats:
            kwargs["mutable"] = ["batch_stats"]
        try:
            result = apply_binding_axis_names(state.apply_fn, variables, batch[self.input_key], **kwargs)
        except TypeError as error:
            if train_flag and f"'{train_flag}'" in str(error):
                raise ValueError(
                    f"the model does not take the keyword {train_flag!r}: jaxdl's steps call "
                    f"`model.apply(variables, x, {train_flag}=True/False, rngs=...)`, as Flax's examples "
                    "do; give your __call__ that argument, or name yours with train_flag='training' "
                    "('deterministic' is passed inverted), train_flag=None for a model without one, or "
                    "train_flag='auto' to read it from the model's signature"
                ) from error
            raise
        except flax.errors.InvalidRngError as error:
            raise ValueError(f"the model draws random numbers ({error}); jaxdl's TrainState carries a key for "
                             f"the streams {self.rng_streams}: build the state with create_train_state, pass "
                             "rng=... to the step, or name the model's streams with rng_streams=...") from error
        if train and stats:
            return result
        return result, {}

    def step_rngs(self, state, rng) -> dict | None:
        """This step's keys, one per stream: reproducible from the run's key and the step number."""
        base = getattr(state, "dropout_rng", None) if rng is None else rng
        if base is None or not self.rng_streams:
            return None
        key = jax.random.fold_in(base, state.step)
        return {name: key if i == 0 else jax.random.fold_in(key, i) for i, name in enumerate(self.rng_streams)}


def _guarded_train_step(contract: StepSpec) -> Callable:
    """`step(state, batch, rng=None) -> (state, sums, finite)`: one update, and whether it kept every number finite.

    `finite` covers the loss, the gradients and the updated parameters and
    batch statistics, so a caller can refuse the very update that diverged
    (the loss alone is computed before the update and would let it through).
    """
    loss_fn = contract.loss_fn()

    def step(state, batch: dict, rng=None):
        contract.check_batch(batch)
        batch = sharding.constrain_batch(batch, contract.mesh)
        rngs = contract.step_rngs(state, rng)

        def objective(params):
            outputs, updates = contract.apply(state, params, batch, train=True, rngs=rngs)
            sums = _batch_sums(outputs, batch, loss_fn, contract.metrics, contract.label_key)
            return sums["loss"] / jnp.maximum(sums["count"], 1.0), (sums, updates)

        scale = getattr(state, "dynamic_scale", None)
        if scale is None:
            grads, (sums, updates) = jax.grad(objective, has_aux=True)(state.params)
        else:  # float16: the loss scaled up before differentiating, the gradients scaled back
            scale, scale_finite, (_, (sums, updates)), grads = scale.value_and_grad(objective, has_aux=True)(
                state.params)
        if getattr(state, "batch_stats", None):
            new_state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
        else:
            new_state = state.apply_gradients(grads=grads)
        if scale is None:
            finite = _all_finite((sums["loss"], grads, new_state.params, getattr(new_state, "batch_stats", None)))
        else:  # an overflow is the loss scale's to handle: the step is skipped, the scale lowered
            skipped = state.replace(step=new_state.step)
            new_state = jax.tree.map(lambda new, old: jnp.where(scale_finite, new, old), new_state, skipped)
            new_state = new_state.replace(dynamic_scale=scale)
            finite = _all_finite((sums["loss"], new_state.params, new_state.batch_stats))
        return sharding.constrain_replicated(new_state, contract.mesh), sums, finite

    return step


def _refuse_consumed(state, what: str) -> None:
    """A state whose buffers a train step donated is one clear error (inside a user's jit it is traced: skipped)."""
    if any(isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer) and leaf.is_deleted()
           for leaf in jax.tree.leaves(state)):
        raise ValueError(f"the state given to this {what} was already used by an earlier train step: "
                         "a compiled train step donates the state it is given (its buffers are reused), so "
                         "continue from the state it returned (`state, sums = step(state, batch)`), or pass a "
                         "copy (jax.tree.map(jnp.copy, state)) to keep the old one")


def _refusing_consumed_states(jitted: Callable, what: str, mesh=None) -> Callable:
    """`jitted`, but a state whose buffers an earlier call donated is one clear error, not JAX's.

    With a `mesh`, a batch still on the host is put on the devices split over
    the mesh's `data` axis first (with several processes: this process's rows).
    """

    @functools.wraps(jitted)
    def call(state, batch, *args, **kwargs):
        _refuse_consumed(state, what)
        if mesh is not None:
            batch = sharding.put_batch(batch, mesh)
        return jitted(state, batch, *args, **kwargs)

    call.jitted = jitted
    return call


def make_train_step(loss, metrics: Sequence[str] = ("accuracy",), *, jit: bool = True, input_key: str = "x",
                    label_key: str = "y", train_flag: str | None = AUTO,
                    rng_streams: Sequence[str] = ("dropout", "augment"), mesh=None) -> Callable:
    """Builds the training step `fit` runs, for your own loop: `train_step(state, batch, rng=None)`.

    The step computes the loss and its gradients, applies the optimizer and
    returns the new state with the batch's sums (loss and metrics, summed over
    its examples, and `count`; `metrics_from_sums` turns them into means). Unlike
    `fit`, it does not refuse a non-finite update: check the sums yourself.
    With float16's dynamic loss scale, an overflowing step is skipped and the
    scale lowered. It works with jaxdl's `TrainState` and with Flax's own
    (`batch_stats`, `frozen` and `dropout_rng` are used when the state has
    them).

    Args:
      loss: a loss name from `jaxdl.training.losses` (e.g.
        "sparse_categorical_crossentropy") or a function
        `(outputs, batch) -> per-example loss`.
      metrics: metrics, each summed per batch: names ("accuracy", "mae",
        "precision", "auc", ...), functions `(outputs, batch) -> per-example
        values` (or `(sums, counts)`) or `Metric`s of `jaxdl.training.metrics`;
        default accuracy.
      jit: True (default) compiles the step with `jaxdl.runtime.compiler.jit`,
        donating the incoming state (pass the returned one on); False returns
        the plain function, to compose inside your own `jax.jit`.
      input_key: the batch key holding the model's input; default "x".
      label_key: the batch key holding the labels; default "y".
      train_flag: the model's training keyword, passed True here; "auto"
        (default) reads it from the model's `__call__` (see `StepSpec`).
      rng_streams: the random streams the model draws from in training, each
        given a key folded from the state's dropout key (or `rng`) and the
        step; default ("dropout", "augment").
      mesh: a `jax.sharding.Mesh` (e.g. `jaxdl.runtime.sharding.data_mesh()`) to train
        data-parallel: the batch is split over its `data` axis, the state
        replicated, the gradients summed over devices by `jax.jit`. None
        (default) runs where the arrays are.

    Returns:
      `train_step(state, batch, rng=None) -> (state, sums)`. `batch` is a dict
      with the input (`input_key`), the labels (`label_key`) and optionally
      `mask` (1 for real examples, 0 for padding) and `weight` (per-example
      loss weights). Pass `rng` for a model that draws random numbers when
      the state has no `dropout_rng`.

    Raises:
      ValueError: here, for an unknown loss or metric, a clash of metric names or a bad
        `train_flag`; from the step, for a batch without `input_key` or
        `label_key`, a padded batch (with `mask`) given to a model with
        BatchNorm statistics (padding would enter them: give it unpadded
        batches, `jaxdl.data.batches(..., pad=False)`), a model that draws random
        numbers without a key, or a state an earlier compiled step donated.
    """
    contract = StepSpec(loss, checked_metric_names(metrics), input_key, label_key, train_flag,
                        tuple(rng_streams), mesh)
    guarded_step = _guarded_train_step(contract)

    def train_step(state, batch: dict, rng=None):
        if getattr(state, "batch_stats", None) and "mask" in batch:
            raise ValueError("this model keeps BatchNorm statistics, and a padded batch (one with 'mask') would "
                             "let its padding rows into them; pass unpadded batches "
                             "(jaxdl.data.batches(..., pad=False) or drop_remainder=True)")
        new_state, sums, _ = guarded_step(state, batch, rng)
        return new_state, sums

    if not jit:
        return train_step
    return _refusing_consumed_states(compiler.jit(train_step, donate_argnums=(0,)), "train step", mesh)


def make_eval_step(loss, metrics: Sequence[str] = ("accuracy",), *, jit: bool = True, input_key: str = "x",
                   label_key: str = "y", train_flag: str | None = AUTO, mesh=None) -> Callable:
    """Builds the evaluation step `evaluate` runs, for your own loop: `eval_step(state, batch) -> sums`.

    The model runs in inference mode (dropout off, BatchNorm on its running
    statistics); the step returns the batch's sums of loss and metrics and
    `count`, which add up over batches and `metrics_from_sums` turns into means.
    Padding rows (`mask` 0) are left out of the sums.

    Args:
      loss: a loss name from `jaxdl.training.losses` or a function
        `(outputs, batch) -> per-example loss`.
      metrics: metrics as `make_train_step` takes them; default accuracy.
      jit: True (default) compiles the step (the state is not donated);
        False returns the plain function to compose.
      input_key: the batch key holding the model's input; default "x".
      label_key: the batch key holding the labels; default "y".
      train_flag: the model's training keyword, passed False here; "auto"
        (default) reads it from the model's `__call__`.
      mesh: a `jax.sharding.Mesh` to split each batch over its `data` axis;
        None (default) runs where the arrays are.

    Returns:
      `eval_step(state, batch) -> sums`, a dict of summed `loss`, each metric
      (by name) and `count`.

    Raises:
      ValueError: here, for an unknown loss or metric, a clash of metric names or a bad
        `train_flag`; from the step, for a batch without `input_key` or
        `label_key`, or a state an earlier compiled train step donated.
    """
    contract = StepSpec(loss, checked_metric_names(metrics), input_key, label_key, train_flag, (), mesh)
    loss_fn = contract.loss_fn()

    def eval_step(state, batch: dict):
        contract.check_batch(batch)
        batch = sharding.constrain_batch(batch, contract.mesh)
        outputs, _ = contract.apply(state, state.params, batch, train=False)
        return _batch_sums(outputs, batch, loss_fn, contract.metrics, contract.label_key)

    if not jit:
        return eval_step
    jitted = compiler.jit(eval_step)

    @functools.wraps(eval_step)
    def call(state, batch):
        _refuse_consumed(state, "eval step")
        return jitted(state, batch if mesh is None else sharding.put_batch(batch, mesh))

    call.jitted = jitted
    return call


def metrics_from_sums(sums: dict, prefix: str = "") -> dict[str, float]:
    """The loss and metrics from step sums (fetched to the host): the mean loss, each metric read from its
    totals' form (`jaxdl.training.metrics.metric_value`: means, ratios, ROC counts)."""
    sums = jax.device_get(sums)
    count = max(float(sums["count"]), 1.0)
    result = {prefix + "loss": float(sums["loss"]) / count}
    for name in sorted(set(sums) - {"loss", "count"}):  # Keras's order: loss first
        result[prefix + name] = metric_sums.metric_value(name, sums[name], count)
    return result


def _scan_batches(num_examples: int, batch_size: int, drop_remainder: bool, order=None):
    """Per-batch example indices and masks, built inside a compiled function."""
    index, mask = arrays.padded_indices(np.arange(num_examples), batch_size, drop_remainder)
    if order is not None:  # a permutation computed on the device
        index = jnp.resize(order, index.size).reshape(index.shape)
    return index, jnp.asarray(mask, jnp.float32)


def _cached_by_arguments(factory: Callable) -> Callable:
    """`functools.lru_cache` keyed on the bound arguments, defaults filled in: `f(a)` and `f(a, b=default)`
    share one compiled program (a plain lru_cache keys them apart and would compile twice)."""
    cached = functools.lru_cache(maxsize=64)(factory)
    signature = inspect.signature(factory)

    @functools.wraps(factory)
    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return cached(*bound.args)

    call.cache_clear = cached.cache_clear
    return call


def _guarded_scan_body(contract: StepSpec) -> Callable:
    """`body((state, previous, healthy), batch) -> (carry, sums)`: one guarded step, for `lax.scan`.

    An update whose gradients or new parameters are not finite is refused,
    and so are all steps after it (`healthy` turns False); a state whose own
    loss is not finite is replaced by `previous`, the state before it. Refused
    steps contribute zero sums, so `count > 0` marks the accepted ones.
    """
    guarded_step = _guarded_train_step(contract)

    def guarded_body(carry, batch):
        state, previous, healthy = carry
        new_state, sums, update_finite = guarded_step(state, batch)
        loss_finite = jnp.isfinite(sums["loss"])
        accept = healthy & loss_finite & update_finite
        # A non-finite loss condemns the state that computed it, not only its update: fall back one step.
        roll_back = healthy & ~loss_finite

        def keep(choice, a, b):
            return jax.tree.map(lambda u, v: jnp.where(choice, u, v), a, b)

        carry = (keep(accept, new_state, keep(roll_back, previous, state)), keep(accept, state, previous), accept)
        return carry, jax.tree.map(lambda s: jnp.where(accept, s, 0.0), sums)

    return guarded_body


def _unselected_scan_body(contract: StepSpec) -> Callable:
    """`_guarded_scan_body` without its selections: the carry moves on whether or not a step was accepted.

    While every step is accepted it computes what the guarded body does. It
    is the cheaper one for small models, where choosing between the new,
    current and previous states costs a small kernel per leaf per step
    (docs/numerics.md#training-steps-on-cpu). After a
    refused step its carry means nothing: `GuardedEpoch` then runs the epoch
    again with the guarded body.
    """
    guarded_step = _guarded_train_step(contract)

    def body(carry, batch):
        state, _, healthy = carry
        new_state, sums, update_finite = guarded_step(state, batch)
        accept = healthy & jnp.isfinite(sums["loss"]) & update_finite
        return (new_state, state, accept), jax.tree.map(lambda s: jnp.where(accept, s, 0.0), sums)

    return body


def _epoch_of(body: Callable, batch_size: int, shuffle: bool | str, drop_remainder: bool,
              previous_each_step: bool = True) -> Callable:
    """`epoch(state, previous, x, y, weight, order) -> (state, previous, sums, healthy_steps, healthy)`.

    `shuffle`: False reads the examples in order; True draws the order as
    `fold_in(order, state.step)`'s permutation (`order` is then the shuffle
    key), so training on from a state sees new orders; "given" takes `order`
    as the example numbers in the order to read them.

    Without `previous_each_step` (for `_unselected_scan_body`, which does not
    read it) the scan carries no previous state, and the epoch's last step
    runs after the scan, from which the previous state is the one before it:
    carrying it was a copy of every leaf of the state per step (13 of the
    "learning to round" MLP's 62 kernels a step).
    """

    def epoch(state, previous, x, y, weight, order):
        num_examples = x.shape[0]
        if shuffle != "given":
            order = (jax.random.permutation(jax.random.fold_in(order, state.step), num_examples) if shuffle
                     else jnp.arange(num_examples))

        def batch_of(rows, mask=None):
            batch = {"x": x[rows], "y": y[rows], "weight": weight[rows]}
            return batch if mask is None else {**batch, "mask": mask}

        last = None  # a batch run after the scan
        if state.batch_stats:  # no padding: full batches in the scan, then the remainder alone
            full = num_examples // batch_size * batch_size
            scanned = (order[:full].reshape(-1, batch_size),)
            if full < num_examples and not drop_remainder:
                last = (order[full:],)
        else:
            scanned = _scan_batches(num_examples, batch_size, drop_remainder, order)
        if not previous_each_step and last is None:
            last, scanned = jax.tree.map(lambda a: a[-1], scanned), jax.tree.map(lambda a: a[:-1], scanned)
        if previous_each_step:
            carry, sums = jax.lax.scan(lambda c, b: body(c, batch_of(*b)), (state, previous, jnp.bool_(True)),
                                       scanned)
        else:
            def step_without_previous(carry, b):
                (new_state, _, accept), sums = body((carry[0], carry[0], carry[1]), batch_of(*b))
                return (new_state, accept), sums

            (state, healthy), sums = jax.lax.scan(step_without_previous, (state, jnp.bool_(True)), scanned)
            carry = (state, previous, healthy)
        if last is not None:
            carry, last_sums = body(carry, batch_of(*last))
            sums = jax.tree.map(lambda s, last_s: jnp.concatenate([s, last_s[None]]), sums, last_sums)
        healthy_steps = jnp.sum(sums["count"] > 0)
        return carry[0], carry[1], jax.tree.map(lambda s: s.sum(axis=0), sums), healthy_steps, carry[2]

    return epoch


@dataclasses.dataclass(frozen=True)
class GuardedEpoch:
    """`epoch(state, previous, x, y, weight, order) -> (state, previous, sums, healthy_steps)`.

    One compiled pass over in-memory arrays, each step guarded as
    `_guarded_scan_body` says: `healthy_steps` tells `fit` where training
    broke down, and the returned state is the last one whose loss, gradients
    and parameters were all finite.

    It first runs `unselected` (see `_unselected_scan_body`), which leaves its
    inputs alive (no donation: up to four copies of the state exist at once,
    against two). Only when a step was refused does it run `guarded` from
    those inputs, compiled on that first use; a run that never diverges never
    compiles it.
    """

    unselected: Callable
    guarded: Callable

    def __call__(self, state, previous, x, y, weight, order):
        *result, healthy_steps, healthy = self.unselected(state, previous, x, y, weight, order)
        healthy_steps, healthy = jax.device_get((healthy_steps, healthy))
        if not healthy:
            *result, healthy_steps, _ = self.guarded(state, previous, x, y, weight, order)
        return (*result, healthy_steps)

    def clear_cache(self) -> None:
        self.unselected.clear_cache()
        self.guarded.clear_cache()

    def _cache_size(self) -> int:
        """Programs compiled for the every-step-accepted form: one per input shape and placement."""
        return self.unselected._cache_size()


@_cached_by_arguments
def compiled_epoch(loss, metrics: tuple, batch_size: int, shuffle: bool | str, drop_remainder: bool, mesh=None,
                   train_flag: str | None = "train", rng_streams: tuple = ("dropout", "augment")) -> GuardedEpoch:
    """One compiled pass over in-memory arrays (`GuardedEpoch`), in the order `shuffle` says (`_epoch_of`).

    `weight` scales each example's loss (Keras's sample and class weights).
    The last partial batch is padded and masked out of the loss, except for
    models with BatchNorm statistics, where padding rows would enter the
    statistics: there it runs as its own smaller batch, as Keras's last batch does.
    """
    contract = StepSpec(loss, metrics, train_flag=train_flag, rng_streams=rng_streams, mesh=mesh)
    return GuardedEpoch(
        compiler.jit(_epoch_of(_unselected_scan_body(contract), batch_size, shuffle, drop_remainder,
                               previous_each_step=False)),
        compiler.jit(_epoch_of(_guarded_scan_body(contract), batch_size, shuffle, drop_remainder),
                     donate_argnums=(0, 1)))


@_cached_by_arguments
def compiled_steps(loss, metrics: tuple, mesh=None, train_flag: str | None = "train",
                   rng_streams: tuple = ("dropout", "augment")):
    """`steps(state, previous, healthy, totals, batches) -> (state, previous, healthy, totals)`: K guarded steps.

    `batches` stacks K batches on a leading axis; one dispatch runs their K
    steps (see `_guarded_scan_body`), which cuts the per-step dispatch cost
    that dominates small models. The steps are unrolled, not a `lax.scan`:
    XLA:CPU runs a convolution's gradient inside a loop far slower than
    outside one, and unrolled steps were faster for dense layers too
    (docs/numerics.md#training-steps-on-cpu). `totals`
    adds up the sums and `accepted_steps` on the device, so an epoch never
    waits for the host between dispatches.
    """
    guarded_body = _guarded_scan_body(StepSpec(loss, metrics, train_flag=train_flag, rng_streams=rng_streams,
                                              mesh=mesh))

    def steps(state, previous, healthy, totals, batches):
        carry = (state, previous, healthy)
        for index in range(jax.tree.leaves(batches)[0].shape[0]):
            carry, sums = guarded_body(carry, jax.tree.map(lambda leaf: leaf[index], batches))
            sums["accepted_steps"] = (sums["count"] > 0).astype(jnp.int32)
            totals = jax.tree.map(jnp.add, totals, sums)
        return (*carry, totals)

    # The states are donated, the totals (a few scalars) are not: donating them made each dispatch wait for the
    # step before it on a 4-device mesh (docs/numerics.md#training-steps-on-cpu).
    return compiler.jit(steps, donate_argnums=(0, 1))


def _has_convolution(jaxpr) -> bool:
    """Whether a jaxpr (or one nested in it: scans, jits, custom derivatives) convolves."""
    for equation in jaxpr.eqns:
        if equation.primitive.name == "conv_general_dilated":
            return True
        for value in equation.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns") and _has_convolution(inner):
                    return True
    return False


def loops_are_slow(apply_fn, variables, input_shape: Sequence[int], train_flag: str | None = AUTO,
                   input_dtype="float32") -> bool:
    """Whether a compiled loop over steps would be slow for this model here: convolutions on XLA:CPU.

    See `compiled_steps`: there `fit` runs its steps unrolled, K per call, and
    keeps the one-`lax.scan`-per-epoch form for the models and backends where
    it is the fast one (dense layers, and convolutional models whose CPU form
    has no convolution op). Decided from the model's traced operations.
    """
    if jax.default_backend() != "cpu":
        return False
    return _has_convolution(inference_jaxpr(apply_fn, variables, input_shape, train_flag, input_dtype).jaxpr)


def zero_totals(metrics: Sequence) -> dict:
    """The `totals` a streamed epoch starts from (see `compiled_steps`)."""
    totals = {name: jnp.zeros((), jnp.float32) for name in ("loss", "count")}
    return {**totals, **metric_sums.zeros(metrics), "accepted_steps": jnp.zeros((), jnp.int32)}


@_cached_by_arguments
def compiled_eval_step(loss, metrics: tuple, mesh=None, train_flag: str | None = "train"):
    """`make_eval_step(loss, metrics)`, compiled once per loss, metrics, mesh and train flag."""
    return compiler.jit(make_eval_step(loss, metrics, jit=False, mesh=mesh, train_flag=train_flag))


@_cached_by_arguments
def compiled_evaluate(loss, metrics: tuple, batch_size: int, mesh=None, train_flag: str | None = "train"):
    """`evaluate_all(state, x, y) -> sums`: the eval step scanned over in-memory arrays, one compiled call."""
    eval_step = make_eval_step(loss, metrics, jit=False, mesh=mesh, train_flag=train_flag)

    def evaluate_all(state, x, y):
        index, mask = _scan_batches(x.shape[0], batch_size, False)

        def body(_, rows_and_mask):
            rows, keep = rows_and_mask
            return None, eval_step(state, {"x": x[rows], "y": y[rows], "mask": keep})

        _, sums = jax.lax.scan(body, None, (index, mask))
        return jax.tree.map(lambda s: s.sum(axis=0), sums)

    return compiler.jit(evaluate_all)


@functools.partial(compiler.jit, static_argnames=("apply_fn", "batch_size", "chunked", "mesh", "train_flag"))
def predict_all(apply_fn, variables, x, batch_size, chunked, mesh=None, train_flag="train"):
    """The model's outputs on every row of `x`, in batches of `batch_size`, in inference mode."""
    index, _ = _scan_batches(x.shape[0], batch_size, False)
    forward_fn = inference(apply_fn, train_flag)

    def forward(rows):  # computed split over the mesh, gathered whole: every process gets every output
        images = sharding.constrain_batch(x[rows], mesh)
        outputs = apply_in_chunks(apply_fn, variables, images) if chunked else forward_fn(variables, images)
        return sharding.constrain_replicated(outputs, mesh)

    if index.shape[0] == 1:  # one batch: no loop (see `loops_are_slow`)
        return forward(index[0])[: x.shape[0]]
    _, outputs = jax.lax.scan(lambda _, rows: (None, forward(rows)), None, index)
    return outputs.reshape(-1, *outputs.shape[2:])[: x.shape[0]]


def seed_rngs(seed: int) -> tuple[jax.Array, jax.Array]:
    """`fit`'s (init, shuffle) keys for `seed`: build a state with the init key to match a `fit` run."""
    return _seed_keys(seed, jax.config.jax_default_prng_impl)


@functools.partial(compiler.jit, static_argnums=(0, 1))
def _seed_keys(seed: int, impl: str) -> tuple[jax.Array, jax.Array]:
    """The key of `seed` under the PRNG implementation `impl`, split: one program (eagerly, three: the seed, the
    split and its unstacking). `impl` is an argument: JAX's jit cache does not tell `jax_default_prng_impl`'s
    values apart (a resume under "rbg" was given threefry keys, and not refused)."""
    init_rng, shuffle_rng = jax.random.split(jax.random.key(seed, impl=impl))
    return init_rng, shuffle_rng
