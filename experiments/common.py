"""What every experiment shares: its output folder, its metrics file and its reference checks."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Callable


def shared_data_dir() -> Path:
    """The project's shared data: `../shared/data` beside the repository.

    $JAXDL_SHARED_DATA overrides it; a clone of a local checkout that has no
    `../shared` of its own looks beside the checkout it was cloned from.
    """
    if os.environ.get("JAXDL_SHARED_DATA"):
        return Path(os.environ["JAXDL_SHARED_DATA"])
    repository = Path(__file__).resolve().parents[1]
    beside = repository.parent / "shared" / "data"
    if beside.is_dir():
        return beside
    origin = subprocess.run(["git", "-C", str(repository), "config", "--get", "remote.origin.url"],
                            capture_output=True, text=True).stdout.strip()
    if origin and Path(origin).is_dir():
        return Path(origin).resolve().parent / "shared" / "data"
    return beside


def run_dir(name: str, root: str | None = None) -> Path:
    """`runs/NAME` (or under $JAXDL_RUNS), created if missing."""
    path = Path(root or os.environ.get("JAXDL_RUNS", "runs")) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def finish(out: Path, metrics: dict) -> dict:
    """Writes `metrics.json` and prints the metrics as one JSON object, the last line of output."""
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics), flush=True)
    return metrics


def parser(doc: str, trains: bool = True, precision: bool = False) -> argparse.ArgumentParser:
    """The experiments' common options; `trains` adds checkpointing, `precision` the computation dtype."""
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--out", default=None, help="folder for runs/NAME (default: runs or $JAXDL_RUNS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if trains:
        p.add_argument("--checkpoint-dir", default=None,
                       help="save every training run's checkpoints under this folder (one subfolder per model)")
        p.add_argument("--resume", action="store_true", help="continue the runs saved in --checkpoint-dir")
    if precision:
        p.add_argument("--precision", choices=("float32", "bfloat16", "float16"), default=None,
                       help="compute in this dtype, parameters staying float32 (default: the models' own, float32)")
    return p


def checkpointing(args) -> Callable[[str], dict]:
    """`options(name)`: the `fit` arguments the command line chose for the run `name`.

    Checkpoints under `--checkpoint-dir`, and `--precision` where the
    experiment offers it. First joins a multi-process run when the
    environment describes one (`jaxdl.runtime.distributed.initialize`): every
    training experiment runs the same way on one host or several.
    """
    from jaxdl.cli import run_directory
    from jaxdl.runtime import distributed

    distributed.initialize()
    try:
        root = run_directory(args.checkpoint_dir, args.resume)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    chosen = {} if getattr(args, "precision", None) is None else {"precision": args.precision}
    return lambda name: chosen if root is None else {**chosen, "checkpoint_dir": root / name}


@dataclasses.dataclass(frozen=True)
class Check:
    """A tutorial's reference value for one metric, and whether ours meets it."""

    metric: str
    reference: str
    holds: Callable[[Any], bool]


def machine() -> str:
    """Where numbers were measured: CPU model and widest vector ISA, JAX version and device.

    Float32 results differ in their last bits between processors (XLA:CPU
    picks its code by the instruction set), so a trained metric is only
    comparable with the machine it came from.
    """
    import platform

    import jax

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"),
                                        ("sse4_2", "SSE4.2"), ("asimd", "NEON")) if flag in flags), "unknown ISA")
    device = jax.devices()[0]
    return (f"{model} ({isa}, {os.cpu_count()} cores), jax {jax.__version__} on "
            f"{device.platform}{'' if device.platform == 'cpu' else ' ' + device.device_kind}")
