"""What a benchmark hands back, and the arithmetic and Markdown of the report `python -m benchmarks` writes.

Every benchmark module has `measure(quick: bool) -> dict`, plain data:

    {"title": "MobileNetV2 inference",             # the section's heading
     "about": "what was measured, how",            # one paragraph
     "figures": {"jaxdl, batch 32": {"value": 223.2, "unit": "img/s"}, ...},
     "ratios": [{"ours": "jaxdl, batch 32", "peer": "Keras, batch 32"}, ...],
     "notes": ["ONNX Runtime: skipped (not installed)", ...],
     "skipped": None}                              # or the reason the whole benchmark could not run

and `python -m benchmarks.NAME --json PATH [--quick]` writes it (`run_cli`).
A ratio is `ours / peer` of one repeat's figures; over repeats the report
gives each figure's and each ratio's median and spread (min-max), so a
ratio's spread is that of the per-repeat ratios, not a ratio of medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def figure(value: float, unit: str) -> dict:
    return {"value": float(value), "unit": unit}


def ratio(ours: str, peer: str, readme: bool = False) -> dict:
    """`ours / peer`, two figure labels of the same benchmark; `readme`: quoted in README.md too."""
    return {"ours": ours, "peer": peer, "readme": readme}


def result(title: str, about: str, figures: dict | None = None, ratios: list | None = None,
           notes: list | None = None, skipped: str | None = None) -> dict:
    return {"title": title, "about": about, "figures": figures or {}, "ratios": ratios or [],
            "notes": notes or [], "skipped": skipped}


def spread(values) -> dict:
    """Median, min and max of `values`, and how many there were."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values to summarize")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def per_repeat_ratios(runs: list[dict], ours: str, peer: str) -> list[float]:
    """`ours / peer` in each repeat that measured both."""
    return [run["figures"][ours]["value"] / run["figures"][peer]["value"] for run in runs
            if ours in run["figures"] and peer in run["figures"] and run["figures"][peer]["value"]]


def summarize(runs: list[dict]) -> dict:
    """One benchmark's repeats (each a `measure` result) as medians and spreads.

    Figures keep the order they first appear in; a figure or ratio some
    repeats lack is summarized over those that have it (`n` says how many).
    """
    measured = [run for run in runs if not run.get("skipped")]
    first = (measured or runs)[0]
    summary = {"title": first["title"], "about": first["about"], "skipped": None if measured else first["skipped"],
               "repeats": len(runs), "figures": {}, "ratios": [], "notes": []}
    for run in runs:
        summary["notes"] += [note for note in run.get("notes", []) if note not in summary["notes"]]
    for run in measured:
        for label, fig in run["figures"].items():
            summary["figures"].setdefault(label, {"unit": fig["unit"], "values": []})["values"].append(fig["value"])
    for fig in summary["figures"].values():
        fig.update(spread(fig["values"]))
    seen = set()
    for run in measured:
        for pair in run["ratios"]:
            key = (pair["ours"], pair["peer"])
            if key in seen:
                continue
            seen.add(key)
            values = per_repeat_ratios(measured, *key)
            summary["ratios"].append({"ours": key[0], "peer": key[1], "readme": pair.get("readme", False),
                                      **(spread(values) if values else {"n": 0})})
    return summary


def number(value: float) -> str:
    """Three significant figures, thousands separated; plain enough to read in a table."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def with_spread(stats: dict, suffix: str = "") -> str:
    if stats["n"] == 1:
        return f"{number(stats['median'])}{suffix}"
    return f"{number(stats['median'])}{suffix} ({number(stats['min'])}-{number(stats['max'])})"


def section_markdown(name: str | None, summary: dict) -> str:
    where = f" (`benchmarks/{name}.py`)" if name else ""
    lines = [f"## {summary['title']}{where}", "", summary["about"], ""]
    if summary["skipped"]:
        lines += [f"**Skipped**: {summary['skipped']}", ""]
    else:
        lines += ["| figure | median (min-max) | unit | repeats |", "|---|---|---|---|"]
        lines += [f"| {label} | {with_spread(fig)} | {fig['unit']} | {fig['n']} |"
                  for label, fig in summary["figures"].items()]
        lines.append("")
        if summary["ratios"]:
            lines += ["| ratio | median (min-max) | repeats |", "|---|---|---|"]
            for pair in summary["ratios"]:
                text = with_spread(pair, "x") if pair["n"] else "not measured (see notes)"
                lines.append(f"| {pair['ours']} / {pair['peer']} | {text} | {pair['n']} |")
            lines.append("")
    lines += [f"- {note}" for note in summary["notes"]]
    return "\n".join(lines).rstrip() + "\n"


README_BEGIN = "<!-- benchmark ratios: written by `python -m benchmarks`, not by hand -->"
README_END = "<!-- end of benchmark ratios -->"


def readme_ratios(summaries: list[dict], generated: str) -> str:
    """The ratios marked `readme`, as README.md quotes them: copied from the run, never typed in."""
    lines = [f"Measured by `python -m benchmarks` ({generated}); [BENCHMARKS.md](BENCHMARKS.md) has every figure, "
             "the machine and its load.", "", "| benchmark | ours / peer | median (min-max) |", "|---|---|---|"]
    for summary in summaries:
        if summary["skipped"]:
            lines.append(f"| {summary['title']} | skipped | {summary['skipped'].splitlines()[0][:120]} |")
        for pair in summary["ratios"]:
            if pair["readme"]:
                text = with_spread(pair, "x") if pair["n"] else "not measured (see BENCHMARKS.md)"
                lines.append(f"| {summary['title']} | {pair['ours']} / {pair['peer']} | {text} |")
    return "\n".join(lines)


def with_readme_ratios(readme: str, block: str) -> str:
    """README.md's text with `block` between its benchmark markers (an error naming them if either is missing)."""
    if README_BEGIN not in readme or README_END not in readme:
        raise ValueError(f"README.md lacks the lines {README_BEGIN!r} and {README_END!r} that the benchmark "
                         "ratios go between")
    before, rest = readme.split(README_BEGIN, 1)
    return before + README_BEGIN + "\n" + block + "\n" + README_END + rest.split(README_END, 1)[1]


def run_cli(measure, description: str, argv=None, print_table=None) -> None:
    """The command line every benchmark module shares.

    `--json PATH` writes `measure(quick)` there (what `python -m benchmarks`
    reads); without it the human-readable table is printed.
    """
    cli = argparse.ArgumentParser(description=description)
    cli.add_argument("--quick", action="store_true", help="the small sizes (seconds, not minutes)")
    cli.add_argument("--json", type=Path, help="write the measured figures to this file instead of printing")
    args = cli.parse_args(argv)
    measured = measure(args.quick)
    if args.json:
        args.json.write_text(json.dumps(measured, indent=1))
    else:
        (print_table or print_result)(measured)


def print_result(measured: dict) -> None:
    """The default human-readable output: one repeat's section as the report would show it."""
    print(section_markdown(None, summarize([measured])))
