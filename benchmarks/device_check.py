"""What jaxdl does on this machine's accelerator: run it on a GPU or TPU and report the figures.

The same code runs on any JAX backend (nothing here names one): the CPU-only
forms (depthwise-as-shifts and matmul convs, chunked inference) switch off by
themselves elsewhere. It prints:

1. the devices;
2. `fit` of the digits CNN (`experiments.digits`: 8x8 scikit-learn digits,
   `CNN_LAYERS`, batch 32) in float32 and bfloat16: seconds and test accuracy;
3. MobileNetV2 inference (the classifier's inference form, as `jaxdl.predict`
   and `jaxdl classify` run it; torchvision's ImageNet weights, or random
   weights if they cannot be loaded: it says which) in images per second
   at batch 1, 32 and 128, float32 and bfloat16, compile excluded;
4. head-only fine-tuning (`jaxdl.pretrained.finetune`, cached features) on the tutorial's
   cat photos, or on generated images when they are absent (it says which).

`--quick` (a smoke run: well under a minute on a 2-core CPU): fewer epochs,
batches 1 and 8, 96x96 images for inference, fewer fine-tuning photos.
Run: `python -m benchmarks.device_check [--quick]`.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from experiments.common import machine, shared_data_dir

FULL = {"digits_epochs": 20, "batches": (1, 32, 128), "size": 224, "calls": 5, "finetune_epochs": 20, "photos": 40}
QUICK = {"digits_epochs": 1, "batches": (1, 8), "size": 96, "calls": 2, "finetune_epochs": 2, "photos": 8}


def digits_fit(epochs: int, precision: str) -> tuple[float, float]:
    """Seconds of `fit` (compile included) and test accuracy of the digits CNN."""
    import optax

    from experiments.digits import CNN_LAYERS, load_split
    from jaxdl import ConvNet, evaluate, fit

    (x, y), _, (x_test, y_test) = load_split(0)
    started = time.perf_counter()
    state, _ = fit(ConvNet(layers=CNN_LAYERS), x, y, loss="sparse_categorical_crossentropy",
                   optimizer=optax.adam(1e-3), epochs=epochs, batch_size=32, precision=precision, verbose=0)
    jax.block_until_ready(state.params)
    seconds = time.perf_counter() - started
    return seconds, evaluate(state, x_test, y_test, loss="sparse_categorical_crossentropy")["accuracy"]


def mobilenet():
    """`(model, variables, which weights)` in the inference form `jaxdl classify` runs (BatchNorm folded):
    torchvision's ImageNet weights, or random weights if those fail to load."""
    from jaxdl.pretrained import ImageClassifier

    try:
        model, variables = ImageClassifier.load("imagenet").inference_form()
        return model, variables, "torchvision ImageNet weights"
    except Exception as error:  # noqa: BLE001 -- any failure to load: measure speed on random weights instead
        from jaxdl.models import MobileNetV2

        model = MobileNetV2(convention="torchvision", fold_bn=True)
        variables = model.init(jax.random.key(0), np.zeros((1, 224, 224, 3), np.float32))
        return model, variables, f"random weights (the ImageNet weights did not load: {type(error).__name__}: {error})"


def images_per_second(model, variables, batch: int, size: int, precision: str, calls: int) -> float:
    """The forward pass as `jaxdl.predict` runs it (in chunks where that is faster), compiled once."""
    from jaxdl.runtime.inference import apply_in_chunks
    from jaxdl.training import with_precision

    model = with_precision(model, precision)
    apply = jax.jit(lambda v, x: apply_in_chunks(model.apply, v, x))
    x = jax.device_put(np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32))
    apply(variables, x).block_until_ready()  # compile
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        apply(variables, x).block_until_ready()
        times.append(time.perf_counter() - started)
    return batch / statistics.median(times)


def finetune_seconds(epochs: int, photos: int) -> tuple[float, float, str]:
    """Seconds of a first and a second head-only fine-tuning (cached features), and which images were used."""
    from jaxdl import pretrained
    from jaxdl.data import images
    from jaxdl.pretrained import finetune

    cats = shared_data_dir() / "cats"
    labels = np.array([0, 1] * (photos // 2))
    if cats.is_dir():
        paths = [cats / f"{sex}{i:02d}.jpg" for i in range(1, photos // 2 + 1) for sex in "fm"]
        x, _, _ = images.load_images(paths, labels, images.TORCHVISION)
        which = f"{photos} of the tutorial's cat photos"
    else:
        x = np.random.default_rng(0).normal(size=(photos, 224, 224, 3)).astype(np.float32)
        which = f"{photos} generated 224x224 images (the cat photos are not at {cats})"
    model, variables, _ = pretrained.torchvision_imagenet()
    runs = []
    for _ in range(2):
        started = time.perf_counter()
        finetune.finetune(x, labels, backbone=model, backbone_variables=variables, num_classes=2, epochs=epochs,
                          batch_size=32, cache_features=True, verbose=False)
        runs.append(time.perf_counter() - started)
    return runs[0], runs[1], which


def main(argv=None):
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--quick", action="store_true", help="a smoke run: small sizes, well under a minute on a CPU")
    args = cli.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    print(f"# jaxdl device check{' (--quick sizes)' if args.quick else ''}\n")
    print(f"{machine()}\ndevices: {', '.join(str(d) for d in jax.devices())} (backend {jax.default_backend()})\n")

    print(f"## fit of the digits CNN, {sizes['digits_epochs']} epochs, batch 32 (compile included)\n")
    print("| precision | seconds | test accuracy |\n|---|---|---|")
    for precision in ("float32", "bfloat16"):
        seconds, accuracy = digits_fit(sizes["digits_epochs"], precision)
        print(f"| {precision} | {seconds:.2f} | {accuracy:.4f} |", flush=True)

    model, variables, weights = mobilenet()
    print(f"\n## MobileNetV2 inference at {sizes['size']}x{sizes['size']}, images/s "
          f"(median of {sizes['calls']} calls of the compiled forward pass, compile excluded; {weights})\n")
    print("| precision | " + " | ".join(f"batch {b}" for b in sizes["batches"]) + " |")
    print("|---|" + "---|" * len(sizes["batches"]))
    for precision in ("float32", "bfloat16"):
        rates = [images_per_second(model, variables, batch, sizes["size"], precision, sizes["calls"])
                 for batch in sizes["batches"]]
        print(f"| {precision} | " + " | ".join(f"{rate:.1f}" for rate in rates) + " |", flush=True)

    first, second, which = finetune_seconds(sizes["finetune_epochs"], sizes["photos"])
    print(f"\n## head-only fine-tuning, {sizes['finetune_epochs']} epochs, cached features, {which}\n")
    print(f"first run (compile included) {first:.2f} s, second run {second:.2f} s")


if __name__ == "__main__":
    main()
