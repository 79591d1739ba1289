import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from experiments.common import shared_data_dir  # imports neither jax nor keras: the settings below come first

# Keras (a test-only reference) must run on the JAX backend; set before any import of keras.
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Full float32 matrix products everywhere, also in subprocesses: GPUs default to TF32 (10-bit mantissa)
# and TPUs to bfloat16 passes, which the parity tests' 1e-5 could not survive. No effect on CPU.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# XLA:CPU compiles the suite's programs with LLVM's optimizations off: compiling, not running, is
# what the suite's time goes to (its programs are small), and the flag cut the CPU time of
# training/test_steps + training/test_step_contract by 34% and of pretrained/test_finetune +
# pretrained/test_classifier by 19% (jax 0.10.2). The
# code it generates rounds as other CPUs' code does, which the tolerance policy already covers.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
# One on-disk compilation cache for the session and its subprocesses (the CLI, save/load in a new
# process): a program compiled once is read back instead of compiled again.
_OWN_XLA_CACHE = None if "JAX_COMPILATION_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="jaxdl-test-xla-")
if _OWN_XLA_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_XLA_CACHE
    # Every program, however quick to compile (JAX's default skips those under a second): the suite's are
    # small, and the other worker and the CLI's subprocesses compile many of the same ones.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

TESTS = Path(__file__).parent
CATS = shared_data_dir() / "cats"
MNIST = shared_data_dir() / "mnist"  # the four original IDX files (its README has their checksums)


def pytest_unconfigure(config):
    if _OWN_XLA_CACHE:
        shutil.rmtree(_OWN_XLA_CACHE, ignore_errors=True)


def pytest_configure(config):
    # pytest-xdist's loadfile scheduler re-sorts the files by their number of tests unless told not to
    # (`--no-loadscope-reorder`): keep the order below (HEAVY_FIRST), which is by seconds, not by count. Seen
    # without it: test_default_compiler_flags.py (one test, 16 s) handed out last and test_finetune.py late.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    config.addinivalue_line("markers", "slow: thorough runs left out of `make test` (pytest -m slow runs them)")
    config.addinivalue_line("markers", "requires_cats: needs the tutorial's cat photos (../shared/data/cats); "
                                       "skipped where they are absent, failed instead in CI (CI=true)")
    config.addinivalue_line("markers", "requires_mnist: needs MNIST's four IDX files (../shared/data/mnist); "
                                       "skipped where they are absent, failed instead in CI (CI=true)")


# The heaviest files first, each file's seconds (calls and setups, --durations=0) in a `make test` run on this
# 2-core machine (2026-12-08, AMD EPYC):
# `make test`'s --dist loadfile hands each worker whole files in queue order, and a long file started last keeps
# the other worker idle at the end. Longest first, the light files after them fill in whichever worker frees first
# (longest-processing-time order).
HEAVY_FIRST = (
    "project/test_experiments.py",  # 91
    "project/test_docs.py",  # 79
    "runtime/test_sharding.py",  # 73
    "training/test_resume.py",  # 71
    "pretrained/test_finetune.py",  # 69
    "models/test_mobilenet_v2.py",  # 62
    "pretrained/test_classifier.py",  # 82 (less since its three CLI processes run at once)
    "training/test_steps.py",  # 51
    "training/test_nnx.py",  # 44
    "data/test_sources.py",  # 36
    "models/test_layers.py",  # 30
    "training/test_flax_examples.py",  # 29
    "models/test_model_conventions.py",  # 26
    "models/test_nnx_mobilenet_v2.py",  # 25
    "training/test_fit_front_door.py",  # 25
    "training/test_step_contract.py",  # 23
    "training/test_callbacks.py",  # 22
    "project/test_benchmarks.py",  # 22
    "runtime/test_program_cache.py",  # 18
    "data/test_mnist_real.py",  # 17
    "pretrained/test_convert.py",  # 15
    "training/test_run_checkpoint.py",  # 15
    "pretrained/test_cli_finetune.py",  # 15
    "training/test_audit_regressions.py",  # 15
    "training/test_metrics.py",  # 11
    "runtime/test_compilation_cache.py",  # 11
)  # the rest under 9 s each


def pytest_collection_modifyitems(session, config, items):
    rank = {name: position for position, name in enumerate(HEAVY_FIRST)}

    def position(item):  # by the file's path under tests/ (a test file elsewhere, e.g. a tmp_path's, comes last)
        name = item.path.relative_to(TESTS).as_posix() if item.path.is_relative_to(TESTS) else None
        return rank.get(name, len(rank))

    items.sort(key=position)  # stable: each file's own order is kept


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Tests marked `requires_cats` / `requires_mnist` skip in a clone without that shared data; CI has it, so
    there its absence fails."""
    for marker, path, what in (("requires_cats", CATS, "the tutorial's cat photos"),
                               ("requires_mnist", MNIST, "MNIST's four IDX files")):
        if item.get_closest_marker(marker) is None or path.is_dir():
            continue
        reason = f"needs {what} at {path} (../shared/data/{path.name} beside the clone); not in this checkout"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true, but the test {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def mnist_dir():
    """`../shared/data/mnist`: tests that use it are marked `requires_mnist` (skipped where it is absent)."""
    return MNIST


@pytest.fixture(scope="session")
def jaxdl_cache(tmp_path_factory):
    """A private cache for converted weights, shared by the tests of one session (and their subprocesses)."""
    path = tmp_path_factory.mktemp("jaxdl-cache")
    os.environ["JAXDL_CACHE"] = str(path)
    return path


@pytest.fixture
def main_here(monkeypatch, capsys, jaxdl_cache):
    """`main_here(*args) -> (exit code, stdout, stderr)`: the command's own `main`, in this process.

    For the runs after a first start-up of the command in a process of its own: the same code,
    without starting JAX again. `main` would point JAX's compilation cache at $JAXDL_CACHE for the rest of
    the session: the suite's is kept.
    """
    from jaxdl import cli

    monkeypatch.setattr(cli, "enable_compilation_cache", lambda: None)
    monkeypatch.setenv("JAXDL_CACHE", str(jaxdl_cache))

    def main(*args):
        capsys.readouterr()
        code = cli.main([str(arg) for arg in args])
        printed = capsys.readouterr()
        return code, printed.out, printed.err

    return main


@pytest.fixture(scope="session")
def converted_models(tmp_path_factory):
    """`converted(name)`: each Keras model built once per test process, with its outputs (and each block's,
    `BLOCK_ENDS`) on random images and our conversion of its file. A cache rather than a parametrized
    fixture, so that the shape-mismatch test can take the legacy file of one config without rebuilding it."""
    done = {}

    import keras
    import numpy as np

    from jaxdl.pretrained.convert import from_keras
    from tests.support.keras_reference import BLOCK_ENDS, CONFIGS, build, save_legacy_h5

    def convert(name: str):
        if name not in done:
            config = CONFIGS[name]
            keras_model = build(config["alpha"], config["size"], config["include_top"], config["pooling"], seed=1)
            path = tmp_path_factory.mktemp("keras") / {"legacy": "weights.h5", "weights.h5": "m.weights.h5",
                                                       "keras": "m.keras", "model.h5": "model.h5"}[config["layout"]]
            if config["layout"] == "legacy":
                save_legacy_h5(keras_model, path)
            elif config["layout"] == "weights.h5":
                keras_model.save_weights(path)
            else:
                keras_model.save(path)
            images = np.random.default_rng(2).uniform(-1, 1, (2, config["size"], config["size"], 3))
            images = images.astype(np.float32)
            # One Keras program for the output and every block's: Keras compiles each model it predicts with.
            probe = keras.Model(keras_model.input, [keras_model.get_layer(layer).output for layer in BLOCK_ENDS]
                                + [keras_model.output])
            *blocks, expected = [np.asarray(output) for output in probe.predict(images, verbose=0)]
            model, variables = from_keras(path, pooling=config["pooling"])
            done[name] = config, model, variables, images, expected, dict(zip(BLOCK_ENDS, blocks)), path
        return done[name]

    return convert


@pytest.fixture(scope="session")
def keras_mobilenet_v2():
    """Keras's MobileNetV2 (1.0, 224, random weights): built once, as building it takes seconds."""
    import keras

    return keras.applications.MobileNetV2(weights=None)


@pytest.fixture(scope="session")
def imagenet_classifier(jaxdl_cache):
    from jaxdl.pretrained.classifier import ImageClassifier

    return ImageClassifier.load("imagenet")


def pytest_terminal_summary(terminalreporter):
    """Per comparison kind, the difference that came closest to its tolerance: how much room the policy leaves."""
    from tests.support import tolerance

    if tolerance.margins:
        terminalreporter.section("tolerance margins: per kind, the tightest comparison (difference / allowed)")
        for kind, (seen, allowed) in sorted(tolerance.margins.items()):
            ratio = f"{allowed / seen:.0f}x" if seen else "exact"
            terminalreporter.write_line(f"{kind:40s} {seen:.3g} / {allowed:.3g}  ({ratio})")


def pytest_sessionfinish(session):
    """On a pytest-xdist worker: hand this worker's tolerance margins to the controller, which prints them."""
    from tests.support import tolerance

    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["tolerance_margins"] = json.dumps(tolerance.margins)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """On the pytest-xdist controller: merge a finished worker's margins into this process's table."""
    from tests.support import tolerance

    for kind, (seen, allowed) in json.loads(getattr(node, "workeroutput", {}).get("tolerance_margins", "{}")).items():
        tolerance.record(kind, seen, allowed)


@pytest.hookimpl(specname="pytest_terminal_summary")
def pytest_terminal_summary_of_doc_blocks(terminalreporter):
    """How many python blocks of README.md and docs/*.md tests/project/test_docs.py ran and skipped, and why.

    Counted from the reports (tagged `doc_block` by each block's test), which
    pytest-xdist's workers send to the controller, so the count is whole.
    """
    import collections

    outcomes, reasons = collections.Counter(), collections.Counter()
    for reports in terminalreporter.stats.values():
        for report in reports:
            properties = dict(getattr(report, "user_properties", ()))
            if getattr(report, "when", None) != "call" or "doc_block" not in properties:
                continue
            outcomes[report.outcome] += 1
            if report.skipped:
                reasons[str(report.longrepr[-1]).removeprefix("Skipped: ")] += 1
    if outcomes:
        why = "; ".join(f"{reason}: {count}" for reason, count in sorted(reasons.items()))
        terminalreporter.section("python blocks of README.md and docs/*.md (tests/project/test_docs.py)")
        terminalreporter.write_line(f"{outcomes['passed'] + outcomes['failed']} run ({outcomes['failed']} failed), "
                                    f"{outcomes['skipped']} skipped" + (f" ({why})" if why else ""))
