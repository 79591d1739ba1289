"""jaxdl's on-disk compilation cache, on by default: a second process compiles nothing, and the cache is keyed,
checked, bounded, safe to share between processes, refused where others can write, and switched off on request.

JAX sets its cache up from the environment once per process, so the cases run in new processes
(`tests/support/compilation_cache_runs.py`): two writers at once, then one process that checks every case.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxdl.runtime import compilation_cache

REPOSITORY = Path(__file__).resolve().parents[2]


def environment(cache: Path, **extra) -> dict:
    """This process's environment without the suite's own JAX cache, with $JAXDL_CACHE=`cache`, 2 CPU devices."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "JAXDL_COMPILATION_CACHE"))}
    flags = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    return {**env, "JAXDL_CACHE": str(cache), "XLA_FLAGS": flags.strip(), **extra}


def start(mode: str, out: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.support.compilation_cache_runs", mode, str(out)],
                            cwd=REPOSITORY, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen, out: Path) -> dict:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two processes training the same model at once into an empty cache, then one checking what it holds."""
    root = tmp_path_factory.mktemp("compilation-cache")
    env = environment(root / "cache")
    writers = [start("write", root / f"write{i}.json", env) for i in range(2)]
    written = [finished(writer, root / f"write{i}.json") for i, writer in enumerate(writers)]
    check = start("check", root / "check.json", {**env, compilation_cache.SWITCH: "0"})
    return written, finished(check, root / "check.json")


def test_two_processes_writing_the_same_programs_at_once_both_succeed(runs):
    written, _ = runs
    for run in written:  # each compiled what the other had not yet written, or read it back
        assert run["fit"]["requests"] >= 3 and run["program"]["requests"] == 1


def test_a_second_process_compiles_nothing(runs):
    """The same training in a later process: every program read back, none compiled (JAX's own events)."""
    _, seen = runs
    assert seen["fit_again"]["requests"] >= 3
    assert seen["fit_again"]["compiles"] == 0 and seen["same_program"] == {"requests": 1, "hits": 1, "compiles": 0}


def test_fit_asks_for_its_own_programs_only(runs):
    """`fit`'s set-up runs as a few compiled programs, not as eager operations: each of those is a program of its
    own per leaf shape (a copy, a zeros, a key split), read back from the cache one by one in a new process.
    Two epochs of the MLP with validation asked for 21 programs before; now 10 (initialisation with its key split,
    the optimizer's state, the seed's keys, the copies onto the mesh, the shuffle, the epochs and evaluation)."""
    written, seen = runs
    assert all(run["fit"]["requests"] <= 10 for run in written)
    assert seen["fit_again"]["requests"] <= 10


@pytest.mark.parametrize("part", ["shape", "dtype", "sharding", "xla_option", "jax_version"])
def test_each_part_of_the_key_changed_alone_is_a_miss(runs, part):
    """(A new XLA option also compiles the one-off probe of whether this XLA accepts it: 2 look-ups.)"""
    _, seen = runs
    assert seen[part] == {"requests": 2 if part == "xla_option" else 1, "hits": 0,
                          "compiles": 2 if part == "xla_option" else 1}


def test_the_jax_version_names_a_folder_of_its_own(runs):
    _, seen = runs
    assert Path(seen["jax_version_directory"]).parent == Path(seen["directory"]).parent
    assert seen["jax_version_directory"] != seen["directory"]


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_a_damaged_entry_is_removed_with_a_warning_and_compiled_again(runs, damage):
    """Before the checksum, JAX warned, compiled, and kept the damaged entry for every later process."""
    _, seen = runs
    assert seen[damage]["compiles"] == 1
    [warning] = seen[damage]["warnings"]
    assert "is truncated or corrupt" in warning and "removed, and its program compiled again" in warning
    assert seen[damage]["read_back"] == {"requests": 1, "hits": 1, "compiles": 0}  # written afresh, sound


def test_the_cache_keeps_within_its_bound_evicting_the_least_recently_used(runs):
    _, seen = runs
    bounded = seen["bounded"]
    assert bounded["entries"] == 2 and bounded["bytes"] <= bounded["max"]
    assert bounded["newest_kept"] and bounded["oldest_evicted"]


def test_a_directory_others_can_write_is_refused_and_the_cache_left_off(runs):
    _, seen = runs
    shared = seen["shared_directory"]
    assert not shared["enabled"] and shared["entries"] == [] and shared["hits"] == 0
    [warning] = shared["warnings"]
    assert "is not used as a compilation cache: it must be owned by uid" in warning and "drwxrwxrwx" in warning


def test_the_switch_leaves_the_cache_off(runs):
    _, seen = runs
    assert seen["switched_off"]["hits"] == 0 and seen["switched_off"]["written"] == []


def test_info_and_clear_report_and_empty_every_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXDL_CACHE", str(tmp_path))
    for folder, names in (("abc", ["jit_f-1", "jit_g-2"]), ("def", ["jit_h-3"])):
        (tmp_path / "xla" / folder).mkdir(parents=True)
        for name in names:
            (tmp_path / "xla" / folder / f"{name}-cache").write_bytes(b"x" * 10)
            (tmp_path / "xla" / folder / f"{name}-atime").write_bytes(b"t" * 8)
    assert compilation_cache.info() == {"directory": str(tmp_path / "xla"), "entries": 3, "bytes": 30,
                                        "max_bytes": compilation_cache.DEFAULT_MAX_BYTES,
                                        "in_use": str(compilation_cache.default_directory())}
    assert compilation_cache.clear() == 3
    assert compilation_cache.info()["entries"] == 0
    assert sorted(p.name for p in (tmp_path / "xla" / "abc").iterdir()) == [".lockfile"]


def test_the_cache_command_reports_and_clears(tmp_path, monkeypatch, capsys):
    from jaxdl import cli

    monkeypatch.setenv("JAXDL_CACHE", str(tmp_path))
    folder = compilation_cache.default_directory()
    folder.mkdir(parents=True)
    (folder / "jit_f-1-cache").write_bytes(b"x" * (3 << 20))
    (folder / "jit_f-1-atime").write_bytes(b"t" * 8)
    assert cli.main(["cache", "info"]) == 0
    assert capsys.readouterr().out == (f"{tmp_path / 'xla'}: 1 compiled programs, 3.0 MiB (at most 1024 MiB, least "
                                       f"recently used deleted beyond)\nthis jax and CPU use {folder}\n")
    assert cli.main(["cache", "clear"]) == 0
    assert capsys.readouterr().out == f"deleted 1 compiled programs from {tmp_path / 'xla'}\n"
    assert compilation_cache.info()["entries"] == 0
