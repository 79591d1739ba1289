"""Monte-Carlo dropout: predictions with dropout left on, many times over, as a mean and a spread.

`mc_predict(model, variables, x, n_samples, rng)` runs `n_samples` forward
passes of `model` on `x`, each with its own dropout masks, and returns the
per-output mean and standard deviation over them (Gal & Ghahramani, 2016:
the spread estimates the model's uncertainty about each prediction).

How dropout is switched on without switching BatchNorm to batch statistics:
the model is applied in inference mode (`train=False`), so BatchNorm uses its
running averages and nothing is mutated, and a Flax method interceptor
(`nn.intercept_methods`) turns every `nn.Dropout` call into Flax's own
dropout with `deterministic=False`, drawing its mask from the `"dropout"`
stream. Applying the model with `train=True` instead would normalise each
batch by its own statistics (and update them): predictions would then
depend on which other examples share the batch. The interceptor needs no
flag on the models, so it works for any Linen module built from
`nn.Dropout` (jaxdl's models, or your own),
whether the module sets `deterministic` when constructed or when called.

The samples are one compiled `jax.vmap` over `n_samples` keys (no Python loop
over samples), compiled once per model, input shape and sample count.
"""
from __future__ import annotations

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdl.models.contract import AUTO, flag_kwargs, resolve_train_flag
from jaxdl.models.nnx_modules import NNXApply, is_nnx_module, split_module
from jaxdl.runtime import compiler


def _dropout_always_on(next_fun, args, kwargs, context):
    """Interceptor: every `nn.Dropout.__call__` drops, whatever `deterministic` its module or caller says.

    The caller may pass `deterministic` by keyword or by position
    (`nn.Dropout(0.5)(x, not train)`), and `rng` after it.
    """
    module = context.module
    if not isinstance(module, nn.Dropout) or context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    inputs, *positional = args
    if positional:  # Dropout.__call__(inputs, deterministic=None, rng=None): name what came by position
        kwargs = {**dict(zip(("deterministic", "rng"), positional)), **kwargs}
    if module.deterministic is False and not kwargs.get("deterministic"):
        return next_fun(inputs, **kwargs)  # drops already (this is also the copy made below, called)
    kwargs = {key: value for key, value in kwargs.items() if key != "deterministic"}
    if kwargs.get("rng") is None:
        kwargs["rng"] = module.make_rng(module.rng_collection)
    # Flax's own dropout, as an unbound copy told to drop: the same mask, scaling and rate-0/1 cases.
    return module.clone(parent=None, deterministic=False).apply({}, inputs, **kwargs)


def _dropout_rates(model, variables, example_shape, dtype, train_flag) -> tuple[list[float], int]:
    """The rate of every `nn.Dropout` call of one forward pass, and the outputs per example (nothing computed)."""
    rates = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
            rates.append(float(context.module.rate))
        return next_fun(*args, **kwargs)

    def forward(variables, x):
        with nn.intercept_methods(record):
            return model.apply(variables, x, **flag_kwargs(train_flag, False))

    outputs = jax.eval_shape(forward, variables, jax.ShapeDtypeStruct((1, *example_shape), dtype))
    return rates, int(outputs.shape[-1]) if outputs.ndim else 1


def _moments(model, variables, x, rng, n_samples: int, train_flag: str | None, output: str):
    """`(mean, std)` over `n_samples` dropout passes on one batch `x`: one vmap, one program.

    `output` "logits" keeps the model's outputs; "softmax"/"sigmoid" turns each pass into probabilities first.
    """
    def one_pass(key):
        with nn.intercept_methods(_dropout_always_on):
            outputs = model.apply(variables, x, rngs={"dropout": key}, **flag_kwargs(train_flag, False))
        return _as_output(outputs, output)

    return _sample_moments(jax.vmap(one_pass)(jax.random.split(rng, n_samples)))


def _as_output(outputs, output: str):
    """One pass's outputs in float32, as "logits" (kept), or turned into "softmax"/"sigmoid" probabilities."""
    outputs = outputs.astype(jnp.float32)
    return {"softmax": jax.nn.softmax, "sigmoid": jax.nn.sigmoid}.get(output, lambda o: o)(outputs)


def _sample_moments(samples):
    """`(mean, std)` over the first axis, around the first sample (the shifted-data algorithm): no cancellation
    between two large sums, and samples that are all equal (no dropout, or rate 0) give a spread of exactly 0."""
    shifted = samples - samples[0]
    mean_shift = shifted.mean(axis=0)
    variance = jnp.maximum((shifted ** 2).mean(axis=0) - mean_shift ** 2, 0.0)
    return samples[0] + mean_shift, jnp.sqrt(variance)


# Compiled once per model (hashable: jaxdl's models are), input shape and sample count.
_mc_moments = compiler.jit(_moments, static_argnames=("model", "n_samples", "train_flag", "output"))


def _sampler(model):
    """`_mc_moments`, or for a model with unhashable fields (lists, dicts) a program compiled for this call."""
    try:
        hash(model)
        return _mc_moments
    except TypeError:
        return compiler.jit(functools.partial(_moments, model),
                            static_argnames=("n_samples", "train_flag", "output"))


def _nnx_dropping(apply: NNXApply, variables, key):
    """An NNX module rebuilt in evaluation mode but with every `nnx.Dropout` dropping, its random streams drawn
    from `key` (one stream each), so a pass depends on `key` alone."""
    module = apply.module(variables)
    module.eval()
    streams = 0
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Dropout):
            node.deterministic = False
        elif isinstance(node, nnx.RngStream):
            node.key[...] = jax.random.fold_in(key, streams)
            node.count[...] = jnp.zeros_like(node.count[...])
            streams += 1
    return module


def _nnx_dropout_rates(apply: NNXApply, variables, example_shape, dtype) -> tuple[list[float], int, str]:
    """The rate of every `nnx.Dropout` of an NNX module, its outputs per example (nothing computed), and its
    class's name."""
    module = apply.module(variables)
    rates = [float(node.rate) for _, node in nnx.iter_graph(module) if isinstance(node, nnx.Dropout)]
    outputs = jax.eval_shape(lambda v, x: apply(v, x, train=False), variables,
                             jax.ShapeDtypeStruct((1, *example_shape), dtype))
    return rates, int(outputs.shape[-1]) if outputs.ndim else 1, type(module).__name__


def _nnx_moments(apply: NNXApply, variables, x, rng, n_samples: int, output: str):
    """`_moments` for an NNX module: each pass its own dropping copy (`_nnx_dropping`), one vmap."""
    def one_pass(key):
        return _as_output(_nnx_dropping(apply, variables, key)(x), output)

    return _sample_moments(jax.vmap(one_pass)(jax.random.split(rng, n_samples)))


# Compiled once per module graph (hashable), input shape and sample count.
_nnx_mc_moments = compiler.jit(_nnx_moments, static_argnames=("apply", "n_samples", "output"))


_CLASSIFIER_OUTPUTS = {"sparse_categorical_crossentropy": "softmax", "categorical_crossentropy": "softmax",
                       "binary_crossentropy": "sigmoid"}


def _output_kind(loss, probabilities: bool | None, num_outputs: int) -> str:
    """"logits", "softmax" or "sigmoid": what each Monte-Carlo pass returns before the moments are taken."""
    if probabilities is None:
        return _CLASSIFIER_OUTPUTS.get(loss, "logits") if isinstance(loss, str) else "logits"
    if not probabilities:
        return "logits"
    if isinstance(loss, str) and loss in _CLASSIFIER_OUTPUTS:
        return _CLASSIFIER_OUTPUTS[loss]
    return "sigmoid" if num_outputs == 1 else "softmax"


def mc_predict(model: nn.Module | None, variables, x, n_samples: int, rng, *, batch_size: int | None = None,
               train_flag: str | None = AUTO, loss=None,
               probabilities: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of `n_samples` predictions of `model` on `x` with dropout on.

    Monte-Carlo dropout (Gal & Ghahramani): the model runs `n_samples` times
    in inference mode with every `nn.Dropout` switched on, BatchNorm staying
    on its running averages (see the module docstring), and the spread of the passes
    estimates the model's uncertainty. For a classifier it averages
    *probabilities*, so with a classification `loss` each pass is turned into
    probabilities before the mean and spread are taken; without one, the raw
    outputs (logits, or a regression's values) are averaged. The same key
    gives the same masks, so the result is reproducible.

    Args:
      model: the Flax Linen module; None when `variables` is a `TrainState`
        built by `create_train_state` (its own model is used).
      variables: the model's variables (e.g. `state.variables`), or a whole
        `TrainState`, whose variables are used.
      x: a batch of inputs, shape `(N, ...)`.
      n_samples: the number of dropout passes, a positive integer.
      rng: a JAX key, or an int seed.
      batch_size: split `x` into batches of that many inputs (the last one
        padded), all run by one compiled program, for inputs whose
        `n_samples` copies of activations would not fit in memory at once;
        batch `i` draws its masks from `fold_in(rng, i)`. None (default) runs
        `x` at once.
      train_flag: the model's training keyword, passed False (dropout is
        switched on by a method interceptor); "auto" (default) reads it
        from the model's `__call__` (see `jaxdl.models.contract`).
      loss: the loss name given to `fit`: sparse/categorical cross-entropy
        averages softmax probabilities, binary cross-entropy sigmoid ones;
        None (default) averages the raw outputs.
      probabilities: True or False overrides what `loss` chose; None
        (default) follows `loss`.

    Returns:
      `(mean, std)`: two numpy arrays of the model's output shape,
      `(N, outputs)`; the standard deviation is the population one (over the
      samples, ddof 0). A model without any `nn.Dropout` of a rate above 0
      gets a warning: every sample is then the same prediction, and the
      standard deviation is exactly 0.

    Raises:
      ValueError: if no Linen module is given or found in the state; if
        `n_samples` or `batch_size` is not a positive integer; if `x` is not a
        non-empty batch `(N, ...)`; if the train flag cannot be read from the
        model.
    """
    nnx_apply = None
    if hasattr(variables, "apply_fn") and hasattr(variables, "params"):  # a TrainState
        state = variables
        if isinstance(state.apply_fn, NNXApply):
            nnx_apply = state.apply_fn
        model = model if model is not None else getattr(state.apply_fn, "__self__", None)
        variables = state.variables
    if is_nnx_module(model):  # an NNX module holds its variables
        nnx_apply, trained, carried = split_module(model)
        variables = {"params": trained, "batch_stats": carried}
    if nnx_apply is None and not isinstance(model, nn.Module):
        raise ValueError(f"mc_predict needs the Linen module (got {type(model).__name__}); pass it, or a "
                         "TrainState built by create_train_state, whose apply_fn is its module's")
    train_flag = None if nnx_apply is not None else resolve_train_flag(model, train_flag)
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if isinstance(rng, (int, np.integer)):
        rng = jax.random.key(int(rng))
    x = jnp.asarray(x)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch of inputs, shape (N, ...); got shape {tuple(x.shape)}")
    if nnx_apply is not None:
        rates, num_outputs, name = _nnx_dropout_rates(nnx_apply, variables, x.shape[1:], x.dtype)
        layer = "nnx.Dropout"
    else:
        rates, num_outputs = _dropout_rates(model, variables, x.shape[1:], x.dtype, train_flag)
        name, layer = type(model).__name__, "nn.Dropout"
    if not any(rates):
        warnings.warn(f"{name} has no {layer} layer with a rate above 0: every Monte-Carlo "
                      "sample is the same prediction, and the standard deviation is 0 (give the model dropout, "
                      "e.g. MLP(..., dropout_rate=0.2))", UserWarning, stacklevel=2)
    output = _output_kind(loss, probabilities, num_outputs)
    if nnx_apply is not None:
        moments = functools.partial(_nnx_mc_moments, nnx_apply, n_samples=int(n_samples), output=output)
    else:
        sampler = _sampler(model)
        moments = functools.partial(sampler, model) if sampler is _mc_moments else sampler
        moments = functools.partial(moments, n_samples=int(n_samples), train_flag=train_flag, output=output)
    if batch_size is None or batch_size >= x.shape[0]:
        mean, std = moments(variables, x, rng)
        return np.asarray(mean), np.asarray(std)
    means, stds = [], []
    for index, start in enumerate(range(0, x.shape[0], batch_size)):
        rows = x[start:start + batch_size]
        real = rows.shape[0]
        if real < batch_size:  # pad to one shape: one compiled program for every batch
            rows = jnp.concatenate([rows, jnp.zeros((batch_size - real, *rows.shape[1:]), rows.dtype)])
        mean, std = moments(variables, rows, jax.random.fold_in(rng, index))
        means.append(np.asarray(mean)[:real])
        stds.append(np.asarray(std)[:real])
    return np.concatenate(means), np.concatenate(stds)
