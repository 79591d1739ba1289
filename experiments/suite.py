"""Runs every experiment that works on offline data and prints one results table.

Columns: experiment, metric, our value, the tutorial's reference value, and
whether ours meets it. Exits non-zero when any reference is missed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

EXPERIMENTS = ("neuron", "basics", "penguins", "digits", "classify", "transfer")


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


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("names", nargs="*", default=list(EXPERIMENTS), help="experiments to run (default: all)")
    cli.add_argument("--out", default=None, help="root folder for the runs (default: runs)")
    args = cli.parse_args(argv)

    rows, failed = [], 0
    for name in args.names:
        module = importlib.import_module(f"experiments.{name}")
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        metrics = module.run(["--quiet"] + (["--out", args.out] if args.out else []))
        seconds = time.perf_counter() - started
        for check in module.checks(metrics) if hasattr(module, "checks") else module.CHECKS:
            value = metrics.get(check.metric)
            ok = value is not None and check.holds(value)
            failed += not ok
            rows.append((name, check.metric, _show(value), check.reference, "ok" if ok else "MISSED"))
        rows.append((name, "seconds", f"{seconds:.1f}", "", ""))

    header = ("experiment", "metric", "ours", "tutorial / target", "")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print()
    for row in [header, tuple("-" * w for w in widths)] + rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"\n{len([r for r in rows if r[4]])} checks, {failed} missed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
