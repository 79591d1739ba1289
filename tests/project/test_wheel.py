"""`pip install jaxdl` outside this repository: the wheel builds, installs into a fresh venv, and runs.

Offline and quick: the wheel is built from a copy of the sources (so no
build/ or egg-info lands in the checkout) with the setuptools already in the
test environment (`--no-build-isolation --no-index`), and installed with
`--no-deps --no-index` into a venv made without pip. That venv sees the
dependencies through a .pth line naming this environment's site-packages: a
path line only, so the editable install's own .pth hook there is not run and
`import jaxdl` can only find the wheel's copy. Both commands run from a
directory outside the repository, with PYTHONPATH cleared.
"""
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
PACKAGES = ("jaxdl",)  # pyproject.toml's [tool.setuptools.packages.find] include
# The clone's other packages, copied into the build too: the wheel must leave them out (they run from a clone).
CLONE_ONLY = ("experiments", "benchmarks")


def build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPOSITORY / name, source / name)
    for package in PACKAGES + CLONE_ONLY:
        shutil.copytree(REPOSITORY / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, text=True)
    (wheel,) = (tmp_path / "dist").glob("jaxdl-*.whl")
    return wheel


def fresh_venv(tmp_path: Path) -> Path:
    """A venv without pip whose site-packages reaches this environment's installed dependencies."""
    root = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    dependencies = [sysconfig.get_path("purelib"), *site.getsitepackages()]
    Path(purelib, "jaxdl_test_dependencies.pth").write_text("\n".join(dict.fromkeys(dependencies)) + "\n")
    return root


def test_the_wheel_installs_into_a_fresh_venv_and_runs_outside_the_repository(tmp_path):
    wheel = build_wheel(tmp_path)
    shipped = set(zipfile.ZipFile(wheel).namelist())
    missing = [str(path.relative_to(REPOSITORY)) for package in PACKAGES
               for path in (REPOSITORY / package).rglob("*")
               if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
               and path.relative_to(REPOSITORY).as_posix() not in shipped]
    assert not missing, f"files of the package left out of {wheel.name}: {missing}"
    top_level = {name.split("/")[0] for name in shipped if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == set(PACKAGES), f"{wheel.name} installs {sorted(top_level)} into site-packages"
    assert "jaxdl/py.typed" in shipped  # PEP 561: type checkers read jaxdl's annotations

    root = fresh_venv(tmp_path)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(root / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True, text=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}

    helped = subprocess.run([root / "bin" / "jaxdl", "--help"], cwd=elsewhere, env=env, capture_output=True,
                            text=True)
    assert helped.returncode == 0, helped.stderr
    assert all(command in helped.stdout for command in ("classify", "convert", "finetune", "prepare"))

    imported = subprocess.run(
        [root / "bin" / "python", "-c", "import jaxdl, jaxdl.pretrained.imagenet_classes; print(jaxdl.__file__); "
                                        "print(len(jaxdl.pretrained.imagenet_classes.class_names()))"],
        cwd=elsewhere, env=env, capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr
    where, classes = imported.stdout.split()
    assert Path(where).is_relative_to(root), f"imported {where}, not the wheel installed in {root}"
    assert classes == "1000"  # the class names the CLI prints come with the installed dependencies
