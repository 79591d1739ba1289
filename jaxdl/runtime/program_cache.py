"""Compiled programs kept on disk, so that a new process skips XLA's compile.

The compiled executable itself is serialized
(`jax.experimental.serialize_executable`) under a key naming everything it
depends on: the lowered program's text, its arguments, and the environment
it was compiled in (`program_key`, `cached_program`). Computing that key
traces and lowers the Python function, so the key cannot miss a change of
the code; the tracing itself is not skipped.

Only entries this user wrote are loaded: a serialized program is a pickle
holding machine code, so loading a foreign one runs its code. The directory
must be this user's and writable by no one else, and each entry a regular
file of this user's that no one else can write (opened with O_NOFOLLOW,
checked with `fstat`); otherwise the program is compiled in memory, or again.
Why, as verified in JAX's sources: docs/reliability.md#why-only-your-own-files-are-loaded.

Entries are written with mode 0o600 to a temporary file, loaded back from
there and run once, and only then renamed into place, so a reader never sees
a partial entry nor one that has not run. The trees are stored without
pickle, in a JSON first line; an output with user-defined pytree nodes is not
cached. Entries not used for a while are evicted once the directory holds
more than `max_bytes`.
"""
from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import os
import platform
import secrets
import stat
import warnings
from pathlib import Path
from typing import Callable

import jax
import jaxlib
import numpy as np
from jax.experimental import serialize_executable

from jaxdl.runtime import compiler

# A MobileNetV2 program with its weights as constants measured 14.4 MB (batch 1) and 14.8 MB (batch 32)
# with jax 0.10.2 on CPU: about 35 such programs.
DEFAULT_MAX_BYTES = 512 << 20
# JAX options that change the program traced from the same function and arguments.
_CONFIG_OPTIONS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
                   "jax_threefry_partitionable")
# Environment variables XLA and libtpu read their compile options from.
_ENVIRONMENT_VARIABLES = ("XLA_FLAGS", "LIBTPU_INIT_ARGS")
_SUFFIX = ".executable"
_FORMAT = "jaxdl-program/4"  # 2: the header names the devices; 3: entries are run once read back; 4: and the arguments
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH
# A debug option that only bounds how many buffer assignments XLA's diagnostics print. Given a value of its
# own, a program's key in JAX's persistent compilation cache changes and its code does not, so XLA compiles it
# afresh: the one public way found (jax 0.10.2) past that cache, whose reads cannot be turned off in a
# process once it has used it. See `_failure_when_read_back`.
_PAST_JAX_CACHE_OPTION = "xla_debug_buffer_assignment_show_max"


class UntrustedCacheError(OSError):
    """A cache directory other users can write in: its entries could be theirs."""


def _processor_description(cpuinfo: str) -> list[str]:
    """The machine type and the instruction-set features of its CPU, read from /proc/cpuinfo's text.

    x86 Linux lists the features on `flags` lines, Arm Linux on `Features`.
    Where neither is there (macOS, no /proc) the features are unknown, so the
    host's name stands in for them: programs are then reused only on the
    machine that compiled them, never on another whose CPU may lack an
    instruction they use.
    """
    for line in cpuinfo.splitlines():
        field, _, value = line.partition(":")
        if field.strip() in ("flags", "Features"):
            return [platform.machine(), *value.split()]
    return [platform.machine(), platform.processor(), "host " + platform.node()]


@functools.lru_cache(maxsize=1)
def processor_description() -> list[str]:
    """This machine's type and its CPU's instruction-set features (`_processor_description`)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    return _processor_description(cpuinfo)


def _devices() -> tuple[str, int]:
    """The default backend's device kind (the CPU or accelerator model) and device count."""
    return jax.devices()[0].device_kind, jax.device_count()


def program_key(*parts, cpu_options: dict | None = None) -> str:
    """A file-name-safe digest of `parts` and of everything else a compiled program depends on.

    That is the JAX and jaxlib versions, the backend with its device kind and
    count, the JAX options in `_CONFIG_OPTIONS`, the XLA environment variables
    in `_ENVIRONMENT_VARIABLES`, the compiler options jaxdl passes for `cpu_options`
    (`jaxdl.runtime.compiler`; give `cached_program` the same), and the processor
    (`_processor_description`).
    Machine code compiled for one CPU can die with SIGILL on another.
    `cached_program` adds the lowered program itself and its arguments' signature.
    """
    environment = [jax.__version__, jaxlib.__version__, jax.default_backend(), *_devices(),
                   {name: str(getattr(jax.config, name)) for name in _CONFIG_OPTIONS},
                   {name: os.environ.get(name) for name in _ENVIRONMENT_VARIABLES},
                   compiler.compiler_options(cpu_options), processor_description()]
    text = json.dumps([environment, *map(str, parts)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _signature(lowered, example_args: tuple) -> str:
    """The arguments a program takes: each one's dtype, shape and donation (`Lowered.args_info`), and where it is
    placed (its sharding, which names its devices; "uncommitted" for a host array)."""
    placements = [str(leaf.sharding) if isinstance(leaf, jax.Array) and leaf.committed else "uncommitted"
                  for leaf in jax.tree.leaves(example_args)]
    arguments = [f"{info.dtype}{list(info.shape)} donated={info.donated}"
                 for info in jax.tree.leaves(lowered.args_info[0])]
    return json.dumps([[argument, placement] for argument, placement in zip(arguments, placements, strict=True)])


def cached_program(fn: Callable, example_args: tuple, directory: str | os.PathLike, key: str = "", *,
                   max_bytes: int = DEFAULT_MAX_BYTES, cpu_options: dict | None = None) -> Callable:
    """`fn` compiled for `example_args`' shapes and dtypes (`compiler.jit(fn, cpu_options=cpu_options)`): read
    from `directory` when there, written there when not.

    `fn` is traced and lowered in every call: an entry's name is a digest of
    the lowered program's text (StableHLO, its constants included: weights
    that `fn` closes over are part of it), of its arguments' dtypes, shapes,
    donation and placement, of `program_key`'s environment, and of `key`
    (anything else the program depends on that its text does not show; none
    is needed for a pure `fn`). So any change of the computation, of jaxdl's
    code or the model's, names another entry; the cache saves XLA's compile.
    An entry that is unreadable (a partial write, another JAX) or not trusted
    (see the module docstring) is compiled again and replaced. An entry is run
    once under a temporary name, and takes its name only if it runs, so no
    reader meets an untried entry; one that fails is compiled again past JAX's
    persistent cache (`_failure_when_read_back`), and not kept if it fails
    again. After a write, the least recently used entries are deleted until
    this user's entries total at most `max_bytes`. The entry just written is
    always kept.

    Args:
      fn: a pure function of `example_args`.
      example_args: arrays (or pytrees of them) of the shapes, dtypes and placement the program is called with.
      directory: the cache's directory, made with mode 0o700 if missing; one that others can write in is not
        used (a warning, and the program is compiled in memory).
      key: extra text for the entry's name.
      max_bytes: the most this user's entries in `directory` may total.
      cpu_options: the XLA:CPU options to compile with (`jaxdl.runtime.compiler`).

    Returns:
      The compiled program (a `jax.stages.Compiled`, or a loaded one that is called the same way).
    """
    lowered = compiler.jit(fn, cpu_options=cpu_options).lower(*example_args)
    in_tree = jax.tree.structure((example_args, {}))
    try:
        directory_fd = _open_private_directory(directory)
    except OSError as error:
        warnings.warn(f"{directory} is not used as a program cache: {error}", stacklevel=2)
        return lowered.compile()
    try:
        signature = _signature(lowered, example_args)
        text = lowered.as_text()
        name = program_key(key, signature, hashlib.sha256(text.encode()).hexdigest(),
                           cpu_options=cpu_options) + _SUFFIX
        program = _load(directory_fd, name, in_tree, signature)
        if program is not None:
            return program
        compiled = lowered.compile()
        try:
            failure = _write_and_try(directory_fd, name, compiled, in_tree, signature, example_args, max_bytes)
            if failure is not None:  # most likely read from JAX's cache (see `_failure_when_read_back`)
                compiled = _compiled_past_jax_cache(fn, example_args, cpu_options)
                failure = _write_and_try(directory_fd, name, compiled, in_tree, signature, example_args, max_bytes)
        except (ValueError, NotImplementedError, OSError, jax.errors.JaxRuntimeError) as error:
            # not serializable, user-defined output nodes, a full disk, an option XLA refuses: the program still runs
            warnings.warn(f"a program is not cached in {directory}: {error}", stacklevel=2)
            return compiled
        if failure is not None:
            warnings.warn(f"a program is not cached in {directory}: read back, it failed to run ({failure}), "
                          f"compiled past JAX's persistent compilation cache too", stacklevel=2)
        return compiled
    finally:
        os.close(directory_fd)


def _compiled_past_jax_cache(fn: Callable, example_args: tuple, cpu_options: dict | None):
    """`fn` compiled as `compiler.jit` compiles it, by XLA rather than read from JAX's persistent cache.

    The program's key there takes a value of `_PAST_JAX_CACHE_OPTION` drawn for
    this call, so an entry JAX wrote of it would never be read again (nor of
    the small program `compiler` checks the options with): JAX writes none,
    its minimum compile time for a write being infinite meanwhile.
    On CPU only: elsewhere jaxdl passes no options, and the failure has not been seen.
    """
    options = {**(compiler.CPU_OPTIONS if cpu_options is None else cpu_options),
               _PAST_JAX_CACHE_OPTION: 1 + secrets.randbelow(1 << 30)}
    minimum = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
    try:
        return compiler.jit(fn, cpu_options=options).lower(*example_args).compile()
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", minimum)


def _write_and_try(directory_fd: int, name: str, compiled, in_tree, signature: str, example_args: tuple,
                   max_bytes: int) -> str | None:
    """Writes `compiled` as entry `name` if it runs read back, and evicts to `max_bytes`; why it fails, or None.

    The entry is written under a temporary name and tried there: it takes its
    name only once it ran, and one that fails is deleted. Raises what
    serializing or writing raises.
    """
    devices = [device.id for device in compiled.runtime_executable().local_devices()]
    contents = _entry(*serialize_executable.serialize(compiled), devices, signature)
    partial = _write_temporary(directory_fd, name, contents)
    try:
        failure = _failure_when_read_back(directory_fd, partial, in_tree, signature, example_args)
        if failure is None:
            os.replace(partial, name, src_dir_fd=directory_fd, dst_dir_fd=directory_fd)
    finally:
        with contextlib.suppress(FileNotFoundError):  # renamed: nothing left under the temporary name
            os.unlink(partial, dir_fd=directory_fd)
    if failure is None:
        _evict(directory_fd, name, max_bytes)
    return failure


def _open_private_directory(directory: str | os.PathLike) -> int:
    """A descriptor of `directory` (made with mode 0o700 if missing) if only this user can write in it."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    info = os.fstat(directory_fd)
    if info.st_uid != os.getuid() or info.st_mode & _WRITABLE_BY_OTHERS:
        os.close(directory_fd)
        raise UntrustedCacheError(f"it must be owned by uid {os.getuid()} and writable by no one else; it is "
                                  f"owned by uid {info.st_uid} with mode {stat.filemode(info.st_mode)}")
    return directory_fd


def open_compilation_cache(directory: str | os.PathLike) -> int:
    """A descriptor of `directory` (made with mode 0o700 if missing) fit to hold JAX's own compilation cache.

    JAX's persistent cache loads native code from files it opens by name, with
    no check of its own, so the directory must pass `_open_private_directory`'s
    check, and every entry already in it must be a regular file (not a
    symbolic link) owned by this user that no one else who can reach it may
    write: a group or other write bit counts where the directory lets that
    class search it. Raises UntrustedCacheError naming what failed. The caller
    keeps the descriptor open and gives JAX a path through it
    (`/proc/self/fd/N`), so the directory's ancestors need no check.
    """
    directory_fd = _open_private_directory(directory)
    try:
        mode = os.fstat(directory_fd).st_mode
        reachable = ((stat.S_IWGRP if mode & stat.S_IXGRP else 0) | (stat.S_IWOTH if mode & stat.S_IXOTH else 0))
        with os.scandir(directory_fd) as listing:
            for item in listing:
                with contextlib.suppress(FileNotFoundError):  # evicted meanwhile by another of this user's processes
                    info = os.stat(item.name, dir_fd=directory_fd, follow_symlinks=False)
                    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & reachable:
                        raise UntrustedCacheError(
                            f"its entry {item.name!r} must be a regular file owned by uid {os.getuid()} that no one "
                            f"else can write; it is owned by uid {info.st_uid} with mode {stat.filemode(info.st_mode)}")
    except BaseException:
        os.close(directory_fd)
        raise
    return directory_fd


def _written_by_this_user(info: os.stat_result) -> bool:
    return stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & _WRITABLE_BY_OTHERS


def _entry(payload: bytes, in_tree, out_tree, devices: list[int], signature: str) -> bytes:
    """A cache file: a JSON line naming the format, the trees, the devices (ids, in the program's order) and the
    arguments' signature (`_signature`), then JAX's payload."""
    header = {"format": _FORMAT, "in_tree": str(in_tree), "devices": devices, "arguments": signature,
              "out_tree": base64.b64encode(out_tree.serialize_using_proto()).decode()}
    return json.dumps(header).encode() + b"\n" + payload


def _load(directory_fd: int, name: str, in_tree, signature: str) -> Callable | None:
    """The program in entry `name`, or None if it is missing, not trusted, unreadable, or for other arguments
    than `in_tree` and `signature` say."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=directory_fd)
    except OSError:  # missing, or a symbolic link
        return None
    with os.fdopen(fd, "rb") as file:
        if not _written_by_this_user(os.fstat(fd)):
            return None
        first_line, _, payload = file.read().partition(b"\n")
        try:
            header = json.loads(first_line)
            if (header["format"] != _FORMAT or header["in_tree"] != str(in_tree)
                    or header["arguments"] != signature):
                return None
            out_tree = jax.tree_util.PyTreeDef.deserialize_using_proto(
                jax.tree_util.default_registry, base64.b64decode(header["out_tree"]))
            # Loaded onto the devices it was compiled for: by default JAX loads it onto every device of the
            # process, and a one-device program then fails on its first call where there are several.
            by_id = {device.id: device for device in jax.devices()}
            program = serialize_executable.deserialize_and_load(
                payload, in_tree, out_tree, execution_devices=[by_id[i] for i in header["devices"]])
        except Exception:  # noqa: BLE001 - any unreadable entry is rebuilt by the caller
            return None
        os.utime(fd)  # marks the use: eviction deletes the least recently used entries first
    return program


def _failure_when_read_back(directory_fd: int, name: str, in_tree, signature: str,
                            example_args: tuple) -> str | None:
    """Why entry `name`, just written, fails to run on zeros of `example_args`' shapes; None if it runs.

    With jax 0.10.2 an executable that JAX read from its persistent compilation cache (which
    `jaxdl classify` keeps too, and which another process may have filled) serializes without
    its kernels' code: read back, it fails on every call ("Function dot_general.1_kernel not
    found"). Nothing public says where a compiled program came from, so the entry is tried;
    `cached_program` then compiles one that failed again, past JAX's cache.
    """
    program = _load(directory_fd, name, in_tree, signature)
    if program is None:
        return "unreadable"
    zeros = jax.tree.map(lambda leaf: np.zeros(np.shape(leaf), leaf.dtype if hasattr(leaf, "dtype") else
                                               np.result_type(leaf)), example_args)
    try:
        jax.block_until_ready(program(*zeros))
    except Exception as error:  # noqa: BLE001 - whatever the failure, this entry is not kept
        return f"{type(error).__name__}: {error}"
    return None


def _write_temporary(directory_fd: int, name: str, contents: bytes) -> str:
    """Writes `contents` with mode 0o600 to a new temporary file for entry `name`, and returns its name (a leading
    dot: eviction and readers pass it by)."""
    partial = f".{name}.{secrets.token_hex(8)}"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=directory_fd)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(contents)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial, dir_fd=directory_fd)
        raise
    return partial


def _evict(directory_fd: int, keep: str, max_bytes: int) -> None:
    """Deletes this user's least recently used entries (by mtime) until the rest, `keep` first, fit in `max_bytes`."""
    entries = []
    with os.scandir(directory_fd) as listing:
        for item in listing:
            if not item.name.endswith(_SUFFIX) or item.name.startswith("."):
                continue
            with contextlib.suppress(FileNotFoundError):  # another process evicted it
                entries.append((item.name, item.stat(follow_symlinks=False)))
    mine = [(name, info) for name, info in entries if stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid()]
    mine.sort(key=lambda entry: (entry[0] != keep, -entry[1].st_mtime_ns))
    total = 0
    for name, info in mine:
        total += info.st_size
        if total > max_bytes and name != keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=directory_fd)
