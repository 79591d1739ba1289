"""jaxdl.data.prepare and `jaxdl prepare`: tfds's builder writing ArrayRecord, and the error without TensorFlow.

The real preparation needs TensorFlow (tfds writes with it), which `make
test` does not install: that test is marked slow and skips without it. The
rest checks what is handed to tfds, with its builder replaced, and runs
anywhere.
"""
import importlib.util
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from jaxdl import cli
from jaxdl.data import TensorFlowMissingError, prepare, tfds_source

prepare_module = sys.modules["jaxdl.data.prepare"]  # `jaxdl.data.prepare` is the function, re-exported


def without_tensorflow(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorflow" else real(name, *a))


def test_without_tensorflow_prepare_is_one_error_saying_what_to_install(monkeypatch, tmp_path, capsys):
    without_tensorflow(monkeypatch)
    with pytest.raises(TensorFlowMissingError, match=r"needs TensorFlow: .*pip install 'jaxdl\[prepare\]'"):
        prepare("mnist", data_dir=tmp_path)
    args = cli.build_parser().parse_args(["prepare", "mnist", "--data-dir", str(tmp_path)])
    assert args.run(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("jaxdl prepare: jaxdl.data.prepare needs TensorFlow") and "jaxdl[prepare]" in error
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.fixture
def fake_builder(monkeypatch):
    """tfds.builder replaced by a recorder; TensorFlow taken as installed. Returns the calls made."""
    import tensorflow_datasets as tfds

    calls = {}

    class Builder:
        version, data_dir = "3.0.1", "/data/mnist/3.0.1"
        info = SimpleNamespace(splits={"train": SimpleNamespace(num_examples=60000),
                                       "test": SimpleNamespace(num_examples=10000)})

        def download_and_prepare(self, **kwargs):
            calls["download_and_prepare"] = kwargs

    def builder(name, **kwargs):
        calls["builder"] = (name, kwargs)
        return Builder()

    monkeypatch.setattr(prepare_module, "require_tensorflow", lambda *a: None)
    monkeypatch.setattr(tfds, "builder", builder)
    return calls


def test_prepare_asks_tfds_for_array_record_from_the_manual_dir_and_never_gcs(fake_builder, tmp_path):
    written = prepare("mnist", data_dir=tmp_path / "data", manual_dir=tmp_path)
    assert written == {"name": "mnist", "version": "3.0.1", "path": "/data/mnist/3.0.1",
                       "splits": {"test": 10000, "train": 60000}}
    assert fake_builder["builder"] == ("mnist", {"data_dir": str(tmp_path / "data"), "file_format": "array_record"})
    options = fake_builder["download_and_prepare"]
    assert options["file_format"] == "array_record"
    config = options["download_config"]
    assert (config.manual_dir, config.try_download_gcs) == (str(tmp_path), False)


def test_the_command_prints_what_it_wrote_and_names_a_missing_manual_dir(fake_builder, tmp_path, capsys):
    args = cli.build_parser().parse_args(["prepare", "mnist", "--manual-dir", str(tmp_path)])
    assert args.run(args) == 0
    assert capsys.readouterr().out == ("prepared mnist 3.0.1 as ArrayRecord in /data/mnist/3.0.1: "
                                       "test 10,000, train 60,000 examples\n")
    assert fake_builder["builder"] == ("mnist", {"data_dir": None, "file_format": "array_record"})
    args = cli.build_parser().parse_args(["prepare", "mnist", "--manual-dir", str(tmp_path / "absent")])
    assert args.run(args) == 1
    assert f"manual_dir {tmp_path / 'absent'}: no such directory" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.requires_mnist
def test_prepare_writes_mnist_from_the_four_files_as_tfds_reads_it(mnist_dir, tmp_path):
    """Measured once by hand (tensorflow-cpu 2.21.0, tfds 4.9.10, 2 loaded cores): 43 s; the 70,000
    (image, label) pairs byte-identical to the IDX files'."""
    pytest.importorskip("tensorflow", reason="tfds needs TensorFlow to write a dataset: pip install "
                                             "'jaxdl[prepare]' to run this test")
    written = prepare("mnist", data_dir=tmp_path, manual_dir=mnist_dir)
    assert written["splits"] == {"test": 10000, "train": 60000}
    from jaxdl.data import load_mnist

    for split, (images, labels) in zip(("train", "test"), load_mnist(mnist_dir)):
        source = tfds_source("mnist", split, tmp_path)
        read = [source[index] for index in range(len(source))]
        assert np.bincount([example["label"] for example in read], minlength=10).tolist() == \
            np.bincount(labels, minlength=10).tolist()
        # tfds shuffles the examples: compare the (image, label) pairs as sorted lists
        assert sorted((example["image"].tobytes(), int(example["label"])) for example in read) == \
            sorted((image[..., None].tobytes(), int(label)) for image, label in zip(images, labels))
