"""MNIST's original IDX files, read with numpy: no TensorFlow, no tfds, no download.

The format (LeCun's MNIST page): a big-endian header of a 4-byte magic
number, `0x00 0x00 TYPE NDIM` (TYPE 0x08 for unsigned bytes), then NDIM
big-endian uint32 sizes, then the values in row-major order. MNIST's images
are magic 2051 (0x0803: uint8, 3 dimensions, N x 28 x 28) and its labels
magic 2049 (0x0801: uint8, 1 dimension, N). The files are usually gzipped
(`train-images-idx3-ubyte.gz` ...), as tfds and Keras download them.

Read by hand because it is a few lines, and because every other reader
(tfds's builder, `keras.datasets.mnist`) needs TensorFlow or a download.
Anything that is not a whole, consistent IDX file is a `ValueError` naming
the file: a truncated or corrupt gzip stream, a wrong magic number, fewer
bytes than the header declares (or more), images and labels of different
counts.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
# The names tfds's MNIST builder and Keras's mirror use; a directory may hold them gzipped or not.
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
MNIST_SHAPE = (28, 28)
_UBYTE = 0x08


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with gzip's magic; a ValueError naming it if corrupt."""
    data = path.read_bytes()
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as error:  # EOFError: the gzip stream ends early (a truncated file)
        raise ValueError(f"{path}: not a complete gzip file ({error}); it may be truncated, download it "
                         "again") from None


def read_idx(path: str | os.PathLike, magic: int | None = None) -> np.ndarray:
    """The uint8 array stored in the IDX file `path` (gzipped or not), shaped as its header says.

    `magic`, when given (2051 images, 2049 labels), is the number the file
    must start with. Raises ValueError naming the file for a wrong magic
    number, a type other than unsigned bytes, or a payload whose length is not
    the product of the declared sizes (a truncated or padded file).
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes, too short for an IDX header (4-byte magic number)")
    found = int.from_bytes(data[:4], "big")
    if magic is not None and found != magic:
        raise ValueError(f"{path}: magic number {found}, expected {magic} "
                         f"({'images' if magic == IMAGES_MAGIC else 'labels' if magic == LABELS_MAGIC else 'IDX'}); "
                         "is it an IDX file of the right kind?")
    if data[0] or data[1] or data[2] != _UBYTE or not 1 <= data[3] <= 4:
        raise ValueError(f"{path}: magic number {found} is not an IDX header of unsigned bytes "
                         "(0x00 0x00 0x08 NDIM)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated in its header ({len(data)} bytes, the {ndim} sizes need {header})")
    shape = tuple(int(size) for size in np.frombuffer(data, ">u4", ndim, 4))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data) - header:,} bytes of values, but its header declares shape {shape} "
                         f"({expected - header:,}); the file is {'truncated' if len(data) < expected else 'padded'}")
    return np.frombuffer(data, np.uint8, expected - header, header).reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{directory}: no {stem}.gz (nor {stem}); an MNIST directory holds the four IDX files "
                            + ", ".join(f"{name}.gz" for pair in MNIST_FILES.values() for name in pair))


def read_idx_pair(images_path: str | os.PathLike, labels_path: str | os.PathLike,
                  image_shape: tuple[int, ...] | None = MNIST_SHAPE, num_classes: int | None = 10):
    """`(images (N, H, W) uint8, labels (N,) uint8)` from an images file and its labels file.

    Checks both magic numbers, that the counts agree, the image shape
    (`image_shape`, MNIST's 28x28 unless None) and the label range
    (`0 .. num_classes - 1` unless None); errors name the file at fault.
    """
    images, labels = read_idx(images_path, IMAGES_MAGIC), read_idx(labels_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images):,} images but {labels_path} holds {len(labels):,} "
                         "labels; they must be a matching pair")
    if image_shape is not None and images.shape[1:] != tuple(image_shape):
        raise ValueError(f"{images_path}: images of shape {images.shape[1:]}, expected {tuple(image_shape)}")
    if num_classes is not None and len(labels) and labels.max() >= num_classes:
        raise ValueError(f"{labels_path}: label {int(labels.max())} outside 0..{num_classes - 1}")
    return images, labels


def load_mnist(directory: str | os.PathLike):
    """`((x_train, y_train), (x_test, y_test))` from a directory of MNIST's four IDX files.

    The layout of `keras.datasets.mnist.load_data()`: uint8 images
    (60000, 28, 28) and (10000, 28, 28), uint8 labels. The files may be
    gzipped (`train-images-idx3-ubyte.gz`, ...) or not.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory (expected MNIST's four IDX files in one)")
    return tuple(read_idx_pair(_find(directory, images), _find(directory, labels))
                 for images, labels in MNIST_FILES.values())
