"""Transfer learning on the tutorial's cat photos: frozen backbone, cached vs end to end, unfreezing, saving."""
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from experiments.common import shared_data_dir
from jaxdl.data import images as image_io
from jaxdl.models import ClassifierHead
from jaxdl.pretrained import finetune
from jaxdl.pretrained.classifier import ImageClassifier
from jaxdl.training.trainer import predict
from tests.support import tolerance

CATS = shared_data_dir() / "cats"
pytestmark = pytest.mark.requires_cats


@pytest.fixture(scope="session")
def pretrained_model(jaxdl_cache):
    from jaxdl.pretrained import weights as pretrained

    return pretrained.torchvision_imagenet()


@pytest.fixture(scope="session")
def cats(pretrained_model):
    """Six female and six male photos, preprocessed for the torchvision weights at 64x64, not 224x224.

    What these tests check (frozen variables, equal paths, saved classes) does not depend on the size,
    and MobileNetV2 takes any size from 32 up: 12x fewer pixels through the backbone.
    """
    paths = [CATS / f"{sex}{i:02d}.jpg" for sex in "fm" for i in range(1, 7)]
    labels = np.array([0] * 6 + [1] * 6, np.int32)
    small = {**pretrained_model[2]["preprocessing"], "size": 64, "resize": 73}
    images, labels, _ = image_io.load_images(paths, labels, small)
    return images, labels


def run(cats, pretrained_model, **kwargs):
    model, variables, _ = pretrained_model
    images, labels = cats
    options = dict(num_classes=2, epochs=3, batch_size=8, seed=0, verbose=False)
    return finetune.finetune(images, labels, backbone=model, backbone_variables=variables, **{**options, **kwargs})


def leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="session")
def head_runs(cats, pretrained_model):
    """Head-only training for 4 epochs from one seed, on cached features and end to end."""
    _, variables, _ = pretrained_model
    before = jax.tree.map(np.array, variables)
    runs = {"cached": run(cats, pretrained_model, cache_features=True, epochs=4),
            "end-to-end": run(cats, pretrained_model, cache_features=False, epochs=4)}
    return before, runs


@pytest.mark.parametrize("path", ["cached", "end-to-end"])
def test_head_only_training_leaves_the_backbone_bitwise_unchanged(head_runs, pretrained_model, path):
    before, runs = head_runs
    trained = runs[path].variables
    expected_params = {k: v for k, v in before["params"].items() if k != "predictions"}
    assert leaves_equal(trained["params"]["backbone"], expected_params)
    assert leaves_equal(trained["batch_stats"]["backbone"], before["batch_stats"])
    assert leaves_equal(pretrained_model[1], before)  # the caller's variables are untouched too


def test_cached_and_end_to_end_training_reach_the_same_head(head_runs):
    cached, end_to_end = head_runs[1]["cached"], head_runs[1]["end-to-end"]
    # The same training from the same features, computed once or at every step: FEW_OPS per step, and
    # 4 epochs of Adam steps do not amplify a 1e-7 feature difference beyond it (seen: see `margins`).
    tolerance.assert_close(cached.variables["params"]["head"], end_to_end.variables["params"]["head"],
                           tolerance.FEW_OPS)
    tolerance.assert_close(cached.history["loss"], end_to_end.history["loss"], tolerance.FEW_OPS)


def test_only_the_head_is_differentiated_and_optimised(head_runs):
    result = head_runs[1]["end-to-end"]
    head_size = sum(np.size(p) for p in jax.tree.leaves(result.state.params))
    assert head_size == 1280 * 2 + 2
    moments = sum(np.size(p) for p in jax.tree.leaves(result.state.opt_state))
    assert moments == 2 * head_size + 1  # Adam's mu and nu, and its step count


def test_every_run_on_cached_features_shares_one_feature_program(cats, pretrained_model, head_runs):
    """The backbone's features come from one compiled program for every run and split of the same backbone
    (each run makes its own folded copy of it, equal but not the same object)."""
    from jaxdl.runtime.inference import predict_in_chunks

    compiled = predict_in_chunks._cache_size()  # head_runs' cached run has compiled it
    images, labels = cats
    run(cats, pretrained_model, epochs=1, validation_data=(images[::3], labels[::3]))
    assert predict_in_chunks._cache_size() == compiled


def test_partial_unfreezing_changes_exactly_the_chosen_stages(cats, pretrained_model):
    _, variables, _ = pretrained_model
    result = run(cats, pretrained_model, unfreeze=2, epochs=1)
    chosen = set(finetune.top_stage_layers(2))
    assert chosen == {"Conv_1", "Conv_1_bn", "block_16_expand", "block_16_expand_BN", "block_16_depthwise",
                      "block_16_depthwise_BN", "block_16_project", "block_16_project_BN"}
    for name, params in result.variables["params"]["backbone"].items():
        same = leaves_equal(params, variables["params"][name])
        assert same == (name not in chosen), name
    assert leaves_equal(result.variables["batch_stats"]["backbone"], variables["batch_stats"])  # BN stays frozen


def test_augmentation_is_seeded_and_changes_training(cats, pretrained_model):
    first = run(cats, pretrained_model, augment=True, epochs=1)
    again = run(cats, pretrained_model, augment=True, epochs=1)
    plain = run(cats, pretrained_model, epochs=1)
    assert leaves_equal(first.variables["params"]["head"], again.variables["params"]["head"])
    assert not leaves_equal(first.variables["params"]["head"], plain.variables["params"]["head"])


def test_a_deeper_head_trains_with_batchnorm_and_dropout(cats, pretrained_model):
    head = ClassifierHead(2, hidden=(50,), dropout_rate=0.5, input_batch_norm=True)
    result = run(cats, pretrained_model, head=head, epochs=2)
    assert "head" in result.variables["batch_stats"]
    logits = predict(result.model, cats[0], variables=result.variables)
    assert logits.shape == (12, 2) and np.isfinite(logits).all()


def test_save_then_load_in_a_new_process_keeps_predictions_and_class_names(tmp_path, cats, pretrained_model,
                                                                          head_runs):
    result = head_runs[1]["cached"]
    classifier = ImageClassifier(result.model, result.variables, pretrained_model[2]["preprocessing"],
                                 ("female", "male"))
    classifier.save(tmp_path / "cats")
    expected = ImageClassifier.load(tmp_path / "cats").probabilities(cats[0])
    tolerance.assert_close(classifier.probabilities(cats[0]), expected,  # saved and reloaded: both folded
                           tolerance.ONE_OP)
    np.save(tmp_path / "images.npy", cats[0])
    code = ("import sys, json, numpy as np; from jaxdl.pretrained.classifier import ImageClassifier; "
            "c = ImageClassifier.load(sys.argv[1]); np.save(sys.argv[3], c.probabilities(np.load(sys.argv[2]))); "
            "print(json.dumps(c.class_names))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cats"), str(tmp_path / "images.npy"),
                           str(tmp_path / "out.npy")], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["female", "male"]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


def test_finetune_command_trains_saves_and_classify_uses_the_new_classes(tmp_path, jaxdl_cache, main_here):
    """`python -m jaxdl.cli finetune` in its own process; then, in this one (`main_here`: the same command's
    code without a second start-up of JAX), the same command refused and `classify` on the model it saved."""
    data = tmp_path / "cats"
    for sex, name in (("f", "female"), ("m", "male")):
        (data / name).mkdir(parents=True)
        for i in range(1, 5):
            shutil.copy(CATS / f"{sex}{i:02d}.jpg", data / name)
    (data / "male" / "broken.jpg").write_text("not a photo")
    env = {**os.environ, "JAXDL_CACHE": str(jaxdl_cache)}
    arguments = ["finetune", str(data), "--out", str(tmp_path / "model"), "--epochs", "2", "--val-split", "0.25",
                 "--batch-size", "4"]
    done = subprocess.run([sys.executable, "-m", "jaxdl.cli", *arguments], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "broken.jpg: not an image" in done.stderr
    lines = done.stdout.splitlines()
    assert lines[1].startswith("epoch 1/2: loss ") and "val_accuracy" in lines[1]
    model = tmp_path / "model"
    assert lines[-3:] == [f"history: {model / 'history.json'}",
                          f"figures: {model / 'history.png'}, {model / 'confusion_matrix.png'}", f"saved to {model}"]
    history = json.loads((tmp_path / "model" / "history.json").read_text())
    assert list(history) == ["loss", "accuracy", "val_loss", "val_accuracy"] and len(history["loss"]) == 2
    code, _, err = main_here(*arguments)
    assert code == 1 and "already exists" in err
    code, out, _ = main_here("classify", "--json", "--weights", tmp_path / "model", CATS / "f10.jpg")
    assert code == 0
    top = json.loads(out)["top"]
    assert {entry["label"] for entry in top} == {"female", "male"}


def test_bad_options_are_clear_errors(cats, pretrained_model):
    with pytest.raises(ValueError, match="unfreeze must be between 0 and 18"):
        run(cats, pretrained_model, unfreeze=19)
    with pytest.raises(TypeError, match="must take \\(features, train: bool\\)"):
        run(cats, pretrained_model, head=nn.Dense(2))
    with pytest.raises(ValueError, match="leaves class 0 with no validation images"):
        finetune.stratified_split(np.array([0, 1, 1, 1]), 0.25)
    with pytest.raises(ValueError, match="cannot be augmented"):
        run(cats, pretrained_model, cache_features=True, augment=True)
