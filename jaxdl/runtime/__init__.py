"""Where jaxdl's programs run: the XLA options they compile with, the program cache, meshes and processes.

`compiler` (`jit`, the per-backend XLA options), `compilation_cache` (JAX's
persistent cache, on by default for every program jaxdl compiles, checked and
bounded), `program_cache` (compiled programs kept on disk for later processes,
with their traces: `jaxdl classify`'s), `sharding` (the `data` mesh and
how batches and variables are placed on it), `distributed` (joining a
multi-process run) and `inference` (the CPU inference engine: a batch in
chunks, over a CPU device per core). Nothing here imports the models or the
training code.
"""
from jaxdl.runtime import compilation_cache, compiler, distributed, inference, program_cache, sharding
from jaxdl.runtime.compiler import INFERENCE_CPU_OPTIONS, compiler_options, jit
from jaxdl.runtime.program_cache import UntrustedCacheError, cached_program, open_compilation_cache, program_key
from jaxdl.runtime.sharding import DATA_AXIS, data_mesh, put_batch, put_global_batch, put_replicated

__all__ = [
    "compilation_cache", "compiler", "distributed", "inference", "program_cache", "sharding",
    "INFERENCE_CPU_OPTIONS", "compiler_options", "jit",
    "UntrustedCacheError", "cached_program", "open_compilation_cache", "program_key",
    "DATA_AXIS", "data_mesh", "put_batch", "put_global_batch", "put_replicated",
]
