"""`python -m benchmarks`: the report's arithmetic on given numbers, and the report it writes.

The runner test is kept cheap for `make test`: `--quick --only train_small`
measures one benchmark and must still write every section (the others say
they were not run, and why). The whole quick run, all five benchmarks
measured, is the slow test (`pytest -m slow`).
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.__main__ import BENCHMARKS

REPOSITORY = Path(__file__).resolve().parents[2]


def run(seconds_a, seconds_b):
    return report.result("t", "about", {"a": report.figure(seconds_a, "s"), "b": report.figure(seconds_b, "s")},
                         [report.ratio("a", "b")])


def test_spread_is_median_min_max():
    assert report.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert report.spread([4.0, 1.0]) == {"median": 2.5, "min": 1.0, "max": 4.0, "n": 2}
    with pytest.raises(ValueError, match="no values"):
        report.spread([])


def test_ratios_are_summarized_per_repeat_not_as_a_ratio_of_medians():
    summary = report.summarize([run(2.0, 1.0), run(3.0, 3.0), run(10.0, 2.0)])
    assert summary["figures"]["a"]["median"] == 3.0 and summary["figures"]["b"]["median"] == 2.0
    (pair,) = summary["ratios"]
    # per-repeat ratios 2.0, 1.0, 5.0: median 2.0 (the ratio of medians would be 1.5)
    assert (pair["ours"], pair["peer"], pair["median"], pair["min"], pair["max"], pair["n"]) == ("a", "b", 2.0, 1.0,
                                                                                                 5.0, 3)
    text = report.section_markdown("example", summary)
    assert "| a | 3.00 (2.00-10.0) | s | 3 |" in text
    assert "| a / b | 2.00x (1.00-5.00) | 3 |" in text


def test_a_missing_peer_and_a_skipped_benchmark_are_reported():
    lone = report.result("t", "about", {"a": report.figure(1.0, "s")}, [report.ratio("a", "b")], ["b: not installed"])
    text = report.section_markdown("example", report.summarize([lone]))
    assert "| a / b | not measured (see notes) | 0 |" in text and "- b: not installed" in text
    skipped = report.summarize([report.result("t", "about", skipped="no photos here")])
    assert "**Skipped**: no photos here" in report.section_markdown("example", skipped)


def test_readme_quotes_the_marked_ratios_of_the_run_between_its_markers():
    marked = report.result("Speed", "about", {"a": report.figure(2.0, "s"), "b": report.figure(1.0, "s"),
                                             "c": report.figure(4.0, "s")},
                           [report.ratio("a", "b", readme=True), report.ratio("a", "c")])
    summaries = [report.summarize([marked, marked]), report.summarize([report.result("Photos", "", skipped="none")])]
    block = report.readme_ratios(summaries, "2026-11-27 15:00 UTC")
    assert "| Speed | a / b | 2.00x (2.00-2.00) |" in block and "a / c" not in block
    assert "| Photos | skipped | none |" in block and "2026-11-27 15:00 UTC" in block
    readme = f"# x\n\nbefore\n{report.README_BEGIN}\nold figures\n{report.README_END}\nafter\n"
    rewritten = report.with_readme_ratios(readme, block)
    assert rewritten == f"# x\n\nbefore\n{report.README_BEGIN}\n{block}\n{report.README_END}\nafter\n"
    assert report.with_readme_ratios(rewritten, block) == rewritten
    with pytest.raises(ValueError, match="README.md lacks the lines"):
        report.with_readme_ratios("# no markers\n", block)
    readme_text = (REPOSITORY / "README.md").read_text()
    assert readme_text.count(report.README_BEGIN) == 1 and readme_text.count(report.README_END) == 1


def sections(text: str) -> dict[str, str]:
    """`## heading` -> its body."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def check_report(path: Path, measured: tuple[str, ...]) -> dict[str, str]:
    found = sections(path.read_text())
    assert "Machine" in found and "jax " in found["Machine"] and "devices:" in found["Machine"]
    assert "load average" in found["Machine"]
    for name in BENCHMARKS:
        (body,) = [body for heading, body in found.items() if f"`benchmarks/{name}.py`" in heading]
        if name in measured:
            assert "| figure | median (min-max) | unit | repeats |" in body or "**Skipped**: the cat photos" in body, \
                body
        else:
            assert "**Skipped**: not run (`--only" in body, body
    return found


def test_quick_run_writes_every_section(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "train_small", "--out", str(out)],
                   check=True, cwd=REPOSITORY, capture_output=True, text=True)
    found = check_report(out, ("train_small",))
    assert "--quick --only train_small" in out.read_text()
    (body,) = [body for heading, body in found.items() if "train_small" in heading]
    assert re.search(r"\| jaxdl `fit` \| [\d.,]+ \| ms/epoch \| 1 \|", body)
    assert "/ jaxdl `fit` |" in body or "| jaxdl `fit` / hand-written" in body


@pytest.mark.slow
def test_whole_quick_run_measures_every_benchmark(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)], check=True, cwd=REPOSITORY,
                   capture_output=True, text=True)
    check_report(out, BENCHMARKS)
