"""JAX's persistent compilation cache, on for every program jaxdl compiles: a second process compiles nothing.

Every jaxdl program (fit's steps and epochs, evaluate, predict, the
fine-tuning features, classify) is compiled by `jaxdl.runtime.compiler.jit`,
which calls `ensure_enabled()` at its first use. Unless the user chose
otherwise, that turns on JAX's own persistent cache (`jax_compilation_cache_dir`)
in `$JAXDL_CACHE/xla/TAG` (`~/.cache/jaxdl` by default), for the rest of the
process: the next process that compiles the same program reads the executable
back instead of running XLA.

What it keys on: JAX's key (the lowered program, which holds the shapes,
dtypes, shardings and donation; the jaxlib version; the backend's version;
XLA_FLAGS; the compile options, which hold jaxdl's per-program XLA options;
the devices) plus `TAG`, a hash of what JAX's key leaves out and the
executable depends on: the jax version and the CPU's instruction-set features.

What is trusted: JAX loads native code from the cache, so the directory must
be this user's and writable by no one else, and each entry already in it a
regular file of this user's (`program_cache.open_compilation_cache`);
otherwise a warning names the directory and why, and the cache stays off.
jaxdl writes each entry with a SHA-256 of its contents and checks it when it
reads the entry back: a truncated or corrupt entry (a process killed while
writing, a damaged disk) is removed with a warning and the program compiled
again. JAX's own file lock makes two processes writing the same entry safe.

The cache is bounded (`DEFAULT_MAX_BYTES`; JAX evicts the least recently
used entries beyond it). `jaxdl cache info` / `jaxdl cache clear` report and
empty it (`info`, `clear`).

The user's choice wins: with `JAXDL_COMPILATION_CACHE=0` (or `off`), with a
cache directory of their own (`JAX_COMPILATION_CACHE_DIR` or
`jax.config.update("jax_compilation_cache_dir", ...)`), or after `disable()`,
jaxdl leaves JAX's cache as it is. Threat model: docs/reliability.md.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import warnings
from pathlib import Path

import jax
import jaxlib
from jax._src import compilation_cache as jax_cache_internals  # see `_install`
from jax._src.lru_cache import LRUCache
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache

from jaxdl.runtime import program_cache

__all__ = ["SWITCH", "DEFAULT_MAX_BYTES", "cache_root", "default_directory", "switched_off", "ensure_enabled",
           "enable", "enable_users_directory", "disable", "info", "clear", "CorruptEntryWarning"]

# The environment variable that turns jaxdl's use of the cache off: "0", "off", "false" or "no".
SWITCH = "JAXDL_COMPILATION_CACHE"
# The most the cache may hold: JAX deletes its least recently used entries beyond it. A MobileNetV2 inference
# program measured 14.4 MB (program_cache.DEFAULT_MAX_BYTES), a small model's train step a few hundred kB.
DEFAULT_MAX_BYTES = 1 << 30
_OFF = ("0", "off", "false", "no")
# Entries jaxdl writes: this header, the SHA-256 of the rest, then JAX's own bytes.
_MAGIC = b"jaxdl-xla/1\n"
_DIGEST_BYTES = 32
_ENTRY_SUFFIX, _ATIME_SUFFIX = "-cache", "-atime"  # JAX's LRUCache names


class CorruptEntryWarning(RuntimeWarning):
    """A cache entry that fails its checksum: it was removed and its program compiled again."""


def cache_root() -> Path:
    """jaxdl's cache folder: `$JAXDL_CACHE`, else `$XDG_CACHE_HOME/jaxdl`, else `~/.cache/jaxdl`."""
    root = os.environ.get("JAXDL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxdl"
    return Path(root)


def _tag() -> str:
    """What the executable depends on beyond JAX's key: the jax version and the CPU's instruction-set features."""
    description = json.dumps([jax.__version__, jaxlib.__version__, program_cache.processor_description()])
    return hashlib.sha256(description.encode()).hexdigest()[:16]


def default_directory() -> Path:
    """Where jaxdl keeps compiled programs: `cache_root()/xla/TAG` (TAG: see the module's docstring)."""
    return cache_root() / "xla" / _tag()


def switched_off() -> bool:
    """Whether `JAXDL_COMPILATION_CACHE` turns jaxdl's use of the cache off."""
    return os.environ.get(SWITCH, "").strip().lower() in _OFF


@functools.cache
def ensure_enabled() -> Path | None:
    """Turns the cache on in `default_directory()` unless the user chose otherwise; once per process.

    Called by `jaxdl.runtime.compiler.jit` before a program's first compile.

    Returns:
      The directory in use, or None where jaxdl leaves JAX's cache as it is
      (switched off, a directory of the user's own, `disable()` called, or
      a directory that fails the trust check).
    """
    if switched_off() or os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return None
    if not jax.config.jax_enable_compilation_cache:  # turned off by the user (or `disable`)
        return None
    return enable()


def enable(directory: str | os.PathLike | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Path | None:
    """Keeps every program this process compiles in `directory`, bounded by `max_bytes`, checked on reading.

    Args:
      directory: the cache directory; `default_directory()` when None. It is
        made (mode 0o700) if missing.
      max_bytes: the bound; JAX deletes the least recently used entries
        beyond it.

    Returns:
      The directory, or None where it failed the trust check (a warning then
      names it and why, and JAX's cache is off for the process).
    """
    directory = Path(directory) if directory is not None else default_directory()
    path = _checked_path(directory)
    if path is None:
        return None
    drop_entries_without_access_times(path)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_max_size", int(max_bytes))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # every program, however quick
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_dir", path)
    _install(VerifiedCache(path, max_size=int(max_bytes)))
    return directory


def enable_users_directory(directory: str | os.PathLike) -> Path | None:
    """Uses a cache directory the user chose for JAX (`JAX_COMPILATION_CACHE_DIR`), as their JAX options say,
    once it passes the same trust check; `jaxdl classify` and the other commands call it.

    Args:
      directory: the user's JAX cache directory.

    Returns:
      The directory, or None where it failed the check (a warning names it
      and why, and JAX's cache is off for the process, though JAX read the
      variable itself at start-up).
    """
    directory = Path(directory)
    path = _checked_path(directory)
    if path is None:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax_compilation_cache.reset_cache()  # JAX's own cache, set up again at the next compile, on the checked path
    return directory


def _checked_path(directory: Path) -> str | None:
    """The path JAX is given for `directory` once it passes the trust check, or None (a warning, naming the
    directory and why, and the cache turned off) where it fails.

    The directory's descriptor is left open for the life of the process and
    JAX opens the entries through it (`/proc/self/fd/N`, where there is one),
    so a path swapped later leads nowhere else.
    """
    try:
        directory_fd = program_cache.open_compilation_cache(directory)
    except OSError as error:
        warnings.warn(f"jaxdl: {directory} is not used as a compilation cache: {error}", RuntimeWarning,
                      stacklevel=3)  # the caller of enable / enable_users_directory
        disable()
        return None
    through_descriptor = f"/proc/self/fd/{directory_fd}"
    return through_descriptor if os.path.isdir(through_descriptor) else str(directory)


def disable() -> None:
    """Turns JAX's persistent cache off for the rest of the process: neither read nor written."""
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_enable_compilation_cache", False)
    jax_compilation_cache.reset_cache()


def _install(cache: LRUCache) -> None:
    """Makes `cache` the object JAX reads and writes its entries through.

    JAX (0.10) builds a plain `LRUCache` for its directory and offers no
    public way to give it another; its module keeps the cache in `_cache`
    and whether it was set up in `_cache_initialized`. Where a JAX version
    lacks them, its own cache is used, unchecked.
    """
    jax_compilation_cache.reset_cache()
    internals = jax_cache_internals
    if not all(hasattr(internals, name) for name in ("_cache", "_cache_initialized", "_cache_initialized_mutex")):
        return
    with internals._cache_initialized_mutex:
        internals._cache = cache
        internals._cache_initialized = True


class VerifiedCache(LRUCache):
    """JAX's `LRUCache` whose entries carry a SHA-256 of their contents, checked on every read.

    Written by hand: JAX's cache does not check what it reads back, and keeps
    a damaged entry forever (it recompiles, then finds the entry present and
    writes nothing).
    """

    def put(self, key: str, value: bytes) -> None:
        super().put(key, _MAGIC + hashlib.sha256(value).digest() + value)

    def get(self, key: str) -> bytes | None:
        stored = super().get(key)
        if stored is None:
            return None
        body = stored[len(_MAGIC) + _DIGEST_BYTES:]
        if stored.startswith(_MAGIC) and hashlib.sha256(body).digest() == stored[len(_MAGIC):][:_DIGEST_BYTES]:
            return body
        self._remove(key)
        warnings.warn(f"jaxdl: the compilation cache's entry {key[:60]}... in {self.path} is truncated or corrupt "
                      f"({len(stored)} bytes): removed, and its program compiled again",
                      CorruptEntryWarning, stacklevel=2)
        return None

    def _remove(self, key: str) -> None:
        with self.lock if self.eviction_enabled else contextlib.nullcontext():
            for suffix in (_ENTRY_SUFFIX, _ATIME_SUFFIX):
                (self.path / f"{key}{suffix}").unlink(missing_ok=True)


def drop_entries_without_access_times(directory: str | os.PathLike) -> None:
    """Deletes cache entries (NAME-cache) that lack the access time JAX records beside them (NAME-atime) once
    its cache has a size bound. Entries written without a bound have none, and JAX's eviction fails on them
    (FileNotFoundError), refusing every later write with a warning. Done under JAX's own lock."""
    import filelock

    directory = Path(directory)
    with filelock.FileLock(directory / ".lockfile"):
        for entry in directory.glob(f"*{_ENTRY_SUFFIX}"):
            atime = entry.with_name(entry.name.removesuffix(_ENTRY_SUFFIX) + _ATIME_SUFFIX)
            if not atime.exists():
                entry.unlink(missing_ok=True)


def _entries(directory: Path) -> dict[Path, list[Path]]:
    """The cache's entries under `directory`, by the folder holding them (one per TAG, and older untagged ones)."""
    found: dict[Path, list[Path]] = {}
    if directory.is_dir():
        for entry in sorted(directory.rglob(f"*{_ENTRY_SUFFIX}")):
            found.setdefault(entry.parent, []).append(entry)
    return found


def info(directory: str | os.PathLike | None = None) -> dict:
    """What the cache holds: `{"directory", "entries", "bytes", "max_bytes", "in_use"}`.

    Args:
      directory: a cache directory; by default `cache_root()/xla`, every
        jax version's and CPU's folder under it.

    Returns:
      The directory, its number of entries and their bytes, the bound, and
      the folder this process's jax and CPU use.
    """
    directory = Path(directory) if directory is not None else cache_root() / "xla"
    entries = [entry for group in _entries(directory).values() for entry in group]
    return {"directory": str(directory), "entries": len(entries),
            "bytes": sum(entry.stat().st_size for entry in entries), "max_bytes": DEFAULT_MAX_BYTES,
            "in_use": str(default_directory())}


def clear(directory: str | os.PathLike | None = None) -> int:
    """Deletes every entry of the cache under `directory` (`cache_root()/xla`), under JAX's lock; returns how many.

    Args:
      directory: a cache directory; by default `cache_root()/xla`.

    Returns:
      The number of entries deleted.
    """
    import filelock

    removed = 0
    for folder, entries in _entries(Path(directory) if directory is not None else cache_root() / "xla").items():
        with filelock.FileLock(folder / ".lockfile"):
            for entry in entries:
                entry.unlink(missing_ok=True)
                entry.with_name(entry.name.removesuffix(_ENTRY_SUFFIX) + _ATIME_SUFFIX).unlink(missing_ok=True)
                removed += 1
    return removed
