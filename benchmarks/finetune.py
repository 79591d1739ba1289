"""Head-only transfer learning on the tutorial's 40 cat photos, 20 epochs: wall time of each engine.

- jaxdl with cached features (the backbone runs once per photo),
- jaxdl end to end (the frozen backbone runs at every step),
- Keras 3 on its JAX backend doing what the tutorial does: a frozen
  `keras.applications.MobileNetV2` with a new Dense(2, softmax) head, `model.fit`
  for 20 epochs (batch 32; its weights do not change its speed).
Each engine runs in a fresh process: its first run (compilation included), then a
second run in the same process (compilation excluded). The jaxdl engines run twice
more in new processes with JAX's persistent compilation cache warm.
The photos are loaded and preprocessed before timing starts (the same for every engine).
`--quick`: 2 epochs, the jaxdl engines only, no warm-cache processes.
Without the photos (`../shared/data/cats`) the benchmark reports itself skipped.
Run: `python -m benchmarks.finetune [--quick] [--json PATH]`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report
from experiments.common import shared_data_dir

CATS = shared_data_dir() / "cats"
EPOCHS, QUICK_EPOCHS = 20, 2
LABELS = {"jaxdl-cached": "jaxdl, cached features", "jaxdl-end-to-end": "jaxdl, end to end",
          "keras": "Keras 3 on JAX, frozen MobileNetV2 + Dense (the tutorial)"}


def cat_images():
    import numpy as np

    from jaxdl.data import images

    paths = [CATS / f"{sex}{i:02d}.jpg" for sex in "fm" for i in range(1, 21)]
    x, y, _ = images.load_images(paths, np.array([0] * 20 + [1] * 20), images.TORCHVISION)
    return x, y


def jaxdl_runner(cache_features: bool, epochs: int):
    from jaxdl import pretrained
    from jaxdl.pretrained import finetune

    model, variables, _ = pretrained.torchvision_imagenet()
    x, y = cat_images()
    return lambda: finetune.finetune(x, y, backbone=model, backbone_variables=variables, num_classes=2,
                                     epochs=epochs, batch_size=32, cache_features=cache_features, verbose=False)


def keras_runner(epochs: int):
    os.environ["KERAS_BACKEND"] = "jax"
    import keras

    x, y = cat_images()
    base = keras.applications.MobileNetV2(weights=None, include_top=False, pooling="avg", input_shape=(224, 224, 3))
    base.trainable = False
    model = keras.Sequential([base, keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return lambda: model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)


def time_engine(engine: str, epochs: int) -> dict:
    """Seconds of a first and a second run of one engine, in this process."""
    if engine != "keras":
        from jaxdl.cli import enable_compilation_cache

        enable_compilation_cache()
    run = keras_runner(epochs) if engine == "keras" else jaxdl_runner(engine == "jaxdl-cached", epochs)
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    start = time.perf_counter()
    run()
    return {"first": first, "second": time.perf_counter() - start}


def in_new_process(engine: str, cache: str, epochs: int) -> dict:
    command = [sys.executable, "-m", "benchmarks.finetune", "--engine", engine, "--epochs", str(epochs)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "JAXDL_CACHE": cache})
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[1:])} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(quick: bool) -> dict:
    """First and second run of each engine in a fresh process; jaxdl's against Keras's (time ratios: < 1x is faster)."""
    epochs = QUICK_EPOCHS if quick else EPOCHS
    about = (f"{epochs} epochs of head-only training on the tutorial's 40 cat photos (224x224), batch 32; seconds. "
             "Each engine in a fresh process: its first run (compile included), then a second run in the same "
             "process; `new process, cache warm` is the first run of another process with JAX's persistent "
             "compilation cache filled. Time ratios: below 1x jaxdl is faster.")
    if not CATS.is_dir():
        return report.result("Head-only fine-tuning", about,
                             skipped=f"the cat photos are not at {CATS} (../shared/data/cats beside the repository)")
    engines = ("jaxdl-cached", "jaxdl-end-to-end") + (() if quick else ("keras",))
    with tempfile.TemporaryDirectory() as cache:
        in_new_process("jaxdl-cached", cache, epochs)  # converts the weights into this cache, outside the timings
        shutil.rmtree(Path(cache) / "xla", ignore_errors=True)  # start with no compiled programs
        results = {engine: in_new_process(engine, cache, epochs) for engine in engines}
        warm = {} if quick else {engine: in_new_process(engine, cache, epochs)
                                 for engine in ("jaxdl-cached", "jaxdl-end-to-end")}
    figures, ratios = {}, []
    for engine in engines:
        label = LABELS[engine]
        figures[f"{label}, first run"] = report.figure(results[engine]["first"], "s")
        figures[f"{label}, second run"] = report.figure(results[engine]["second"], "s")
        if engine in warm:
            figures[f"{label}, new process, cache warm"] = report.figure(warm[engine]["first"], "s")
    if "keras" in results:
        for engine in ("jaxdl-cached", "jaxdl-end-to-end"):
            for run in ("first run", "second run"):
                ratios.append(report.ratio(f"{LABELS[engine]}, {run}", f"{LABELS['keras']}, {run}"))
    notes = ["--quick: 2 epochs, Keras and the warm-cache processes left out"] if quick else []
    return report.result("Head-only fine-tuning", about, figures, ratios, notes)


def main(argv=None):
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--engine", choices=list(LABELS), help="time one engine in this process (JSON on stdout)")
    cli.add_argument("--epochs", type=int, default=EPOCHS)
    cli.add_argument("--quick", action="store_true")
    cli.add_argument("--json", type=Path)
    args = cli.parse_args(argv)
    if args.engine:
        print(json.dumps(time_engine(args.engine, args.epochs)))
        return
    measured = measure(args.quick)
    if args.json:
        args.json.write_text(json.dumps(measured, indent=1))
    else:
        report.print_result(measured)


if __name__ == "__main__":
    main()
