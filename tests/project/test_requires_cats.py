"""The `requires_cats` marker (tests/conftest.py): a clone without the cat photos skips, CI (which has them) fails."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
MARKED_TEST = """import pytest


@pytest.mark.requires_cats
def test_on_the_photos():
    pass
"""


def run_marked_test(folder: Path, ci: str | None) -> subprocess.CompletedProcess:
    """One `requires_cats` test in its own pytest session, with tests/conftest.py and no shared data."""
    (folder / "test_marked.py").write_text(MARKED_TEST)
    env = {name: value for name, value in os.environ.items() if name != "CI"}
    env["JAXDL_SHARED_DATA"] = str(folder / "no-shared-data")
    if ci is not None:
        env["CI"] = ci
    # Without the plugins the marker does not involve (their imports were half of the child's 1.8 s).
    plugins_off = [argument for name in ("cacheprovider", "xdist", "hypothesispytest", "regressions", "datadir")
                   for argument in ("-p", f"no:{name}")]
    command = [sys.executable, "-m", "pytest", "-q", "-ra", *plugins_off, "-p", "tests.conftest",
               "--rootdir", str(folder), str(folder / "test_marked.py")]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPOSITORY, env=env)


@pytest.mark.parametrize("ci", [None, "false"])
def test_a_clone_without_the_photos_skips_and_says_where_they_belong(tmp_path, ci):
    done = run_marked_test(tmp_path, ci)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 skipped" in done.stdout
    assert f"needs the tutorial's cat photos at {tmp_path / 'no-shared-data' / 'cats'}" in done.stdout


def test_ci_without_the_photos_fails(tmp_path):
    done = run_marked_test(tmp_path, "true")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 error" in done.stdout and "CI=true, but the test needs the tutorial's cat photos" in done.stdout
