"""Loading photos, preprocessing them the way pretrained weights expect, and augmenting them.

Preprocessing is plain data (`{"kind": "torchvision", "size": 224}`), stored
beside a saved model so that it is applied the same way in every process.
"""
from __future__ import annotations

import csv
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

TORCHVISION = {"kind": "torchvision", "size": 224, "resize": 256,
               "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
KERAS = {"kind": "keras", "size": 224}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")  # what image_dataset_from_directory reads
# Pillow's default `Image.MAX_IMAGE_PIXELS` (about 89.5 megapixels), written out so that it does not depend on
# whatever a program has set that global to.
MAX_PIXELS = 89_478_485
# A photo enlarged more than this many times in a side before it reaches the network is mostly interpolation:
# `load_batch` warns, naming it.
MAX_UPSCALE = 2.0


class ImageError(ValueError):
    """An image file that cannot be read; the message starts with its path."""


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An RGB image, upright per its EXIF orientation (grayscale, 16-bit, palette and RGBA converted).

    An image of more than `max_pixels` pixels is refused from its header,
    before it is decoded: a small file can declare a huge image. Pillow's
    own limit (twice `Image.MAX_IMAGE_PIXELS`, checked by `Image.open`)
    applies as well, so `max_pixels` can lower the limit but not raise it.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1, got {max_pixels}")
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"{path}: image too large to decode safely ({width}x{height} = "
                                 f"{width * height} pixels, over max_pixels={max_pixels})")
            image.load()  # decode now, so a truncated file fails here
            image = to_8_bit(ImageOps.exif_transpose(image))
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
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:  # warnings may be errors
        raise ImageError(f"{path}: image too large to decode safely ({error})") from None
    except OSError as error:
        raise ImageError(f"{path}: damaged or truncated image ({error})") from None


def to_8_bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float grayscale image as 8-bit grayscale ("L"); other modes unchanged.

    Pillow's own conversion clips these to 0-255, turning a 16-bit photo
    white. Integer samples are taken as 16-bit (Pillow opens 16-bit PNGs as
    "I;16" and 16-bit PGMs as "I") and keep their high byte, `value >> 8`:
    torchvision's `to_dtype(uint16 -> uint8, scale=True)` and Pillow's own
    reading of 16-bit RGB PNGs do the same. Float samples are taken as
    [0, 1], torchvision's float convention, and scaled as its `to_dtype`
    scales them (`floor(value * 255.999)`); out-of-range samples are clipped.
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        samples = np.clip(np.asarray(image), 0, 65535).astype(np.uint16) >> 8
    elif image.mode == "F":
        samples = np.clip(np.asarray(image), 0.0, 1.0) * 255.999
    else:
        return image
    return Image.fromarray(samples.astype(np.uint8))


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) after torchvision's `Resize(short_side)`: the short side becomes `short_side`, the long
    side keeps the aspect ratio, truncated (451x300 -> 384x256)."""
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def center_crop_offset(length: int, crop: int) -> int:
    """Where torchvision's `center_crop` starts a crop of `crop` pixels along a side of `length`.

    Negative when the side is shorter than the crop: torchvision pads it
    with zeros, as a PIL crop past the edge does.
    """
    if crop > length:
        return -((crop - length) // 2)
    return int(round((length - crop) / 2.0))


def preprocess(image: Image.Image, preprocessing: dict) -> np.ndarray:
    """An HWC float32 array for the network.

    torchvision: `Resize(resize)` (bilinear), `CenterCrop(size)`, scale to
    [0, 1], normalise with ImageNet mean and std, with torchvision's sizes
    and offsets. keras: resize to `size` x `size` (nearest, Keras's
    `load_img` default) and scale to [-1, 1] as
    `mobilenet_v2.preprocess_input` does.
    """
    size = int(preprocessing["size"])
    if preprocessing["kind"] == "torchvision":
        image = image.resize(resized_size(*image.size, int(preprocessing["resize"])), Image.BILINEAR)
        width, height = image.size
        left, top = center_crop_offset(width, size), center_crop_offset(height, size)
        pixels = np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255.0
        return ((pixels - np.asarray(preprocessing["mean"], np.float32))
                / np.asarray(preprocessing["std"], np.float32))
    if preprocessing["kind"] == "keras":
        pixels = np.asarray(image.resize((size, size), Image.NEAREST), np.float32)
        return pixels / 127.5 - 1.0
    raise ValueError(f"unknown preprocessing kind {preprocessing['kind']!r} (torchvision or keras)")


def upscale_factor(width: int, height: int, preprocessing: dict) -> float:
    """How many times `preprocess` enlarges a `width` x `height` photo along a side (below 1: it shrinks it).

    torchvision's preprocessing scales the short side to `resize`; Keras's
    stretches the photo to `size` x `size`, so its larger factor counts.
    """
    if preprocessing["kind"] == "torchvision":
        return int(preprocessing["resize"]) / min(width, height)
    size = int(preprocessing["size"])
    return max(size / width, size / height)


def load_batch(paths, preprocessing: dict,
               max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, list[str], list[str]]:
    """Preprocessed images stacked, the paths that loaded, and an error line for each that did not.

    A photo that preprocessing enlarges more than `MAX_UPSCALE` times along
    a side is used, with a `UserWarning` naming it and its size: the network
    then sees mostly interpolated pixels.
    """
    arrays, loaded, errors = [], [], []
    for path in paths:
        try:
            image = load_image(path, max_pixels)
            factor = upscale_factor(*image.size, preprocessing)
            if factor > MAX_UPSCALE:
                warnings.warn(f"{path}: a {image.size[0]}x{image.size[1]} photo, enlarged {factor:.1f}x to reach "
                              f"the network's {preprocessing['size']}x{preprocessing['size']} input (more than "
                              f"{MAX_UPSCALE:g}x: mostly interpolated pixels)", UserWarning, stacklevel=2)
            arrays.append(preprocess(image, preprocessing))
            loaded.append(str(path))
        except ImageError as error:
            errors.append(str(error))
    size = int(preprocessing["size"])
    stacked = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.float32)
    return stacked, loaded, errors


def image_folder(directory: str | os.PathLike) -> tuple[list[Path], np.ndarray, list[str]]:
    """(paths, labels, class names) from one subfolder per class, as Keras's image_dataset_from_directory.

    Classes are the subfolders in alphabetical order. Fewer than two
    classes, or a class without images, is an error naming the folder; when
    the images lie directly in the folder (a flat folder, labelled by name or
    by a CSV file rather than by subfolder), the error names the options and
    functions that read it.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such data folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        flat = sum(1 for p in root.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
        raise ValueError(f"{root}: needs one subfolder per class and at least two classes, found {len(classes)}"
                         + (f" ({classes[0]})" if classes else "")
                         + (f"; it holds {flat} images directly (a flat folder): take each image's class from "
                            "its file name (--labels-from-name REGEX, images.labels_from_names) or from a CSV "
                            "file of 'file,class' lines (--labels-csv FILE, images.labels_from_csv)" if flat else ""))
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"{root / name}: class {name!r} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths += files
        labels += [label] * len(files)
    return paths, np.asarray(labels, np.int32), classes


def _labelled(root: Path, named: list[tuple[Path, str]]) -> tuple[list[Path], np.ndarray, list[str]]:
    """(paths, labels, class names) from (path, class name) pairs: classes sorted, paths sorted."""
    classes = sorted({name for _, name in named})
    if len(classes) < 2:
        raise ValueError(f"{root}: needs at least two classes, found {len(classes)}"
                         + (f" ({classes[0]})" if classes else ""))
    index = {name: label for label, name in enumerate(classes)}
    named = sorted(named)
    return [path for path, _ in named], np.asarray([index[name] for _, name in named], np.int32), classes


def _listing(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def class_pattern(pattern: str | re.Pattern) -> re.Pattern:
    """`pattern` compiled; a ValueError unless it is a valid regular expression with exactly one group."""
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"invalid regular expression '{pattern}': {error}") from None
    if compiled.groups != 1:
        raise ValueError(f"regular expression '{compiled.pattern}' has {compiled.groups} groups; it needs exactly "
                         "one, whose value is the class name (e.g. '^([fm])\\d+')")
    return compiled


def labels_from_names(directory: str | os.PathLike,
                      pattern: str | re.Pattern) -> tuple[list[Path], np.ndarray, list[str]]:
    """(paths, labels, class names) of a flat folder of images, the class taken from each file name.

    `pattern` is a regular expression with one group, searched in each image
    file's name (`^` anchors it at the start); the group's text is the class
    name: `^([fm])\\d+` gives f01.jpg class "f". Images are the folder's files
    with an image extension (as `image_folder`'s), subfolders are not read.
    Classes are sorted alphabetically. Any image whose name the pattern does
    not match, and fewer than two classes, are errors.
    """
    root = Path(directory)
    compiled = class_pattern(pattern)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such data folder")
    files = sorted(p for p in root.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    named, unmatched = [], []
    for path in files:
        match = compiled.search(path.name)
        if match and match.group(1):
            named.append((path, match.group(1)))
        else:
            unmatched.append(path.name)
    if unmatched:
        raise ValueError(f"{root}: {len(unmatched)} of {len(files)} images have names that '{compiled.pattern}' "
                         f"does not match (or whose group is empty): {_listing(unmatched)}")
    return _labelled(root, named)


def labels_from_csv(directory: str | os.PathLike,
                    csv_path: str | os.PathLike) -> tuple[list[Path], np.ndarray, list[str]]:
    """(paths, labels, class names) of the images a CSV file lists, with their classes.

    Each line of the CSV (comma-separated, UTF-8) is `file,class`, the file
    relative to `directory` (subfolders allowed). The first line is a header,
    and skipped, when it has two columns and the first neither names an
    existing file nor ends with an image extension (`file,label` is a
    header, `f01.jpg,female` is not). Blank lines are skipped. Classes are sorted alphabetically;
    images in `directory` that the CSV does not list are not used. Errors
    name the CSV line: not two columns, an empty file or class, a file
    outside `directory` or without an image extension, a missing file, a
    file listed twice; and fewer than two classes.
    """
    root, csv_path = Path(directory), Path(csv_path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such data folder")
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: no such labels file")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as file:  # -sig: a spreadsheet's byte-order mark
            reader = csv.reader(file)
            rows = [(reader.line_num, [cell.strip() for cell in row]) for row in reader]
    except (UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"{csv_path}: not a readable UTF-8 CSV file ({error})") from None
    rows = [(number, row) for number, row in rows if any(row)]
    if rows and len(rows[0][1]) == 2:
        first = rows[0][1][0]
        if Path(first).suffix.lower() not in IMAGE_EXTENSIONS and not (root / first).is_file():
            rows = rows[1:]  # a header
    if not rows:
        raise ValueError(f"{csv_path}: no labelled images (expected lines of file,class)")
    named, seen = [], {}
    for number, row in rows:
        where = f"{csv_path}, line {number}"
        if len(row) != 2 or not all(row):
            raise ValueError(f"{where}: expected two non-empty columns (file,class), got {row!r}")
        name, label = row
        relative = Path(os.path.normpath(name))  # "./a/../f01.jpg" and "f01.jpg" are one file
        if relative.is_absolute() or relative.parts[:1] == ("..",):
            raise ValueError(f"{where}: {name!r} is not a path inside {root}")
        path = root / relative
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise ValueError(f"{where}: {name!r} is not an image file ({', '.join(IMAGE_EXTENSIONS)})")
        if not path.is_file():
            raise ValueError(f"{where}: {name!r}: no such file in {root}")
        if relative in seen:
            raise ValueError(f"{where}: {name!r} is listed twice (first on line {seen[relative]})")
        seen[relative] = number
        named.append((path, label))
    return _labelled(root, named)


def load_images(paths, labels, preprocessing: dict, report: Callable[[str], None] | None = None,
                max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, np.ndarray, list]:
    """Preprocessed images, their labels and their paths; unreadable files are reported by name and left out
    of all three, so that the three stay aligned."""
    report = report or (lambda line: print(line, file=sys.stderr))
    batch, loaded, errors = load_batch(paths, preprocessing, max_pixels)
    for error in errors:
        report(f"skipped: {error}")
    index = {str(p): i for i, p in enumerate(paths)}
    kept = [index[p] for p in loaded]
    return batch, np.asarray([labels[i] for i in kept], np.int32), [paths[i] for i in kept]


def augment_images(rng: jax.Array, images: jnp.ndarray, pad: int = 16) -> jnp.ndarray:
    """Random horizontal flips and random crops (reflect-pad by `pad`, crop back), seeded by `rng`."""
    flip_rng, crop_rng = jax.random.split(rng)
    n, height, width, channels = images.shape
    flip = jax.random.bernoulli(flip_rng, 0.5, (n, 1, 1, 1))
    images = jnp.where(flip, images[:, :, ::-1], images)
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    offsets = jax.random.randint(crop_rng, (n, 2), 0, 2 * pad + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    return jax.vmap(crop)(padded, offsets)
