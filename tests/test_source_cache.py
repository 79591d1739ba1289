"""A source's examples kept in memory after their first read (`cache`), as tf.data's `.cache()` keeps them."""
import jax
import numpy as np
import pytest

from jaxdl import MLP, data, fit
from jaxdl.data import sources
import tolerance
from toy_data import CE, blobs


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


def test_the_transforms_output_is_what_is_cached():
    x, y = blobs(n=40)
    calls = np.zeros(40, int)

    def transform(example):
        calls[int(example["index"])] += 1
        return example["image"] * 2, example["label"]

    source = [{"image": row, "label": label, "index": i} for i, (row, label) in enumerate(zip(x, y))]
    train(source, True, epochs=1, transform=transform)
    one_epoch, calls[:] = calls.copy(), 0
    train(source, True, epochs=3, transform=transform)
    assert calls.tolist() == one_epoch.tolist()  # the later epochs from memory


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
