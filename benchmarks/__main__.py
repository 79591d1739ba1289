"""`python -m benchmarks`: every benchmark, each repeat in a fresh process, summarized into BENCHMARKS.md.

Each repeat of each benchmark runs `python -m benchmarks.NAME --json FILE
[--quick]` in a new process (nothing compiled or cached in memory carries
over) and the report gives each figure's median and spread (min-max) over
the repeats, and each ratio against its named peer over the per-repeat
ratios (see `benchmarks.report`). A benchmark that fails or cannot run here
is reported in its section with the reason; the others still run.
`--only NAME ...` runs some benchmarks; the others' sections say they were not run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report

BENCHMARKS = ("train_small", "callback_hooks", "convnet_training", "nnx_training", "mobilenet_inference", "finetune",
              "input_pipeline", "data_parallel")
REPOSITORY = Path(__file__).resolve().parents[1]


def machine_section() -> str:
    """The machine, its JAX devices and its load, measured in a fresh process (as the benchmarks are)."""
    code = ("import jax, json; from experiments.common import machine; "
            "print(json.dumps({'machine': machine(), 'devices': [str(d) for d in jax.devices()]}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPOSITORY)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return (f"- machine: {found['machine']}\n- devices: {', '.join(found['devices'])}\n"
                   f"- python {sys.version.split()[0]}, {os.cpu_count()} logical cores\n")


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


def run_once(name: str, quick: bool, folder: str, repeat: int, timeout: float) -> dict:
    """One repeat of one benchmark in a new process: its `measure` result, or a skip saying why it failed."""
    out = Path(folder) / f"{name}-{repeat}.json"
    # Every repeat compiles afresh: jaxdl's compilation cache off (benchmarks.convnet_training measures it, in
    # processes of its own).
    env = {**os.environ, "JAXDL_COMPILATION_CACHE": "0"}
    command = [sys.executable, "-m", f"benchmarks.{name}", "--json", str(out)] + (["--quick"] if quick else [])
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPOSITORY, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return report.result(name, "", skipped=f"`{' '.join(command[1:])}` ran over {timeout:.0f} s")
    if done.returncode or not out.exists():
        tail = "\n".join(done.stderr.strip().splitlines()[-3:])
        return report.result(name, "", skipped=f"`{' '.join(command[1:])}` failed (exit {done.returncode}): {tail}")
    return json.loads(out.read_text())


def run_benchmark(name: str, quick: bool, repeats: int, timeout: float) -> tuple[dict, float]:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        runs = []
        for repeat in range(repeats):
            runs.append(run_once(name, quick, folder, repeat, timeout))
            print(f"{name} repeat {repeat + 1}/{repeats}: "
                  f"{runs[-1]['skipped'] or 'done'} ({time.perf_counter() - started:.0f} s)", flush=True)
            if runs[-1]["skipped"]:  # a benchmark that cannot run here will not run on the next repeat either
                break
    return report.summarize(runs), time.perf_counter() - started


def write_report(path: Path, header: str, sections: list[str]) -> None:
    path.write_text(header + "\n" + "\n".join(sections))


def main(argv=None):
    cli = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    cli.add_argument("--repeats", type=int, default=3, help="fresh processes per benchmark (default 3)")
    cli.add_argument("--quick", action="store_true", help="one repeat of each benchmark's quick size")
    cli.add_argument("--out", type=Path, default=REPOSITORY / "BENCHMARKS.md", help="the report to write")
    cli.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME",
                     help=f"run only these of {', '.join(BENCHMARKS)}")
    cli.add_argument("--note", default="", help="a sentence for the report's header (why these options, ...)")
    cli.add_argument("--timeout", type=float, default=1800, help="seconds one repeat may take (default 1800)")
    cli.add_argument("--readme", type=Path, default=REPOSITORY / "README.md",
                     help="whose benchmark-ratios block to rewrite (a full run of every benchmark only)")
    args = cli.parse_args(argv)
    if args.repeats < 1:
        cli.error(f"--repeats must be at least 1, got {args.repeats}")
    repeats = 1 if args.quick else args.repeats
    options = " ".join(["--quick" if args.quick else f"--repeats {repeats}"]
                       + (["--only " + " ".join(args.only)] if args.only else []))
    started, load_before = time.perf_counter(), load_text()
    machine = machine_section()
    sections, summaries = [], []
    for name in BENCHMARKS:
        if args.only and name not in args.only:
            sections.append(f"## `benchmarks/{name}.py`\n\n**Skipped**: not run (`--only {' '.join(args.only)}`).\n")
            continue
        summary, seconds = run_benchmark(name, args.quick, repeats, args.timeout)
        summaries.append(summary)
        sections.append(report.section_markdown(name, summary) + f"\n_{seconds:.0f} s for {summary['repeats']} "
                        f"repeat{'s' * (summary['repeats'] > 1)}; load average after: {load_text()}._\n")
    generated = f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
    header = (f"# Benchmarks\n\nGenerated by `python -m benchmarks {options}` on "
              f"{generated} in {time.perf_counter() - started:.0f} s; "
              "every figure below was measured by that run (never typed in). Each repeat of each benchmark ran "
              "in a fresh process; a figure is the median of the repeats with their spread (min-max), a ratio "
              "`ours / peer` the median and spread of the per-repeat ratios. "
              "Regenerate with `python -m benchmarks` (`--quick` for a minute's smoke run). "
              f"{args.note}\n\n"
              f"## Machine\n\n{machine}- load average at the start: {load_before}; at the end: {load_text()} "
              "(other work on the machine slows every figure; judge them by it)\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_report(args.out, header, sections)
    print(f"wrote {args.out}")
    if not args.quick and not args.only:
        block = report.readme_ratios(summaries, f"{generated}, load average at the start {load_before}")
        args.readme.write_text(report.with_readme_ratios(args.readme.read_text(), block))
        print(f"wrote its ratios into {args.readme}")


if __name__ == "__main__":
    main()
