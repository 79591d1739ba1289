"""How jaxdl calls a user's model: its train flag, read once from its own signature, and its inference form.

Flax models say "training mode" in three ways: `train: bool` (flax's
examples), `training: bool` (Keras's habit) and `deterministic: bool`
(flax's Dropout, inverted), each with or without a default; many take none.
Every place jaxdl runs a model (the train and eval steps, `create_train_state`,
the label and shape checks before `fit` compiles, `predict`, `mc_predict`,
`summary`) asks this module for the keyword to pass, so a model accepted by
one is accepted by all. `train_flag="auto"` (the default everywhere) detects
the flag from `__call__`'s parameters; a name or None says it explicitly.

What this module leaves to others: the step itself (`jaxdl.training.steps`), the
random streams (`StepSpec.rng_streams`), and the loss (`jaxdl.training.losses`);
it also tells, from a model's traced operations, whether its outputs are
already probabilities (a final sigmoid or softmax), which the named losses
would read as logits.

A model that runs inference in a faster form of its own (MobileNetV2: its
BatchNorm folded into the convs, its batches in chunks) says so through one
hook, `model.inference_form(variables) -> InferenceForm`; `inference_form`
asks it, and gives every other model back as it is. Generic code (`predict`)
asks this module, never which model it holds.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from typing import Any, Callable

import flax.linen as nn
import jax
from flax import nnx

from jaxdl.runtime import compilation_cache

AUTO = "auto"
TRAIN_FLAGS = ("train", "training", "deterministic")
FAMILIES = ("linen", "nnx")


def model_family(model, where: str) -> str:
    """The family of Flax model `model` belongs to, as jaxdl's entry points take it: "linen" or "nnx".

    The one place where a model's kind is decided: every entry point that
    takes a model (`fit`, `predict`, `create_train_state`, `summary`) asks
    here first, so a model jaxdl cannot train is refused by name before any
    data is read. A Linen module is called through its own `apply`; an NNX
    module is split once into a pure `apply` over its graph
    (`jaxdl.models.nnx_modules`).

    Args:
      model: the model an entry point was given.
      where: the entry point and argument, for the message (e.g.
        "fit(model, ...)").

    Returns:
      "linen" for a Flax Linen module, "nnx" for a Flax NNX module instance.

    Raises:
      TypeError: for anything else (a function, a module class rather than
        an instance, another library's module), naming what was given and
        what jaxdl takes.
    """
    # Before the entry point's first computation, even its eager ones (keys, staging), so that a second
    # process finds every program of the run in the cache.
    compilation_cache.ensure_enabled()
    if isinstance(model, nn.Module):
        return "linen"
    if isinstance(model, nnx.Module):
        return "nnx"
    if isinstance(model, type) and issubclass(model, (nn.Module, nnx.Module)):
        raise TypeError(f"{where} was given the class {model.__name__}, not a module: pass an instance, "
                        f"e.g. {model.__name__}(...)")
    raise TypeError(f"{where} takes a Flax module instance as its model (a flax.linen.Module, or a flax.nnx.Module "
                    f"built with its nnx.Rngs); got {type(model).__name__} ({model!r:.80})")


@dataclasses.dataclass(frozen=True)
class InferenceForm:
    """A model as inference runs it: the module and variables to call, and how its batches run.

    Attributes:
      model: the module to call (the model itself, or an equivalent faster
        one, e.g. with BatchNorm folded into its convs).
      variables: the variables of `model`.
      chunked: True when the form is inference-only and runs through the CPU
        inference engine (`jaxdl.runtime.inference.apply_in_chunks`), called
        without a train flag; False (default) for a model called as in
        training, with its flag set to inference.
    """

    model: Any
    variables: Any
    chunked: bool = False


def inference_form(model, variables) -> InferenceForm:
    """The form `model` runs inference in: its own `inference_form(variables)` hook, else the model as it is.

    Args:
      model: a Flax Linen module.
      variables: its variables (`{"params": ..., ...}`).

    Returns:
      An `InferenceForm`; for a model without the hook, `InferenceForm(model,
      variables)`.
    """
    hook = getattr(model, "inference_form", None)
    return InferenceForm(model, variables) if hook is None else hook(variables)


def _signature_target(model_or_apply) -> tuple[Callable, int, str]:
    """`(callable, parameters to skip, name)`: what to read a train flag from.

    A Linen module (or its bound `apply`) is read from its class's `__call__`
    after `self` and the input; any other `apply_fn(variables, x, ...)` (a
    function, a partial, an object with `__call__`) after its first two.
    """
    module = model_or_apply if isinstance(model_or_apply, nn.Module) else getattr(model_or_apply, "__self__", None)
    if isinstance(module, nn.Module):
        return type(module).__call__, 2, f"{type(module).__name__}.__call__"
    name = getattr(model_or_apply, "__qualname__", type(model_or_apply).__name__)
    return model_or_apply, 2, name


@functools.lru_cache(maxsize=256)
def _detected(function: Callable, skip: int, name: str) -> str | None:
    try:
        parameters = list(inspect.signature(function).parameters.values())[skip:]
    except (TypeError, ValueError):  # a builtin or C function: nothing to read
        parameters = []
    found = [p.name for p in parameters if p.name in TRAIN_FLAGS]
    shown = ", ".join(str(p) for p in parameters) or "no parameters after the input"
    if len(found) > 1:
        raise ValueError(f"{name} takes several train flags ({', '.join(found)}): jaxdl cannot tell which one "
                         f"switches training on; pass train_flag={found[0]!r} (or another name) to say which")
    if found:
        return found[0]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        raise ValueError(f"{name} takes **kwargs ({shown}), so jaxdl cannot tell from its signature whether it "
                         "takes a train flag; pass train_flag='train', 'training', 'deterministic' or None")
    return None


def detect_train_flag(model_or_apply) -> str | None:
    """The train flag `model_or_apply` takes: "train", "training", "deterministic", or None for none.

    Read from the signature of a Linen module's `__call__` (or of a plain
    `apply_fn(variables, x, ...)`); several of the names, or only `**kwargs`,
    is an error naming what was found and the argument to pass.
    """
    target = _signature_target(model_or_apply)
    try:
        return _detected(*target)
    except TypeError:  # an unhashable callable object: read it uncached
        return _detected.__wrapped__(*target)


def resolve_train_flag(model_or_apply, train_flag: str | None = AUTO) -> str | None:
    """`train_flag` checked, with "auto" replaced by what `detect_train_flag` finds."""
    if train_flag == AUTO:
        return detect_train_flag(model_or_apply)
    if train_flag is not None and (not isinstance(train_flag, str) or not train_flag.isidentifier()):
        raise ValueError(f"train_flag must be a keyword name such as 'train', 'auto' or None, got {train_flag!r}")
    return train_flag


def flag_kwargs(train_flag: str | None, train: bool) -> dict[str, bool]:
    """The keyword that puts a model in training (`train=True`) or inference mode: `deterministic` is inverted."""
    if train_flag is None:
        return {}
    return {train_flag: (not train) if train_flag == "deterministic" else train}


def inference(apply_fn: Callable, train_flag: str | None = AUTO) -> Callable:
    """`forward(variables, x)`: `apply_fn` in inference mode, as the eval step calls it."""
    kwargs = flag_kwargs(resolve_train_flag(apply_fn, train_flag), False)
    return functools.partial(apply_fn, **kwargs) if kwargs else apply_fn


# --- collective axis names (models written for jax.pmap) ----------------------------------------

# JAX's NameError for a collective over a name nothing binds: "Found an unbound axis name: batch. ..."
# (older versions: "unbound axis name: batch. The following axis names ...").
_UNBOUND_AXIS = re.compile(r"unbound axis name: ([^\s,]+?)\.?(?:\s|$)")


def unbound_axis_name(error: NameError) -> str | None:
    """The axis name in JAX's error for a collective (`lax.pmean(x, name)`) over an unbound name; None for any
    other NameError."""
    found = _UNBOUND_AXIS.search(str(error))
    return found.group(1) if found else None


def _with_axes_bound(apply_fn: Callable, names: tuple[str, ...]) -> Callable:
    """`apply_fn` with each of `names` bound by a `jax.vmap` of size 1 over nothing: the one global batch."""
    if not names:
        return apply_fn

    def call(*args, **kwargs):
        forward = functools.partial(apply_fn, *args, **kwargs)
        for name in names:  # closed over, nothing is mapped: a collective over a size-1 axis gives its operand back
            forward = jax.vmap(forward, axis_name=name, axis_size=1)
        outputs = forward()
        return jax.tree.map(lambda leaf: leaf.reshape(leaf.shape[len(names):]), outputs)

    return call


def apply_binding_axis_names(apply_fn: Callable, variables, x, **kwargs):
    """`apply_fn(variables, x, **kwargs)`, with the collective axis names the model uses bound to the whole batch.

    A model written for `jax.pmap` names the axis its batch is split over:
    flax's examples build `nn.BatchNorm(axis_name="batch")`, whose training
    statistics are `lax.pmean(..., "batch")` of each device's, and JAX
    refuses the name where nothing binds it (`NameError: Found an unbound
    axis name: batch`). jaxdl's steps run under `jax.jit`, which sees the
    global batch (the compiler splits it over the devices), so such a
    statistic is the whole batch's already: each name the call finds
    unbound is bound to an axis of size 1 (`jax.vmap(..., axis_name=name,
    axis_size=1)` over nothing), over which `pmean` and `psum` give their
    operand back. The model then computes what it computes with
    `axis_name=None`, which is what flax's pmap examples compute after their
    `pmean`: statistics over the global batch. A model that uses no axis name
    is called once, as it is; one that does is traced again with its names
    bound (nothing is computed twice: this runs while a step is traced).

    Args:
      apply_fn: the model's `apply(variables, x, ...)`.
      variables: its variables.
      x: the batch's inputs.
      **kwargs: the train flag, `rngs`, `mutable`, as the step passes them.

    Returns:
      What `apply_fn` returns.

    Raises:
      NameError: any other than an unbound axis name, as the model raised it.
    """
    names: tuple[str, ...] = ()
    while True:
        try:
            return _with_axes_bound(apply_fn, names)(variables, x, **kwargs)
        except NameError as error:
            name = unbound_axis_name(error)
            if name is None or name in names:
                raise
            names += (name,)


# --- outputs that are probabilities ------------------------------------------------------------

# Operations that pass a value on unchanged in meaning (casts, reshapes): looked through.
_PASS_THROUGH = {"convert_element_type", "reshape", "squeeze", "expand_dims", "copy"}


def _producer(jaxpr, var):
    for equation in reversed(jaxpr.eqns):
        if any(out is var for out in equation.outvars):
            return equation
    return None


def _inner_jaxpr(equation):
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        inner = equation.params.get(key)
        if inner is not None:
            return getattr(inner, "jaxpr", inner)
    return None


def _final_activation(jaxpr, var, depth: int = 0) -> str | None:
    """"sigmoid" or "softmax" when `var` is the result of one (through casts, reshapes and nested calls)."""
    equation = _producer(jaxpr, var)
    if equation is None or depth > 20:
        return None
    name = equation.primitive.name
    if name == "logistic":
        return "sigmoid"
    if name in _PASS_THROUGH:
        return _final_activation(jaxpr, equation.invars[0], depth + 1)
    if name == "div":
        numerator = _producer(jaxpr, equation.invars[0])
        return "softmax" if numerator is not None and numerator.primitive.name == "exp" else None
    inner = _inner_jaxpr(equation)
    if inner is not None:
        index = next(i for i, out in enumerate(equation.outvars) if out is var)
        return _final_activation(inner, inner.outvars[index], depth + 1)
    return None


class _Ignored:
    """A value carried through a cache key without being part of it."""

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        return 0

    def __eq__(self, other):
        return isinstance(other, _Ignored)


@functools.lru_cache(maxsize=64)
def _traced(apply_fn: Callable, input_shape: tuple, variables: _Ignored, train_flag: str | None, input_dtype):
    forward = inference(apply_fn, train_flag)
    shapes = jax.eval_shape(lambda: variables.value)
    return jax.make_jaxpr(forward)(shapes, jax.ShapeDtypeStruct((1, *input_shape), input_dtype))


def inference_jaxpr(apply_fn: Callable, variables: Any, input_shape, train_flag: str | None = AUTO,
                    input_dtype="float32"):
    """The model's operations in inference mode on one example of `input_shape` and `input_dtype` (nothing
    computed): the data's dtype, so that a model on integer tokens (`nn.Embed`) is traced on integers.

    Traced once per model, input shape, dtype and flag: one model at one input
    shape has one set of operations (and one structure of variables), so
    `fit`'s checks (the loop kind, the outputs' activation and shape) share it.
    """
    train_flag = resolve_train_flag(apply_fn, train_flag)
    input_dtype = jax.dtypes.canonicalize_dtype(input_dtype)  # int64 data arrive as int32 without jax_enable_x64
    arguments = (apply_fn, tuple(input_shape), _Ignored(variables), train_flag, input_dtype)
    try:
        return _traced(*arguments)
    except TypeError:  # an unhashable model: trace it uncached
        return _traced.__wrapped__(*arguments)


def traced_outputs(apply_fn: Callable, variables: Any, input_shape: tuple, train_flag: str | None,
                   input_dtype="float32") -> tuple[str | None, tuple]:
    """`(final activation, output shape)` of the model on one example of `input_shape` (and `input_dtype`),
    in inference mode.

    The activation is "sigmoid" or "softmax" when the outputs come out of
    one (probabilities, not logits), else None.
    """
    closed = inference_jaxpr(apply_fn, variables, input_shape, train_flag, input_dtype)
    outputs = closed.jaxpr.outvars
    shape = tuple(closed.out_avals[0].shape) if closed.out_avals else ()
    if len(outputs) != 1:
        return None, shape
    return _final_activation(closed.jaxpr, outputs[0]), shape
