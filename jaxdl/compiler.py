"""The XLA options jaxdl compiles its programs with: chosen per backend, measured, and passed per program.

On XLA:CPU (jax 0.10.2) the option `xla_cpu_experimental_ynn_fusion_type`
sends dots, reductions and convolutions to YNNPACK by default. For
convolutions that is the slow choice here. These are train steps on an AMD EPYC
with 2 cores, Adam, the median of 5 rounds. With YNNPACK's convolutions,
keras.io's MNIST convnet at batch 128 took 34.6 ms and the CNN lesson's 64x64
network at batch 32 took 164 ms. With XLA's own (Eigen) convolutions they took
20.2 and 75.4 ms. So jaxdl's programs keep YNNPACK for dots and reductions
only. A program without a convolution compiles exactly as it does by default
(the MLP's train step gives the same optimized HLO).

The option is passed to each program jaxdl compiles (`jax.jit(...,
compiler_options=...)`), never to the whole process. So a user's own
`jax.jit`s are untouched, and an `XLA_FLAGS` that names the option wins.
No option is passed on GPU or TPU, and none where this jax's XLA does not
accept it (a newer jax may rename an experimental option): one small compile
finds that out, once per process.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import jax

YNN_FUSION_TYPE = "xla_cpu_experimental_ynn_fusion_type"
CPU_OPTIONS = {YNN_FUSION_TYPE: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options() -> dict | None:
    """The options jaxdl compiles with on this backend (see the module's docstring); None for XLA's defaults."""
    if jax.default_backend() != "cpu" or YNN_FUSION_TYPE in os.environ.get("XLA_FLAGS", ""):
        return None
    return dict(CPU_OPTIONS) if _accepted(tuple(CPU_OPTIONS.items())) else None


@functools.cache
def _accepted(options: tuple) -> bool:
    """Whether this jax's XLA compiles a program with `options` (a tuple of pairs)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(0.0).compile()
    except jax.errors.JaxRuntimeError:
        return False
    return True


class jit:  # noqa: N801 -- used as jax.jit is: a decorator or a call
    """`jax.jit(fun, **jit_kwargs)` compiled with `compiler_options()`.

    The options are read at the first use, not when the program is defined:
    a module-level program is defined before JAX has picked a backend.
    Called inside another `jax.jit` (a user's own loop around jaxdl's step),
    it is a plain nested `jax.jit`: JAX takes options at the top level only.
    Anything else (`lower`, `trace`, `_cache_size`) is the jitted function's.
    """

    def __init__(self, fun: Callable, **jit_kwargs):
        self._fun, self._jit_kwargs = fun, jit_kwargs
        functools.update_wrapper(self, fun)

    @functools.cached_property
    def _jitted(self):
        return jax.jit(self._fun, compiler_options=compiler_options(), **self._jit_kwargs)

    @functools.cached_property
    def _nested(self):
        return jax.jit(self._fun, **self._jit_kwargs)

    def __call__(self, *args, **kwargs):
        try:
            return self._jitted(*args, **kwargs)
        except ValueError as error:  # jax 0.10.2's pjit_staging_rule: options on a jit inside another
            if "compiler_options` can only be passed to top-level" not in str(error):
                raise
        return self._nested(*args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):  # copy, pickle and the like: not the jitted function's
            raise AttributeError(name)
        return getattr(self._jitted, name)
