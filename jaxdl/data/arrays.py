"""Checks and batching for in-memory datasets (sources are `jaxdl.data.sources`).

Bad inputs are caught here, on the host and before any compilation, so that
the user reads which argument is wrong instead of a JAX trace.
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterator

import numpy as np


def positive_int(name: str, value) -> int:
    """`value` as an int, or a ValueError naming `name` when it is not a positive integer (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_batch_size(batch_size) -> int:
    return positive_int("batch_size", batch_size)


def _is_streaming_source(value) -> bool:
    """A generator, iterator, tfds data source, grain dataset or dict of features: not an in-memory array."""
    if isinstance(value, (np.ndarray, list, tuple)) or hasattr(value, "__array__"):
        return False
    return isinstance(value, dict) or hasattr(value, "__next__") or hasattr(value, "__iter__") \
        or hasattr(value, "__getitem__")


def check_dataset(x, y=None, *, name: str = "x", input_shape: tuple | None = None, purpose: str = "training"):
    """Validates one dataset and returns it as numpy arrays.

    Raises ValueError naming `name` when it is a source or a dict, empty, holds NaN or infinity, has per-example
    shape other than `input_shape`, or when `y` has another number of examples.
    """
    if isinstance(x, dict):
        raise ValueError(f"{name} is a dict of feature arrays ({sorted(x)}); jaxdl models take one input array: "
                         f"pass x=features[input name] and y=features[label name], or a source of example dicts "
                         "with features=(input, label)")
    if _is_streaming_source(x):
        raise ValueError(f"{name} is a {type(x).__name__}, and this takes in-memory arrays; fit, evaluate and "
                         "predict read sources (tfds data sources, grain datasets, iterables of batch dicts) "
                         "when given as x, or as fit's validation_data")
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}); there is nothing to train or evaluate on")
    if x.dtype == object:
        raise ValueError(f"{name} must be numeric, got an object array (ragged rows or mixed types?)")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x.reshape(x.shape[0], -1)))[0][0]
        raise ValueError(f"{name} contains NaN or infinite values (first in example {bad}); "
                         f"drop or impute them before {purpose}")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(f"{name} has per-example shape {tuple(x.shape[1:])}, but the model was built "
                         f"for {tuple(input_shape)}")
    if y is None:
        return x
    y = np.asarray(y)
    label_name = "y" if name == "x" else f"labels of {name}"
    if y.ndim == 0 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{name} has {x.shape[0]} examples but {label_name} has "
                         f"{y.shape[0] if y.ndim else 0}; they must match")
    if np.issubdtype(y.dtype, np.floating) and not np.isfinite(y).all():
        raise ValueError(f"{label_name} contains NaN or infinite values")
    return x, y


def class_indices(y: np.ndarray, *, name: str = "y") -> np.ndarray:
    """The class number of every example of labels `y` (N, ...), as Keras reads them for `class_weight`.

    - (N,) labels are class numbers: integers as they are, floats (and bools)
      that are whole numbers as integers;
    - (N, 1) labels are one binary label each (0/1, or a probability): rounded
      and squeezed, as Keras does. An argmax over that length-1 axis would give
      class 0 for every example, and class_weight no effect;
    - (N, C) labels with C > 1 are one-hot (or probabilities): their argmax.

    Returns an int64 array of shape (N,). Anything else (more axes, fractional
    (N,) labels, NaN, non-numeric values) is a ValueError naming `name`, the
    example and what class_weight reads.
    """
    y = np.asarray(y)
    if y.dtype == bool:
        y = y.astype(np.int64)
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"{name} holds {y.dtype} values; class_weight reads numeric labels (class numbers, "
                         "binary 0/1 labels or one-hot rows)")
    if y.ndim not in (1, 2):
        raise ValueError(f"{name} has labels of shape {y.shape[1:]} per example; class_weight reads a class "
                         "number (shape ()), one binary label (shape (1,)) or a one-hot row (shape (C,))")
    if np.issubdtype(y.dtype, np.floating) and not np.isfinite(y).all():
        bad = int(np.argwhere(~np.isfinite(y.reshape(len(y), -1)))[0][0])
        raise ValueError(f"{name} holds NaN or infinite labels (example {bad}); class_weight cannot read a class")
    if y.ndim == 2:
        return (np.round(y[:, 0]) if y.shape[1] == 1 else y.argmax(axis=1)).astype(np.int64)
    if np.issubdtype(y.dtype, np.floating):
        fractional = np.flatnonzero(y != np.round(y))
        if fractional.size:
            raise ValueError(f"{name} holds {y[fractional[0]]:g} (example {int(fractional[0])}), not a class "
                             "number: class_weight reads whole-number labels of shape (N,) (binary probabilities "
                             "are rounded only when shaped (N, 1), as Keras)")
    return y.astype(np.int64)


def split_validation(x, y, validation_split: float):
    """Holds out the last `validation_split` of the examples, as Keras's `fit` does."""
    if isinstance(validation_split, bool) or not 0.0 < float(validation_split) < 1.0:
        raise ValueError(f"validation_split must be between 0 and 1 (exclusive), got {validation_split!r}")
    split_at = int(x.shape[0] * (1.0 - validation_split))
    if split_at == 0 or split_at == x.shape[0]:
        raise ValueError(f"validation_split={validation_split} leaves no examples for training or "
                         f"validation out of {x.shape[0]}")
    return (x[:split_at], y[:split_at]), (x[split_at:], y[split_at:])


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool = False) -> int:
    if drop_remainder:
        return num_examples // batch_size
    return math.ceil(num_examples / batch_size)


def rows_to_split(rows: np.ndarray, multiple: int, masked: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """`rows` filled up (wrapping around) to a multiple of `multiple`, with the mask of the real ones.

    A batch split over `multiple` devices must divide evenly; the mask keeps
    the added rows out of the loss and metrics. None: nothing was added and
    `masked` was not asked for (a mask on every batch, padded or not, gives
    all batches one structure: one compiled step).
    """
    missing = -len(rows) % multiple
    if not missing:
        return rows, np.ones(len(rows), np.float32) if masked else None
    return np.resize(rows, len(rows) + missing), (np.arange(len(rows) + missing) < len(rows)).astype(np.float32)


def padded_indices(order: np.ndarray, batch_size: int, drop_remainder: bool = False):
    """Example indices as (batches, batch_size) plus a mask of the real ones.

    The last partial batch is filled by wrapping around and masked out (see
    `rows_to_split`), so every batch has one shape and a jitted step compiles once.
    """
    kept = order[:num_batches(len(order), batch_size, drop_remainder) * batch_size]
    rows, mask = rows_to_split(kept, batch_size, masked=True)
    return rows.reshape(-1, batch_size), mask.reshape(-1, batch_size)


def process_part(size: int, process: tuple[int, int]) -> slice:
    """Process `(index, count)`'s consecutive part of `size` rows: its devices' part of a split batch."""
    index, count = process
    return slice(index * size // count, (index + 1) * size // count)


def split_evenly(batch: dict, multiple: int) -> dict:
    """A batch dict filled up to a multiple of `multiple` examples, its `mask` marking the real ones."""
    rows, mask = rows_to_split(np.arange(len(next(iter(batch.values())))), multiple)
    if mask is None:
        return batch
    padded = {key: np.asarray(value)[rows] for key, value in batch.items()}
    padded["mask"] = mask * padded["mask"] if "mask" in batch else mask
    return padded


def ordered_batches(arrays: dict, order: np.ndarray, batch_size: int, drop_remainder: bool = False,
                    multiple: int = 1, masked: bool = False) -> Iterator[dict]:
    """Batches of `arrays` (a dict of equally long arrays) taken in `order`, the last one smaller or dropped.

    A smaller last batch that `multiple` devices could not split is filled
    up and gets a `mask`; with `masked` every batch has one (see `rows_to_split`).
    """
    stop = min(num_batches(len(order), batch_size, drop_remainder) * batch_size, len(order))
    for start in range(0, stop, batch_size):
        rows, mask = rows_to_split(order[start:start + batch_size], multiple, masked)
        batch = {key: value[rows] for key, value in arrays.items()}
        yield batch if mask is None else {**batch, "mask": mask}


def batches(x, y, batch_size: int, *, seed: int | None = None, drop_remainder: bool = False,
            pad: bool = True) -> Iterator[dict]:
    """Yields numpy batches for hand-written loops.

    With `seed` the order is shuffled (numpy Generator, reproducible);
    without it the data is read in order. With `pad` every batch has one
    shape, so a jitted step compiles once: `{'x', 'y', 'mask'}`, the last
    batch filled up and masked. Models with BatchNorm statistics need
    `pad=False` (padding rows would enter the statistics): `{'x', 'y'}`, the
    last batch smaller, as in Keras.
    """
    batch_size = check_batch_size(batch_size)
    x, y = check_dataset(x, y)
    order = np.arange(len(x)) if seed is None else np.random.default_rng(seed).permutation(len(x))
    if not pad:
        yield from ordered_batches({"x": x, "y": y}, order, batch_size, drop_remainder)
        return
    index, mask = padded_indices(order, batch_size, drop_remainder)
    for rows, keep in zip(index, mask):
        yield {"x": x[rows], "y": y[rows], "mask": keep.astype(np.float32)}


def data_fingerprint(*arrays: np.ndarray, rows: int = 64) -> str:
    """A cheap identity of a dataset: its shapes and dtypes, and the bytes of up to `rows` evenly spaced rows."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.asarray(array)
        digest.update(f"{array.shape} {array.dtype}".encode())
        if len(array):
            picked = np.unique(np.linspace(0, len(array) - 1, min(rows, len(array))).astype(np.int64))
            digest.update(np.ascontiguousarray(array[picked]).tobytes())
    return digest.hexdigest()[:16]
