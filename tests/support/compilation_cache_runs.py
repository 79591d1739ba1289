"""jaxdl's on-disk compilation cache seen from new processes (tests/runtime/test_compilation_cache.py starts them).

    python -m tests.support.compilation_cache_runs write OUT.json   # train a small model: programs written
    python -m tests.support.compilation_cache_runs check OUT.json   # what a later process finds, case by case

Each prints what it saw as JSON to OUT.json. Both run with
`--xla_force_host_platform_device_count=2` (a sharding to vary) and
$JAXDL_CACHE set by the test; `check` starts with $JAXDL_COMPILATION_CACHE=0
(the switch), and turns the cache on once that case is seen. Compiles are
counted from JAX's own events: a look-up in the cache that finds nothing is
a compile.
"""
import json
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np

events = []
jax.monitoring.register_event_listener(lambda name, **kwargs: events.append(name))


def counts() -> dict:
    """Look-ups in the cache, hits, and compiles (look-ups that missed) since the last call."""
    requests = events.count("/jax/compilation_cache/compile_requests_use_cache")
    hits = events.count("/jax/compilation_cache/cache_hits")
    events.clear()
    return {"requests": requests, "hits": hits, "compiles": requests - hits}


def train() -> dict:
    """Two epochs of `fit` on a small MLP: its initialisation, epoch and evaluation programs."""
    from jaxdl import MLP, fit

    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    fit(MLP(features=(8,), num_outputs=2), x, y, loss="sparse_categorical_crossentropy", epochs=2, batch_size=16,
        verbose=0, validation_split=0.25)
    return counts()


def program(x, *, cpu_options=None):
    """A small program compiled by `jaxdl.runtime.compiler.jit`, as every jaxdl program is, afresh."""
    from jaxdl.runtime import compiler

    jax.clear_caches()  # JAX's in-memory caches: each call below goes to the persistent one
    compiler.jit(lambda v: jnp.sin(v) * 3, cpu_options=cpu_options)(x).block_until_ready()
    return counts()


def entries(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith("-cache"))


def check() -> dict:
    from jaxdl.runtime import compilation_cache

    seen = {}
    x = np.ones(5, np.float32)
    before = entries(compilation_cache.default_directory())
    seen["switched_off"] = program(x)  # written by the writers: a hit, were the cache on
    seen["switched_off"]["written"] = sorted(set(entries(compilation_cache.default_directory())) - set(before))
    os.environ.pop(compilation_cache.SWITCH)
    compilation_cache.ensure_enabled.cache_clear()
    directory = compilation_cache.ensure_enabled()
    seen["directory"] = str(directory)
    seen["fit_again"] = train()
    seen["same_program"] = program(x)
    # Each part of the key changed alone: a miss, compiled and written.
    seen["shape"] = program(np.ones(6, np.float32))
    seen["dtype"] = program(x.astype(np.float16))
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    seen["sharding"] = program(jax.device_put(np.ones(4, np.float32),
                                              jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))))
    seen["xla_option"] = program(x, cpu_options={"xla_cpu_prefer_vector_width": 128})

    # A damaged entry: found, removed with a warning, compiled again and written afresh.
    before = entries(directory)
    x = np.ones(10, np.float32)
    program(x)
    [entry] = sorted(set(entries(directory)) - set(before))
    for damage in ("corrupt", "truncated"):
        data = bytearray((directory / entry).read_bytes())
        if damage == "corrupt":
            data[len(data) // 2] ^= 0xFF
        else:
            del data[len(data) // 2:]
        (directory / entry).write_bytes(bytes(data))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            seen[damage] = program(x)
        seen[damage]["warnings"] = [str(w.message) for w in caught]
        seen[damage]["read_back"] = program(x)  # the entry written again is sound

    # The version of jax, which JAX's own key leaves out: another folder, so a miss.
    real_version, jax.__version__ = jax.__version__, "0.0.0+another"
    seen["jax_version_directory"] = str(compilation_cache.enable())
    seen["jax_version"] = program(x)
    jax.__version__ = real_version

    # The bound: a cache of 2.5 entries' size keeps the last two programs written.
    bounded = directory.parent / "bounded"
    size = os.path.getsize(directory / entry)
    compilation_cache.enable(bounded, max_bytes=int(size * 2.5))
    for length in (11, 12, 13):
        program(np.ones(length, np.float32))
    seen["bounded"] = {"entries": len(entries(bounded)), "bytes": sum(os.path.getsize(bounded / n)
                                                                     for n in entries(bounded)), "max": int(size * 2.5)}
    seen["bounded"]["newest_kept"] = program(np.ones(13, np.float32))["compiles"] == 0
    seen["bounded"]["oldest_evicted"] = program(np.ones(11, np.float32))["compiles"] == 1

    # A directory others can write in: refused with a warning, and the cache off.
    shared = directory.parent / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen["shared_directory"] = {"enabled": compilation_cache.enable(shared) is not None,
                                    "warnings": [str(w.message) for w in caught]}
    seen["shared_directory"].update(program(x), entries=entries(shared))
    return seen


if __name__ == "__main__":
    mode, out = sys.argv[1:3]
    result = {"devices": jax.device_count()}
    if mode == "write":
        result["fit"] = train()
        result["program"] = program(np.ones(5, np.float32))
    else:
        result.update(check())
    with open(out, "w") as file:
        json.dump(result, file)
