"""Reader-first docstrings on the public entry points, and no measured timings in the package's code (issue 35).

Every entry point documents each argument of its signature as it is now under `Args:`, with `Returns:` and
(where the function raises errors of its own) `Raises:`, as optax and Flax write them. Timings live in
docs/numerics.md: at most 5 lines of package code may quote one.
"""
from __future__ import annotations

import inspect
import pathlib
import re

import pytest

from jaxdl.data import sources
from jaxdl.models import saving as checkpoint
from jaxdl.pretrained import finetune
from jaxdl.pretrained.classifier import ImageClassifier
from jaxdl.training import steps as train, sweeps, trainer as driver, uncertainty

ENTRY_POINTS = [driver.fit, driver.evaluate, driver.predict, train.create_train_state, train.make_train_step,
                train.make_eval_step, uncertainty.mc_predict, sweeps.sweep, sources.tfds_source, finetune.finetune,
                ImageClassifier.load, ImageClassifier.save, ImageClassifier.classify, ImageClassifier.probabilities,
                checkpoint.save_model, checkpoint.load_model]
# The functions whose bodies raise no error of their own: Raises would have nothing to list.
RAISE_NOTHING = {ImageClassifier.probabilities}

# A number with a duration unit, a throughput, or a measured ratio such as "1.024x".
TIMING = re.compile(r"[0-9][0-9,.]*(-[0-9.]+)? ?(ms|us|µs|s|seconds|minutes)\b|images/s|img/s|images per second"
                    r"|[0-9]\.[0-9]+x\b|[0-9]x (faster|slower)|times (faster|slower)")
PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "jaxdl"


@pytest.mark.parametrize("function", ENTRY_POINTS, ids=lambda function: function.__qualname__)
def test_entry_point_documents_every_argument(function):
    doc = inspect.getdoc(function) or ""
    summary = doc.splitlines()[0] if doc else ""
    assert summary and not summary.startswith(" "), f"{function.__qualname__} has no one-line summary"
    sections = ["Args:", "Returns:"] + ([] if function in RAISE_NOTHING else ["Raises:"])
    assert [section for section in sections if section not in doc] == [], function.__qualname__
    args = doc.split("Args:")[1].split("Returns:")[0]
    documented = set(re.findall(r"^\s+\**(\w+):", args, re.MULTILINE))
    parameters = [name for name in inspect.signature(function).parameters if name not in ("self", "cls")]
    assert [name for name in parameters if name not in documented] == [], function.__qualname__


def test_package_code_quotes_at_most_five_timings():
    quoting = [f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
               for path in sorted(PACKAGE.rglob("*.py"))
               for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
               if TIMING.search(line)]
    assert len(quoting) <= 5, "timings belong in docs/numerics.md:\n" + "\n".join(quoting)
