"""MobileNetV2 1.0 at 224: images per second of jaxdl and its peers in one process, and `jaxdl classify` start-up.

Engines (same weights: torchvision's ImageNet MobileNetV2, converted):
- jaxdl as `jaxdl classify` runs it (a CPU device per core, BatchNorm folded, convs in XLA:CPU-friendly
  form, the batch split over the devices and in concurrent chunks, the top once per share), the same
  in one piece on one device, and the naive port (lax convolutions, grouped depthwise) for comparison;
- Keras 3 on the JAX backend, `predict`;
- PyTorch eager, and in inference mode with channels-last tensors, when torch is installed
  (torchvision's MobileNetV2 forward written with torch.nn.functional);
- ONNX Runtime, when onnxruntime and onnx are installed (the torch graph exported);
- with ONNX Runtime, jaxdl as a library user runs it: `ImageClassifier.probabilities` in a new process with
  JAX's default device set-up (one CPU device), against ONNX Runtime in that same process, calls alternating.
Then the wall time of a first and a second `jaxdl classify` process on one image,
with an empty cache directory at the start (the first one converts the weights and compiles;
the second finds both in the cache).
`--quick`: jaxdl (chunked and in one piece) and PyTorch in inference mode only,
fewer calls, no `jaxdl classify` processes.
Run: `python -m benchmarks.mobilenet_inference [--quick] [--json PATH]`.
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

from jaxdl import cli
from jaxdl.runtime import sharding

cli.one_cpu_device_per_core()  # as `jaxdl classify` starts: before JAX does

import jax
import numpy as np

from benchmarks import report
from jaxdl.models.mobilenet_v2 import layer_plan
from jaxdl.pretrained import ImageClassifier
from jaxdl.runtime.inference import (
    CPU_DEVICE_CHUNK,
    CPU_DEVICE_STREAMS,
    inference_chunk,
    inference_mesh,
    predict_in_chunks,
)

BATCHES = (1, 32)


def images_per_second(run, batch: int, repeats: int) -> float:
    run()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


# Each engine is built once and returns `run(x)`: a no-argument callable that classifies `x` once.

def jaxdl_engine(classifier, implementation=None, whole_batch=False):
    """The forward pass as `jaxdl classify` runs it (`ImageClassifier.forward_plan`, compiled by
    `predict_in_chunks`), or with `whole_batch` in one piece on one device (a plain `jax.jit`, as a user
    would write it), its convs as `implementation` says."""
    if implementation and not whole_batch:
        raise ValueError("implementation is for the one-piece engine: classify's own forward pass is measured as is")
    model, variables = classifier.inference_form()
    if implementation:
        model = model.clone(conv_implementation=implementation)

    def run(x):
        if whole_batch:
            placed, mesh, apply = variables, None, jax.jit(model.apply)
        else:
            forward, placed, options = classifier.forward_plan(len(x))
            mesh = options["mesh"]
            apply = functools.partial(predict_in_chunks, forward, **options)
        x = jax.device_put(x, mesh and sharding.batch_sharding(mesh))
        return lambda: apply(placed, x).block_until_ready()

    return run


def keras_engine(unfolded):
    import keras

    model = keras.applications.MobileNetV2(weights=None, classifier_activation=None)
    params, stats = unfolded.variables["params"], unfolded.variables["batch_stats"]
    for name, kind in layer_plan():
        p = params[name]
        weights = {"conv": lambda: [p["kernel"]], "depthwise": lambda: [p["kernel"].transpose(0, 1, 3, 2)],
                   "bn": lambda: [p["scale"], p["bias"], stats[name]["mean"], stats[name]["var"]],
                   "dense": lambda: [p["kernel"], p["bias"]]}[kind]()
        model.get_layer(name).set_weights([np.asarray(w) for w in weights])
    return lambda x: lambda: model.predict(x, batch_size=len(x), verbose=0)


def torch_state_dict():
    import torch

    from jaxdl.pretrained import load_state_dict, torchvision_weights_path

    return {k: torch.from_numpy(np.array(v)) for k, v in load_state_dict(torchvision_weights_path()).items()}


def torch_engines():
    """PyTorch eager, and in inference mode with channels-last tensors."""
    import torch

    from jaxdl.references.torch_mobilenet_v2 import forward

    torch.set_num_threads(os.cpu_count())
    state = torch_state_dict()
    channels_last = {k: (v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v)
                     for k, v in state.items()}

    def eager(x):
        nchw = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

        def run():
            with torch.no_grad():
                forward(state, nchw)

        return run

    def inference(x):
        nhwc = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=torch.channels_last)

        def run():
            with torch.inference_mode():
                forward(channels_last, nhwc)

        return run

    return eager, inference


def onnx_engine(folder):
    import onnxruntime
    import torch

    from jaxdl.references.torch_mobilenet_v2 import forward

    state = torch_state_dict()

    class Net(torch.nn.Module):
        def forward(self, images):
            return forward(state, images)

    path = os.path.join(folder, "mobilenet_v2.onnx")
    torch.onnx.export(Net(), (torch.zeros(1, 3, 224, 224),), path, input_names=["images"],
                      dynamic_axes={"images": {0: "batch"}}, dynamo=False)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda x: lambda: session.run(None, {"images": x.transpose(0, 3, 1, 2).copy()})


# Run in a new process by `library_process`: JAX as a library user's process starts it (one CPU device, no flags),
# `ImageClassifier.probabilities` against ONNX Runtime's session on the same exported graph, calls alternating.
_LIBRARY_PROCESS = """
import json, statistics, sys, time
import numpy as np, onnxruntime
from jaxdl.pretrained import ImageClassifier
import jax
classifier = ImageClassifier.load("imagenet")
session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
figures = {"devices": jax.device_count()}
for batch, repeats in zip((1, 32), map(int, sys.argv[2:4])):
    x = np.random.default_rng(0).normal(size=(batch, 224, 224, 3)).astype(np.float32)
    nchw = x.transpose(0, 3, 1, 2).copy()
    runs = {"library": lambda: classifier.probabilities(x, batch_size=batch),
            "onnx": lambda: session.run(None, {"images": nchw})}
    times = {name: [] for name in runs}
    for run in runs.values():
        run()  # compile / warm up
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    for name in runs:
        figures[f"{name}, batch {batch}"] = batch / statistics.median(times[name])
print(json.dumps(figures))
"""


def library_process(onnx_path: str, repeats: tuple[int, int]) -> dict:
    """Images/s of `ImageClassifier.probabilities` and of ONNX Runtime in a new process with JAX's default device
    set-up (one CPU device), as a user importing jaxdl gets it; batch 1 and 32, calls alternating."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _LIBRARY_PROCESS, onnx_path, *map(str, repeats)], check=True,
                          capture_output=True, text=True, cwd=root)
    return json.loads(done.stdout.strip().splitlines()[-1])


def classify_process_seconds(image_path: str, cache: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jaxdl.cli", "classify", "--json", image_path], check=True,
                   capture_output=True, env={**os.environ, "JAXDL_CACHE": cache})
    return time.perf_counter() - start


def measure(quick: bool) -> dict:
    """Images per second of each engine at batch 1 and 32; jaxdl's as-shipped engine against each peer."""
    rng = np.random.default_rng(0)
    inputs = {b: rng.normal(size=(b, 224, 224, 3)).astype(np.float32) for b in BATCHES}
    fast = ImageClassifier.load("imagenet")
    figures, notes, engines, library_ratios = {}, [], [], []

    def engine(name, build, repeats=(15, 5)):
        """`build()` makes the engine; an optional peer that fails is reported, not fatal."""
        try:
            run = build()
            for batch, count in zip(BATCHES, (1, 1) if quick else repeats):
                figures[f"{name}, batch {batch}"] = report.figure(
                    images_per_second(run(inputs[batch]), batch, count + 2 * quick), "img/s")
            engines.append(name)
        except Exception as error:  # noqa: BLE001 - an optional peer that fails is a note, not the end
            notes.append(f"{name}: skipped ({type(error).__name__}: {error})")

    chunk, streams = inference_chunk()
    ours = "jaxdl (as `jaxdl classify` runs it)"
    engine(ours, lambda: jaxdl_engine(fast))
    mesh = inference_mesh()
    split = (f"split over {mesh.size} CPU devices (one per core, as `jaxdl classify` sets up) where each gets "
             f"an image, each running {CPU_DEVICE_STREAMS} stream(s) of {CPU_DEVICE_CHUNK} image(s) and the top "
             f"once per share; otherwise " if mesh else "")
    notes.append(f"{ours}: BatchNorm folded, matmul/shifted convs, {split}{streams} streams of {chunk} images")
    engine("jaxdl, the same in one piece", lambda: jaxdl_engine(fast, whole_batch=True))
    if not quick:
        unfolded = ImageClassifier.load("imagenet", fast=False)
        engine("jaxdl, naive port (BN, lax convs, grouped depthwise)",
               lambda: jaxdl_engine(unfolded, "xla", whole_batch=True), repeats=(3, 2))
        engine("Keras 3 on JAX (`predict`)", lambda: keras_engine(unfolded), repeats=(5, 2))
    try:
        import torch

        eager, inference = torch_engines()
        if not quick:
            engine(f"PyTorch {torch.__version__} eager", lambda: eager, repeats=(10, 3))
        engine(f"PyTorch {torch.__version__} inference mode, channels-last", lambda: inference, repeats=(10, 3))
    except ImportError:
        notes.append("PyTorch: skipped (not installed)")
    if not quick:
        with tempfile.TemporaryDirectory() as folder:
            try:
                import onnxruntime

                peer = f"ONNX Runtime {onnxruntime.__version__}"
                engine(peer, lambda: onnx_engine(folder), repeats=(15, 5))
                library = library_process(os.path.join(folder, "mobilenet_v2.onnx"), (30, 6))
                mine, theirs = "jaxdl as a library (`ImageClassifier.probabilities`, new process)", \
                    f"{peer}, same new process"
                for batch in BATCHES:
                    figures[f"{mine}, batch {batch}"] = report.figure(library[f"library, batch {batch}"], "img/s")
                    figures[f"{theirs}, batch {batch}"] = report.figure(library[f"onnx, batch {batch}"], "img/s")
                    library_ratios.append(report.ratio(f"{mine}, batch {batch}", f"{theirs}, batch {batch}",
                                                       readme=True))
                notes.append(f"{mine}: JAX's default set-up ({library['devices']} CPU device, no flags), as a Python "
                             "process importing jaxdl gets it; measured against ONNX Runtime in that process, "
                             "calls alternating")
            except ImportError:
                notes.append("ONNX Runtime: skipped (not installed; `pip install -e '.[bench]'` adds it)")
    ratios = [report.ratio(f"{ours}, batch {batch}", f"{peer}, batch {batch}",
                           readme=peer.startswith(("ONNX Runtime", "PyTorch")) and "eager" not in peer)
              for peer in engines if peer != ours for batch in BATCHES] + library_ratios
    if not quick:
        figures.update(classify_processes())
        ratios.append(report.ratio("`jaxdl classify`, first process (empty cache)",
                                   "`jaxdl classify`, second process (cache warm)"))
    else:
        notes.append("--quick: the naive port, Keras, PyTorch eager, ONNX Runtime and the `jaxdl classify` "
                     "processes are left out")
    return report.result(
        "MobileNetV2 inference", "MobileNetV2 1.0 at 224, torchvision's ImageNet weights converted, random "
        "images; images per second, median of repeated calls, compile excluded; ratios > 1x mean jaxdl is "
        "faster. Then the wall time of a first and a second `jaxdl classify` process on one photo, the cache "
        "directory empty at the start.", figures, ratios, notes)


def classify_processes() -> dict:
    """Seconds of a first `jaxdl classify` process (converts, compiles) and a second (finds both cached)."""
    from PIL import Image
    from skimage import data

    with tempfile.TemporaryDirectory() as folder:
        image = os.path.join(folder, "chelsea.jpg")
        Image.fromarray(data.chelsea()).save(image)
        cache = os.path.join(folder, "cache")
        first = classify_process_seconds(image, cache)
        second = classify_process_seconds(image, cache)
    return {"`jaxdl classify`, first process (empty cache)": report.figure(first, "s"),
            "`jaxdl classify`, second process (cache warm)": report.figure(second, "s")}


def print_table(measured: dict) -> None:
    figures = measured["figures"]
    print(f"jax {jax.__version__}, {os.cpu_count()} cores; {measured['about']}")
    print("| engine | " + " | ".join(f"batch {b}" for b in BATCHES) + " |")
    print("|---|" + "---|" * len(BATCHES))
    names = [label.rsplit(", batch ", 1)[0] for label in figures if ", batch " in label]
    for name in dict.fromkeys(names):
        print(f"| {name} | " + " | ".join(f"{figures[f'{name}, batch {b}']['value']:.1f}" for b in BATCHES) + " |")
    for pair in measured["ratios"]:
        ratio = figures[pair['ours']]['value'] / figures[pair['peer']]['value']
        print(f"{pair['ours']} / {pair['peer']}: {ratio:.2f}x")
    for label, fig in figures.items():
        if fig["unit"] == "s":
            print(f"{label}: {fig['value']:.2f} s")
    for note in measured["notes"]:
        print(note)


def main(argv=None):
    report.run_cli(measure, __doc__.splitlines()[0], argv, print_table)


if __name__ == "__main__":
    main()
