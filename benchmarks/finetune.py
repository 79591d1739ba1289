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
Run: `python -m benchmarks.finetune`.
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

from experiments.common import shared_data_dir

CATS = shared_data_dir() / "cats"
EPOCHS = 20


def cat_images():
    import numpy as np

    from jaxdl import images

    paths = [CATS / f"{sex}{i:02d}.jpg" for sex in "fm" for i in range(1, 21)]
    x, y, _ = images.load_images(paths, np.array([0] * 20 + [1] * 20), images.TORCHVISION)
    return x, y


def jaxdl_runner(cache_features: bool):
    from jaxdl import finetune, pretrained

    model, variables, _ = pretrained.torchvision_imagenet()
    x, y = cat_images()
    return lambda: finetune.finetune(x, y, backbone=model, backbone_variables=variables, num_classes=2,
                                     epochs=EPOCHS, batch_size=32, cache_features=cache_features, verbose=False)


def keras_runner():
    os.environ["KERAS_BACKEND"] = "jax"
    import keras

    x, y = cat_images()
    base = keras.applications.MobileNetV2(weights=None, include_top=False, pooling="avg", input_shape=(224, 224, 3))
    base.trainable = False
    model = keras.Sequential([base, keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return lambda: model.fit(x, y, epochs=EPOCHS, batch_size=32, verbose=0)


def measure(engine: str) -> dict:
    if engine != "keras":
        from jaxdl.cli import enable_compilation_cache

        enable_compilation_cache()
    run = keras_runner() if engine == "keras" else jaxdl_runner(engine == "jaxdl-cached")
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    start = time.perf_counter()
    run()
    return {"first": first, "second": time.perf_counter() - start}


def in_new_process(engine: str, cache: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.finetune", "--engine", engine], check=True,
                          capture_output=True, text=True, env={**os.environ, "JAXDL_CACHE": cache})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--engine", choices=["jaxdl-cached", "jaxdl-end-to-end", "keras"])
    args = cli.parse_args()
    if args.engine:
        print(json.dumps(measure(args.engine)))
        return
    with tempfile.TemporaryDirectory() as cache:
        in_new_process("jaxdl-cached", cache)  # converts the weights into this cache, outside the timings
        shutil.rmtree(Path(cache) / "xla", ignore_errors=True)  # start with no compiled programs
        results = {engine: in_new_process(engine, cache) for engine in ("jaxdl-cached", "jaxdl-end-to-end")}
        warm = {engine: in_new_process(engine, cache) for engine in ("jaxdl-cached", "jaxdl-end-to-end")}
        results["keras"] = in_new_process("keras", cache)
    keras_first = results["keras"]["first"]
    print(f"{EPOCHS} epochs of head-only training on 40 photos (224x224), batch 32, {os.cpu_count()} cores; seconds")
    print("| engine | first run (compile included) | compile (first - second) | second run | "
          "new process, persistent cache warm | Keras first run / this first run |")
    print("|---|---|---|---|---|---|")
    for engine, label in (("jaxdl-cached", "jaxdl, cached features"), ("jaxdl-end-to-end", "jaxdl, end to end"),
                          ("keras", "Keras 3 on JAX, frozen MobileNetV2 + Dense (the tutorial)")):
        r = results[engine]
        warm_text = f"{warm[engine]['first']:.2f}" if engine in warm else "-"
        print(f"| {label} | {r['first']:.2f} | {r['first'] - r['second']:.2f} | {r['second']:.2f} | {warm_text} | "
              f"{keras_first / r['first']:.1f}x |")


if __name__ == "__main__":
    main()
