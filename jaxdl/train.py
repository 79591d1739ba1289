"""Train state, jit-compiled train/eval steps, and a Keras-like `fit`.

The steps are pure functions that users can put in their own loops:

    train_step = make_train_step("sparse_categorical_crossentropy")  # jitted, donates the state
    for batch in data.batches(x, y, 32, seed=epoch):
        state, sums = train_step(state, batch)
    print(summarize(sums))

Steps return *sums* over the batch's real (unmasked) examples plus their
`count`, in the manner of clu's `Average` metric: sums add up exactly across
batches, including a padded last batch, and `summarize` turns them into means.

`fit` runs a whole epoch inside one compiled function (`jax.lax.scan` over
batches of data already on the device), which removes the per-step Python
dispatch that dominates the cost of training small models.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from typing import Any, Callable, Sequence

import flax.errors
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm.auto import tqdm

from jaxdl import data, losses
from jaxdl.callbacks import Callback, FitRun, injected_learning_rates
from jaxdl.models import FineTuneModel, MobileNetV2
from jaxdl.models.heads import fast_inference
from jaxdl.models.mobilenet_v2 import apply_in_chunks


class TrainState(train_state.TrainState):
    """Flax's TrainState plus BatchNorm statistics, a dropout key, the input shape and frozen variables.

    The random key of a step is `fold_in(dropout_rng, step)`, so a run is
    reproducible from its seed without threading keys through the loop.
    `frozen` holds variable collections that `apply_fn` reads but training
    never differentiates nor changes (a pretrained backbone, for instance).
    """

    batch_stats: Any
    dropout_rng: jax.Array
    input_shape: tuple = flax.struct.field(pytree_node=False)
    frozen: Any = flax.struct.field(default_factory=dict)

    @property
    def variables(self) -> dict:
        """The collections `apply_fn` takes: params, batch_stats when the model has any, and the frozen ones."""
        variables = {"params": self.params, **self.frozen}
        if self.batch_stats:
            variables["batch_stats"] = self.batch_stats
        return variables


def create_train_state(model, optimizer: optax.GradientTransformation, input_shape: Sequence[int],
                       rng: jax.Array, *, input_dtype=jnp.float32) -> TrainState:
    """Initialises `model` for examples of `input_shape` (no batch axis).

    A model that cannot take that shape is one error naming the shape (and,
    for a 2-D example given to a convolutional model, the missing channel axis).
    """
    init_rng, dropout_rng = jax.random.split(rng)
    sample = jnp.zeros((1, *input_shape), input_dtype)
    try:
        variables = jax.jit(functools.partial(model.init, train=False))(init_rng, sample)
    except (TypeError, ValueError, ZeroDivisionError, IndexError) as error:
        hint = (" Convolutional models take (height, width, channels) per example: add a channel axis "
                "(x[..., None])." if len(input_shape) == 2 else "")
        raise ValueError(f"{type(model).__name__} cannot take examples of shape {tuple(input_shape)} (a batch of "
                         f"shape {sample.shape}): {type(error).__name__}: {error}.{hint}") from error
    kernels = [leaf.shape for leaf in jax.tree.leaves(variables["params"]) if leaf.ndim == 4]
    if len(input_shape) == 2 and kernels and kernels[0][2] == input_shape[-1]:
        # Flax's Conv reads an (N, H, W) batch as one unbatched (H, W, channels) image: no error, wrong model.
        raise ValueError(f"{type(model).__name__} has 2-D convolutions (first kernel {kernels[0]}), which take "
                         f"(height, width, channels) per example, but the examples have shape {tuple(input_shape)}: "
                         "its last axis was read as channels; add a channel axis (x[..., None])")
    return new_train_state(model.apply, variables["params"], optimizer, batch_stats=variables.get("batch_stats", {}),
                           dropout_rng=dropout_rng, input_shape=input_shape)


def new_train_state(apply_fn, params, optimizer: optax.GradientTransformation, *, batch_stats, dropout_rng,
                    input_shape: Sequence[int], frozen: dict | None = None) -> TrainState:
    """A TrainState at step 0 from already initialised variables."""
    state = TrainState.create(apply_fn=apply_fn, params=params, tx=optimizer, batch_stats=batch_stats,
                              dropout_rng=dropout_rng, input_shape=tuple(int(d) for d in input_shape),
                              frozen=frozen or {})
    # TrainState.create starts from the Python int 0, a weakly typed scalar: the second
    # call of a compiled step would see int32 instead and compile again.
    return state.replace(step=jnp.zeros((), jnp.int32))


def _batch_sums(outputs, batch, loss_fn: Callable, metric_names, label_key: str) -> dict:
    """Loss and metric sums over the batch's real examples, and their count.

    `mask` (1 real, 0 padding) leaves padding out of everything; `weight`
    scales each example's loss, not its metrics, as Keras's `sample_weight`
    and `class_weight` do (its `metrics` are unweighted).
    """
    mask = batch.get("mask")
    if mask is None:
        mask = jnp.ones(outputs.shape[0], jnp.float32)
    weight = batch.get("weight")
    per_example_loss = loss_fn(outputs, batch)
    weighted = per_example_loss * mask if weight is None else per_example_loss * mask * weight
    sums = {"loss": jnp.sum(weighted), "count": jnp.sum(mask)}
    for name in metric_names:
        sums[name] = jnp.sum(losses.get_metric(name).per_example(outputs, batch[label_key]) * mask)
    return sums


def _all_finite(tree) -> jax.Array:
    """True when every floating-point number in `tree` is finite."""
    leaves = [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])) if leaves else jnp.bool_(True)


def _checked_metric_names(metrics: Sequence[str]) -> tuple[str, ...]:
    """The metric names, each looked up now so that a typo fails before anything compiles."""
    names = tuple(metrics)
    for name in names:
        losses.get_metric(name)
    return names


@dataclasses.dataclass(frozen=True)
class StepContract:
    """How a step reads a batch and calls a model: plain data, so that equal contracts give equal steps.

    The model is called as `apply_fn(variables, batch[input_key], **{train_flag: True}, rngs=...)`,
    Flax's own convention: `train_flag` names the model's keyword (None: the
    model takes none; "deterministic" is passed inverted, as Flax's Dropout
    reads it), `rng_streams` the random streams it draws from in training.
    `loss` is a name from `jaxdl.losses` (comparing outputs with
    `batch[label_key]`) or a function `(outputs, batch) -> per-example loss`.
    """

    loss: Any
    metrics: tuple[str, ...] = ("accuracy",)
    input_key: str = "x"
    label_key: str = "y"
    train_flag: str | None = "train"
    rng_streams: tuple[str, ...] = ("dropout", "augment")

    def loss_fn(self) -> Callable:
        """`(outputs, batch) -> per-example loss`."""
        if callable(self.loss):
            return self.loss
        named = losses.get_loss(self.loss)
        return lambda outputs, batch: named(outputs, batch[self.label_key])

    def check_batch(self, batch) -> None:
        """A clear error when the batch lacks what this contract reads (raised while tracing)."""
        needed = [self.input_key] + ([self.label_key] if self.metrics or not callable(self.loss) else [])
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
        kwargs = {}
        if self.train_flag:
            kwargs[self.train_flag] = (not train) if self.train_flag == "deterministic" else train
        if train and rngs:
            kwargs["rngs"] = rngs
        if train and stats:
            kwargs["mutable"] = ["batch_stats"]
        try:
            result = state.apply_fn(variables, batch[self.input_key], **kwargs)
        except TypeError as error:
            if self.train_flag and f"'{self.train_flag}'" in str(error):
                raise ValueError(
                    f"the model does not take the keyword {self.train_flag!r}: jaxdl's steps call "
                    f"`model.apply(variables, x, {self.train_flag}=True/False, rngs=...)`, as Flax's examples "
                    "do; give your __call__ that argument, or name yours with train_flag='training' "
                    "('deterministic' is passed inverted), or train_flag=None for a model without one"
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


def _guarded_train_step(contract: StepContract) -> Callable:
    """`step(state, batch, rng=None) -> (state, sums, finite)`: one update, and whether it kept every number finite.

    `finite` covers the loss, the gradients and the updated parameters and
    batch statistics, so a caller can refuse the very update that diverged
    (the loss alone is computed before the update and would let it through).
    """
    loss_fn = contract.loss_fn()

    def step(state, batch: dict, rng=None):
        contract.check_batch(batch)
        rngs = contract.step_rngs(state, rng)

        def objective(params):
            outputs, updates = contract.apply(state, params, batch, train=True, rngs=rngs)
            sums = _batch_sums(outputs, batch, loss_fn, contract.metrics, contract.label_key)
            return sums["loss"] / jnp.maximum(sums["count"], 1.0), (sums, updates)

        grads, (sums, updates) = jax.grad(objective, has_aux=True)(state.params)
        if getattr(state, "batch_stats", None):
            new_state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
        else:
            new_state = state.apply_gradients(grads=grads)
        finite = _all_finite((sums["loss"], grads, new_state.params, getattr(new_state, "batch_stats", None)))
        return new_state, sums, finite

    return step


def _refusing_consumed_states(jitted: Callable, what: str) -> Callable:
    """`jitted`, but a state whose buffers an earlier call donated is one clear error, not JAX's."""

    @functools.wraps(jitted)
    def call(state, *args, **kwargs):
        if any(isinstance(leaf, jax.Array) and leaf.is_deleted() for leaf in jax.tree.leaves(state)):
            raise ValueError(f"this state was already used by an earlier {what}: a compiled step donates the "
                             "state it is given (its buffers are reused), so continue from the state it "
                             "returned (`state, sums = step(state, batch)`), or pass a copy "
                             "(jax.tree.map(jnp.copy, state)) to keep the old one")
        return jitted(state, *args, **kwargs)

    call.jitted = jitted
    return call


def make_train_step(loss, metrics: Sequence[str] = ("accuracy",), *, jit: bool = True, input_key: str = "x",
                    label_key: str = "y", train_flag: str | None = "train",
                    rng_streams: Sequence[str] = ("dropout", "augment")) -> Callable:
    """Returns `train_step(state, batch, rng=None) -> (state, sums)`.

    Works with jaxdl's `TrainState` and with Flax's own (`batch_stats`,
    `frozen` and `dropout_rng` are used when the state has them); without a
    `dropout_rng` in the state, pass `rng` for models that draw random numbers.
    `batch` is a dict with the input (`input_key`), the labels (`label_key`),
    and optionally `mask` (1 for real examples, 0 for padding) and `weight`
    (per-example loss weights). `loss` is a name from `jaxdl.losses` or a
    function `(outputs, batch) -> per-example loss`; see `StepContract`
    for `train_flag` and `rng_streams`. With `jit` the step is compiled and
    donates the incoming state; without it, it is the plain function to compose.
    A model with BatchNorm statistics takes no `mask`: padding rows would enter
    the batch statistics, so give it unpadded batches (`data.batches(...,
    pad=False)`), whose last one is smaller, as in Keras.
    """
    contract = StepContract(loss, _checked_metric_names(metrics), input_key, label_key, train_flag,
                            tuple(rng_streams))
    guarded_step = _guarded_train_step(contract)

    def train_step(state, batch: dict, rng=None):
        if getattr(state, "batch_stats", None) and "mask" in batch:
            raise ValueError("this model keeps BatchNorm statistics, and a padded batch (one with 'mask') would "
                             "let its padding rows into them; pass unpadded batches (data.batches(..., pad=False) "
                             "or drop_remainder=True)")
        new_state, sums, _ = guarded_step(state, batch, rng)
        return new_state, sums

    return _refusing_consumed_states(jax.jit(train_step, donate_argnums=(0,)), "train step") if jit else train_step


def make_eval_step(loss, metrics: Sequence[str] = ("accuracy",), *, jit: bool = True, input_key: str = "x",
                   label_key: str = "y", train_flag: str | None = "train") -> Callable:
    """Returns `eval_step(state, batch) -> sums`, running the model in inference mode (see `make_train_step`)."""
    contract = StepContract(loss, _checked_metric_names(metrics), input_key, label_key, train_flag, ())
    loss_fn = contract.loss_fn()

    def eval_step(state, batch: dict):
        contract.check_batch(batch)
        outputs, _ = contract.apply(state, state.params, batch, train=False)
        return _batch_sums(outputs, batch, loss_fn, contract.metrics, contract.label_key)

    return jax.jit(eval_step) if jit else eval_step


def summarize(sums: dict, prefix: str = "") -> dict[str, float]:
    """Means from step sums (fetched to the host), with each metric's finalizer applied."""
    sums = jax.device_get(sums)
    count = max(float(sums["count"]), 1.0)
    result = {}
    for name in ["loss"] + sorted(set(sums) - {"loss", "count"}):  # Keras's order: loss first
        mean = float(sums[name]) / count
        result[prefix + name] = mean if name == "loss" else float(losses.get_metric(name).finalize(mean))
    return result


def _scan_batches(num_examples: int, batch_size: int, drop_remainder: bool, order=None):
    """Per-batch example indices and masks, built inside a compiled function."""
    index, mask = data.padded_indices(np.arange(num_examples), batch_size, drop_remainder)
    if order is not None:  # a permutation computed on the device
        index = jnp.resize(order, index.size).reshape(index.shape)
    return index, jnp.asarray(mask, jnp.float32)


@functools.lru_cache(maxsize=64)
def compiled_epoch(loss, metrics: tuple, batch_size: int, shuffle: bool, drop_remainder: bool):
    """`epoch(state, previous, x, y, weight, key) -> (state, previous, sums, healthy_steps)`: one compiled pass.

    `weight` scales each example's loss (Keras's sample and class weights).

    An update whose gradients or new parameters are not finite is refused,
    and so are all steps after it; a state whose own loss is not finite is
    replaced by `previous`, the state before it. `healthy_steps` tells `fit`
    where training broke down, and the returned state is the last one whose
    loss, gradients and parameters were all finite.
    The last partial batch is padded and masked out of the loss, except for
    models with BatchNorm statistics, where padding rows would enter the
    statistics: there it runs as its own smaller batch, as Keras's last batch does.
    """
    guarded_step = _guarded_train_step(StepContract(loss, metrics))

    def guarded_body(carry, batch):
        state, previous, healthy = carry
        new_state, sums, update_finite = guarded_step(state, batch)
        loss_finite = jnp.isfinite(sums["loss"])
        accept = healthy & loss_finite & update_finite
        # A non-finite loss condemns the state that computed it, not only its update: fall back one step.
        roll_back = healthy & ~loss_finite
        keep = lambda choice, a, b: jax.tree.map(lambda u, v: jnp.where(choice, u, v), a, b)  # noqa: E731
        carry = (keep(accept, new_state, keep(roll_back, previous, state)), keep(accept, state, previous), accept)
        return carry, jax.tree.map(lambda s: jnp.where(accept, s, 0.0), sums)

    def epoch(state, previous, x, y, weight, key):
        num_examples = x.shape[0]
        order = jax.random.permutation(key, num_examples) if shuffle else jnp.arange(num_examples)
        carry = (state, previous, jnp.bool_(True))
        examples = lambda rows: {"x": x[rows], "y": y[rows], "weight": weight[rows]}  # noqa: E731
        if state.batch_stats:  # no padding: full batches in the scan, then the remainder alone
            full = num_examples // batch_size * batch_size
            rows = order[:full].reshape(-1, batch_size)
            carry, sums = jax.lax.scan(lambda c, r: guarded_body(c, examples(r)), carry, rows)
            if full < num_examples and not drop_remainder:
                carry, last = guarded_body(carry, examples(order[full:]))
                sums = jax.tree.map(lambda s, l: jnp.concatenate([s, l[None]]), sums, last)
        else:
            index, mask = _scan_batches(num_examples, batch_size, drop_remainder, order)
            carry, sums = jax.lax.scan(
                lambda c, rows_and_mask: guarded_body(c, {**examples(rows_and_mask[0]), "mask": rows_and_mask[1]}),
                carry, (index, mask))
        healthy_steps = jnp.sum(sums["count"] > 0)
        return carry[0], carry[1], jax.tree.map(lambda s: s.sum(axis=0), sums), healthy_steps

    return jax.jit(epoch, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=64)
def compiled_evaluate(loss, metrics: tuple, batch_size: int):
    eval_step = make_eval_step(loss, metrics, jit=False)

    def evaluate_all(state, x, y):
        index, mask = _scan_batches(x.shape[0], batch_size, False)

        def body(_, rows_and_mask):
            rows, keep = rows_and_mask
            return None, eval_step(state, {"x": x[rows], "y": y[rows], "mask": keep})

        _, sums = jax.lax.scan(body, None, (index, mask))
        return jax.tree.map(lambda s: s.sum(axis=0), sums)

    return jax.jit(evaluate_all)


@functools.partial(jax.jit, static_argnames=("apply_fn", "batch_size", "chunked"))
def _predict_all(apply_fn, variables, x, batch_size, chunked):
    index, _ = _scan_batches(x.shape[0], batch_size, False)

    def forward(rows):
        return apply_in_chunks(apply_fn, variables, x[rows]) if chunked else apply_fn(variables, x[rows], train=False)

    _, outputs = jax.lax.scan(lambda _, rows: (None, forward(rows)), None, index)
    return outputs.reshape(-1, *outputs.shape[2:])[: x.shape[0]]


def evaluate(state: TrainState, x, y, *, loss, metrics: Sequence[str] = ("accuracy",),
             batch_size: int = 256) -> dict[str, float]:
    """Loss and metrics over a whole dataset, in inference mode; labels are checked as `fit` checks them."""
    batch_size = data.check_batch_size(batch_size)
    x, y = data.check_dataset(x, y, input_shape=state.input_shape, purpose="evaluating")
    _check_labels_fit_the_loss(state, loss, {"y": y})
    sums = compiled_evaluate(loss, _checked_metric_names(metrics), batch_size)(state, jnp.asarray(x), jnp.asarray(y))
    return summarize(sums)


def prediction_batch_size(num_examples: int, batch_size: int) -> int:
    """The batch `predict` compiles for: `batch_size`, or the power of two that holds a smaller input.

    Padding a few examples up to a large batch wastes the compute; rounding
    up to powers of two keeps the number of compiled shapes small.
    """
    return min(batch_size, 1 << max(num_examples - 1, 0).bit_length())


def predict(model_or_state, x, *, variables=None, batch_size: int = 256) -> np.ndarray:
    """Model outputs (logits) for `x`, in batches, in inference mode.

    Takes a TrainState, or a Linen module together with its `variables`.
    MobileNetV2 models run their fast inference form (BatchNorm folded,
    images in chunks, as `jaxdl.classifier` does).
    """
    batch_size = data.check_batch_size(batch_size)
    if isinstance(model_or_state, TrainState):
        x = data.check_dataset(x, input_shape=model_or_state.input_shape, purpose="predicting")
        model = getattr(model_or_state.apply_fn, "__self__", None)
        apply_fn, variables = model_or_state.apply_fn, model_or_state.variables
    else:
        if variables is None:
            raise ValueError("predict(model, x) needs variables=...; or pass a TrainState")
        x = data.check_dataset(x, purpose="predicting")
        model, apply_fn = model_or_state, model_or_state.apply
    chunked = isinstance(model, (MobileNetV2, FineTuneModel))
    if chunked:
        model, variables = fast_inference(model, variables)
        apply_fn = model.apply
    size = prediction_batch_size(len(x), batch_size)
    return np.asarray(_predict_all(apply_fn, variables, jnp.asarray(x), size, chunked))


# --- fit ---------------------------------------------------------------------------------------


def learning_rate_of(opt_state) -> float | None:
    """The learning rate an `optax.inject_hyperparams` optimizer holds in its state, or None without one.

    Searches the optimizer state (chains and masks nest it), as Keras logs
    `learning_rate`; callbacks such as ReduceLROnPlateau change it there.
    """
    found = injected_learning_rates(opt_state)
    return float(found[0].hyperparams["learning_rate"]) if found else None


def seed_rngs(seed: int) -> tuple[jax.Array, jax.Array]:
    """`fit`'s (init, shuffle) keys for `seed`: build a state with the init key to match a `fit` run."""
    init_rng, shuffle_rng = jax.random.split(jax.random.key(seed))
    return init_rng, shuffle_rng


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


def fit(model, x, y, *, loss, optimizer: optax.GradientTransformation | None = None,
        metrics: Sequence[str] = ("accuracy",), epochs: int = 1, batch_size: int = 32, seed: int = 0,
        validation_split: float | None = None, validation_data: tuple | None = None,
        shuffle: bool = True, drop_remainder: bool = False, callbacks: Sequence[Callback] = (),
        state: TrainState | None = None, initial_epoch: int = 0, class_weight: dict | None = None,
        sample_weight=None, verbose: int | bool | str = "auto") -> tuple[TrainState, dict[str, list]]:
    """Trains `model` on in-memory arrays, as Keras's `Model.fit` does.

    Returns the final state and a history: per-epoch lists of `loss`, each
    metric and their `val_` counterparts. The optimizer defaults to Adam(1e-3).
    An update that makes the loss, a gradient or a parameter non-finite stops
    training with a warning, and the returned state is the last finite one.

    Pass `state` to continue training it: it carries its model and optimizer,
    so `model` must be None or that same model and `optimizer` None. The
    caller's state is copied, never consumed. Each epoch's shuffle order
    follows from `seed` and the state's step count, so training on from a
    state sees new orders, and two calls (`epochs=2`, then `epochs=3` from
    the returned state) train exactly as one call of 5 epochs with the same
    seed. As in Keras, `initial_epoch` numbers the first epoch (for callbacks
    and messages) and training runs epochs `initial_epoch` to `epochs - 1`.

    `class_weight` ({class: weight}) and `sample_weight` (one per example)
    scale each example's loss as Keras does: the loss is the sum of weighted
    losses over the number of examples; metrics stay unweighted. `verbose`: 0
    silent, 1 a progress bar, 2 one line per epoch; "auto" (and True) is 1 on
    a terminal and 2 otherwise, so logs do not fill with progress-bar updates.
    """
    batch_size = data.check_batch_size(batch_size)
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if (isinstance(initial_epoch, bool) or not isinstance(initial_epoch, (int, np.integer))
            or not 0 <= initial_epoch <= epochs):
        raise ValueError(f"initial_epoch must be an integer from 0 to epochs={epochs}, got {initial_epoch!r}")
    if validation_split is not None and validation_data is not None:
        raise ValueError("pass validation_split or validation_data, not both")
    x, y = data.check_dataset(x, y, input_shape=state.input_shape if state is not None else None)
    weights = example_weights(y, class_weight, sample_weight)
    if validation_split is not None:
        (x, y), validation_data = data.split_validation(x, y, validation_split)
        weights = weights[:len(x)]
    metrics = _checked_metric_names(metrics)
    verbosity = _verbosity(verbose)

    init_rng, shuffle_rng = seed_rngs(seed)
    if state is None:
        state = create_train_state(model, optimizer or optax.adam(1e-3), x.shape[1:], init_rng)
    else:
        state = _state_to_continue(model, optimizer, state)
    if validation_data is not None:
        if len(validation_data) != 2:
            raise ValueError("validation_data must be a pair (x_val, y_val)")
        x_val, y_val = data.check_dataset(*validation_data, name="validation_data", input_shape=state.input_shape)
    _check_labels_fit_the_loss(state, loss, {"y": y} if validation_data is None
                               else {"y": y, "labels of validation_data": y_val})
    if drop_remainder and len(x) < batch_size:
        raise ValueError(f"drop_remainder with batch_size={batch_size} drops all {len(x)} examples")

    x_dev, y_dev, weights_dev = jax.device_put(x), jax.device_put(y), jax.device_put(weights)
    if validation_data is not None:
        val_dev = jax.device_put(x_val), jax.device_put(y_val)
    run_epoch = compiled_epoch(loss, metrics, batch_size, shuffle, drop_remainder)
    evaluate_all = compiled_evaluate(loss, metrics, batch_size)
    steps_per_epoch = data.num_batches(len(x), batch_size, drop_remainder)

    trained_model = model if model is not None else getattr(state.apply_fn, "__self__", None)
    run = FitRun(state=state, history={}, model=trained_model)
    previous = jax.tree.map(jnp.copy, state)  # the fallback when a state's own loss is not finite
    for callback in callbacks:
        callback.on_train_begin(run)
    progress = tqdm(range(initial_epoch, epochs), desc="fit", unit="epoch", disable=verbosity != 1, leave=True)
    for epoch in progress:
        order_key = jax.random.fold_in(shuffle_rng, int(run.state.step))  # new orders when training on from a state
        run.state, previous, sums, healthy_steps = run_epoch(run.state, previous, x_dev, y_dev, weights_dev,
                                                             order_key)
        if int(healthy_steps) < steps_per_epoch:
            warnings.warn("fit stopped: the loss, a gradient or an updated parameter became NaN or infinite at "
                          f"epoch {epoch + 1}, step "
                          f"{int(healthy_steps) + 1} of {steps_per_epoch}; the returned state is the last one whose loss, "
                          "gradients and parameters were all finite (lower the learning rate or check the data)",
                          RuntimeWarning, stacklevel=2)
            break
        logs = summarize(sums)
        if validation_data is not None:
            logs.update(summarize(evaluate_all(run.state, *val_dev), prefix="val_"))
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
        if run.stop_training:
            break
    progress.close()
    for callback in callbacks:
        callback.on_train_end(run)
    return run.state, run.history
