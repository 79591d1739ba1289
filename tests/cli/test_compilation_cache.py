"""JAX's persistent compilation cache under the `jaxdl` command: off for the whole process where refused, bounded
where used. Each case runs in a process of its own: JAX sets its cache up once per process, from its environment."""
import json
import os
import subprocess
import sys

from jaxdl.runtime import compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The command's set-up, then a small program compiled, as `jaxdl classify` compiles after `cli.main`'s set-up:
# one JSON line of what JAX's cache did. A request is a look-up in the cache, whether it finds the entry or not.
PROCESS = """
import json
import jax, jax.numpy as jnp, numpy as np
from jaxdl import cli

events = []
jax.monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
cli.enable_compilation_cache()
jax.jit(lambda x: jnp.sin(x) * 3).lower(np.ones(5, np.float32)).compile()
import os
directory = jax.config.jax_compilation_cache_dir
print(json.dumps({"requests": events.count("/jax/compilation_cache/compile_requests_use_cache"),
                  "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "directory": directory and os.path.realpath(directory),
                  "max_size": jax.config.jax_compilation_cache_max_size}))
"""


def run_command_setup(environment):
    """`(what JAX's cache did, stderr)` in a new process given `environment` on top of this one's."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    env.update(environment)
    done = subprocess.run([sys.executable, "-c", PROCESS], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def listing(directory):
    return sorted(path.name for path in directory.iterdir())


def test_a_refused_compilation_cache_is_neither_read_nor_written(tmp_path):
    """JAX reads JAX_COMPILATION_CACHE_DIR itself: before the fix, `enable_compilation_cache` printed that a
    directory others can write in "is not used", and JAX went on to look its programs up there and to write
    them there. Seen failing so: 1 request where 0 were expected, and the program's entry written into the
    mode-0777 directory. The JAX_PERSISTENT_CACHE_MIN_* variables say to write every program, as the command's
    own set-up does, so that a write would show."""
    directory = tmp_path / "chosen"
    directory.mkdir()
    directory.chmod(0o777)
    environment = {"JAX_COMPILATION_CACHE_DIR": str(directory), "JAXDL_CACHE": str(tmp_path / "jaxdl"),
                   "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    refused, stderr = run_command_setup(environment)
    assert f"jaxdl: {directory} is not used as a compilation cache" in stderr
    assert refused["requests"] == 0 and refused["hits"] == 0 and refused["directory"] is None
    assert listing(directory) == []


def test_jaxdls_own_compilation_cache_is_bounded(tmp_path, monkeypatch):
    """$JAXDL_CACHE/xla/TAG is kept under `compilation_cache.DEFAULT_MAX_BYTES` (JAX evicts the least recently used
    entries beyond it); before, JAX's default, -1 (no limit), was left (seen failing: max_size -1). An entry
    written before there was a bound (no NAME-atime beside it) is deleted, else JAX's eviction would fail on it
    and refuse every write with a warning on stderr (seen: "Error writing persistent compilation cache entry")."""
    monkeypatch.setenv("JAXDL_CACHE", str(tmp_path / "jaxdl"))
    directory = compilation_cache.default_directory()  # this jax's and CPU's folder, as in the process below
    directory.mkdir(parents=True, mode=0o700)
    unbounded = directory / "jit_old-0123-cache"
    unbounded.write_bytes(b"compiled without a bound")
    used, stderr = run_command_setup({"JAXDL_CACHE": str(tmp_path / "jaxdl")})
    assert stderr == "" and used["requests"] == 1
    assert used["max_size"] == compilation_cache.DEFAULT_MAX_BYTES > 0
    assert os.path.samefile(used["directory"], directory)
    written = listing(directory)
    assert not unbounded.exists()
    [entry] = [name for name in written if name.startswith("jit__lambda") and name.endswith("-cache")]
    assert entry.removesuffix("-cache") + "-atime" in written  # JAX's record of its last use, for eviction
