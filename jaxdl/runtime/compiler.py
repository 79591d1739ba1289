"""The XLA options jaxdl compiles its programs with: chosen per backend, measured, and passed per program.

On XLA:CPU (jax 0.10.2) the option `xla_cpu_experimental_ynn_fusion_type`
sends dots, reductions and convolutions to YNNPACK by default. For
convolutions that is the slow choice in training, so jaxdl's programs keep
YNNPACK for dots and reductions only (the figures:
docs/numerics.md#compiler-options-on-cpu). A program without a convolution
compiles exactly as it does by default (the MLP's train step gives the same
optimized HLO).

The option is passed to each program jaxdl compiles (`jax.jit(...,
compiler_options=...)`), never to the whole process. So a user's own
`jax.jit`s are untouched, and an `XLA_FLAGS` that names the option wins.
No option is passed on GPU or TPU, and none where this jax's XLA does not
accept it (a newer jax may rename an experimental option): one small compile
finds that out, once per process.

Inference programs (`jaxdl.runtime.inference.predict_in_chunks`, the
programs `jaxdl classify` caches) take `INFERENCE_CPU_OPTIONS` instead.
MobileNetV2's CPU forward pass is nothing but dots and elementwise loops, its
dots small (one or two images at a time), and it ran faster (same machine,
docs/numerics.md#compiler-options-on-cpu) with:
- YNNPACK for reductions only, so that the dots are XLA's own. Outputs differ
  in the last bits only (a dot's sums in another order).
- 512-bit vectors in XLA's own loops (`xla_cpu_prefer_vector_width`; LLVM's
  default on that CPU is 256); bitwise the same outputs. A CPU without
  AVX-512 has no such vectors and compiles as before.
An option that XLA_FLAGS names is left to XLA_FLAGS.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import jax

YNN_FUSION_TYPE = "xla_cpu_experimental_ynn_fusion_type"
CPU_OPTIONS = {YNN_FUSION_TYPE: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
INFERENCE_CPU_OPTIONS = {YNN_FUSION_TYPE: "LIBRARY_FUSION_TYPE_REDUCE", "xla_cpu_prefer_vector_width": 512}


def compiler_options(cpu_options: dict | None = None) -> dict | None:
    """The options jaxdl compiles with on this backend: `cpu_options` (`CPU_OPTIONS` when None) on XLA:CPU,
    less any that XLA_FLAGS names (see the module's docstring); None for XLA's defaults."""
    cpu_options = CPU_OPTIONS if cpu_options is None else cpu_options
    if jax.default_backend() != "cpu":
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    options = {name: value for name, value in cpu_options.items() if name not in flags}
    return options if options and _accepted(tuple(options.items())) else None


@functools.cache
def _accepted(options: tuple) -> bool:
    """Whether this jax's XLA compiles a program with `options` (a tuple of pairs)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(0.0).compile()
    except jax.errors.JaxRuntimeError:
        return False
    return True


class jit:  # noqa: N801 -- used as jax.jit is: a decorator or a call
    """`jax.jit(fun, **jit_kwargs)` compiled with `compiler_options(cpu_options)`.

    The options are read at the first use, not when the program is defined:
    a module-level program is defined before JAX has picked a backend.
    Called inside another `jax.jit` (a user's own loop around jaxdl's step),
    it is a plain nested `jax.jit`: JAX takes options at the top level only.
    Anything else (`lower`, `trace`, `_cache_size`) is the jitted function's.
    """

    def __init__(self, fun: Callable, *, cpu_options: dict | None = None, **jit_kwargs):
        self._fun, self._cpu_options, self._jit_kwargs = fun, cpu_options, jit_kwargs
        functools.update_wrapper(self, fun)

    @functools.cached_property
    def _jitted(self):
        from jaxdl.runtime import compilation_cache  # it imports program_cache, which imports this module

        compilation_cache.ensure_enabled()  # once per process: every jaxdl program is kept on disk
        return jax.jit(self._fun, compiler_options=compiler_options(self._cpu_options), **self._jit_kwargs)

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
