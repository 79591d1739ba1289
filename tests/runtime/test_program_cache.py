"""Compiled programs cached on disk: reused, rebuilt when unreadable or not trusted, evicted, keyed by their inputs."""
import hashlib
import os
import pickle
import stat
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdl import MLP, cli, create_train_state, save_model
from jaxdl.models.saving import fingerprint
from jaxdl.runtime import compilation_cache, program_cache as aot
from tests.support import tolerance

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


def read_back(fn, x, directory, monkeypatch, key="k"):
    """`aot.cached_program(fn, (x,), directory, key)`, failing if it compiles: the program must come from its entry."""
    def must_not_compile(*args, **kwargs):
        raise AssertionError("a cached program was compiled again")

    with monkeypatch.context() as patch:
        patch.setattr(jax.stages.Lowered, "compile", must_not_compile)
        return aot.cached_program(fn, (x,), directory, key)


def test_cached_program_is_reused_and_a_damaged_entry_rebuilt(tmp_path, monkeypatch):
    x = np.ones((4, 3), np.float32)
    expected = np.tanh(x @ WEIGHTS)
    first = aot.cached_program(forward, (x,), tmp_path, "k")
    tolerance.assert_close(first(x), expected, tolerance.ONE_OP)
    [entry] = tmp_path.glob("*" + aot._SUFFIX)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    again = read_back(forward, x, tmp_path, monkeypatch)
    tolerance.assert_close(again(x), expected, tolerance.ONE_OP)
    entry.write_bytes(b"damaged")
    rebuilt = aot.cached_program(forward, (x,), tmp_path, "k")
    tolerance.assert_close(rebuilt(x), expected, tolerance.ONE_OP)
    assert entry.stat().st_size > 1000
    assert [path.name for path in tmp_path.iterdir()] == [entry.name]  # no temporary file left


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
        [entry] = tmp_path.glob("*" + aot._SUFFIX)
        kept = aot._load(descriptor, entry.name, jax.tree.structure(((x,), {})), aot._signature(
            jax.jit(program).lower(x), (x,)))
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
    done = subprocess.run([sys.executable, "-m", "tests.support.aot_two_devices", str(tmp_path)], capture_output=True,
                          text=True, env=environment, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"one device": {"same": True, "devices": 1},
                                                                "both devices": {"same": True, "devices": 2}}


class PlantMarker:
    """Unpickling this creates a directory: it stands for any code a crafted cache entry could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant_crafted_entry(directory, marker, x):
    """An entry under the name `aot.cached_program(forward, (x,), directory, "k")` looks up, in this cache's own
    format (the header of a genuine entry, written in a scratch directory), whose JAX payload runs `PlantMarker`
    when JAX unpickles it."""
    scratch = directory.parent / f"{directory.name}-scratch"
    aot.cached_program(forward, (x,), scratch, "k")
    [genuine] = scratch.glob("*" + aot._SUFFIX)
    header = genuine.read_bytes().partition(b"\n")[0]
    path = directory / genuine.name
    path.write_bytes(header + b"\n" + pickle.dumps(PlantMarker(marker)))
    path.chmod(0o600)
    return path


def test_a_crafted_entry_runs_code_when_trusted(tmp_path):
    """Why ownership and modes are checked: JAX's own loader unpickles the payload, whatever wraps it."""
    x = np.ones((4, 3), np.float32)
    directory = tmp_path / "programs"
    directory.mkdir(mode=0o700)
    plant_crafted_entry(directory, tmp_path / "marker", x)
    aot.cached_program(forward, (x,), directory, "k")
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
    entry = plant_crafted_entry(directory, tmp_path / "marker", x)
    make_untrusted(entry, monkeypatch)
    program = aot.cached_program(forward, (x,), directory, "k")
    tolerance.assert_close(program(x), np.tanh(x @ WEIGHTS), tolerance.ONE_OP)
    assert not (tmp_path / "marker").exists()
    info = entry.lstat()
    assert stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o600
    read_back(forward, x, directory, monkeypatch)  # the rebuilt entry is trusted: loaded, not compiled


@pytest.mark.parametrize("mode", [0o770, 0o777, 0o1777, "not-owned"],
                         ids=["group-writable", "other-writable", "sticky", "not-owned"])
def test_a_directory_others_can_write_in_is_not_used(tmp_path, monkeypatch, mode):
    """"not-owned" is a private directory whose stat reads as another user's (faked, so no root is needed); with the
    uid comparison removed from `_open_private_directory` it was seen failing (the crafted payload ran)."""
    directory = tmp_path / "shared"
    directory.mkdir()
    x = np.ones((4, 3), np.float32)
    entry = plant_crafted_entry(directory, tmp_path / "marker", x)
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
    assert [path.name for path in directory.iterdir()] == [entry.name] and entry.read_bytes() == planted


def test_the_least_recently_used_entries_are_evicted_beyond_the_limit(tmp_path, monkeypatch):
    def compile_for(rows, **options):
        """The name of the entry written for `rows` rows."""
        before = set(tmp_path.iterdir())
        aot.cached_program(forward, (np.ones((rows, 3), np.float32),), tmp_path, "k", **options)
        [entry] = set(tmp_path.iterdir()) - before
        return entry.name

    a, b, c = (compile_for(rows) for rows in (1, 2, 3))
    now = time.time()
    for age, name in zip((300, 200, 100), (a, b, c)):  # "a" written first, "c" last
        os.utime(tmp_path / name, (now - age, now - age))
    read_back(forward, np.ones((1, 3), np.float32), tmp_path, monkeypatch)  # "a" is now the latest used
    entry_bytes = (tmp_path / a).stat().st_size
    limit = int(2.5 * entry_bytes)  # room for two entries
    d = compile_for(4, max_bytes=limit)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([a, d])
    assert sum(path.stat().st_size for path in tmp_path.iterdir()) <= limit
    e = compile_for(5, max_bytes=1)
    assert [path.name for path in tmp_path.iterdir()] == [e]  # the entry just written stays


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
    lambda monkeypatch: monkeypatch.setattr(aot, "processor_description", lambda: ["x86_64", "sse2"]),
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
    monkeypatch.setattr(compilation_cache, "_install", lambda cache: options.__setitem__("installed", cache))
    cli.enable_compilation_cache()
    path = options.get("jax_compilation_cache_dir") or ""
    if path.startswith("/proc/self/fd/"):  # the checked directory, through its descriptor
        options["jax_compilation_cache_dir"] = os.readlink(path)
        os.close(int(path.rsplit("/", 1)[1]))
    return options


def cli_cache_directory(cache):
    """The folder of $JAXDL_CACHE=`cache` the CLI keeps its programs in (`compilation_cache.default_directory`)."""
    return cache / "xla" / compilation_cache.default_directory().name


def make_cache(tmp_path, directory_mode, entry_mode):
    """$JAXDL_CACHE with the compilation cache's directory of `directory_mode` holding one entry of `entry_mode`."""
    directory = cli_cache_directory(tmp_path / "cache")
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
        directory = cli_cache_directory(tmp_path / "cache")
    else:
        directory, _ = make_cache(tmp_path, directory_mode, entry_mode)
    options = enable_cli_cache(monkeypatch, tmp_path / "cache")
    assert os.path.samefile(options["jax_compilation_cache_dir"], directory)
    assert options["jax_persistent_cache_min_compile_time_secs"] == 0.0
    assert isinstance(options["installed"], compilation_cache.VerifiedCache)  # entries checked when read back
    assert stat.S_IMODE(directory.stat().st_mode) == (directory_mode or 0o700)
    assert capsys.readouterr().err == ""


def test_the_cli_uses_the_compilation_cache_jax_was_given_and_checks_it(tmp_path, monkeypatch, capsys):
    """JAX_COMPILATION_CACHE_DIR is the user's choice of JAX's cache: the CLI shares it, checked as its own."""
    chosen, _ = make_cache(tmp_path / "chosen", 0o700, 0o600)
    monkeypatch.setenv("JAXDL_CACHE", str(tmp_path / "cache"))
    options = {}
    monkeypatch.setattr(jax.config, "update", lambda name, value: options.__setitem__(name, value))
    monkeypatch.setattr(compilation_cache, "_install", lambda cache: options.__setitem__("installed", cache))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(chosen))
    cli.enable_compilation_cache()
    path = options["jax_compilation_cache_dir"]
    assert os.path.samefile(path, chosen) and not (tmp_path / "cache" / "xla").exists()
    assert "installed" not in options  # JAX's own cache reads the user's directory: its entries are JAX's format
    if path.startswith("/proc/self/fd/"):
        os.close(int(path.rsplit("/", 1)[1]))
    assert "jax_persistent_cache_min_compile_time_secs" not in options  # the user's JAX options, not jaxdl's
    chosen.chmod(0o770)
    options.clear()
    cli.enable_compilation_cache()
    assert options == REFUSED and f"jaxdl: {chosen} is not used as a compilation cache" in capsys.readouterr().err


# The JAX options a refusal sets: JAX's persistent cache off for the process, whatever JAX_COMPILATION_CACHE_DIR says
# (`tests/cli/test_compilation_cache.py` runs it in a process of its own).
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
    """JAX's cache loads native code, so `jaxdl` checks it as `jaxdl.runtime.program_cache` checks its own (owners faked
    through the stat results, so any user runs every case): one line on stderr names the directory and why, and JAX's
    cache is turned off. Seen failing with the check taken out of `enable_compilation_cache` (the cache was enabled in
    every case), and with the entry loop taken out of `aot.open_compilation_cache` (the entry cases)."""
    directory, entry = make_cache(tmp_path, directory_mode, entry_mode)
    if change:
        change(directory, entry, monkeypatch)
    assert enable_cli_cache(monkeypatch, tmp_path / "cache") == REFUSED
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"jaxdl: {directory} is not used as a compilation cache: ")
    assert reason.format(uid=os.getuid(), other=os.getuid() + 1) in line


def entries_named(directory, name):
    """The names in `directory` that are not temporary files (a leading dot) and start with `name`."""
    return sorted(path.name for path in directory.iterdir() if path.name.startswith(name) and path.name[0] != ".")


def test_an_entry_that_fails_again_when_compiled_past_jaxs_cache_is_not_kept(tmp_path, monkeypatch):
    """Where even the program compiled past JAX's cache fails read back, the entry is deleted and a warning says
    so; the program compiled in memory is returned and runs. The entry's name never appears, so no reader meets
    it (before, it was renamed into place, then tried: seen failing with the name there at both tries). The
    compile past JAX's cache writes nothing there: under an option's value drawn for it, that entry would never
    be read (before, it wrote one: seen failing, 1 entry where 0 were expected)."""
    from jax._src import compilation_cache

    weights = np.arange(6, dtype=np.float32).reshape(2, 3)

    def cos_past_jax_cache(x):  # a name no other program has, to find its entries in JAX's cache
        return jnp.cos(x @ weights)

    jax_cache = jax.config.jax_compilation_cache_dir
    assert compilation_cache.is_persistent_cache_enabled()  # conftest gives the session one
    # every program written to JAX's cache, however quick its compile (conftest's setting, made sure of here)
    min_compile_time = jax.config.jax_persistent_cache_min_compile_time_secs
    past_cache, tried = [], []
    compile_past = aot._compiled_past_jax_cache

    def counting_entries(*args):
        before = entries_named(Path(jax_cache), "jit_cos_past_jax_cache")
        compiled = compile_past(*args)
        past_cache.append(len(entries_named(Path(jax_cache), "jit_cos_past_jax_cache")) - len(before))
        return compiled

    def failing(directory_fd, name, *args):
        tried.append(entries_named(tmp_path, ""))
        return "made to fail"

    monkeypatch.setattr(aot, "_failure_when_read_back", failing)
    monkeypatch.setattr(aot, "_compiled_past_jax_cache", counting_entries)
    x = np.ones((4, 2), np.float32)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        with pytest.warns(UserWarning, match="made to fail.*compiled past JAX's persistent compilation cache too"):
            compiled = aot.cached_program(cos_past_jax_cache, (x,), tmp_path, "k")
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time)
    assert past_cache == [0]
    assert tried == [[], []] and entries_named(tmp_path, "") == []
    tolerance.assert_close(compiled(x), np.cos(x @ weights), tolerance.ONE_OP)


def test_an_entry_takes_its_name_only_once_it_has_run(tmp_path, monkeypatch):
    """A reader finds an entry only once its writer has run it: the entry is tried under a temporary name, then
    renamed. Before, it was renamed into place first, and a process started meanwhile could load an entry about
    to fail and be deleted (`NOT_FOUND: Function dot_general.1_kernel not found`). Seen failing: the final name
    was there while the entry was tried."""
    tried, try_entry = [], aot._failure_when_read_back

    def watching(directory_fd, name, *args):
        tried.append((name.startswith("."), entries_named(tmp_path, "")))
        return try_entry(directory_fd, name, *args)

    monkeypatch.setattr(aot, "_failure_when_read_back", watching)
    x = np.ones((4, 3), np.float32)
    program = aot.cached_program(forward, (x,), tmp_path, "k")
    tolerance.assert_close(program(x), np.tanh(x @ WEIGHTS), tolerance.ONE_OP)
    assert tried == [(True, [])]
    assert len(entries_named(tmp_path, "")) == 1 and not [path for path in tmp_path.iterdir() if path.name[0] == "."]


def test_programs_of_different_code_under_the_same_key_get_entries_of_their_own(tmp_path):
    """The key names what is compiled (the lowered program), not only what the caller lists: before, a change of
    the computation under the same key inputs (an upgrade, a fix, an edited model class) loaded the old program.
    Seen failing: the gelu program returned relu's outputs (0 where gelu gives -0.0624)."""
    x = np.linspace(-2, 2, 12, dtype=np.float32).reshape(4, 3)

    def relu(x):
        return jax.nn.relu(x @ WEIGHTS)

    def gelu(x):
        return jax.nn.gelu(x @ WEIGHTS)

    tolerance.assert_close(aot.cached_program(relu, (x,), tmp_path, "k")(x), np.maximum(x @ WEIGHTS, 0),
                           tolerance.ONE_OP)
    # the same program compiled in memory: they differ by XLA's rounding of one fused op at most
    tolerance.assert_close(aot.cached_program(gelu, (x,), tmp_path, "k")(x), jax.jit(gelu)(x), tolerance.ONE_OP)
    assert len(list(tmp_path.glob("*" + aot._SUFFIX))) == 2


def test_a_program_cached_for_one_dtype_is_not_loaded_for_another(tmp_path):
    """Before, the key named shapes but not dtypes: a program cached for uint8 images was loaded for float32 ones,
    and failed with "Argument types differ" there and in every later process."""
    weights = WEIGHTS / 8  # this test's own function and constants (JAX keeps a function's traces, globals and all)

    def product(x):
        return jnp.tanh(x @ weights)

    images = np.arange(12, dtype=np.uint8).reshape(4, 3)
    floats = images.astype(np.float32) / 11
    as_uint8 = aot.cached_program(product, (images,), tmp_path, "k")
    as_float = aot.cached_program(product, (floats,), tmp_path, "k")
    tolerance.assert_close(as_float(floats), np.tanh(floats @ weights), tolerance.ONE_OP)
    tolerance.assert_close(as_uint8(images), np.tanh(images @ weights), tolerance.ONE_OP)
    assert len(list(tmp_path.glob("*" + aot._SUFFIX))) == 2


def small_classifier(directory):
    """An `ImageClassifier` of a small MLP, its weights drawn from a fixed key, its programs cached in `directory`."""
    from jaxdl.pretrained.classifier import ImageClassifier

    model = MLP(features=(4,), num_outputs=3)
    state = create_train_state(model, optax.sgd(0.1), (2, 2, 3), jax.random.key(0))
    leaves, tree = jax.tree.flatten(state.variables)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    variables = jax.tree.unflatten(tree, [jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)])
    return ImageClassifier(model, variables, {}, ("a", "b", "c"), "logits", str(directory))


def test_a_classifier_runs_each_dtype_with_its_own_program(tmp_path):
    """A classifier, and the next one (as in a new process), given uint8 images and then float32 ones: before,
    both the classifier's own programs and the cache's entries were keyed by shape alone ("Argument types
    differ")."""
    images = np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3)
    floats = images.astype(np.float32) / 23
    first = small_classifier(tmp_path)
    from_uint8 = first.probabilities(images)
    from_floats = first.probabilities(floats)
    again = small_classifier(tmp_path)
    # the same programs, read back: bitwise the same outputs
    np.testing.assert_array_equal(again.probabilities(images), from_uint8)
    np.testing.assert_array_equal(again.probabilities(floats), from_floats)
    assert not np.allclose(from_uint8, from_floats, atol=1e-3)  # two inputs, two programs' outputs


def test_a_classifier_whose_computation_changed_does_not_load_the_old_program(tmp_path, monkeypatch):
    """jaxdl's own code changed under the same model and weights (here the softmax it applies to logits, replaced
    by a log-softmax): the next classifier gets the new computation's outputs. Seen failing before the key named
    the lowered program: the second classifier returned the first one's probabilities from the cache."""
    images = np.arange(24, dtype=np.float32).reshape(2, 2, 2, 3) / 23
    probabilities = small_classifier(tmp_path).probabilities(images)
    monkeypatch.setattr(jax.nn, "softmax", jax.nn.log_softmax)
    changed = small_classifier(tmp_path).probabilities(images)
    # exp of log-softmax against softmax: two programs, a few ops each apart
    tolerance.assert_close(np.exp(changed), probabilities, tolerance.FEW_OPS)
    assert np.all(changed < 0)
