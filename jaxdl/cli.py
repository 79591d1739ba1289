"""The `jaxdl` command: classify photos, convert pretrained weights.

    jaxdl classify [--weights imagenet|PATH] [--top K] [--json] IMAGE...
    jaxdl convert keras|torchvision SRC DST [--overwrite]
    jaxdl finetune DATA_DIR --out DIR [--labels-from-name REGEX | --labels-csv FILE] [--epochs 20]
                   [--val-split F] [--unfreeze N] [--augment]
    jaxdl prepare NAME [--data-dir DIR] [--manual-dir M]
    jaxdl cache info|clear
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import jax


def enable_compilation_cache() -> None:
    """Keeps compiled XLA programs on disk, so the next process skips compilation (`jaxdl.runtime.compilation_cache`).

    jaxdl's own directory ($JAXDL_CACHE/xla/TAG) unless JAX_COMPILATION_CACHE_DIR
    names one, which is then used as the user's JAX options say, so `jaxdl`
    shares the programs of their other JAX processes. Either must pass the
    cache's trust check (a directory this user owns that no one else can
    write in, holding only this user's files); otherwise one line on stderr
    names the directory and why, and JAX's persistent cache is off for the
    whole process: neither read nor written, whatever
    JAX_COMPILATION_CACHE_DIR says. `JAXDL_COMPILATION_CACHE=0` leaves JAX's
    cache as the environment sets it.
    """
    from jaxdl.runtime import compilation_cache

    chosen = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    with warnings.catch_warnings(record=True) as refused:
        warnings.simplefilter("always", RuntimeWarning)
        if chosen:
            compilation_cache.enable_users_directory(chosen)
        elif not compilation_cache.switched_off():
            compilation_cache.enable()
    for warning in refused:
        print(str(warning.message), file=sys.stderr)


def one_cpu_device_per_core() -> None:
    """Gives JAX a CPU device per core this process may run on, as `jaxdl classify` runs best.

    MobileNetV2 inference then splits a batch over the devices
    (`jaxdl.runtime.inference.inference_mesh`), each running its share on a
    core of its own, faster than one device using both cores
    (docs/numerics.md#mobilenetv2-inference-on-cpu; not measured on more than 2). Left as it
    is where the user chose the CPU devices (a device count in XLA_FLAGS, or
    JAX_NUM_CPU_DEVICES), and where JAX already runs in this process (`main`
    called from Python), since JAX takes the setting only before it starts.
    """
    chosen = "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if chosen or jax.config.jax_num_cpu_devices != -1 or cores < 2:
        return
    try:
        jax.config.update("jax_num_cpu_devices", cores)
    except RuntimeError:  # JAX has started: "should be updated before backends are initialized"
        pass


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def class_regex(text: str) -> str:
    """argparse type: a regular expression with exactly one group."""
    from jaxdl.data.images import class_pattern

    try:
        class_pattern(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def classify(args) -> int:
    from jaxdl.pretrained.classifier import ImageClassifier
    from jaxdl.pretrained.weights import cache_dir

    try:
        classifier = ImageClassifier.load(args.weights, program_cache=cache_dir() / "programs")
        results, errors = classifier.classify(args.images, top=args.top, batch_size=args.batch_size)
    except (OSError, ValueError) as error:
        print(f"jaxdl classify: {error}", file=sys.stderr)
        return 2
    for error in errors:
        print(f"jaxdl classify: error: {error}", file=sys.stderr)
    for path, top in results:
        if args.json:
            print(json.dumps({"image": path, "top": [{"index": i, "label": label, "probability": p}
                                                     for i, label, p in top]}))
        else:
            print(path)
            for rank, (index, label, probability) in enumerate(top, 1):
                print(f"  {rank}. {label} ({index}): {probability:.2%}")
    return 1 if errors else 0


def convert(args) -> int:
    from jaxdl.data import images
    from jaxdl.pretrained import imagenet_classes
    from jaxdl.pretrained.classifier import ImageClassifier
    from jaxdl.pretrained.convert import from_keras, from_torchvision

    source = {"keras": from_keras, "torchvision": from_torchvision}[args.source]
    try:
        model, variables = source(args.src)
        # A weight file names no classes: a head of 1000 is ImageNet's (as Keras and torchvision publish it);
        # any other head's names are unknown, recorded as None, and `jaxdl classify` shows their indices.
        imagenet_head = model.include_top and model.num_classes == 1000
        classes = imagenet_classes.class_names() if imagenet_head else None
        preprocessing = images.KERAS if args.source == "keras" else images.TORCHVISION
        classifier = ImageClassifier(model, variables, preprocessing, classes,
                                     "probabilities" if model.head_activation == "softmax" else "logits")
        saved = classifier.save(args.dst, overwrite=args.overwrite, source=str(args.src))
    except (OSError, ValueError) as error:
        print(f"jaxdl convert: {error}", file=sys.stderr)
        return 1
    if not model.include_top:
        head = "no classifier layer (features only: jaxdl classify refuses it)"
    elif imagenet_head:
        head = "1000 classes, ImageNet's names"
    else:
        head = f"{model.num_classes} classes, names unknown (jaxdl classify shows them as 'class 0', 'class 1', ...)"
    print(f"saved MobileNetV2(alpha={model.alpha}, include_top={model.include_top}) from {args.src} to {saved}: "
          f"{head}")
    return 0


HISTORY_FILE = "history.json"  # in a fine-tuned model's folder: {"loss": [...], "accuracy": [...], ...}
HISTORY_FIGURE, CONFUSION_FIGURE = "history.png", "confusion_matrix.png"  # beside it


def run_directory(directory: str | os.PathLike | None, resume: bool) -> Path | None:
    """The checkpoint directory of a command-line run (`--checkpoint-dir`, `--resume`), checked.

    A directory that already holds checkpoints is resumed only with
    `--resume`, so a new run never picks up an old one by accident; `--resume`
    without checkpoints to resume from is an error too.
    """
    if directory is None:
        if resume:
            raise ValueError("--resume needs --checkpoint-dir, the directory of the run to resume")
        return None
    path = Path(directory)
    holds_checkpoints = path.is_dir() and any(path.iterdir())
    if holds_checkpoints and not resume:
        raise ValueError(f"--checkpoint-dir {path} already holds checkpoints; pass --resume to continue that run, "
                         "or choose another directory")
    if resume and not holds_checkpoints:
        raise ValueError(f"--resume: {path} holds no checkpoint to resume from")
    return path


def finetune(args) -> int:
    import numpy as np

    from jaxdl.data import images as image_io
    from jaxdl.pretrained import finetune as ft, weights as pretrained
    from jaxdl.pretrained.classifier import ImageClassifier
    from jaxdl.training.callbacks import Callback

    class PrintEpochs(Callback):
        def on_epoch_end(self, run, epoch, logs):
            print(f"epoch {epoch + 1}/{args.epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in logs.items()),
                  flush=True)

    try:
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"--out {out} already exists; pass --overwrite to replace it")
        checkpoint_dir = run_directory(args.checkpoint_dir, args.resume)  # before any work: the flags may clash
        if args.labels_from_name is not None:
            paths, labels, classes = image_io.labels_from_names(args.data_dir, args.labels_from_name)
        elif args.labels_csv is not None:
            paths, labels, classes = image_io.labels_from_csv(args.data_dir, args.labels_csv)
        else:
            paths, labels, classes = image_io.image_folder(args.data_dir)
        model, variables, metadata = pretrained.torchvision_imagenet()
        images, labels, _ = image_io.load_images(paths, labels, metadata["preprocessing"],
                                                 report=lambda line: print(f"jaxdl finetune: {line}", file=sys.stderr))
        for label, name in enumerate(classes):
            if not np.any(labels == label):
                raise ValueError(f"{args.data_dir}: no readable images left in class {name!r}")
        validation = None
        if args.val_split:
            train, val = ft.stratified_split(labels, args.val_split, args.seed)
            validation = (images[val], labels[val])
            images, labels = images[train], labels[train]
        print(f"{len(labels)} training images, {0 if validation is None else len(validation[1])} validation, "
              f"classes {classes}", flush=True)
        result = ft.finetune(images, labels, backbone=model, backbone_variables=variables, num_classes=len(classes),
                             validation_data=validation, epochs=args.epochs, batch_size=args.batch_size,
                             learning_rate=args.learning_rate, unfreeze=args.unfreeze, augment=args.augment,
                             seed=args.seed, callbacks=[PrintEpochs()], verbose=False,
                             checkpoint_dir=checkpoint_dir)
        classifier = ImageClassifier(result.model, result.variables, dict(metadata["preprocessing"]), tuple(classes))
        saved = classifier.save(out, overwrite=args.overwrite, history=result.history,
                                source=f"fine-tuned on {args.data_dir}")
        history = saved / HISTORY_FILE
        history.write_text(json.dumps(result.history, indent=1) + "\n")
        figures = _finetune_figures(classifier, result.history, validation or (images, labels), saved,
                                    "validation" if validation else "training")
    except (OSError, ValueError) as error:
        print(f"jaxdl finetune: {error}", file=sys.stderr)
        return 1
    print(f"history: {history}")
    print(f"figures: {', '.join(str(path) for path in figures)}")
    print(f"saved to {saved}")
    return 0


def _finetune_figures(classifier, history: dict, data: tuple, out: Path, which: str) -> list[Path]:
    """The history's curves and the confusion matrix on `data` (the validation images, else the training ones),
    as the experiments draw them."""
    from jaxdl import plots
    from jaxdl.training import confusion_matrix

    images, labels = data
    predicted = classifier.probabilities(images).argmax(axis=-1)
    matrix = confusion_matrix(labels, predicted, len(classifier.class_names))
    return [plots.plot_history(history, out / HISTORY_FIGURE, "fine-tuning"),
            plots.plot_confusion_matrix(matrix, list(classifier.class_names), out / CONFUSION_FIGURE,
                                        f"confusion matrix, {which} images")]


def prepare(args) -> int:
    """Writes tfds dataset NAME as ArrayRecord (`jaxdl.data.prepare`); TensorFlow must be installed."""
    from jaxdl.data.prepare import TensorFlowMissingError, prepare as prepare_dataset

    try:
        written = prepare_dataset(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir)
    except TensorFlowMissingError as error:
        print(f"jaxdl prepare: {error}", file=sys.stderr)
        return 2
    except (OSError, ValueError, AssertionError) as error:  # tfds reports a bad download or file by assertion
        print(f"jaxdl prepare: {args.name}: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    splits = ", ".join(f"{split} {count:,}" for split, count in written["splits"].items())
    print(f"prepared {written['name']} {written['version']} as ArrayRecord in {written['path']}: {splits} examples")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxdl", description="jaxdl: functional deep learning on JAX")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("classify", help="top-K ImageNet (or fine-tuned) classes of photos")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--weights", default="imagenet",
                   help="'imagenet' (default), a saved model directory, or a Keras/torchvision weight file")
    p.add_argument("--top", type=positive_int, default=5)
    p.add_argument("--json", action="store_true", help="one JSON object per image per line")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.set_defaults(run=classify)

    p = commands.add_parser("convert", help="convert Keras or torchvision MobileNetV2 weights to a jaxdl model")
    p.add_argument("source", choices=["keras", "torchvision"])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(run=convert)

    p = commands.add_parser("finetune", help="train a new head on the ImageNet MobileNetV2",
                            description="Train a new classifier head on the ImageNet MobileNetV2. Classes come from "
                                        "one subfolder per class in DATA_DIR (the default), from the file names "
                                        "(--labels-from-name) or from a CSV file (--labels-csv).")
    p.add_argument("data_dir", metavar="DATA_DIR")
    p.add_argument("--out", required=True,
                   help=f"folder to save the fine-tuned model in; the training history (per-epoch loss and "
                        f"metrics, as JSON) goes to OUT/{HISTORY_FILE}, its curves to "
                        f"OUT/{HISTORY_FIGURE} and the confusion matrix (on the validation images, or the training "
                        f"ones without --val-split) to OUT/{CONFUSION_FIGURE}")
    labelling = p.add_mutually_exclusive_group()
    labelling.add_argument("--labels-from-name", metavar="REGEX", type=class_regex,
                           help="DATA_DIR is a flat folder of images; REGEX, searched in each file name, has one "
                                "group whose text is the class name (e.g. '^([fm])\\d+'); every image must match")
    labelling.add_argument("--labels-csv", metavar="FILE",
                           help="a CSV file of lines 'file,class', files relative to DATA_DIR (header line optional)")
    p.add_argument("--epochs", type=positive_int, default=20)
    p.add_argument("--val-split", type=fraction, default=0.0, help="fraction of each class held out for validation")
    p.add_argument("--unfreeze", type=int, default=0, help="also train the top N backbone stages")
    p.add_argument("--augment", action="store_true", help="random flips and crops (trains end to end)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--checkpoint-dir", default=None, help="save the training's checkpoints here (every epoch)")
    p.add_argument("--resume", action="store_true", help="continue the training saved in --checkpoint-dir")
    p.set_defaults(run=finetune)

    p = commands.add_parser("prepare", help="write a tensorflow-datasets dataset as ArrayRecord (needs TensorFlow)",
                            description="Download and prepare tfds dataset NAME as ArrayRecord, the format jaxdl "
                                        "reads (tfds_source, experiments.mnist --data-dir). tfds writes with "
                                        "TensorFlow: pip install 'jaxdl[prepare]'.")
    p.add_argument("name", metavar="NAME", help="a tfds dataset name, e.g. mnist")
    p.add_argument("--data-dir", default=None,
                   help="tfds data dir to write into (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--manual-dir", default=None,
                   help="take the dataset's files from this directory instead of downloading them (for mnist: "
                        "the four IDX .gz files, as in ../shared/data/mnist)")
    p.set_defaults(run=prepare)

    p = commands.add_parser("cache", help="what jaxdl's compilation cache holds, or empty it",
                            description="jaxdl keeps every program it compiles in $JAXDL_CACHE/xla (default "
                                        "~/.cache/jaxdl/xla), so a second process compiles nothing. 'info' reports "
                                        "its entries and size, 'clear' deletes them. JAXDL_COMPILATION_CACHE=0 turns "
                                        "the cache off.")
    p.add_argument("action", choices=["info", "clear"])
    p.set_defaults(run=cache)
    return parser


def cache(args) -> int:
    from jaxdl.runtime import compilation_cache

    if args.action == "clear":
        print(f"deleted {compilation_cache.clear()} compiled programs from {compilation_cache.cache_root() / 'xla'}")
        return 0
    held = compilation_cache.info()
    print(f"{held['directory']}: {held['entries']} compiled programs, {held['bytes'] / 2**20:.1f} MiB "
          f"(at most {held['max_bytes'] / 2**20:.0f} MiB, least recently used deleted beyond)")
    print(f"this jax and CPU use {held['in_use']}"
          + ("; turned off by JAXDL_COMPILATION_CACHE" if compilation_cache.switched_off() else ""))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.run is classify:
        one_cpu_device_per_core()
    if args.run is not cache:
        enable_compilation_cache()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
