"""Customizing MobileNetV2 through transfer learning: telling female from male cats with a new head.

The tutorial's data: 40 photos of cat faces, f01-f20 female (label 0) and
m01-m20 male (label 1), by Sebastiaan Mathot's Python tutorials (photos from
Chris Longmore's cat-face experiment; CC-BY 3.0). They are read from
`../shared/data/cats/` or `--data DIR`; without them, scikit-learn's bundled
8x8 digits 0 and 1 (20 of each) stand in, rendered as RGB photos, and the
output says so.

1. ImageNet's top-1 label of every photo (the tutorial finds cat breeds,
   with low confidence); 2. a Dense(2) head trained on all 40 for 20 epochs;
3. trained on f01-f15 + m01-m15 and validated on f16-f20 + m16-m20: the
   head learns the training photos while validation stays well below, the
   tutorial's overfitting lesson.

The backbone is torchvision's ImageNet MobileNetV2 (the tutorial's Keras
weights cannot be downloaded here). Adam(1e-3) as in the tutorial, batch 16:
with Keras's default batch of 32 (2 steps an epoch), the head on these
features reaches 0.95 training accuracy after 20 epochs (1.0 after 31);
the metrics report that run too (`train_accuracy_all_batch32`).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from experiments.common import Check, checkpointing, finish, parser, run_dir, shared_data_dir
from jaxdl.data import images as image_io
from jaxdl.plots import plot_history
from jaxdl.pretrained import CAT_CLASSES, ImageClassifier, decode_predictions, finetune

DEFAULT_DATA = shared_data_dir() / "cats"
# Bands over seeds 0-4 (python -m experiments.suite --seeds 0 1 2 3 4): training accuracy 0.95-1.0 on
# all 40 and 0.967-1.0 on the 30, validation 0.5-0.7; the tutorial's run reached 1.0 in training.
CHECKS = (
    Check("train_accuracy_all", ">= 0.9 (tutorial: 1.0)", lambda v: v >= 0.9),
    Check("train_accuracy", ">= 0.9 (tutorial: 1.0)", lambda v: v >= 0.9),
    Check("val_accuracy", "well below training", lambda v: v <= 0.8),
    Check("imagenet_cat_count", "most of the 40 seen as cat breeds", lambda v: v >= 20),
)
# Zeros and ones are easy to tell apart: the stand-in shows the workflow, not the overfitting lesson.
STAND_IN_CHECKS = (
    Check("train_accuracy_all", "1.0 (stand-in data)", lambda v: v == 1.0),
    Check("train_accuracy", "1.0 (stand-in data)", lambda v: v == 1.0),
    Check("val_accuracy", ">= 0.9 (stand-in data: easy)", lambda v: v >= 0.9),
)


def checks(metrics: dict) -> tuple:
    """The tutorial's references on the cat photos; plainer ones on the stand-in digits."""
    return STAND_IN_CHECKS if metrics["stand_in"] else CHECKS
NAME = re.compile(r"^([fm])(\d+)$")


def cat_photos(folder: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """f##/m## photo files (female 0, male 1) from a flat folder, or class subfolders."""
    if any(p.is_dir() for p in folder.iterdir()):
        return image_io.image_folder(folder)
    files = sorted(p for p in folder.iterdir() if NAME.match(p.stem) and p.suffix.lower() in image_io.IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"{folder}: no f##/m## photos and no class subfolders")
    return files, np.asarray([0 if p.stem[0] == "f" else 1 for p in files], np.int32), ["female", "male"]


def digit_photos(folder: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Stand-in data: 20 zeros as f01-f20, 20 ones as m01-m20, rendered as 256x256 RGB PNGs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    paths, labels = [], []
    for label, prefix in enumerate("fm"):
        for i, image in enumerate(digits.images[digits.target == label][:20], 1):
            gray = Image.fromarray((255 - image * 255 / 16).astype(np.uint8)).resize((256, 256), Image.BILINEAR)
            path = folder / f"{prefix}{i:02d}.png"
            gray.convert("RGB").save(path)
            paths.append(path)
            labels.append(label)
    return paths, np.asarray(labels, np.int32), ["zero", "one"]


def is_training_photo(path: Path) -> bool:
    """f01-f15 and m01-m15 train; f16-f20 and m16-m20 validate, as in the tutorial."""
    match = NAME.match(path.stem)
    return match is not None and int(match.group(2)) <= 15


def load_photos(paths, labels, preprocessing: dict) -> tuple[np.ndarray, np.ndarray, list, np.ndarray]:
    """Preprocessed photos, their labels, their paths and whether each is a training photo.

    Unreadable files are reported and left out of all four, so that labels
    and the training split stay with their photos.
    """
    images, labels, paths = image_io.load_images(paths, labels, preprocessing)
    return images, labels, paths, np.array([is_training_photo(Path(p)) for p in paths], bool)


def choose_photos(data: str | None, out: Path) -> tuple[list[Path], np.ndarray, list[str], str, bool]:
    """(paths, labels, classes, where they come from, whether they are the stand-in digits).

    `--data` must exist; without it, the shared cat photos are used when
    present, and the digits stand-in (said on the output) when not.
    """
    folder = Path(data) if data else DEFAULT_DATA
    if folder.is_dir():
        return (*cat_photos(folder), str(folder), False)
    if data:
        raise FileNotFoundError(f"--data {folder}: no such folder")
    source = f"scikit-learn digits 0 and 1 (stand-in: no cat photos found at {DEFAULT_DATA})"
    print(f"transfer: no cat photos at {DEFAULT_DATA}; using {source}")
    return (*digit_photos(out / "digit_photos"), source, True)


def run(argv=None) -> dict:
    cli = parser(__doc__)
    cli.add_argument("--data", default=None, help=f"cat photos (default: {DEFAULT_DATA} when present)")
    cli.add_argument("--epochs", type=int, default=20)
    cli.add_argument("--batch-size", type=int, default=16)
    args = cli.parse_args(argv)
    out = run_dir("transfer", args.out)
    paths, labels, classes, source, stand_in = choose_photos(args.data, out)

    imagenet = ImageClassifier.load("imagenet")
    images, labels, paths, train = load_photos(paths, labels, imagenet.preprocessing)
    top1 = [top[0] for top in decode_predictions(imagenet.probabilities(images), 1, imagenet.class_names)]
    for path, (_, label, probability) in zip(paths, top1):
        print(f"{Path(path).name}: {label} ({probability:.1%})")

    checkpoints = checkpointing(args)
    common = dict(backbone=imagenet.model, backbone_variables=imagenet.variables, num_classes=len(classes),
                  epochs=args.epochs, learning_rate=1e-3, seed=args.seed, verbose=not args.quiet)
    everything = finetune.finetune(images, labels, batch_size=args.batch_size, **common, **checkpoints("all"))
    keras_batch = finetune.finetune(images, labels, batch_size=32, **common, **checkpoints("batch32"))
    split = finetune.finetune(images[train], labels[train], validation_data=(images[~train], labels[~train]),
                              batch_size=args.batch_size, **common, **checkpoints("split"))
    plot_history(split.history, out / "history.png",
                 f"transfer learning: {train.sum()} training, {(~train).sum()} validation photos")
    return finish(out, {
        "data": source,
        "stand_in": stand_in,
        "classes": classes,
        "imagenet_top1": [label for _, label, _ in top1],
        "imagenet_cat_count": sum(index in CAT_CLASSES for index, _, _ in top1),
        "imagenet_top1_probability_median": float(np.median([p for _, _, p in top1])),
        "train_accuracy_all": everything.history["accuracy"][-1],
        "train_accuracy_all_batch32": keras_batch.history["accuracy"][-1],
        "train_accuracy": split.history["accuracy"][-1],
        "val_accuracy": split.history["val_accuracy"][-1],
    })


if __name__ == "__main__":
    run()
