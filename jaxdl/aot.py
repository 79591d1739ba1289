"""Compiled programs kept on disk, so that a new process skips tracing as well as compiling.

JAX's persistent compilation cache skips XLA's compile, but every process
still traces and lowers the Python model to compute the cache key: for
MobileNetV2 that is most of a warm start. Here the compiled executable
itself is serialized (`jax.experimental.serialize_executable`) under a key
naming everything it depends on, including the processor's features, since
the machine code is specific to them.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import platform
import tempfile
from pathlib import Path
from typing import Callable

import jax
from jax.experimental import serialize_executable


@functools.lru_cache(maxsize=1)
def _processor() -> str:
    try:
        flags = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")]
    except OSError:
        flags = []
    return platform.machine() + (flags[0] if flags else platform.processor())


def program_key(*parts) -> str:
    """A file-name-safe digest of everything a compiled program depends on."""
    text = json.dumps([jax.__version__, jax.default_backend(), _processor(), *map(str, parts)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cached_program(fn: Callable, example_args: tuple, directory: str | os.PathLike, key: str) -> Callable:
    """`fn` compiled for `example_args`' shapes: read from `directory/key` when there, written there when not.

    An unreadable entry (a partial write, another JAX) is compiled again and replaced.
    """
    path = Path(directory) / f"{key}.executable"
    if path.is_file():
        try:  # the file is this cache's own pickle (as serialize_executable's payload is too)
            payload, in_tree, out_tree = pickle.loads(path.read_bytes())
            if in_tree == jax.tree.structure((example_args, {})):
                return serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
        except Exception:  # noqa: BLE001 - any unreadable cache entry is rebuilt below
            pass
    compiled = jax.jit(fn).lower(*example_args).compile()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "wb") as file:
        file.write(pickle.dumps(serialize_executable.serialize(compiled)))
    os.replace(partial, path)
    return compiled
