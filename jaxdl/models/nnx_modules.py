"""Flax NNX modules as jaxdl's steps call models: a pure `apply(variables, x, train=...)` over the module's graph.

An NNX module holds its own state. jaxdl's steps are pure functions of
`(state, batch)`, so a module is split once with Flax's functional API
(`nnx.split(module, wrt, ...)`): its graph (static, hashable) becomes the
state's `apply_fn`, its trained variables (`nnx.Param` unless `wrt` says
otherwise) the state's `params`, and everything else it carries (BatchNorm's
`nnx.BatchStat`, its `nnx.Rngs` keys and counts, a user's own
`nnx.Variable`s) the state's `batch_stats`, which training updates and
checkpoints save. Inside a compiled step the module is rebuilt with
`nnx.merge`, put in training or evaluation mode (`model.train()` /
`model.eval()`), called, and its carried variables read back with
`nnx.state`; at the end of `fit`, `nnx.update` writes the trained variables
into the user's module. Nothing here re-implements Flax: it is the pattern of
Flax's "functional API" guide, packaged as the `apply_fn` jaxdl's steps take.

Dropout draws from the module's own `nnx.Rngs` streams (whatever their
names): their keys and counts are carried variables, so a run is
reproducible from the seed the module was built with and a resumed run
continues their counts where the checkpoint left them.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from flax import nnx

# The keyword `NNXApply` takes for training mode: jaxdl's steps pass it as they pass a Linen module's flag.
NNX_TRAIN_FLAG = "train"


def nnx_train_flag(train_flag) -> str:
    """The train flag jaxdl passes an NNX module's `NNXApply`; any other than "auto" is refused by name."""
    if train_flag not in ("auto", NNX_TRAIN_FLAG):
        raise ValueError(f"train_flag={train_flag!r} with a Flax NNX module: jaxdl puts an NNX module in training "
                         "mode with model.train() and in evaluation mode with model.eval(); leave train_flag out")
    return NNX_TRAIN_FLAG


def nnx_param_filter(wrt):
    """The filter of the trained variables: `wrt`, or `nnx.Param` when None (as `nnx.Optimizer` defaults)."""
    return nnx.Param if wrt is None else wrt


def is_nnx_module(model) -> bool:
    """Whether `model` is an instance of a Flax NNX module."""
    return isinstance(model, nnx.Module)


@dataclasses.dataclass(frozen=True)
class NNXApply:
    """`apply(variables, x, train=False, mutable=False)`: an NNX module's graph as a Linen-style pure function.

    `variables` is `{"params": trained state, "batch_stats": carried state}`
    (the two parts of `nnx.split(module, wrt, ...)`). With `mutable` (a
    training step of a module that carries variables), returns
    `(outputs, {"batch_stats": carried state after the call})`, as a Linen
    module's `apply(..., mutable=["batch_stats"])` does. Equal graphs compare
    equal, so equal modules share compiled steps.

    Attributes:
      graphdef: the module's static graph (`nnx.GraphDef`).
      wrt: the filter of the variables trained (`nnx.Param` by default).
    """

    graphdef: Any
    wrt: Any = nnx.Param

    def module(self, variables) -> nnx.Module:
        """A module rebuilt from the graph and `variables` (`nnx.merge`).

        `copy=True`: inside a step, `variables` come from an outer trace (the
        scan over an epoch, the gradient), and Flax refuses to update a
        variable made at another trace level (`TraceContextError`, seen with
        BatchNorm's statistics); copies are made at this one.
        """
        return nnx.merge(self.graphdef, variables["params"], variables.get("batch_stats", nnx.State({})), copy=True)

    def __call__(self, variables, x, train: bool = False, rngs=None, mutable=False):
        del rngs  # an NNX module draws from its own nnx.Rngs streams, carried in `batch_stats`
        model = self.module(variables)
        if train:
            model.train()
        else:
            model.eval()
        outputs = model(x)
        if not mutable:
            return outputs
        return outputs, {"batch_stats": nnx.state(model, nnx.Not(self.wrt))}


def split_module(module: nnx.Module, wrt: Any = nnx.Param) -> tuple[NNXApply, Any, Any]:
    """`(apply, trained, carried)`: `module` split once (`nnx.split(module, wrt, ...)`).

    Args:
      module: an NNX module, initialised.
      wrt: which variables are trained, as `nnx.Optimizer(wrt=...)` takes it;
        `nnx.Param` by default.

    Returns:
      The module's `NNXApply`, its trained variables and its carried ones
      (every other variable: batch statistics, RNG keys and counts, a user's
      own `nnx.Variable`s).
    """
    _check_called_with_inputs_alone(module)
    graphdef, trained, carried = nnx.split(module, wrt, ...)
    return NNXApply(graphdef, wrt), trained, carried


def _check_called_with_inputs_alone(module: nnx.Module) -> None:
    """jaxdl calls an NNX module as `module(x)`: a `__call__` that requires more is refused by name, before
    anything is traced."""
    try:
        parameters = list(inspect.signature(type(module).__call__).parameters.values())[1:]
    except (TypeError, ValueError):  # no signature to read: let the call itself speak
        return
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    takes_input = any(p.kind in positional or p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)
    required = [p for p in parameters if p.default is inspect.Parameter.empty
                and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    if not takes_input or len(required) > 1:
        shown = ", ".join(str(p) for p in parameters) or "nothing"
        raise TypeError(f"{type(module).__name__}.__call__ takes ({shown}), but jaxdl calls an NNX module with the "
                        "batch's inputs alone, module(x): give the other arguments defaults, or wrap the module in "
                        "one whose __call__(self, x) supplies them")


def trained_module(state) -> nnx.Module:
    """A new NNX module holding a `TrainState`'s trained and carried variables (after `fit`, a loop of your
    own, `load_model` or a resume): the one way to get the trained NNX module back from a state.

    Args:
      state: a `TrainState` whose `apply_fn` is an `NNXApply` (built from an
        NNX module by `create_train_state` or `fit`).

    Returns:
      The module, in evaluation mode.

    Raises:
      TypeError: the state was not built from an NNX module.
    """
    apply = state.apply_fn
    if not isinstance(apply, NNXApply):
        raise TypeError(f"trained_module takes a state built from a Flax NNX module; this state's apply_fn is "
                        f"{apply!r:.80}")
    model = apply.module({"params": state.params, "batch_stats": state.batch_stats})
    model.eval()
    return model


def update_module(module: nnx.Module, state) -> None:
    """Writes a state's trained and carried variables into `module` in place (`nnx.update`), as
    `nnx.Optimizer.update` leaves an NNX user's module."""
    nnx.update(module, state.params, state.batch_stats)
