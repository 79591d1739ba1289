"""Compiled programs cached on disk: reused, rebuilt when unreadable or not trusted, evicted, keyed by their inputs."""
import hashlib
import os
import pickle
import stat
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdl import aot, cli, create_train_state, MLP, save_model
from jaxdl.checkpoint import fingerprint
from tests import tolerance

WEIGHTS = np.arange(6, dtype=np.float32).reshape(3, 2)


@pytest.fixture(autouse=True)
def weights_of_this_test(request, monkeypatch):
    """`forward`'s weights, different in each test, so that no test compiles a program that JAX's persistent
    compilation cache (shared by the suite's workers) already holds: such a program is not kept as an entry
    (see `test_a_program_jax_read_from_its_compilation_cache_is_not_cached_in_a_form_that_fails`)."""
    # 4096 offsets in steps of 2**-20 (2 float32 steps at the largest weight, 5), under 0.004 in all: tanh's
    # arguments stay where the one-op tolerance holds (offsets of up to 1 broke it: XLA's tanh gave 1.0
    # where numpy's gave 0.99999797)
    offset = (int(hashlib.sha256(request.node.nodeid.encode()).hexdigest(), 16) % 4096 + 1) / 2 ** 20
    monkeypatch.setattr(sys.modules[__name__], "WEIGHTS", WEIGHTS + np.float32(offset))


def forward(x):
    return jnp.tanh(x @ WEIGHTS)  # the weights become program constants


def must_not_trace(x):
    raise AssertionError("a cached program was traced again")


def test_cached_program_is_reused_and_a_damaged_entry_rebuilt(tmp_path):
    x = np.ones((4, 3), np.float32)
    expected = np.tanh(x @ WEIGHTS)
    first = aot.cached_program(forward, (x,), tmp_path, "k")
    tolerance.assert_close(first(x), expected, tolerance.ONE_OP)
    [entry] = tmp_path.glob("k.executable")
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    again = aot.cached_program(must_not_trace, (x,), tmp_path, "k")
    tolerance.assert_close(again(x), expected, tolerance.ONE_OP)
    entry.write_bytes(b"damaged")
    rebuilt = aot.cached_program(forward, (x,), tmp_path, "k")
    tolerance.assert_close(rebuilt(x), expected, tolerance.ONE_OP)
    assert entry.stat().st_size > 1000
    assert [path.name for path in tmp_path.iterdir()] == ["k.executable"]  # no temporary file left


def test_a_program_jax_read_from_its_compilation_cache_is_cached_in_a_form_that_runs(tmp_path):
    """`jaxdl classify` keeps JAX's persistent compilation cache as well. A program XLA had compiled before (its
    entry here evicted or damaged, or compiled by another process) comes back from that cache, and with jax
    0.10.2 such an executable serializes without its kernels' code: the entry written from it failed on every
    later call ("Function dot_general.1_kernel not found"). Seen failing (the suite's two workers share one
    compilation cache, so the first test above failed whenever the other worker had compiled its program
    first). Entries are now run once when written; one that fails is compiled again past JAX's cache, and
    that one is kept. Both steps failed here before their fixes: first the failing entry was kept, then it
    was deleted with a warning, in every process that met the program in JAX's cache."""
    from jax._src import compilation_cache

    assert compilation_cache.is_persistent_cache_enabled()  # conftest gives the session one
    weights = np.arange(12, dtype=np.float32).reshape(3, 4)  # a program no other test compiles

    def program(x):
        return jnp.sin(x @ weights)

    x = np.ones((5, 3), np.float32)
    expected = np.sin(x @ weights)
    tolerance.assert_close(aot.compiler.jit(program)(x), expected, tolerance.ONE_OP)  # now in JAX's cache
    jax.clear_caches()  # as in a new process: the next compile of it reads JAX's cache
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = aot.cached_program(program, (x,), tmp_path, "k")
        tolerance.assert_close(written(x), expected, tolerance.ONE_OP)
        read = aot.cached_program(program, (x,), tmp_path, "k")
        tolerance.assert_close(read(x), expected, tolerance.ONE_OP)
    # Kept, so the next process reads it (before, each process compiled, wrote, tried and deleted it again).
    assert [str(warning.message) for warning in caught if "not cached" in str(warning.message)] == []
    descriptor = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        kept = aot._load(descriptor, "k" + aot._SUFFIX, jax.tree.structure(((x,), {})))
    finally:
        os.close(descriptor)
    assert kept is not None
    tolerance.assert_close(kept(x), expected, tolerance.ONE_OP)


def test_cached_programs_run_on_their_own_devices_in_a_process_with_several(tmp_path):
    """With a CPU device per core (as `jaxdl classify` runs), a program read back from the cache runs on the
    devices it was compiled for: one, or both."""
    import json
    import subprocess
    import sys

    environment = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    done = subprocess.run([sys.executable, "-m", "tests.aot_two_devices", str(tmp_path)], capture_output=True,
                          text=True, env=environment, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"one device": {"same": True, "devices": 1},
                                                                "both devices": {"same": True, "devices": 2}}


class PlantMarker:
    """Unpickling this creates a directory: it stands for any code a crafted cache entry could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant_crafted_entry(directory, key, marker, x):
    """An entry in this cache's own format whose JAX payload runs `PlantMarker` when JAX unpickles it."""
    contents = aot._entry(pickle.dumps(PlantMarker(marker)), jax.tree.structure(((x,), {})), jax.tree.structure(0),
                          [jax.devices()[0].id])
    path = directory / f"{key}.executable"
    path.write_bytes(contents)
    path.chmod(0o600)
    return path


def test_a_crafted_entry_runs_code_when_trusted(tmp_path):
    """Why ownership and modes are checked: JAX's own loader unpickles the payload, whatever wraps it."""
    x = np.ones((4, 3), np.float32)
    plant_crafted_entry(tmp_path, "k", tmp_path / "marker", x)
    aot.cached_program(forward, (x,), tmp_path, "k")
    assert (tmp_path / "marker").exists()


class OwnedByAnotherUser:
    """A stat result as it would read had another user's uid been given the file (which needs root to do)."""

    def __init__(self, info):
        self._info = info

    @property
    def st_uid(self):
        return os.getuid() + 1

    def __getattr__(self, name):
        return getattr(self._info, name)


def give_away(path, monkeypatch):
    """`path` (this inode, not whatever later takes its name) reads as another user's through `os.stat`/`fstat`/`lstat`:
    the owner check is exercised for any user, not only root."""
    inode = path.lstat().st_dev, path.lstat().st_ino

    def disowning(real):
        def stat_as_given_away(*args, **kwargs):
            info = real(*args, **kwargs)
            return OwnedByAnotherUser(info) if (info.st_dev, info.st_ino) == inode else info
        return stat_as_given_away

    for name in ("stat", "fstat", "lstat"):
        monkeypatch.setattr(os, name, disowning(getattr(os, name)))


def link_elsewhere(path, monkeypatch):
    target = path.parent.parent / "elsewhere.executable"
    path.replace(target)
    path.symlink_to(target)


@pytest.mark.parametrize("make_untrusted", [
    lambda path, monkeypatch: path.chmod(0o620),
    lambda path, monkeypatch: path.chmod(0o606),
    give_away,
    link_elsewhere,
], ids=["group-writable", "other-writable", "not-owned", "symbolic-link"])
def test_an_untrusted_entry_is_never_loaded_but_rebuilt(tmp_path, monkeypatch, make_untrusted):
    """"not-owned" fakes the owner through the stat results (no root needed); with `_written_by_this_user`'s uid
    comparison removed it was seen failing (the crafted payload ran), as the other cases fail without their check."""
    directory = tmp_path / "programs"
    directory.mkdir(mode=0o700)
    x = np.ones((4, 3), np.float32)
    entry = plant_crafted_entry(directory, "k", tmp_path / "marker", x)
    make_untrusted(entry, monkeypatch)
    program = aot.cached_program(forward, (x,), directory, "k")
    tolerance.assert_close(program(x), np.tanh(x @ WEIGHTS), tolerance.ONE_OP)
    assert not (tmp_path / "marker").exists()
    info = entry.lstat()
    assert stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o600
    aot.cached_program(must_not_trace, (x,), directory, "k")  # the rebuilt entry is trusted: loaded, not traced


@pytest.mark.parametrize("mode", [0o770, 0o777, 0o1777, "not-owned"],
                         ids=["group-writable", "other-writable", "sticky", "not-owned"])
def test_a_directory_others_can_write_in_is_not_used(tmp_path, monkeypatch, mode):
    """"not-owned" is a private directory whose stat reads as another user's (faked, so no root is needed); with the
    uid comparison removed from `_open_private_directory` it was seen failing (the crafted payload ran)."""
    directory = tmp_path / "shared"
    directory.mkdir()
    x = np.ones((4, 3), np.float32)
    entry = plant_crafted_entry(directory, "k", tmp_path / "marker", x)
    planted = entry.read_bytes()
    if mode == "not-owned":
        directory.chmod(0o700)
        give_away(directory, monkeypatch)
    else:
        directory.chmod(mode)
    with pytest.warns(UserWarning, match="not used as a program cache"):
        program = aot.cached_program(forward, (x,), directory, "k")
    tolerance.assert_close(program(x), np.tanh(x @ WEIGHTS), tolerance.ONE_OP)
    assert not (tmp_path / "marker").exists()
    assert [path.name for path in directory.iterdir()] == ["k.executable"] and entry.read_bytes() == planted


def test_the_least_recently_used_entries_are_evicted_beyond_the_limit(tmp_path):
    def compile_for(key, rows):
        return aot.cached_program(forward, (np.ones((rows, 3), np.float32),), tmp_path, key)

    for rows, key in enumerate("abc", start=1):
        compile_for(key, rows)
    now = time.time()
    for age, key in zip((300, 200, 100), "abc"):  # "a" written first, "c" last
        os.utime(tmp_path / f"{key}.executable", (now - age, now - age))
    aot.cached_program(must_not_trace, (np.ones((1, 3), np.float32),), tmp_path, "a")  # "a" is now the latest used
    entry_bytes = (tmp_path / "a.executable").stat().st_size
    limit = int(2.5 * entry_bytes)  # room for two entries
    aot.cached_program(forward, (np.ones((4, 3), np.float32),), tmp_path, "d", max_bytes=limit)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.executable", "d.executable"]
    assert sum(path.stat().st_size for path in tmp_path.iterdir()) <= limit
    aot.cached_program(forward, (np.ones((5, 3), np.float32),), tmp_path, "e", max_bytes=1)
    assert [path.name for path in tmp_path.iterdir()] == ["e.executable"]  # the entry just written stays


def test_keys_change_with_the_inputs_they_name(tmp_path):
    assert aot.program_key("a", (1, 224, 224, 3)) == aot.program_key("a", (1, 224, 224, 3))
    assert aot.program_key("a", (1, 224, 224, 3)) != aot.program_key("a", (2, 224, 224, 3))
    model = MLP(features=(2,), num_outputs=2)
    state = create_train_state(model, optax.sgd(0.1), (3,), jax.random.key(0))
    save_model(tmp_path / "m", model, state.variables)
    before = fingerprint(tmp_path / "m")
    save_model(tmp_path / "m", model, state.variables, overwrite=True)
    assert fingerprint(tmp_path / "m") != before  # a re-saved model never reuses an old program


def add_to_environment(name):
    return lambda monkeypatch: monkeypatch.setenv(name, os.environ.get(name, "") + " --changed")


@pytest.mark.parametrize("change", [
    add_to_environment("XLA_FLAGS"),
    add_to_environment("LIBTPU_INIT_ARGS"),
    lambda monkeypatch: monkeypatch.setattr(aot, "_devices", lambda: ("TPU v4", jax.device_count())),
    lambda monkeypatch: monkeypatch.setattr(aot, "_devices", lambda: (jax.devices()[0].device_kind, 64)),
    lambda monkeypatch: monkeypatch.setattr(aot, "_processor", lambda: ["x86_64", "sse2"]),
    lambda monkeypatch: monkeypatch.setattr(jax, "default_backend", lambda: "gpu"),
    lambda monkeypatch: monkeypatch.setattr(jax, "__version__", "0.0.1"),
    lambda monkeypatch: monkeypatch.setattr(aot.jaxlib, "__version__", "0.0.1"),
], ids=["XLA_FLAGS", "LIBTPU_INIT_ARGS", "device-kind", "device-count", "processor", "backend", "jax", "jaxlib"])
def test_each_thing_a_program_depends_on_changes_the_key(monkeypatch, change):
    before = aot.program_key("model", (1, 224, 224, 3))
    change(monkeypatch)
    assert aot.program_key("model", (1, 224, 224, 3)) != before


CHANGED_OPTIONS = {"jax_enable_x64": lambda value: not value, "jax_threefry_partitionable": lambda value: not value,
                   "jax_default_matmul_precision": lambda value: "highest" if value != "highest" else "bfloat16",
                   "jax_default_prng_impl": lambda value: "rbg" if value != "rbg" else "threefry2x32"}


@pytest.mark.parametrize("option", aot._CONFIG_OPTIONS)
def test_each_jax_option_changes_the_key(option):
    before_value, before_key = getattr(jax.config, option), aot.program_key("model")
    jax.config.update(option, CHANGED_OPTIONS[option](before_value))
    try:
        assert aot.program_key("model") != before_key
    finally:
        jax.config.update(option, before_value)
    assert aot.program_key("model") == before_key


X86_CPUINFO = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2\nbugs\t\t: spectre_v1\n"
ARM_CPUINFO = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd atomics sve\nCPU part\t: 0xd0c\n"


def test_the_processor_is_named_by_its_features_or_else_by_its_host(monkeypatch):
    assert aot._processor_description(X86_CPUINFO)[1:] == ["fpu", "sse2", "avx2"]
    assert aot._processor_description(ARM_CPUINFO)[1:] == ["fp", "asimd", "atomics", "sve"]
    unknown = aot._processor_description("")  # macOS, or no /proc
    monkeypatch.setattr(aot.platform, "node", lambda: "another-host")
    assert aot._processor_description("") != unknown
    monkeypatch.setattr(aot.platform, "machine", lambda: "riscv64")
    assert aot._processor_description(X86_CPUINFO)[0] == "riscv64"


def enable_cli_cache(monkeypatch, cache):
    """`jaxdl`'s `enable_compilation_cache` for $JAXDL_CACHE=`cache`: the JAX options it set (recorded, not applied,
    so the session keeps its own cache) and the descriptor it left open for JAX, closed here."""
    monkeypatch.setenv("JAXDL_CACHE", str(cache))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)  # the test session's own cache
    options = {}
    monkeypatch.setattr(jax.config, "update", lambda name, value: options.__setitem__(name, value))
    cli.enable_compilation_cache()
    path = options.get("jax_compilation_cache_dir") or ""
    if path.startswith("/proc/self/fd/"):  # the checked directory, through its descriptor
        options["jax_compilation_cache_dir"] = os.readlink(path)
        os.close(int(path.rsplit("/", 1)[1]))
    return options


def make_cache(tmp_path, directory_mode, entry_mode):
    """$JAXDL_CACHE with an `xla` directory of `directory_mode` holding one entry of `entry_mode`."""
    directory = tmp_path / "cache" / "xla"
    directory.mkdir(parents=True)
    entry = directory / "jit_f-0123-cache"
    entry.write_bytes(b"compiled")
    entry.chmod(entry_mode)
    directory.chmod(directory_mode)
    return directory, entry


@pytest.mark.parametrize("directory_mode, entry_mode", [(None, None), (0o755, 0o644), (0o700, 0o666)],
                         ids=["created", "readable-by-all", "entries-out-of-reach"])
def test_the_cli_uses_a_private_compilation_cache(tmp_path, monkeypatch, capsys, directory_mode, entry_mode):
    """A new $JAXDL_CACHE/xla is made private; one that others can read but not write is used, as is one whose
    group-writable entries (umask 002) no one else can reach."""
    if directory_mode is None:
        directory = tmp_path / "cache" / "xla"
    else:
        directory, _ = make_cache(tmp_path, directory_mode, entry_mode)
    options = enable_cli_cache(monkeypatch, tmp_path / "cache")
    assert os.path.samefile(options["jax_compilation_cache_dir"], directory)
    assert options["jax_persistent_cache_min_compile_time_secs"] == 0.0
    assert stat.S_IMODE(directory.stat().st_mode) == (directory_mode or 0o700)
    assert capsys.readouterr().err == ""


def test_the_cli_uses_the_compilation_cache_jax_was_given_and_checks_it(tmp_path, monkeypatch, capsys):
    """JAX_COMPILATION_CACHE_DIR is the user's choice of JAX's cache: the CLI shares it, checked as its own."""
    chosen, _ = make_cache(tmp_path / "chosen", 0o700, 0o600)
    monkeypatch.setenv("JAXDL_CACHE", str(tmp_path / "cache"))
    options = {}
    monkeypatch.setattr(jax.config, "update", lambda name, value: options.__setitem__(name, value))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(chosen))
    cli.enable_compilation_cache()
    path = options["jax_compilation_cache_dir"]
    assert os.path.samefile(path, chosen) and not (tmp_path / "cache" / "xla").exists()
    if path.startswith("/proc/self/fd/"):
        os.close(int(path.rsplit("/", 1)[1]))
    assert "jax_persistent_cache_min_compile_time_secs" not in options  # the user's JAX options, not jaxdl's
    chosen.chmod(0o770)
    options.clear()
    cli.enable_compilation_cache()
    assert options == REFUSED and f"jaxdl: {chosen} is not used as a compilation cache" in capsys.readouterr().err


# The JAX options a refusal sets: JAX's persistent cache off for the process, whatever JAX_COMPILATION_CACHE_DIR says
# (`tests/test_compilation_cache.py` runs it in a process of its own).
REFUSED = {"jax_compilation_cache_dir": None, "jax_enable_compilation_cache": False}


def entry_linked_elsewhere(directory, entry, monkeypatch):
    entry.unlink()
    (directory.parent / "elsewhere").write_bytes(b"compiled")
    entry.symlink_to(directory.parent / "elsewhere")


@pytest.mark.parametrize("directory_mode, entry_mode, change, reason", [
    (0o770, 0o600, None, "writable by no one else; it is owned by uid {uid} with mode drwxrwx---"),
    (0o777, 0o600, None, "with mode drwxrwxrwx"),
    (0o1777, 0o600, None, "with mode drwxrwxrwt"),
    (0o700, 0o600, lambda directory, entry, monkeypatch: give_away(directory, monkeypatch),
     "it is owned by uid {other} with mode drwx------"),
    (0o750, 0o660, None, "its entry 'jit_f-0123-cache' must be a regular file owned by uid {uid} that no one else "
                         "can write; it is owned by uid {uid} with mode -rw-rw----"),
    (0o705, 0o602, None, "with mode -rw-----w-"),
    (0o700, 0o600, lambda directory, entry, monkeypatch: give_away(entry, monkeypatch),
     "it is owned by uid {other} with mode -rw-------"),
    (0o700, 0o600, entry_linked_elsewhere, "with mode l"),
], ids=["group-writable", "other-writable", "sticky", "not-owned", "entry-group-writable", "entry-other-writable",
        "entry-not-owned", "entry-symbolic-link"])
def test_the_cli_leaves_a_compilation_cache_others_could_write_off(tmp_path, monkeypatch, capsys, directory_mode,
                                                                     entry_mode, change, reason):
    """JAX's cache loads native code, so `jaxdl` checks it as `jaxdl.aot` checks its own (owners faked through the
    stat results, so any user runs every case): one line on stderr names the directory and why, and JAX's cache is
    turned off. Seen failing with the check taken out of `enable_compilation_cache` (the cache was enabled in every case),
    and with the entry loop taken out of `aot.open_compilation_cache` (the entry cases)."""
    directory, entry = make_cache(tmp_path, directory_mode, entry_mode)
    if change:
        change(directory, entry, monkeypatch)
    assert enable_cli_cache(monkeypatch, tmp_path / "cache") == REFUSED
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"jaxdl: {directory} is not used as a compilation cache: ")
    assert reason.format(uid=os.getuid(), other=os.getuid() + 1) in line


def test_an_entry_that_fails_again_when_compiled_past_jaxs_cache_is_not_kept(tmp_path, monkeypatch):
    """Where even the program compiled past JAX's cache fails read back, the entry is deleted and a warning says
    so; the program compiled in memory is returned and runs."""
    weights = np.arange(6, dtype=np.float32).reshape(2, 3)

    def program(x):
        return jnp.cos(x @ weights)

    past_cache = []
    compile_past = aot._compiled_past_jax_cache
    monkeypatch.setattr(aot, "_failure_when_read_back", lambda *args: "made to fail")
    monkeypatch.setattr(aot, "_compiled_past_jax_cache", lambda *args: past_cache.append(1) or compile_past(*args))
    x = np.ones((4, 2), np.float32)
    with pytest.warns(UserWarning, match="made to fail.*compiled past JAX's persistent compilation cache too"):
        compiled = aot.cached_program(program, (x,), tmp_path, "k")
    assert past_cache == [1]
    assert not (tmp_path / ("k" + aot._SUFFIX)).exists()
    tolerance.assert_close(compiled(x), np.cos(x @ weights), tolerance.ONE_OP)
