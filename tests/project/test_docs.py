"""Every ```python block of README.md and docs/*.md runs, so the documentation cannot drift from the code.

One test per block, named by file and line. The blocks of one file share a
namespace and run in their order, as a reader would paste them: a block may
use what an earlier block of its file defined (a test run alone runs the
blocks before it first). Each file's blocks run in a directory of their own
(a fresh temporary one), so what they write lands nowhere else, with the
session's private weight cache (`jaxdl_cache`). Beside that directory a link
`../shared` leads to the repository's `../shared`, so a block reads the
shared data by the path a reader at the repository root would use.

A block is skipped, with its reason, when the line just above its fence says so:
- `<!-- skip: REASON -->` always (network, an accelerator, hours of training);
- `<!-- needs: PATH ... -->` where a path (relative to the repository root,
  e.g. ../shared/data/mnist) is absent;
- `<!-- needs-module: NAME ... -->` where a module cannot be imported (e.g. the
  offline weights that `make` installs).
The terminal summary of the run (`tests/conftest.py`) prints how many blocks
ran and how many were skipped, and why.
"""
import importlib.util
import re
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
DOCUMENTS = [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"<!--\s*(skip|needs|needs-module):\s*(.*?)\s*-->\s*$")


def blocks_of(path: Path) -> list[tuple[int, str, str | None]]:
    """`(line of the fence, code, reason to skip or None)` for each python block of `path`."""
    text = path.read_text()
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        above = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        found.append((line, match.group(1), skip_reason(MARKER.search(above))))
    return found


def skip_reason(marker: re.Match | None) -> str | None:
    if marker is None:
        return None
    kind, argument = marker.groups()
    if kind == "skip":
        return argument
    if kind == "needs":
        absent = [name for name in argument.split() if not (REPOSITORY / name).exists()]
        return f"needs {' '.join(absent)}" if absent else None
    absent = [name for name in argument.split() if importlib.util.find_spec(name) is None]
    return f"needs the module {' '.join(absent)}" if absent else None


BLOCKS = [(path, index, line, code, reason) for path in DOCUMENTS
          for index, (line, code, reason) in enumerate(blocks_of(path))]


class DocumentRun:
    """One document's shared namespace and working directory, and how far its blocks have run."""

    def __init__(self, directory: Path):
        self.namespace = {"__name__": "__doc_block__"}
        self.directory = directory
        self.done = 0


@pytest.fixture(scope="module")
def runs(jaxdl_cache):
    return {}


def new_run(path: Path, tmp_path_factory) -> DocumentRun:
    root = tmp_path_factory.mktemp(path.stem)
    if (REPOSITORY.parent / "shared").is_dir():
        (root / "shared").symlink_to(REPOSITORY.parent / "shared", target_is_directory=True)
    (root / "work").mkdir()
    return DocumentRun(root / "work")


def run_block(path: Path, line: int, code: str, run: DocumentRun, monkeypatch) -> None:
    monkeypatch.chdir(run.directory)
    try:
        exec(compile(code, f"{path.relative_to(REPOSITORY)}:{line}", "exec"), run.namespace)
    except Exception as error:
        raise AssertionError(f"the python block at {path.relative_to(REPOSITORY)}:{line} failed: "
                             f"{type(error).__name__}: {error}") from error


def test_the_documents_have_python_blocks():
    assert (REPOSITORY / "docs").is_dir() and len(DOCUMENTS) > 1
    assert all(blocks_of(path) for path in DOCUMENTS), "every guide opens with a runnable example"


@pytest.mark.parametrize("path, index, line, code, reason", BLOCKS,
                         ids=[f"{path.relative_to(REPOSITORY)}:{line}" for path, _, line, _, _ in BLOCKS])
def test_block(path, index, line, code, reason, runs, tmp_path_factory, monkeypatch, record_property):
    record_property("doc_block", f"{path.relative_to(REPOSITORY)}:{line}")
    if reason is not None:
        pytest.skip(reason)
    if path not in runs:
        runs[path] = new_run(path, tmp_path_factory)
    run = runs[path]
    for earlier_line, earlier, earlier_reason in blocks_of(path)[run.done:index]:
        if earlier_reason is None:  # the blocks before this one, where this test runs alone (pytest -k)
            run_block(path, earlier_line, earlier, run, monkeypatch)
    run.done = index + 1
    run_block(path, line, code, run, monkeypatch)


@pytest.mark.parametrize("name", ["training.md", "checkpoints.md"])
def test_a_guides_opening_example_runs_again_in_the_same_folder(name, tmp_path, monkeypatch, jaxdl_cache):
    """As a reader pastes it twice: before, training.md's saved "model_dir" made the second run a FileExistsError
    (seen failing so); checkpoints.md's run checkpoints go to a new folder each time."""
    path = REPOSITORY / "docs" / name
    line, code, _ = blocks_of(path)[0]
    run = DocumentRun(tmp_path)
    for _ in range(2):
        run_block(path, line, code, run, monkeypatch)
