"""Input adapters: one per kind of training input, each owning how its examples become batches.

As Keras 3 splits its trainer (`keras/src/trainers/epoch_iterator.py`), an
adapter owns, for one kind of input: reading and checking its examples,
labels and weights (class and sample); shuffling, as a pure function of the
seed and the epoch (arrays: of the step the epoch starts at); batching,
padding and masks; the number of batches; the position a checkpoint can
restore; and the data's identity, which a resumed run compares.

- `ArrayInput`: in-memory arrays (x, y, per-example weights);
- `SourceInput`: a random-access source (tfds `data_source`, grain
  `MapDataset`, a list of example dicts) or an iterable of batch dicts,
  through `jaxdl.data.sources`.

Both implement one `typing.Protocol`, `InputAdapter`, and nothing outside
this module asks what kind of input it has: the epoch loop takes
`host_batches(epoch, start_step, skip)` or the adapter's `whole()` data, the
run reads the counts, the labels and the identity. Device placement, steps
and checkpoints belong to others.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Callable, Iterator, NamedTuple, Protocol

import jax
import numpy as np

from jaxdl.data import arrays, sources
from jaxdl.runtime import compiler


def example_weights(y: np.ndarray, class_weight: dict | None, sample_weight) -> np.ndarray:
    """Per-example loss weights from Keras's `class_weight` ({class: weight}) and `sample_weight` (N,).

    Classes are read as Keras reads them (`arrays.class_indices`): integer
    labels as they are, one-hot rows by their largest entry, and one-unit
    binary labels of shape (N, 1) rounded.
    """
    weights = np.ones(len(y), np.float32)
    if class_weight is not None and sample_weight is not None:
        raise ValueError("pass class_weight or sample_weight, not both (as Keras); fold the class weights into "
                         "sample_weight to combine them")
    if sample_weight is not None:
        sample_weight = np.asarray(sample_weight, np.float32)
        if sample_weight.shape != (len(y),) or not np.isfinite(sample_weight).all():
            raise ValueError(f"sample_weight must hold one finite weight per example, shape ({len(y)},); "
                             f"got shape {sample_weight.shape}")
        weights *= sample_weight
    if class_weight is not None:
        classes = arrays.class_indices(y)
        missing = sorted(set(np.unique(classes).tolist()) - set(class_weight))
        if missing:
            raise ValueError(f"class_weight has no weight for classes {missing} found in y")
        weights *= np.asarray([class_weight[c] for c in classes.tolist()], np.float32)
    return weights


class WholeData(NamedTuple):
    """An adapter's data as arrays for epochs scanned on the device: every example, and how epochs order them.

    `shuffle` is True/False (the order drawn on the device from
    `shuffle_rng` and the step), or "given": `orders(epoch)` gives it.
    """

    x: np.ndarray
    y: np.ndarray
    weights: np.ndarray
    shuffle_rng: Any
    shuffle: bool | str
    orders: Callable[[int], np.ndarray] | None = None


class InputAdapter(Protocol):
    """What the run reads of a training input, whatever its kind."""

    kind: str  # "arrays" or "source", recorded in a run checkpoint
    labels_name: str  # how an error names the labels ("y", "the labels of the source")
    per_process: bool  # batches are this process's part (sources), or global (arrays)
    validation_split: float | None

    @property
    def shuffle(self) -> bool: ...

    @property
    def drop_remainder(self) -> bool: ...

    @property
    def resumable(self) -> bool: ...

    @property
    def num_examples(self) -> int | None: ...

    @property
    def batches_per_epoch(self) -> int | None: ...

    @property
    def input_shape(self) -> tuple: ...

    @property
    def input_dtype(self) -> np.dtype: ...

    @property
    def labels(self) -> np.ndarray: ...

    @property
    def nbytes(self) -> int | None: ...

    def fingerprint(self) -> str: ...

    def use_padding(self, pad_to: int, masked: bool) -> None: ...

    def host_batches(self, epoch: int, start_step: int, skip: int = 0) -> Iterator[dict]: ...

    def whole(self) -> WholeData | None: ...


@dataclasses.dataclass
class ArrayInput:
    """In-memory arrays: whole on the device for the scanned epoch (within a byte bound), or read as host batches.

    The shuffle order of an epoch is a permutation drawn from `shuffle_rng`
    folded with the step the epoch starts at, on the device (the scanned
    epoch) or here (`host_batches`): the same order either way.
    """

    x: np.ndarray
    y: np.ndarray
    weights: np.ndarray
    batch_size: int
    shuffle: bool
    drop_remainder: bool
    shuffle_rng: Any
    validation_split: float | None = None
    pad_to: int = 1
    masked: bool = False
    kind = "arrays"
    labels_name = "y"
    per_process = False
    resumable = True

    @property
    def num_examples(self) -> int:
        return len(self.x)

    @property
    def batches_per_epoch(self) -> int:
        return arrays.num_batches(len(self.x), self.batch_size, self.drop_remainder)

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x.shape[1:])

    @property
    def input_dtype(self) -> np.dtype:
        """The dtype the steps see the examples in (`jax.dtypes.canonicalize_dtype`: int64 tokens as int32)."""
        return jax.dtypes.canonicalize_dtype(self.x.dtype)

    @property
    def labels(self) -> np.ndarray:
        """The labels to check against the loss."""
        return self.y

    @property
    def nbytes(self) -> int:
        """The bytes of the examples, labels and weights: what a device holds of them placed whole."""
        return self.x.nbytes + self.y.nbytes + self.weights.nbytes

    def fingerprint(self) -> str:
        return arrays.data_fingerprint(self.x, self.y, self.weights)

    def use_padding(self, pad_to: int, masked: bool) -> None:
        """How host batches fill up a last batch the devices cannot split (see `trainer._split_over`)."""
        self.pad_to, self.masked = pad_to, masked

    def order(self, step: int) -> np.ndarray:
        """The order the scanned epoch draws on the device for this step, drawn here for host batches."""
        if not self.shuffle:
            return np.arange(len(self.x))
        return np.asarray(_permutation(self.shuffle_rng, step, len(self.x)))

    def host_batches(self, epoch: int, start_step: int, skip: int = 0) -> Iterator[dict]:
        del epoch  # arrays' orders follow the step count, so training on from a state sees new ones
        columns = {"x": self.x, "y": self.y, "weight": self.weights}
        return itertools.islice(arrays.ordered_batches(columns, self.order(start_step), self.batch_size,
                                                     self.drop_remainder, self.pad_to, self.masked), skip, None)

    def whole(self) -> WholeData:
        """The arrays, their order drawn on the device from `shuffle_rng` and the step."""
        return WholeData(self.x, self.y, self.weights, self.shuffle_rng, self.shuffle)


@dataclasses.dataclass
class SourceInput:
    """A source: random-access (`sources.SourceBatches`) or an iterable of batch dicts (`sources.IterableBatches`)."""

    batches: sources.SourceBatches | sources.IterableBatches
    kind = "source"
    labels_name = "the labels of the source"
    per_process = True

    validation_split = None  # a source has no split: its validation data is another source

    @property
    def shuffle(self) -> bool:
        return getattr(self.batches, "shuffle", False)

    @property
    def drop_remainder(self) -> bool:
        return getattr(self.batches, "drop_remainder", False)

    @property
    def resumable(self) -> bool:
        """Only a random-access source can be rewound to where a checkpoint stood."""
        return isinstance(self.batches, sources.SourceBatches)

    @property
    def num_examples(self) -> int | None:
        return len(self.batches.source) if self.resumable else None

    @property
    def batches_per_epoch(self) -> int | None:
        return len(self.batches) if self.resumable else self.batches.steps_per_epoch

    @property
    def input_shape(self) -> tuple:
        if self.resumable:
            return tuple(np.shape(self.batches.first_example["x"]))
        return tuple(np.shape(self.batches.first_batch()["x"])[1:])

    @property
    def input_dtype(self) -> np.dtype:
        """The dtype of the input feature as the steps see it (of the first example, or first batch)."""
        first = self.batches.first_example if self.resumable else self.batches.first_batch()
        return jax.dtypes.canonicalize_dtype(np.asarray(first["x"]).dtype)

    @property
    def labels(self) -> np.ndarray:
        """The labels of the first example (as a batch of one) or first batch, to check against the loss."""
        if self.resumable:
            return np.asarray(self.batches.first_example["y"])[None]
        return np.asarray(self.batches.first_batch()["y"])

    def fingerprint(self) -> str:
        """Three examples' inputs and labels (first, middle, last): cheap, and enough to tell datasets apart.

        The class weights, which scale each example's loss, count too.
        """
        if not self.resumable:
            return ""
        size = len(self.batches.source)
        picked = self.batches.read(np.unique([0, size // 2, size - 1]))
        identity = [picked["x"], picked["y"], np.asarray([size])]
        class_weight = self.batches.features.class_weight
        if class_weight is not None:  # left out without them: the fingerprints of earlier runs stay the same
            identity.append(np.asarray(sorted((float(c), float(w)) for c, w in class_weight.items()), np.float64))
        return arrays.data_fingerprint(*identity)

    def use_padding(self, pad_to: int, masked: bool) -> None:
        """How a last batch the devices cannot split is filled up (see `trainer._split_over`)."""
        if self.resumable:
            self.batches = dataclasses.replace(self.batches, multiple=pad_to, masked=masked)

    def host_batches(self, epoch: int, start_step: int, skip: int = 0) -> Iterator[dict]:
        del start_step  # a source's order follows the epoch
        return self.batches.epoch(epoch, skip or None)

    def order(self, epoch: int) -> np.ndarray:
        """The example numbers in the order the epoch reads them (a random-access source's)."""
        return self.batches.order(epoch)

    @property
    def nbytes(self) -> int | None:
        """The bytes of every example as the step takes them (with a weight each), None for an iterable."""
        if not self.resumable:
            return None
        weight = 0 if "weight" in self.batches.first_example else np.dtype(np.float32).itemsize
        return len(self.batches.source) * (self.batches.mapped_bytes + weight)

    def whole(self) -> WholeData | None:
        """A cached source's every example, read now (`SourceBatches.in_memory`), in the source's own orders;
        None where it streams (not cached)."""
        examples = self.batches.in_memory() if self.resumable else None
        if examples is None:
            return None
        weights = examples.get("weight", np.ones(len(examples["x"]), np.float32))
        return WholeData(examples["x"], examples["y"], weights, None, "given", self.order)


@functools.partial(compiler.jit, static_argnums=2)
def _permutation(rng: jax.Array, step, count: int) -> jax.Array:
    """`rng` folded with `step`, then a permutation of `count`: one program (eagerly, four, each read back from
    the compilation cache in a new process)."""
    return jax.random.permutation(jax.random.fold_in(rng, step), count)
