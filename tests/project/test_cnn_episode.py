"""experiments.cnn: the Carpentries CNN episode on a small generated Dollar Street 10 set, its counts and its checks."""
import csv
import json

import numpy as np
import pytest

from experiments import cnn
from jaxdl import ConvNet, load_model


def write_dollar_street(folder, train: int = 40, test: int = 8, seed: int = 0, shape=(64, 64, 3)):
    """Four .npy files as Zenodo's: uint8 64x64x3 images whose brightness follows the class, int64 labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        labels = rng.integers(0, 10, count).astype(np.int64)
        images = (rng.integers(0, 100, (count, *shape)) + 15 * labels.reshape(-1, 1, 1, 1)).astype(np.uint8)
        np.save(folder / f"{split}_images.npy", images)
        np.save(folder / f"{split}_labels.npy", labels)
    return folder


def test_the_lessons_parameter_counts_for_64x64x3_images():
    assert cnn.param_counts() == {"cnn": 514_510, "no_pooling": 1_823_960, "three_blocks": 137_060,
                                  "dense_only": 617_510}
    assert cnn.param_counts() == cnn.LESSON_PARAMS


def test_dropout_follows_each_pooling_layer():
    assert cnn.conv_layers(3, 0.25) == (("conv", 50, 3), ("maxpool", 2), ("dropout", 0.25),
                                        ("conv", 50, 3), ("maxpool", 2), ("dropout", 0.25),
                                        ("conv", 50, 3), ("maxpool", 2), ("dropout", 0.25),
                                        ("flatten",), ("dense", 50, "relu"), ("dense", 10))
    assert cnn.conv_layers(2, 0.0) == cnn.conv_layers(2)  # rate 0: no dropout layer, the lesson's first network


def test_the_episode_runs_end_to_end_on_generated_npy_files(tmp_path, capsys):
    """1 epoch on 32 training images (40, of which 8 validate: one full batch, so one compiled step shape).

    Compiling a convolutional network costs seconds and these steps nothing, so the run compiles one: the
    sweep and the grid use rate 0, the lesson's first network, whose programs its own run compiled, and the
    dense-only network is skipped (its count is tested from shapes). Dropout layers are tested in
    `test_dropout_follows_each_pooling_layer` and `tests/training/test_uncertainty.py`."""
    data = write_dollar_street(tmp_path / "ds10")
    metrics = cnn.run(["--quiet", "--out", str(tmp_path), "--data", str(data), "--epochs", "1", "--sweep-epochs", "1",
                       "--rates", "0", "--blocks", "2", "--grid-rates", "0", "--skip-dense",
                       "--logdir", str(tmp_path / "logs")])
    assert metrics["data"] == f"Dollar Street 10 {data}" and metrics["image_shape"] == [64, 64, 3]
    assert (metrics["train_samples"], metrics["val_samples"], metrics["test_samples"]) == (32, 8, 8)
    assert metrics["cnn_params"] == 514_510 and "dense_only_params" not in metrics
    assert metrics["cnn_epochs"] == 1 and 0 <= metrics["cnn_test_accuracy"] <= 1
    assert [row["dropout_rate"] for row in metrics["dropout_sweep"]] == [0.0]
    assert metrics["best_config"] == {"conv_blocks": 2, "dropout_rate": 0.0}
    out = tmp_path / "cnn"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    with open(out / "grid_search.csv", newline="") as file:
        (row,) = list(csv.DictReader(file))
    assert (row["conv_blocks"], row["dropout_rate"], row["error"]) == ("2", "0.0", "")
    for plot in ("cnn_history.png", "dropout_sweep.png", "grid_search.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
    model, variables, metadata = load_model(out / "best_model")
    assert isinstance(model, ConvNet) and model.layers == cnn.conv_layers(2) and model.input_scale == 1 / 255
    assert metadata["config"] == {"conv_blocks": 2, "dropout_rate": 0.0}
    printed = capsys.readouterr().out
    assert f"saved to {out / 'best_model'}" in printed
    assert f"logging to TensorBoard under {tmp_path / 'logs'}" in printed
    assert (tmp_path / "logs" / "cnn.csv").is_file() and list((tmp_path / "logs" / "cnn" / "train").iterdir())


def test_bad_data_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data .*nowhere: no such folder"):
        cnn.load_dollar_street(tmp_path / "nowhere")
    folder = write_dollar_street(tmp_path / "partial", train=4, test=2, shape=(8, 8, 3))
    (folder / "test_labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"partial lacks test_labels.npy"):
        cnn.load_dollar_street(folder)
    write_dollar_street(tmp_path / "small", train=4, test=2, shape=(32, 32, 3))
    with pytest.raises(ValueError, match=r"train_images.npy holds images of shape \(4, 32, 32, 3\); Dollar Street "
                                         r"10's are \(N, 64, 64, 3\)"):
        cnn.load_dollar_street(tmp_path / "small")
    folder = write_dollar_street(tmp_path / "mismatch", train=4, test=2)
    np.save(folder / "train_labels.npy", np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"train_labels.npy has 3 labels but .*train_images.npy has 4 images"):
        cnn.load_dollar_street(folder)
    np.save(folder / "train_labels.npy", np.array([0, 1, 2, 10]))
    with pytest.raises(ValueError, match=r"train_labels.npy holds classes 0..10; Dollar Street 10 has classes 0..9"):
        cnn.load_dollar_street(folder)
    np.save(folder / "train_labels.npy", np.array(["a", "b", "c", "d"]))
    with pytest.raises(ValueError, match=r"train_labels.npy must hold integer class labels"):
        cnn.load_dollar_street(folder)


def test_without_data_the_suite_counts_parameters_and_lists_training_as_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXDL_SHARED_DATA", str(tmp_path / "no-shared-data"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "no-tfds"))
    arguments, skipped = cnn.suite_args()
    assert arguments == ["--counts-only"]
    ((metric, target, reason),) = skipped
    assert metric == "test accuracy (Dollar Street 10 or CIFAR-10)" and target == "> 0.1 (chance, 10 classes)"
    assert reason.startswith(f"skipped: no Dollar Street 10 in {tmp_path / 'no-shared-data' / 'dollar-street-10'}")
    assert "tfds cifar10 is not prepared in" in reason and str(tmp_path / "no-tfds") in reason
    metrics = cnn.run(["--quiet", "--out", str(tmp_path)] + arguments)
    assert metrics == {"data": "none (parameter counts only)", "cnn_params_64x64": 514_510,
                       "no_pooling_params_64x64": 1_823_960, "three_blocks_params_64x64": 137_060,
                       "dense_only_params_64x64": 617_510}
    assert [check.metric for check in cnn.checks(metrics) if check.holds(metrics[check.metric])] == [
        "cnn_params_64x64", "no_pooling_params_64x64", "three_blocks_params_64x64", "dense_only_params_64x64"]
    assert cnn.checks({"data": "Dollar Street 10 x"})[-1].metric == "cnn_test_accuracy"
