"""Sources stream into fit, evaluate and predict: orders, saved positions, parity with arrays, clear errors."""
import jax
import numpy as np
import optax
import pytest

from jaxdl import MLP, ConvNet, data, evaluate, fit, predict, tfds_source
from jaxdl.data.sources import DatasetNotPreparedError
from tests.support import tolerance
from tests.support.toy_data import CE, blobs


def examples(x, y, names=("image", "label")):
    """A random-access source of example dicts, as a list (the simplest `__len__` + `__getitem__`)."""
    return [{names[0]: row, names[1]: label} for row, label in zip(x, y)]


def labels_of(batches) -> list[list[int]]:
    return [batch["y"].tolist() for batch in batches]


def test_every_example_once_per_epoch_in_a_seeded_order_that_changes_each_epoch():
    n = 37
    source = examples(np.arange(n, dtype=np.float32)[:, None], np.arange(n))
    batches = data.SourceBatches(source, 8, data.Features(), seed=3)
    epochs = [sum(labels_of(batches.epoch(epoch)), []) for epoch in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(n))  # every example exactly once, the last batch of 5 kept
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(n))
    again = data.SourceBatches(source, 8, data.Features(), seed=3)
    assert [sum(labels_of(again.epoch(epoch)), []) for epoch in range(3)] == epochs  # same on every run
    assert sum(labels_of(data.SourceBatches(source, 8, data.Features(), seed=4).epoch(0)), []) != epochs[0]
    assert [len(b) for b in labels_of(batches.epoch(0))] == [8, 8, 8, 8, 5]
    assert sum(labels_of(data.SourceBatches(source, 8, data.Features(), shuffle=False).epoch(1)), []) == \
        list(range(n))


def test_a_position_saved_mid_epoch_restores_exactly_the_remaining_batches():
    source = examples(np.arange(50, dtype=np.float32)[:, None], np.arange(50))
    batches = data.SourceBatches(source, 6, data.Features(), seed=1)
    iterator = batches.epoch(2)
    seen = [next(iterator)["y"].tolist() for _ in range(3)]
    position = iterator.get_state()
    rest = labels_of(iterator)
    restored = data.SourceBatches(source, 6, data.Features(), seed=1).epoch(2, position)
    assert labels_of(restored) == rest
    assert sorted(sum(seen + rest, [])) == list(range(50))


def assert_same_training(a, b, what):
    (state_a, history_a), (state_b, history_b) = a, b
    # the same steps on the same batches; the array path pads its last batch and masks the padding out
    tolerance.assert_close(state_a.params, state_b.params, tolerance.FEW_OPS, what)
    tolerance.assert_close(history_a, history_b, tolerance.FEW_OPS, what)


@pytest.mark.parametrize("model", [
    MLP(features=(8,), num_outputs=3, dropout_rate=0.3),
    ConvNet(layers=(("conv", 4, 3), ("batchnorm",), ("flatten",), ("dense", 3)))], ids=["mlp-dropout", "cnn-bn"])
def test_fit_on_a_source_trains_as_fit_on_the_same_arrays(model):
    x, y = blobs(n=44, features=16)
    if isinstance(model, ConvNet):
        x = x.reshape(-1, 4, 4, 1)
    options = dict(loss=CE, epochs=2, batch_size=16, shuffle=False, verbose=0, seed=5)
    on_arrays = fit(model, x, y, **options)
    assert_same_training(fit(model, examples(x, y), **options), on_arrays, "random-access source")
    assert_same_training(fit(model, examples(x, y), steps_per_execution=2, **options), on_arrays,
                         "two steps per dispatch")
    groups = [{"x": x[i:i + 16], "y": y[i:i + 16]} for i in range(0, 44, 16)] * 2
    assert_same_training(fit(model, iter(groups), steps_per_epoch=3, **options), on_arrays, "iterable of batches")


def test_evaluate_and_predict_read_sources_as_they_read_arrays():
    x, y = blobs(n=30)
    state, _ = fit(MLP(features=(8,), num_outputs=3), x, y, loss=CE, epochs=2, verbose=0)
    tolerance.assert_close(evaluate(state, examples(x, y), loss=CE, batch_size=8),
                           evaluate(state, x, y, loss=CE, batch_size=8), tolerance.FEW_OPS)
    tolerance.assert_close(predict(state, examples(x, y), batch_size=8), predict(state, x), tolerance.ONE_OP)
    only_inputs = [{"pixels": row} for row in x]  # predict reads the input feature alone
    tolerance.assert_close(predict(state, only_inputs, features=("pixels", None)), predict(state, x),
                           tolerance.ONE_OP)


def test_a_transform_reads_examples_of_any_layout():
    x, y = blobs(n=20)
    source = [(row, label) for row, label in zip(x, y)]  # tuples, not dicts

    class Indexed:  # any __len__ + __getitem__ is a random-access source
        def __len__(self):
            return len(source)

        def __getitem__(self, index):
            return source[index]

    options = dict(loss=CE, epochs=1, batch_size=8, shuffle=False, verbose=0)
    _, history = fit(MLP(features=(4,), num_outputs=3), Indexed(), transform=lambda pair: pair, **options)
    _, expected = fit(MLP(features=(4,), num_outputs=3), x, y, **options)
    tolerance.assert_close(history, expected, tolerance.FEW_OPS)
    with pytest.raises(ValueError, match="an example is a tuple, not a dict of features; pass transform="):
        fit(MLP(features=(4,), num_outputs=3), Indexed(), **options)
    import grain  # a grain MapDataset, with a map of its own, is a random-access source too

    doubled = grain.MapDataset.source(examples(x, y)).map(lambda example: {**example, "image": example["image"] * 2})
    _, expected_doubled = fit(MLP(features=(4,), num_outputs=3), x * 2, y, **options)
    tolerance.assert_close(fit(MLP(features=(4,), num_outputs=3), doubled, **options)[1], expected_doubled,
                           tolerance.FEW_OPS)


@pytest.mark.parametrize("source, match", [
    (lambda x, y: examples(x, y, ("pixels", "label")),
     r"the examples have no feature 'image' \(features=\('image', 'label'\)\); they have \['label', 'pixels'\]"),
    (lambda x, y: examples(x[:, :2], y), r"feature 'image' has shape \(2,\) per example, but the model takes \(3,\)"),
    (lambda x, y: examples(x, y.astype(str)), r"feature 'label' holds <U\d+ values; labels must be numbers"),
    # Seen read as an example without a label (fit then failed with KeyError: 'y') until Features checked it;
    # found by tests/project/test_fuzz_loaders.py's thorough run.
    (lambda x, y: [{"image": row, "label": None} for row in x], r"feature 'label' is None in an example"),
    (lambda x, y: iter([{"inputs": x, "y": y}]), r"batch 0 of the iterable is \['inputs', 'y'\]"),
    (lambda x, y: iter([{"x": x, "y": y[:5]}]), r"batch 0 of the iterable has entries of different lengths"),
], ids=["feature name", "feature shape", "label type", "label None", "batch keys", "batch lengths"])
def test_a_source_with_wrong_features_is_an_error_naming_the_feature(source, match):
    x, y = blobs(n=20)
    state, _ = fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, verbose=0)
    with pytest.raises(ValueError, match=match):
        fit(None, source(x, y), loss=CE, state=state, verbose=0)


def test_sources_refuse_what_only_arrays_have():
    x, y = blobs(n=20)
    model = MLP(features=(4,), num_outputs=3)
    with pytest.raises(ValueError, match="validation_split holds out the end of in-memory arrays"):
        fit(model, examples(x, y), loss=CE, validation_split=0.2, verbose=0)
    with pytest.raises(ValueError, match="steps_per_epoch=5, but the source holds 3 batches of 8 per epoch"):
        fit(model, examples(x, y), loss=CE, batch_size=8, steps_per_epoch=5, verbose=0)
    with pytest.raises(ValueError, match="features and transform name how to read a source's examples"):
        fit(model, x, y, loss=CE, features=("image", "label"), verbose=0)
    with pytest.raises(ValueError, match="steps_per_epoch must be a positive integer, got 0"):
        fit(model, iter([{"x": x, "y": y}]), loss=CE, steps_per_epoch=0, verbose=0)
    with pytest.raises(ValueError, match=r"features must name \(input, label\), got \('image',\)"):
        fit(model, examples(x, y), loss=CE, features=("image",), verbose=0)
    with pytest.raises(ValueError, match="steps_per_execution must be a positive integer, got 0"):
        fit(model, examples(x, y), loss=CE, steps_per_execution=0, verbose=0)
    with pytest.raises(ValueError, match="validation_data is a one-shot generator: it would run out"):
        fit(model, x, y, loss=CE, verbose=0, validation_data=({"x": x, "y": y} for _ in range(3)))


def test_a_generator_that_runs_out_stops_fit_with_a_warning_and_keeps_the_epochs_done():
    x, y = blobs(n=20)
    one_pass = ({"x": x[i:i + 10], "y": y[i:i + 10]} for i in (0, 10))
    with pytest.warns(RuntimeWarning, match="gave no batches for epoch 2 .*pass steps_per_epoch"):
        state, history = fit(MLP(features=(4,), num_outputs=3), one_pass, loss=CE, epochs=3, verbose=0)
    assert len(history["loss"]) == 1 and int(state.step) == 2


def test_class_weight_weighs_a_sources_examples_as_it_weighs_arrays():
    x, y = blobs(n=24)
    options = dict(loss=CE, epochs=1, batch_size=8, shuffle=False, verbose=0, class_weight={0: 1.0, 1: 3.0, 2: 0.5})
    tolerance.assert_close(fit(MLP(features=(4,), num_outputs=3), examples(x, y), **options)[1],
                           fit(MLP(features=(4,), num_outputs=3), x, y, **options)[1], tolerance.FEW_OPS)


def test_the_nan_guard_holds_on_the_source_path():
    x, y = blobs(n=32)
    with pytest.warns(RuntimeWarning, match="became NaN or infinite"):
        state, history = fit(MLP(features=(8,), num_outputs=3), examples(x * 1e3, y), loss=CE,
                             optimizer=optax.sgd(1e3), epochs=5, batch_size=8, verbose=0)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params))


def test_uint8_images_travel_as_uint8_and_stack_by_shape():
    batches = [{"x": np.zeros((4, 2, 2, 1), np.uint8), "y": np.zeros(4, np.int32)}] * 3 \
        + [{"x": np.zeros((1, 2, 2, 1), np.uint8), "y": np.zeros(1, np.int32)}]
    groups = list(data.prefetch.to_device(data.prefetch.stacked(batches, 2)))
    assert [group["x"].shape for group in groups] == [(2, 4, 2, 2, 1), (1, 4, 2, 2, 1), (1, 1, 2, 2, 1)]
    assert all(isinstance(group["x"], jax.Array) and group["x"].dtype == np.uint8 for group in groups)


# --- tensorflow-datasets -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    """A real on-disk tfds ArrayRecord directory in MNIST's layout (28x28x1 PNGs, 10 classes), made here."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 96)
    images = (rng.integers(0, 40, (96, 28, 28, 1)) + 20 * labels[:, None, None, None]).astype(np.uint8)
    root = tmp_path_factory.mktemp("tfds")
    data.write_image_dataset(root, "mnist", {"train": (images[:64], labels[:64]), "test": (images[64:], labels[64:])},
                             num_classes=10, version="3.0.1")
    return root, images, labels


def test_tfds_source_reads_a_real_array_record_directory_and_trains_as_arrays_do(mnist_dir):
    root, images, labels = mnist_dir
    train = tfds_source("mnist", "train", data_dir=root)
    assert len(train) == 64 and type(train).__name__ == "ArrayRecordDataSource"
    np.testing.assert_array_equal(train[5]["image"], images[5])  # PNG is lossless
    model = ConvNet(layers=(("conv", 4, 3), ("maxpool", 2), ("flatten",), ("dense", 10)))
    options = dict(loss=CE, epochs=2, batch_size=16, shuffle=False, verbose=0)
    from_source = fit(model, train, validation_data=tfds_source("mnist", "test", data_dir=root), **options)
    # uint8 pixels reach the model as they are on both paths; the conv casts them to float32
    from_arrays = fit(model, images[:64], labels[:64], validation_data=(images[64:], labels[64:]), **options)
    assert_same_training(from_source, from_arrays, "tfds ArrayRecord source")


def test_an_unprepared_tfds_dataset_is_one_error_naming_it_and_how_to_prepare_it(tmp_path):
    with pytest.raises(DatasetNotPreparedError) as error:
        tfds_source("mnist", "train", data_dir=tmp_path)
    message = str(error.value)
    for part in ("tfds dataset 'mnist'", "not prepared", f"looked in {tmp_path}{'/'}mnist",
                 "pip install 'jaxdl[prepare]'", f"jaxdl prepare mnist --data-dir {tmp_path}", "--manual-dir",
                 "downloads nothing"):
        assert part in message, part
    with pytest.raises(ValueError, match="tensorflow-datasets has no dataset named 'no_such_dataset'"):
        tfds_source("no_such_dataset", "train", data_dir=tmp_path)


def test_tfds_mock_data_streams_into_fit():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=24):
        source = tfds_source("mnist", "train")
        state, history = fit(MLP(features=(8,), num_outputs=10), source, loss=CE, batch_size=8, epochs=1,
                             verbose=0)
    assert len(source) == 24 and state.input_shape == (28, 28, 1) and int(state.step) == 3
    assert np.isfinite(history["loss"][0])
    assert predict(state, source, batch_size=8).shape == (24, 10)
