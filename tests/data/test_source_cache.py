"""A source's examples kept in memory after their first read (`cache`), as tf.data's `.cache()` keeps them."""
import grain
import jax
import numpy as np
import pytest

from jaxdl import MLP, data, fit
from jaxdl.data import sources
from tests.support import tolerance
from tests.support.toy_data import CE, blobs


class CountingSource:
    """A random-access source that counts how often each example is read (one by one or in `__getitems__`)."""

    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, np.zeros(len(x), int)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        self.reads[index] += 1
        return {"image": self.x[index], "label": self.y[index]}


MODEL = MLP(features=(8,), num_outputs=3, dropout_rate=0.3)


def train(source, cache, epochs=3, **options):
    return fit(MODEL, source, loss=CE, epochs=epochs, batch_size=16, seed=2, cache=cache, verbose=0, **options)


def test_a_cached_source_is_read_once_and_trains_as_one_read_every_epoch():
    """A cached source is read whole before the first step, then its epochs run scanned, as arrays' do.

    Its orders and dropout keys are the streamed source's: the parameters agree to the last bits that a
    scanned and a streamed program may round apart. Seen failing with the cache storing a batch's rows at
    the batch's own positions (`array[:k] = value`) instead of at their example numbers, and with the
    scanned epochs reading the examples in order: parameters 0.0084 apart.
    """
    x, y = blobs(n=70)

    def reads(cache, epochs):
        source, validation = CountingSource(x, y), CountingSource(*blobs(n=20, seed=1))
        result = train(source, cache, epochs, validation_data=validation)
        return result, source.reads, validation.reads

    cached, *cached_reads = reads("auto", 3)
    _, *one_cached_epoch_reads = reads("auto", 1)
    uncached, *uncached_reads = reads(False, 3)
    _, *one_epoch_reads = reads(False, 1)
    # fit's checks read a few examples directly; past that, the epochs after the first read nothing when cached.
    for three, one in zip(cached_reads, one_cached_epoch_reads):
        assert three.tolist() == one.tolist()
    assert (cached_reads[0] == 1).sum() == 69  # read whole once: example 0 also by fit's checks
    for three, one in zip(uncached_reads, one_epoch_reads):  # every example again each epoch (padding: more)
        assert (three - one).min() == 2
    # Different programs (one scan, steps one by one) of the same operations: XLA may round them apart.
    tolerance.assert_close(cached[0].params, uncached[0].params, tolerance.FEW_OPS)
    tolerance.assert_close(np.asarray(cached[1]["loss"]), np.asarray(uncached[1]["loss"]), tolerance.FEW_OPS)


def test_a_cached_source_read_in_order_trains_bitwise_as_its_arrays():
    """Both run one compiled scan per epoch over the same arrays in the same order: the same bits."""
    x, y = blobs(n=70)
    from_source = train(CountingSource(x, y), True, shuffle=False)
    from_arrays = fit(MODEL, x, y, loss=CE, epochs=3, batch_size=16, seed=2, shuffle=False, verbose=0)
    jax.tree.map(np.testing.assert_array_equal, from_source[0].params, from_arrays[0].params)
    assert from_source[1]["loss"] == from_arrays[1]["loss"]


class Scaled(grain.transforms.Map):
    """A transform declared deterministic (grain's MapTransform): its output may be cached."""

    def __init__(self, calls):
        self.calls = calls

    def map(self, example):
        self.calls[int(example["index"])] += 1
        return example["image"] * 2, example["label"]


class Jittered(grain.transforms.RandomMap):
    """A random transform given its generator (grain's RandomMapTransform): noise on the input."""

    def random_map(self, example, rng):
        return example["image"] + rng.normal(size=example["image"].shape).astype(np.float32), example["label"]


def indexed_examples(n):
    x, y = blobs(n=n)
    return [{"image": row, "label": label, "index": i} for i, (row, label) in enumerate(zip(x, y))]


def test_a_transform_declared_deterministic_is_what_is_cached():
    """A `grain.transforms.Map` is a function of the example alone: its output is kept, later epochs reuse it."""
    calls = np.zeros(40, int)
    source = indexed_examples(40)
    train(source, True, epochs=1, transform=Scaled(calls))
    one_epoch, calls[:] = calls.copy(), 0
    train(source, True, epochs=3, transform=Scaled(calls))
    assert calls.tolist() == one_epoch.tolist()  # the later epochs from memory


def test_a_plain_transform_runs_every_epoch_under_the_default_cache_which_keeps_the_decoded_examples():
    """A plain function may draw random numbers (augmentation): by default the cache keeps what the source
    decodes, beneath the transform, and the transform runs on every read, so every epoch sees new draws.

    Seen failing before the fix: the transform ran once per example in all (66 calls for 3 epochs of 64, with
    fit's 2 checks), and epoch 2's batches were epoch 1's.
    """
    x, y = blobs(n=64)
    source, calls, noise = CountingSource(x, y), np.zeros(64, int), np.random.default_rng(5)

    def augment(example):
        calls[int(np.flatnonzero((x == example["image"]).all(axis=1))[0])] += 1
        return example["image"] + noise.normal(size=3).astype(np.float32), example["label"]

    train(source, "auto", epochs=3, transform=augment)
    assert calls.min() >= 3  # every example transformed in each of the 3 epochs
    one_epoch = CountingSource(x, y)
    train(one_epoch, "auto", epochs=1, transform=augment)
    assert source.reads.tolist() == one_epoch.reads.tolist()  # the source itself read in the first epoch only
    batches = data.SourceBatches(CountingSource(x, y), 16, data.Features(transform=augment), shuffle=False,
                                 cache="auto")
    first, second = (np.concatenate([batch["x"] for batch in batches.epoch(epoch)]) for epoch in (0, 1))
    assert batches.example_cache is not None  # the decoded examples are cached ...
    assert not np.isclose(first, second).any()  # ... and the augmented inputs differ in every number


def test_a_random_transform_gets_a_generator_of_the_seed_epoch_and_example_new_each_epoch():
    """`grain.transforms.RandomMap`: reproducible (the same run twice, and cached or not, trains to the same
    bits), different every epoch, never cached after the transform."""
    source = indexed_examples(48)
    batches = data.SourceBatches(source, 16, data.Features(transform=Jittered()), seed=3, shuffle=False, cache=True)
    first, again, second = (np.concatenate([batch["x"] for batch in batches.epoch(epoch)]) for epoch in (0, 0, 1))
    np.testing.assert_array_equal(first, again)  # a pure function of (seed, epoch, example number)
    assert not np.isclose(first, second).any()
    cached, uncached = train(source, "auto", transform=Jittered()), train(source, False, transform=Jittered())
    jax.tree.map(np.testing.assert_array_equal, cached[0].params, uncached[0].params)
    assert cached[1]["loss"] == uncached[1]["loss"]


def test_auto_caches_only_what_fits_a_quarter_of_the_available_memory_and_bounds_are_checked(monkeypatch):
    """"auto" never fails: too big, and the source is read every epoch; an explicit bound or True that the
    examples exceed, or the memory available does not hold, is an error naming the sizes."""
    x, y = blobs(n=64)  # 3 float32 features and an int64 label: 20 bytes per example, 1280 in all
    per_example = x[0].nbytes + np.asarray(y[0]).nbytes
    assert sources.use_cache("auto", 64, per_example, available=4 * 64 * per_example)
    assert not sources.use_cache("auto", 64, per_example, available=4 * 64 * per_example - 1)
    assert not sources.use_cache("auto", 64, per_example, available=None)  # unknown memory: not cached
    assert sources.use_cache(64 * per_example, 64, per_example, available=None)
    with pytest.raises(ValueError, match=rf"cache=1000 bytes .*, but the source's 64 examples take .* in memory "
                                         rf"as the step takes them \({per_example} bytes each\); raise the bound"):
        sources.use_cache(1000, 64, per_example, available=None)
    with pytest.raises(ValueError, match="more than the 0.00 GiB of memory available now; pass cache=False"):
        sources.use_cache(True, 64, per_example, available=1000)
    with pytest.raises(ValueError, match="cache must be 'auto', True, False or a positive number of bytes"):
        sources.use_cache("yes", 64, per_example, available=None)

    source, uncached = CountingSource(x, y), CountingSource(x, y)
    monkeypatch.setattr(sources, "available_memory", lambda: 100)
    train(source, "auto", epochs=2)
    train(uncached, False, epochs=2)
    assert source.reads.tolist() == uncached.reads.tolist()  # did not fit: read every epoch
    with pytest.raises(ValueError, match="cache=1000 bytes"):
        train(source, 1000)
    with pytest.raises(ValueError, match="cache=True keeps a random-access source's examples in memory; this "
                                         "list_iterator is an iterable of batch dicts"):
        fit(MODEL, iter([{"x": x, "y": y}]), loss=CE, cache=True, verbose=0)


def test_examples_that_change_dtype_are_named():
    x, y = blobs(n=20)
    examples = [{"image": row, "label": label} for row, label in zip(x, y)]
    examples[13]["image"] = examples[13]["image"].astype(np.float64)
    batches = data.SourceBatches(examples, 20, data.Features(), shuffle=False, cache=True)
    with pytest.raises(ValueError, match=r"'x' was float32 \(3,\) in the first example and is float64"):
        next(iter(batches.epoch(0)))
