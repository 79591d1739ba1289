"""Runs every experiment that works on offline data and prints one results table.

Columns: experiment, metric, our value, the tutorial's reference value, and
whether ours meets it. Exits non-zero when any reference is missed. The table
names the machine it was measured on: trained metrics end elsewhere on
another processor, which is why every check is a band, not a point.

`--seeds 0 1 2 3 4` runs the whole suite once per seed and prints each
metric's lowest and highest value over the seeds: the evidence that a band
holds for more than the one seed the table shows.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

from experiments.common import machine

EXPERIMENTS = ("neuron", "basics", "penguins", "weather", "digits", "mnist", "cnn", "classify", "transfer")


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".") if value != int(value) else f"{value:g}"
    if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
        return " ".join(_show(v) for v in value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        text = ", ".join(v.split(",")[0] for v in value)
        return text if len(text) <= 40 else text[:37] + "..."
    if isinstance(value, str):
        return value
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def run_checks(names, out: str | None, seed: int | None) -> list[tuple]:
    """(experiment, metric, value, reference, holds) for every check, plus each experiment's seconds.

    `holds` is True or False for a check that ran, None for a plain figure (the
    metrics named in an experiment's `SUITE_FIGURES`, and its seconds), and
    "skipped: why" for a check whose data is not here (an experiment's
    `suite_args()` says which arguments to run it with and what it skips).
    """
    results = []
    for name in names:
        module = importlib.import_module(f"experiments.{name}")
        print(f"== {name}" + ("" if seed is None else f" (seed {seed})"), flush=True)
        arguments, skipped = module.suite_args() if hasattr(module, "suite_args") else ([], [])
        started = time.perf_counter()
        metrics = module.run(["--quiet"] + arguments + (["--out", out] if out else [])
                             + ([] if seed is None else ["--seed", str(seed)]))
        seconds = time.perf_counter() - started
        # Plain figures an experiment asks to show (mnist: which data it trained on), before its checks.
        results.extend((name, metric, metrics.get(metric, "-"), "", None)
                       for metric in getattr(module, "SUITE_FIGURES", ()))
        for check in module.checks(metrics) if hasattr(module, "checks") else module.CHECKS:
            value = metrics.get(check.metric)
            results.append((name, check.metric, value, check.reference, value is not None and check.holds(value)))
        results.extend((name, metric, "-", reference, reason) for metric, reference, reason in skipped)
        results.append((name, "seconds", round(seconds, 1), "", None))
    return results


def _verdict(holds) -> str:
    return holds if isinstance(holds, str) else "" if holds is None else "ok" if holds else "MISSED"


def _print_table(header: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print()
    for row in [header, tuple("-" * w for w in widths)] + rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def _range(values: list) -> str:
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        low, high = min(values), max(values)
        return _show(low) if low == high else f"{_show(low)} .. {_show(high)}"
    shown = sorted({_show(v) for v in values})
    return shown[0] if len(shown) == 1 else " | ".join(shown)


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("names", nargs="*", default=list(EXPERIMENTS), help="experiments to run (default: all)")
    cli.add_argument("--out", default=None, help="root folder for the runs (default: runs)")
    cli.add_argument("--seeds", type=int, nargs="+", default=None,
                     help="run everything once per seed and print each metric's range (default: each "
                          "experiment's own seed, once)")
    args = cli.parse_args(argv)

    if not args.seeds:
        results = run_checks(args.names, args.out, None)
        rows = [(name, metric, _show(value), reference, _verdict(holds))
                for name, metric, value, reference, holds in results]
        _print_table(("experiment", "metric", "ours", "tutorial / target", ""), rows)
        failed = sum(holds is False for *_, holds in results)
        skipped = sum(isinstance(holds, str) for *_, holds in results)
        print(f"\n{sum(isinstance(holds, bool) for *_, holds in results)} checks, {failed} missed, {skipped} skipped")
        print(f"measured on {machine()}")
        return 1 if failed else 0

    by_seed = [run_checks(args.names, args.out, seed) for seed in args.seeds]
    rows, failed = [], 0
    for index, (name, metric, _, reference, holds) in enumerate(by_seed[0]):
        values = [results[index][2] for results in by_seed]
        misses = [seed for seed, results in zip(args.seeds, by_seed) if results[index][4] is False]
        failed += bool(misses)
        verdict = _verdict(holds) if not misses else "MISSED for seeds " + " ".join(map(str, misses))
        rows.append((name, metric, _range(values), reference, verdict))
    _print_table(("experiment", "metric", f"seeds {' '.join(map(str, args.seeds))}: min .. max",
                  "tutorial / target", ""), rows)
    checks = sum(r[4] in ('ok',) or r[4].startswith('MISSED') for r in rows)
    print(f"\n{checks} checks over {len(args.seeds)} seeds, {failed} missed for some seed")
    print(f"measured on {machine()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
