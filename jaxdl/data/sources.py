"""Datasets read example by example: tfds data sources, grain datasets, and iterables of batches.

`fit`, `evaluate` and `predict` take these besides in-memory arrays. Two
kinds exist, as in tfds's guide to feeding JAX:

- a **random-access source** (`tfds.data_source(...)`, a grain `MapDataset`,
  or anything with `__len__` and `__getitem__` returning an example dict):
  jaxdl reads it through a grain pipeline, shuffled per epoch, batched on the
  host, with a position that can be saved and restored mid-epoch;
- an **iterable of batch dicts** (`{"x": ..., "y": ...}`): used as it comes.

Bad sources are caught on their first example, on the host, with the
feature's name: a missing feature, a per-example shape other than the
model's, a label that is not one number.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from jaxdl.data.arrays import (
    check_batch_size,
    class_indices,
    num_batches,
    positive_int,
    process_part,
    rows_to_split,
    split_evenly,
)

# Grain's read threads, not worker processes: threads start at once, share the open source, and
# keep the iterator's position one small dict; a worker process pays a fork and a pickle of every
# batch. Two threads: more contend for the GIL and the cores the step computes on
# (docs/numerics.md#reading-sources).
READ_THREADS = 2
PREFETCH_BATCHES = 8
# cache="auto" keeps a source's examples in memory when all of them, as the step takes them, need at most
# this share of the memory available: three quarters stay for the model, its compiled steps and the rest of
# the machine's work. A chosen margin, not a measured optimum.
AUTO_CACHE_SHARE = 0.25
# Where a RandomMap transform's generators branch off the run's seed (the shuffle order takes (seed, epoch)).
TRANSFORM_STREAM = 1


class DatasetNotPreparedError(FileNotFoundError):
    """A tfds dataset is not on disk in the ArrayRecord format, and jaxdl does not download it.

    `name` is the dataset and `looked_in` the directory searched.
    """

    def __init__(self, message: str, *, name: str, looked_in: str):
        super().__init__(message)
        self.name, self.looked_in = name, looked_in


def tfds_source(name: str, split: str, data_dir: str | os.PathLike | None = None):
    """A tfds dataset's split as a random-access source for `fit`, `evaluate` and `predict`; never downloads.

    It is `tfds.data_source(name, split=split, data_dir=data_dir,
    download=False)`: examples are read one by one from ArrayRecord files,
    which needs no TensorFlow. jaxdl never falls back to other data: a
    dataset that is not prepared is one error saying how to prepare it on a
    connected machine (`jaxdl prepare`, `jaxdl.data.prepare`; docs/data.md).

    Args:
      name: the tfds dataset name, e.g. "mnist".
      split: the split, e.g. "train", "test" or a slice such as "train[:90%]".
      data_dir: the tfds data directory to read from; None (default) is
        tfds's own default (`TFDS_DATA_DIR` or `~/tensorflow_datasets`).

    Returns:
      The tfds data source: `len(source)` examples, `source[i]` a dict of
      features (e.g. "image", "label").

    Raises:
      ValueError: if tfds has no dataset named `name`.
      DatasetNotPreparedError: (a `FileNotFoundError`) if the dataset is not
        prepared in `data_dir` as ArrayRecord files; it names the dataset, the
        directory looked in (`looked_in`) and how to prepare it.
      ImportError: if tensorflow-datasets is not installed.
    """
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(f"tensorflow-datasets has no dataset named {name!r} (see "
                         "https://www.tensorflow.org/datasets/catalog)") from error
    except (NotImplementedError, RuntimeError, AssertionError, FileNotFoundError, KeyError) as error:
        builder = tfds.builder(name, data_dir=data_dir)
        where = os.fspath(builder.data_dir)
        root = where[:where.rfind(os.sep + name + os.sep)] if os.sep + name + os.sep in where else where
        prepared_as = None
        if builder.is_prepared():
            prepared_as = getattr(builder.info.file_format, "value", builder.info.file_format)
        found = (f"it is prepared there as {prepared_as}, which cannot be read example by example"
                 if prepared_as else "it is not prepared there")
        raise DatasetNotPreparedError(
            f"tfds dataset {name!r} (split {split!r}): {found}. jaxdl reads ArrayRecord files and downloads "
            f"nothing. Prepare it with `jaxdl prepare {name} --data-dir {root}` (or jaxdl.data.prepare), which "
            f"downloads its files, or with `--manual-dir M` takes them from M (for mnist the four IDX .gz files, "
            f"as in ../shared/data/mnist); it needs TensorFlow, which tfds writes datasets with: "
            f"`pip install 'jaxdl[prepare]'`. Prepared elsewhere, pass data_dir=DIR or copy DIR/{name} into "
            f"{root}; looked in {where}", name=name, looked_in=where) from error


def is_random_access(value) -> bool:
    """A dataset indexed by example number (tfds data source, grain MapDataset, a Sequence of dicts)."""
    if _is_list_of_dicts(value):
        return True
    return (hasattr(value, "__len__") and hasattr(value, "__getitem__") and not hasattr(value, "__array__")
            and not isinstance(value, (dict, str, bytes, tuple, list)))


def _is_list_of_dicts(value) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def _grain_batch(source):
    """The `.batch(...)` step of a grain dataset pipeline `source`, or None when it has none (or is not grain).

    Walks the pipeline's parents (a handful of objects, nothing read): a
    batch anywhere upstream makes every item of `source` a batch.
    """
    pending, seen = [source], 0
    while pending and seen < 1000:
        node, seen = pending.pop(), seen + 1
        kind = type(node)
        if kind.__name__ == "BatchMapDataset" and kind.__module__.startswith("grain"):
            return node
        if kind.__module__.startswith("grain"):
            parents = getattr(node, "parents", ())
            pending.extend(parents if isinstance(parents, (list, tuple)) else ())
    return None


def is_source(value) -> bool:
    """Anything `fit` reads through this module rather than as in-memory arrays."""
    if isinstance(value, (np.ndarray, tuple, dict)) or hasattr(value, "__array__"):
        return False
    if isinstance(value, list):
        return _is_list_of_dicts(value)
    return is_random_access(value) or hasattr(value, "__iter__") or hasattr(value, "__next__")


@dataclasses.dataclass(frozen=True)
class Features:
    """How an example dict becomes the step's `{"x": ..., "y": ...}`.

    `names` is (input feature, label feature); the label may be None for
    prediction. `transform` replaces the lookup by names, in one of grain's
    forms (see `transform_kind`): a function `transform(example) -> (x, y)`,
    which may draw random numbers (augmentation) and so is run on every
    read; a `grain.transforms.Map` (`map(example) -> (x, y)`), declared a
    function of the example alone, whose output may be cached; or a
    `grain.transforms.RandomMap` (`random_map(example, rng) -> (x, y)`),
    given a `numpy.random.Generator` of (seed, epoch, example number).
    `input_shape` (no batch axis), when known, is checked on every example.
    `class_weight` ({class: weight}) adds the example's "weight", its class
    read as Keras reads it (`arrays.class_indices`: a (1,) binary label is
    rounded, a one-hot row argmaxed).
    """

    names: tuple[str, str | None] = ("image", "label")
    transform: Callable | None = None
    input_shape: tuple | None = None
    class_weight: dict | None = None

    @functools.cached_property
    def transform_kind(self) -> str | None:
        """None (no transform), "deterministic" (a grain `Map`), "random" (a grain `RandomMap`) or "function".

        Only a transform declared deterministic may be cached after: a plain
        function may augment (draw random numbers), and caching its output
        would give every later epoch the first epoch's draws.
        """
        if self.transform is None:
            return None
        import grain  # a transform is only read with grain's pipeline, which imports it anyway

        if isinstance(self.transform, grain.transforms.Map):
            return "deterministic"
        if isinstance(self.transform, grain.transforms.RandomMap):
            return "random"
        if not callable(self.transform):
            raise ValueError(f"transform must be a function example -> (x, y), a grain.transforms.Map or a "
                             f"grain.transforms.RandomMap; got {self.transform!r}")
        return "function"

    @property
    def deterministic(self) -> bool:
        """Whether the mapped example is a function of the example alone: what may be cached after mapping."""
        return self.transform_kind in (None, "deterministic")

    def __call__(self, example, rng: np.random.Generator | None = None) -> dict:
        """The step's `{"x", "y"(, "weight")}` of one example; `rng` is a `RandomMap` transform's generator."""
        kind = self.transform_kind
        if kind is not None:
            if kind == "random":
                if rng is None:
                    raise ValueError("a grain.transforms.RandomMap transform needs a generator: read the source "
                                     "through SourceBatches, which draws one per (seed, epoch, example)")
                result = self.transform.random_map(example, rng)
            else:
                result = self.transform.map(example) if kind == "deterministic" else self.transform(example)
            try:
                x, y = result
            except (TypeError, ValueError) as error:
                raise ValueError(f"the transform returned a {type(result).__name__}; it must return a pair "
                                 "(x, y) of one example's input and label") from error
            input_name, label_name = "the transform's x", "the transform's y"
        else:
            if not isinstance(example, dict):
                raise ValueError(f"an example is a {type(example).__name__}, not a dict of features; pass "
                                 "transform=lambda example: (x, y) to say how to read it")
            missing = [name for name in self.names if name is not None and name not in example]
            if missing:
                raise ValueError(f"the examples have no feature {missing[0]!r} (features={self.names}); they "
                                 f"have {sorted(example)}: name them with features=(input, label) (a list or "
                                 "other sequence is read as examples; pass batch dicts as an iterator or generator)")
            input_name, label_name = (f"feature {name!r}" for name in self.names)
            x, y = example[self.names[0]], None if self.names[1] is None else example[self.names[1]]
            if self.names[1] is not None and y is None:  # else the example would pass as one without a label
                raise ValueError(f"{label_name} is None in an example; labels must be numbers")
        x = np.asarray(x)
        if self.input_shape is not None and x.shape != tuple(self.input_shape):
            batch_of = x.shape[0] if x.ndim == len(self.input_shape) + 1 and x.shape[1:] == tuple(self.input_shape) \
                else None  # the model's example shape behind one more axis: the source holds batches
            raise ValueError(f"{input_name} has shape {x.shape} per example, but the model takes "
                             f"{tuple(self.input_shape)}"
                             + (f": a batch of {batch_of} examples? jaxdl batches a source itself and wants one "
                                "example per item (pass batches as an iterable of {'x': ..., 'y': ...} dicts "
                                "instead)" if batch_of is not None else ""))
        if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
            raise ValueError(f"{input_name} holds {x.dtype} values; the model takes numbers")
        batch = {"x": x}
        if y is not None:
            y = np.asarray(y)
            if y.dtype == object or not np.issubdtype(y.dtype, np.number):
                raise ValueError(f"{label_name} holds {y.dtype} values; labels must be numbers")
            batch["y"] = y
            if self.class_weight is not None:
                # One example's label read as `arrays.class_indices` reads a batch of them: a class number,
                # a (1,) binary label rounded (an argmax of it would be class 0 for every example), a one-hot row.
                label = int(class_indices(y[None], name=label_name)[0])
                if label not in self.class_weight:
                    raise ValueError(f"class_weight has no weight for class {label} found in {label_name}")
                batch["weight"] = np.float32(self.class_weight[label])
        return batch


def available_memory() -> int | None:
    """Bytes of memory the machine can give now without swapping (Linux's MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB"


def use_cache(cache, num_examples: int, example_bytes: int, available: int | None) -> bool:
    """Whether a source of `num_examples` mapped examples of `example_bytes` each is kept in memory.

    `cache`: False (read every epoch), "auto" (when all of them need at most
    `AUTO_CACHE_SHARE` of the memory available), True (always; an error if
    they need more than is available) or a bound in bytes (an error if they
    need more than the bound, or than is available).
    """
    if cache is False or cache is None:
        return False
    needed = num_examples * example_bytes
    if cache == "auto":
        return available is not None and needed <= AUTO_CACHE_SHARE * available
    if cache is not True and (isinstance(cache, bool) or not isinstance(cache, (int, np.integer)) or cache <= 0):
        raise ValueError(f"cache must be 'auto', True, False or a positive number of bytes, got {cache!r}")
    described = (f"the source's {num_examples} examples take {_gib(needed)} in memory as the step takes them "
                 f"({example_bytes} bytes each)")
    if cache is not True and needed > cache:
        raise ValueError(f"cache={cache} bytes ({_gib(cache)}), but {described}; raise the bound, or pass "
                         "cache=False to read and decode the source every epoch")
    if available is not None and needed > available:
        raise ValueError(f"cache={cache!r}, but {described}, more than the {_gib(available)} of memory available "
                         "now; pass cache=False to read and decode the source every epoch")
    return True


class ExampleCache:
    """A source's mapped examples kept in memory after their first read, as tf.data's `.cache()` keeps them.

    One array per feature, filled row by row as the first epoch reads its
    batches (or all at once, `SourceBatches.in_memory`); later reads take
    their rows from memory instead of reading and decoding the source again.
    The order of the rows read is the source's, so shuffling and resuming are
    unchanged. Grain's read threads fill disjoint rows (an epoch reads each
    example once).
    """

    def __init__(self, num_examples: int, first: dict):
        self.arrays = {key: np.empty((num_examples, *np.shape(value)), np.asarray(value).dtype)
                       for key, value in first.items()}
        self.filled = np.zeros(num_examples, bool)

    def read(self, rows: np.ndarray, read_rows: Callable[[np.ndarray], dict]) -> dict:
        self.fill(rows, read_rows)
        return {key: array[rows] for key, array in self.arrays.items()}

    def fill(self, rows: np.ndarray, read_rows: Callable[[np.ndarray], dict]) -> None:
        """Reads, through `read_rows`, those of `rows` not in memory yet."""
        missing = rows[~self.filled[rows]]
        if missing.size:
            batch = read_rows(missing)
            for key, array in self.arrays.items():
                value = batch[key]
                if value.dtype != array.dtype or value.shape[1:] != array.shape[1:]:
                    raise ValueError(f"the source's examples differ: {key!r} was {array.dtype} {array.shape[1:]} "
                                     f"in the first example and is {value.dtype} {value.shape[1:]} in example "
                                     f"{int(missing[0])}")
                array[missing] = value
            self.filled[missing] = True


class DecodedCache:
    """A source's examples as it returns them (decoded, before any transform), kept after their first read.

    What `cache` keeps under a transform that may draw random numbers: the
    transform then runs on every read, so each epoch sees new draws, and
    the source is still read and decoded once. `fill` stores whole example
    objects; grain's read threads fill disjoint rows.
    """

    def __init__(self, num_examples: int):
        self.examples: list = [None] * num_examples
        self.filled = np.zeros(num_examples, bool)

    def read(self, rows: np.ndarray, read_rows: Callable[[np.ndarray], list]) -> list:
        missing = rows[~self.filled[rows]]
        if missing.size:
            for row, example in zip(missing.tolist(), read_rows(missing)):
                self.examples[row] = example
            self.filled[missing] = True
        return [self.examples[row] for row in rows.tolist()]


def example_bytes(example) -> int:
    """The bytes one example takes in memory: its arrays' and byte strings' sizes (an estimate for others).

    Args:
        example: an example as a source returns it, or as mapped: a dict, tuple or list of arrays and values.

    Returns:
        The bytes, summed over its values.
    """
    if isinstance(example, dict):
        return sum(example_bytes(value) for value in example.values())
    if isinstance(example, (tuple, list)):
        return sum(example_bytes(value) for value in example)
    if isinstance(example, (bytes, str)):
        return len(example)
    try:
        return int(np.asarray(example).nbytes)
    except (TypeError, ValueError):
        return 64  # an object numpy cannot size: a pointer and a header


def transform_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator a `grain.transforms.RandomMap` transform gets for one example of one epoch.

    Philox keyed by (seed, epoch), its counter starting at the example
    number, as grain's own `random_map` sets it: a pure function of the
    three, so a resumed or repeated run draws the same numbers and each
    epoch new ones.

    Args:
        seed: the run's seed (fit's `seed`).
        epoch: the epoch the example is read in.
        index: the example's number in the source.

    Returns:
        A fresh `numpy.random.Generator`.
    """
    key = np.random.SeedSequence([seed, epoch, TRANSFORM_STREAM]).generate_state(2, np.uint64)
    return np.random.Generator(np.random.Philox(key=key, counter=np.array([0, 0, 0, index], np.uint64)))


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of one epoch: a pure function of (seed, epoch), different for every epoch."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


@dataclasses.dataclass
class SourceBatches:
    """A random-access source read as shuffled batches, one grain pipeline per epoch.

    Every example is read exactly once per epoch, in an order that depends
    only on `(seed, epoch)`: another each epoch, the same on every run.
    `position()` / `restore()` save and restore where an epoch stands, so a
    resumed run continues with exactly the batches it would have seen.

    For data-parallel training, a last batch that `multiple` devices could
    not split is filled up and masked (`arrays.rows_to_split`; `masked`
    gives every batch a mask, so that all have one structure), and a
    process `(index, count)` of several reads only its consecutive part of
    every batch: the global batch is the same for any number of processes.

    The source holds examples: a grain dataset already `.batch()`ed (its items
    batches) is refused, since batching here would stack batches of batches.

    `cache` (see `use_cache`) keeps the examples in memory once read, so
    that a fast model's later epochs do not decode the source again. What it
    keeps is what is deterministic: without a transform, or with one declared
    a function of the example (a `grain.transforms.Map`), the mapped examples
    (`ExampleCache`, as tf.data's `map(transform).cache()`); under a plain
    function or a `grain.transforms.RandomMap`, which may augment, the
    source's decoded examples (`DecodedCache`), the transform running on
    every read (tf.data's `cache().map(augment)`), so each epoch has new draws.
    """

    source: Any
    batch_size: int
    features: Features
    seed: int = 0
    shuffle: bool = True
    drop_remainder: bool = False
    multiple: int = 1
    process: tuple[int, int] = (0, 1)
    masked: bool = False
    cache: bool | int | str = False

    def __post_init__(self):
        self.batch_size = check_batch_size(self.batch_size)
        batched = _grain_batch(self.source)
        if batched is not None:
            size = getattr(batched, "_batch_size", None)
            input_name, label_name = self.features.names
            keep = (f"dataset.map(lambda batch: {{'x': batch[{input_name!r}], 'y': batch[{label_name!r}]}})"
                    if label_name is not None else f"dataset.map(lambda batch: {{'x': batch[{input_name!r}]}})")
            if self.features.transform is not None:
                keep = "dataset.map(lambda batch: {'x': ..., 'y': ...})"
            raise ValueError(
                f"the source is a grain dataset already batched (.batch({size if size is not None else '...'})): "
                f"each of its {len(self.source)} items is a batch"
                + (f" of {size} examples" if size is not None else "")
                + f", but jaxdl batches a source itself (batch_size={self.batch_size}) and reads it example by "
                f"example; drop the .batch() and pass batch_size to fit/evaluate/predict (or, to keep your own "
                f"batches, pass an iterable of batch dicts: {keep}.to_iter_dataset())")
        if len(self.source) == 0:
            raise ValueError(f"the source ({type(self.source).__name__}) has no examples")
        if self.drop_remainder and len(self.source) < self.batch_size:
            raise ValueError(f"drop_remainder with batch_size={self.batch_size} drops all {len(self.source)} "
                             "examples of the source")
        decoded = self.source[0]
        self.first_example = self._mapped(decoded, 0, 0)  # a bad source fails here, with the feature's name
        # The deterministic part is what is kept: the mapped examples, or the decoded ones beneath a transform
        # that may draw random numbers.
        kept = ExampleCache if self.features.deterministic else DecodedCache
        self.mapped_bytes = example_bytes(self.first_example)  # one example as the step takes it
        size = self.mapped_bytes if kept is ExampleCache else example_bytes(decoded)
        self.example_cache = None
        if use_cache(self.cache, len(self.source), size, available_memory()):
            self.example_cache = (ExampleCache(len(self.source), self.first_example) if kept is ExampleCache
                                  else DecodedCache(len(self.source)))

    def __len__(self) -> int:
        """Batches per epoch."""
        return num_batches(len(self.source), self.batch_size, self.drop_remainder)

    def read(self, indices: np.ndarray, epoch: int = 0) -> dict:
        """The batch of the examples at `indices` in `epoch`, mapped to `{"x", "y"}` and stacked.

        From memory once cached: the mapped rows, or the decoded examples that
        a transform which may draw random numbers then maps again (its
        `RandomMap` generator is that of the epoch and the example).
        """
        indices = np.asarray(indices)
        if isinstance(self.example_cache, ExampleCache):
            return self.example_cache.read(indices, lambda rows: self._mapped_rows(rows, self._decoded(rows), 0))
        examples = (self.example_cache.read(indices, self._decoded) if self.example_cache is not None
                    else self._decoded(indices))
        return self._mapped_rows(indices, examples, epoch)

    def _mapped(self, example, epoch: int, index: int) -> dict:
        rng = transform_rng(self.seed, epoch, index) if self.features.transform_kind == "random" else None
        return self.features(example, rng)

    def _mapped_rows(self, indices: np.ndarray, examples: list, epoch: int) -> dict:
        mapped = [self._mapped(example, epoch, index) for index, example in zip(indices.tolist(), examples)]
        return {key: np.stack([example[key] for example in mapped]) for key in mapped[0]}

    def _decoded(self, indices: np.ndarray) -> list:
        """The examples at `indices` as the source returns them (decoded).

        One `__getitems__` call where the source has one: tfds's ArrayRecord
        source then reads a batch's records together in C++, about twice the
        examples/s of reading them one by one.
        """
        rows = np.asarray(indices).tolist()
        read_many = getattr(self.source, "__getitems__", None)
        try:
            examples = read_many(rows) if read_many is not None else None
        except TypeError:  # tfds.testing.mock_data's source has a __getitems__ that cannot be called
            examples = None
        if examples is None:
            examples = [self.source[row] for row in rows]
        return list(examples)

    def read_part(self, indices: np.ndarray, epoch: int = 0) -> dict:
        """This process's part of the batch of the examples at `indices` in `epoch` (see the class)."""
        rows, mask = rows_to_split(np.asarray(indices), self.multiple, self.masked)
        part = process_part(len(rows), self.process)
        batch = self.read(rows[part], epoch)
        return batch if mask is None else {**batch, "mask": mask[part]}

    def order(self, epoch: int) -> np.ndarray:
        """The example numbers in the order the epoch reads them: a permutation drawn from `(seed, epoch)`.

        numpy's permutation rather than grain's `shuffle`, which computes each
        index by a call from Python, far slower (docs/numerics.md#reading-sources):
        a cached source's scanned epoch takes the whole order at once.
        """
        if not self.shuffle:
            return np.arange(len(self.source))
        return np.random.default_rng(epoch_seed(self.seed, epoch)).permutation(len(self.source))

    def dataset(self, epoch: int):
        """The epoch's grain `MapDataset` of batches: the epoch's `order`, batched, then read."""
        import grain  # imported when a source is read: it adds a second to `import jaxdl`

        indices = grain.MapDataset.source(self.order(epoch))
        return indices.batch(self.batch_size, drop_remainder=self.drop_remainder).map(
            functools.partial(self.read_part, epoch=epoch))

    def in_memory(self) -> dict | None:
        """Every example, mapped, as one array per feature: read now (grain's read threads) where the source
        is cached (see `use_cache`) after mapping (no transform, or one declared deterministic) and this process
        reads whole batches; None otherwise.

        The in-memory arrays let `fit` run a cached source's epochs as it runs
        arrays' (one compiled scan each), in the source's own orders.
        """
        if not isinstance(self.example_cache, ExampleCache) or self.process != (0, 1):
            return None
        import grain

        def fill(rows) -> int:  # what grain's read threads run; the rows go into the cache, not down the pipeline
            rows = np.asarray(rows)
            self.example_cache.fill(rows, lambda missing: self._mapped_rows(missing, self._decoded(missing), 0))
            return len(rows)

        options = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=PREFETCH_BATCHES)
        batches = grain.MapDataset.range(len(self.source)).batch(self.batch_size).map(fill)
        for _ in batches.to_iter_dataset(options):
            pass
        return self.example_cache.arrays

    def epoch(self, epoch: int, position: dict | int | None = None) -> Iterator[dict]:
        """The batches of one epoch, from its start or from a saved `position`.

        `position` is an iterator's `get_state()`, or the number of batches
        already consumed (what `fit`'s checkpoints record: the iterator runs
        ahead of the steps by its prefetch).
        """
        import grain

        options = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=PREFETCH_BATCHES)
        batches = self.dataset(epoch)
        if isinstance(position, (int, np.integer)):
            batches, position = batches[int(position):], None
        iterator = iter(batches.to_iter_dataset(options))
        if position is not None:
            iterator.set_state(position)
        return iterator


def check_batch(batch, *, index: int, input_shape: tuple | None, needs_labels: bool) -> dict:
    """One batch of an iterable: a dict with "x" (and "y"), consistent sizes, the model's example shape."""
    if not isinstance(batch, dict) or "x" not in batch or (needs_labels and "y" not in batch):
        present = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"batch {index} of the iterable is {present}; an iterable source yields dicts "
                         "{'x': inputs, 'y': labels} (a random-access source takes features=... instead)")
    sizes = {key: np.shape(value)[0] if np.ndim(value) else None for key, value in batch.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"batch {index} of the iterable has entries of different lengths: {sizes}")
    if input_shape is not None and tuple(np.shape(batch["x"])[1:]) != tuple(input_shape):
        raise ValueError(f"batch {index} of the iterable has x of shape {np.shape(batch['x'])}: examples of "
                         f"shape {tuple(np.shape(batch['x'])[1:])}, but the model takes {tuple(input_shape)}")
    return batch


@dataclasses.dataclass
class IterableBatches:
    """An iterable of batch dicts, read `steps_per_epoch` batches per epoch or one pass per epoch.

    A re-iterable (a list, a grain `IterDataset`) is iterated anew each epoch
    unless `steps_per_epoch` is given; with it, and for one-shot iterators
    and generators, one iterator continues across epochs, as Keras reads a
    generator. A batch that `multiple` devices could not split is filled up
    and masked (`arrays.split_evenly`). `keys` names the batches' (input,
    label) entries when they are not "x" and "y" (fit's `features`).
    """

    iterable: Iterable
    steps_per_epoch: int | None = None
    input_shape: tuple | None = None
    needs_labels: bool = True
    multiple: int = 1
    keys: tuple[str, str] = ("x", "y")

    def __post_init__(self):
        self._continuing: Iterator | None = None
        self._first: dict | None = None
        self.one_shot = iter(self.iterable) is self.iterable

    def _stream(self) -> Iterator:
        if self._continuing is None:
            self._continuing = iter(self.iterable)
        return self._continuing

    def first_batch(self) -> dict:
        """The first batch, checked; a one-shot iterator keeps it for the first epoch."""
        if self._first is None:
            if self.one_shot or self.steps_per_epoch is not None:
                first = next(self._stream(), None)
                if first is not None:
                    self._continuing = itertools.chain([first], self._continuing)
            else:
                first = next(iter(self.iterable), None)
            if first is None:
                raise ValueError(f"the iterable ({type(self.iterable).__name__}) yields no batches")
            self._first = check_batch(self._renamed(first), index=0, input_shape=self.input_shape,
                                      needs_labels=self.needs_labels)
        return self._first

    def _renamed(self, batch):
        """The batch with its (input, label) entries under the names the steps read, "x" and "y"."""
        if self.keys == ("x", "y") or not isinstance(batch, dict):
            return batch
        missing = [key for key in self.keys[:1 + self.needs_labels] if key not in batch]
        if missing:
            raise ValueError(f"a batch of the iterable has no entry {missing[0]!r} (features={self.keys}); it has "
                             f"{sorted(batch)}")
        renamed = {key: value for key, value in batch.items() if key not in self.keys}
        renamed["x"] = batch[self.keys[0]]
        if self.keys[1] in batch:
            renamed["y"] = batch[self.keys[1]]
        return renamed

    def epoch(self, epoch: int, position=None) -> Iterator[dict]:
        del epoch
        if position is not None:
            raise ValueError("an iterable of batches has no position to restore; use a random-access source")
        if self.one_shot or self.steps_per_epoch is not None:
            batches = self._stream()
            if self.steps_per_epoch is not None:
                batches = itertools.islice(batches, self.steps_per_epoch)
        else:
            batches = iter(self.iterable)
        for index, batch in enumerate(batches):
            batch = check_batch(self._renamed(batch), index=index, input_shape=self.input_shape,
                                needs_labels=self.needs_labels)
            yield split_evenly(batch, self.multiple)


def as_batches(data, *, batch_size: int, features: Sequence | None = None, transform: Callable | None = None,
               input_shape: tuple | None = None, seed: int = 0, shuffle: bool = True, drop_remainder: bool = False,
               steps_per_epoch: int | None = None, class_weight: dict | None = None,
               needs_labels: bool = True, multiple: int = 1, process: tuple[int, int] = (0, 1),
               masked: bool = False, cache: bool | int | str = False) -> SourceBatches | IterableBatches:
    """The batches `fit`, `evaluate` and `predict` read from a source, checked on its first example.

    `multiple` and `process` split a random-access source's batches for
    data-parallel training, and `cache` keeps its examples in memory (see
    `SourceBatches`).
    """
    if steps_per_epoch is not None:
        steps_per_epoch = positive_int("steps_per_epoch", steps_per_epoch)
    if is_random_access(data):
        names = tuple(features) if features is not None else ("image", "label")
        if len(names) != 2:
            raise ValueError(f"features must name (input, label), got {features!r}")
        if not needs_labels:
            names = (names[0], None)
        batches = SourceBatches(data, batch_size, Features(names, transform, input_shape, class_weight), seed,
                                shuffle, drop_remainder, multiple, process, masked, cache)
        if steps_per_epoch is not None and steps_per_epoch != len(batches):
            raise ValueError(f"steps_per_epoch={steps_per_epoch}, but the source holds {len(batches)} batches of "
                             f"{batch_size} per epoch; leave steps_per_epoch out for random-access sources")
        return batches
    if cache not in (False, None, "auto"):
        raise ValueError(f"cache={cache!r} keeps a random-access source's examples in memory; this "
                         f"{type(data).__name__} is an iterable of batch dicts, read as it comes")
    if transform is not None or class_weight is not None:
        raise ValueError(f"transform and class_weight apply to random-access sources; this "
                         f"{type(data).__name__} is an iterable of batch dicts, which are used as they come "
                         "(features=(input, label) names their entries)")
    keys = ("x", "y")
    if features is not None:
        keys = tuple(features)
        if len(keys) != 2:
            raise ValueError(f"features must name (input, label), got {features!r}")
    # An iterable yields this process's part of each batch, which its own devices split.
    return IterableBatches(data, steps_per_epoch, input_shape, needs_labels, multiple // process[1], keys)
