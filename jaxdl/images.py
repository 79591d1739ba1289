"""Loading photos and preprocessing them the way pretrained weights expect.

Preprocessing is plain data (`{"kind": "torchvision", "size": 224}`), stored
beside a saved model so that it is applied the same way in every process.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

TORCHVISION = {"kind": "torchvision", "size": 224, "resize": 256,
               "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
KERAS = {"kind": "keras", "size": 224}


class ImageError(ValueError):
    """An image file that cannot be read; the message starts with its path."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """An RGB image, upright per its EXIF orientation (grayscale, palette and RGBA converted)."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so a truncated file fails here
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "P"):
                image = image.convert("RGBA")
                background = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, image)
            return image.convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read (JPEG, PNG, ...)") from None
    except OSError as error:
        raise ImageError(f"{path}: damaged or truncated image ({error})") from None


def preprocess(image: Image.Image, preprocessing: dict) -> np.ndarray:
    """An HWC float32 array for the network.

    torchvision: resize the shorter side to `resize` (bilinear), centre-crop
    `size`, scale to [0, 1], normalise with ImageNet mean and std. keras:
    resize to `size` x `size` (nearest, Keras's `load_img` default) and scale
    to [-1, 1] as `mobilenet_v2.preprocess_input` does.
    """
    size = int(preprocessing["size"])
    if preprocessing["kind"] == "torchvision":
        width, height = image.size
        scale = preprocessing["resize"] / min(width, height)
        image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BILINEAR)
        width, height = image.size
        left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
        pixels = np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255.0
        return ((pixels - np.asarray(preprocessing["mean"], np.float32))
                / np.asarray(preprocessing["std"], np.float32))
    if preprocessing["kind"] == "keras":
        pixels = np.asarray(image.resize((size, size), Image.NEAREST), np.float32)
        return pixels / 127.5 - 1.0
    raise ValueError(f"unknown preprocessing kind {preprocessing['kind']!r} (torchvision or keras)")


def load_batch(paths, preprocessing: dict) -> tuple[np.ndarray, list[str], list[str]]:
    """Preprocessed images stacked, the paths that loaded, and an error line for each that did not."""
    arrays, loaded, errors = [], [], []
    for path in paths:
        try:
            arrays.append(preprocess(load_image(path), preprocessing))
            loaded.append(str(path))
        except ImageError as error:
            errors.append(str(error))
    size = int(preprocessing["size"])
    stacked = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.float32)
    return stacked, loaded, errors
