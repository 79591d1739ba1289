"""Run in a fresh process with 2 CPU devices (`tests/runtime/test_program_cache.py`): cached programs on one device
and on both, written, then read back from the cache and run. Prints one JSON line of what each gave."""
import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 2)

import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxdl.runtime import program_cache as aot, sharding


def main(directory: str) -> None:
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    mesh = sharding.data_mesh()
    split = NamedSharding(mesh, PartitionSpec(sharding.DATA_AXIS))
    programs = {
        "one device": lambda x: jnp.tanh(x) * 2,
        "both devices": lambda x: jax.lax.with_sharding_constraint(jnp.tanh(x), split) * 2,
    }
    results = {}
    for name, fn in programs.items():
        written = np.asarray(aot.cached_program(fn, (x,), directory, name.replace(" ", "_"))(x))
        read = aot.cached_program(fn, (x,), directory, name.replace(" ", "_"))  # from the cache
        results[name] = {"same": bool(np.array_equal(np.asarray(read(x)), written)),
                         "devices": len(read(x).sharding.device_set)}
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
