"""The experiment scripts end to end: metrics files, plots, the suite's table."""
import importlib
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from experiments import penguins, suite
from jaxdl.data import images
from tests.support import tolerance


@pytest.fixture(scope="session")
def run_experiment(tmp_path_factory, jaxdl_cache):
    """`run_experiment(name) -> (metrics, its folder)`, each experiment run once per test process.

    One experiment per test, rather than the whole suite in one fixture: a
    failure names its experiment, and the tests that inspect a run reuse it.
    """
    root, done = tmp_path_factory.mktemp("runs"), {}

    def run(name: str):
        if name not in done:
            module = importlib.import_module(f"experiments.{name}")
            arguments = ["--mock"] if name == "mnist" else []  # offline: tfds's mock MNIST, end to end
            done[name] = module.run(["--quiet", "--out", str(root), *arguments]), root / name
        return done[name]

    return run


def checks_of(name: str, metrics: dict) -> tuple:
    module = importlib.import_module(f"experiments.{name}")
    return module.checks(metrics) if hasattr(module, "checks") else module.CHECKS


# The bands this test holds each experiment to, written here and not read from experiments/*.py: loosening an
# experiment's own check (what `make demo` prints) must not loosen its test. Exact values are the tutorials'
# published numbers; trained metrics are bands with the seed-0 value on our machines and their margin.
CAT_LABELS = ("tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat")  # ImageNet classes 281-285
BANDS = {
    "neuron": {"neuron_output": lambda v: v == 1.25,  # the exercise's answer: w=0.5, b=0.25, x=2 (exact)
               "xor": lambda v: v == [0.0, 1.0, 1.0, 0.0]},
    "basics": {"params": lambda v: v == 34,  # the tutorial's model.summary()
               # seed 0: 0.9992 and 0.993 (a separable toy problem); the tutorial's own run ends at 1.0
               "accuracy": lambda v: v >= 0.95, "val_accuracy": lambda v: v >= 0.95},
    "penguins": {"params": lambda v: v == 83,  # 4 inputs -> 10 -> 3: 50 + 33
                 # seeds 0-4 (tests/project/test_seed_bands.py): 67, 68, 68, 67, 69 of 69 test penguins; band 66..69
                 "test_accuracy": lambda v: v >= 66 / 69},
    "digits": {  # scikit-learn's 8x8 digits, 360 test images; seed 0: 0.9611 and 0.9778
               "mlp_test_accuracy": lambda v: v >= 0.90, "cnn_test_accuracy": lambda v: v >= 0.94},
    "mnist": {"mlp_params": lambda v: v == 101_770,  # the TensorFlow beginner MLP (784*128+128 + 128*10+10)
              "cnn_params": lambda v: v == 34_826},  # keras.io's MNIST convnet summary
    "classify": {  # torchvision's ImageNet weights on scikit-image's photos; coffee: 0.9921 here
                 "chelsea_top3": lambda v: any(label.split(",")[0] in CAT_LABELS for label in v),
                 "coffee_top1": lambda v: v == "espresso", "coffee_probability": lambda v: v > 0.9},
    "transfer": {  # the tutorial: training accuracy 1.0, validation well below it (it overfits 40 photos).
                 # Seeds 0-4 (tests/project/test_seed_bands.py): training 30, 29, 30, 30, 30 of 30 (band 28..30), all 40
                 # photos 40, 39, 39, 40, 38 (band 37..40), validation 6, 5, 6, 7, 5 of 10 (band 4..8).
                 "train_accuracy": lambda v: v >= 28 / 30, "train_accuracy_all": lambda v: v >= 37 / 40,
                 "val_accuracy": lambda v: v <= 0.8,
                 "imagenet_cat_count": lambda v: v >= 20},
}


@pytest.mark.parametrize("name, keys, plots", [
    ("neuron", {"neuron_output", "xor"}, []),
    ("basics", {"params", "accuracy", "val_accuracy", "predictions"}, ["history.png"]),
    ("penguins", {"params", "test_accuracy", "confusion_matrix"}, ["history.png", "confusion_matrix.png"]),
    ("digits", {"mlp_test_accuracy", "cnn_test_accuracy"}, ["mlp_history.png", "cnn_history.png"]),
    ("mnist", {"mlp_params", "cnn_params", "mlp_test_accuracy", "cnn_test_accuracy", "cnn_confusion_matrix"},
     ["mlp_history.png", "cnn_history.png", "mlp_confusion_matrix.png", "cnn_confusion_matrix.png"]),
    ("classify", {"chelsea_top5", "chelsea_top3", "coffee_top1", "coffee_probability"}, ["predictions.png"]),
    pytest.param("transfer", {"train_accuracy_all", "train_accuracy", "val_accuracy", "imagenet_top1"},
                 ["history.png"], marks=pytest.mark.requires_cats),
])
def test_each_experiment_meets_its_references_and_writes_metrics_and_plots(run_experiment, name, keys, plots):
    """What `make demo` checks, experiment by experiment, and this test's own bands for the same metrics.

    Seen failing with penguins trained for 2 epochs and its check in experiments/penguins.py loosened to
    `>= 0.0`: the experiment's own check passed, the band here did not (test_accuracy 0.797).
    """
    metrics, folder = run_experiment(name)
    missed = [check.metric for check in checks_of(name, metrics) if not check.holds(metrics.get(check.metric))]
    assert missed == []
    outside = {metric: metrics.get(metric) for metric, holds in BANDS[name].items() if not holds(metrics.get(metric))}
    assert outside == {}
    if name == "transfer":  # the tutorial's lessons, in the same test as its run (one process, one run)
        assert metrics["data"].endswith("shared/data/cats") and metrics["stand_in"] is False
        assert len(metrics["imagenet_top1"]) == 40 and metrics["imagenet_cat_count"] >= 30
    assert keys <= set(json.loads((folder / "metrics.json").read_text()))
    for plot in plots:
        assert (folder / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_suite_prints_the_table_and_the_machine(tmp_path, capsys):
    assert suite.main(["neuron", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "neuron      neuron_output  1.25" in out and "2 checks, 0 missed" in out
    assert out.rstrip().splitlines()[-1].startswith("measured on ") and "jax " in out


def test_the_suite_runs_mnist_on_mock_data_and_lists_the_real_run_as_skipped(tmp_path, monkeypatch):
    """Neither tfds's prepared mnist nor ../shared/data/mnist: the mock run, and a row saying why."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("JAXDL_SHARED_DATA", str(tmp_path / "no-shared-data"))
    from experiments import mnist

    arguments, skipped = mnist.suite_args()
    assert arguments == ["--mock"]
    assert skipped == [("test accuracy on real MNIST", mnist.REAL_DATA_TARGETS,
                        f"skipped: tfds mnist is not prepared in {tmp_path / 'empty' / 'mnist' / '3.0.1'}, "
                        f"{tmp_path / 'no-shared-data' / 'mnist'} does not exist, and no --data was given")]
    assert [check.metric for check in mnist.checks({"data": "mock"})] == ["mlp_params", "cnn_params"]


def test_the_suite_runs_the_short_recipe_on_tfds_mnist_first_then_on_the_shared_files(tmp_path, monkeypatch):
    from experiments import mnist

    short = ["--mlp-epochs", "5", "--cnn-epochs", "1", "--nnx-cnn-epochs", "1", "--models", "mlp", "mlp_dropout",
             "cnn", "nnx_cnn"]
    monkeypatch.setenv("JAXDL_SHARED_DATA", str(tmp_path))
    (tmp_path / "mnist").mkdir()
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "empty"))
    assert mnist.suite_args() == (["--data", str(tmp_path / "mnist")] + short, [])
    monkeypatch.setattr(mnist, "tfds_source", lambda name, split, data_dir: [{"image": None, "label": 0}])
    assert mnist.suite_args() == (short, [])  # prepared tfds mnist (here a stand-in) comes first


def test_mnist_checks_each_measured_recipe_against_its_band_and_reports_other_runs_unchecked():
    from experiments import mnist

    def metrics(epochs: dict, accuracy: float, train_samples: int = 60000) -> dict:
        return {"data": "IDX files ../shared/data/mnist", "train_samples": train_samples,
                **{f"{name}_epochs": epochs[name.split("_")[0]] for name in mnist.MODELS},
                **{f"{name}_test_accuracy": accuracy for name in mnist.MODELS}}

    for recipe in (mnist.FULL_EPOCHS, mnist.SHORT_EPOCHS):
        bands = {name: mnist.BANDS[(name, recipe[name.split("_")[0]])] for name in mnist.MODELS}
        checks = mnist.checks(metrics(recipe, 0.5))
        assert [check.metric for check in checks] == ["mlp_params", "cnn_params", "mlp_test_accuracy",
                                                      "mlp_dropout_test_accuracy", "cnn_test_accuracy"]
        for check in checks[2:]:
            low, high, _ = bands[check.metric.removesuffix("_test_accuracy")]
            assert 0.9 < low < high < 1 and check.reference.startswith(f"{low:.4f}..{high:.4f} (")
            assert (check.holds(low), check.holds(high), check.holds(low - 1e-4), check.holds(high + 1e-4)) == \
                (True, True, False, False)
    # no band was measured for 3 epochs, nor for a subset of the training images
    assert len(mnist.checks(metrics({"mlp": 3, "cnn": 3}, 0.97))) == 2
    assert len(mnist.checks(metrics(mnist.FULL_EPOCHS, 0.97, train_samples=64))) == 2


def test_mnist_trains_from_a_keras_npz_file(tmp_path):
    from experiments import mnist

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 80).astype(np.uint8)
    pixels = (rng.integers(0, 50, (80, 28, 28)) + 20 * labels[:, None, None]).astype(np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=pixels[:64], y_train=labels[:64], x_test=pixels[64:],
             y_test=labels[64:])
    metrics = mnist.run(["--quiet", "--out", str(tmp_path), "--data", str(tmp_path / "mnist.npz"),
                         "--mlp-epochs", "2", "--cnn-epochs", "1", "--batch-size", "32", "--models", "mlp", "cnn"])
    assert metrics["data"] == f"keras npz {tmp_path / 'mnist.npz'}"
    assert (metrics["train_samples"], metrics["test_samples"], metrics["mlp_epochs"]) == (64, 16, 2)
    np.savez(tmp_path / "other.npz", images=pixels)
    with pytest.raises(ValueError, match=r"other.npz is not Keras's mnist.npz: it lacks \['x_test'"):
        mnist.run(["--quiet", "--out", str(tmp_path), "--data", str(tmp_path / "other.npz")])


def test_penguins_metrics(run_experiment):
    metrics, _ = run_experiment("penguins")
    assert metrics["params"] == 83 and metrics["test_samples"] == 69
    assert metrics["test_accuracy"] >= 0.95 and metrics["reload_identical"] is True
    assert sum(map(sum, metrics["confusion_matrix"])) == 69


def test_unscaled_penguins_reproduce_the_tutorials_failure(tmp_path):
    """Bands over seeds 0-4 on raw features: accuracy 0.33 to 0.68, Chinstraps recognised 0 to 2 of 14."""
    metrics = penguins.run(["--unscaled", "--quiet", "--out", str(tmp_path)])
    chinstraps_recognised = metrics["confusion_matrix"][1][1]  # rows: true species, columns: predicted
    assert chinstraps_recognised <= 3
    assert metrics["test_accuracy"] < 0.75


def test_experiment_prints_its_metrics_as_the_last_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "experiments.neuron", "--out", str(tmp_path)],
                          capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"neuron_output": 1.25, "xor": [0.0, 1.0, 1.0, 0.0]}


def test_transfer_falls_back_to_digits_without_cat_photos(tmp_path, monkeypatch, capsys):
    from experiments import transfer

    monkeypatch.setattr(transfer, "DEFAULT_DATA", tmp_path / "no-cats")
    paths, labels, classes, source, stand_in = transfer.choose_photos(None, tmp_path)
    assert source.startswith("scikit-learn digits 0 and 1 (stand-in") and stand_in is True
    assert "no cat photos at" in capsys.readouterr().out
    assert classes == ["zero", "one"] and len(paths) == 40 and labels.tolist() == [0] * 20 + [1] * 20
    assert [p.name for p in paths[:2]] == ["f01.png", "f02.png"] and all(p.is_file() for p in paths)
    assert [c.metric for c in transfer.checks({"stand_in": True})] == ["train_accuracy_all", "train_accuracy",
                                                                        "val_accuracy"]
    with pytest.raises(FileNotFoundError, match="--data .*missing: no such folder"):
        transfer.choose_photos(str(tmp_path / "missing"), tmp_path)


@pytest.mark.requires_cats
def test_shared_data_is_found_beside_the_repository_or_where_told(tmp_path, monkeypatch):
    from experiments.common import shared_data_dir

    monkeypatch.delenv("JAXDL_SHARED_DATA", raising=False)
    assert (shared_data_dir() / "cats" / "f01.jpg").is_file()
    monkeypatch.setenv("JAXDL_SHARED_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path


def test_transfer_keeps_labels_and_the_split_with_their_photos_when_one_is_unreadable(tmp_path, capsys):
    from experiments import transfer

    for gray, name in enumerate(("f01", "f02", "f16", "m01", "m02", "m16")):
        Image.new("L", (48, 40), 40 * gray).save(tmp_path / f"{name}.png")
    (tmp_path / "f03.jpg").write_text("not a photo")
    paths, labels, _ = transfer.cat_photos(tmp_path)
    photos, labels, paths, train = transfer.load_photos(paths, labels, images.KERAS)
    assert [p.stem for p in paths] == ["f01", "f02", "f16", "m01", "m02", "m16"]
    assert len(photos) == len(labels) == len(train) == 6
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.tolist() == [True, True, False, True, True, False]
    tolerance.assert_close(photos[:, 0, 0, 0], np.arange(6) * 40 / 127.5 - 1.0, tolerance.ONE_OP)  # in order
    assert "f03.jpg: not an image" in capsys.readouterr().err
