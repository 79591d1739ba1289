"""Golden outputs of the real ImageNet weights, and `jaxdl classify` end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from experiments import classify as classify_experiment
from jaxdl.data import images
from jaxdl.pretrained.imagenet_classes import CAT_CLASSES, decode_predictions
from jaxdl.runtime.inference import predict_in_chunks
from tests.support import tolerance

# Golden outputs of torchvision's ImageNet MobileNetV2 on scikit-image's sample photos, through
# jaxdl's preprocessing: one reviewable .npz per photo under tests/support/golden/ (pytest-regressions), a change
# detector. Regenerate after an intended change with:
#   .venv/bin/python -m pytest tests/pretrained/test_classifier.py -k golden --force-regen
# What makes them right is tests/support/golden/torch_reference.npz: torch's logits for the same photos through
# torchvision's transforms and forward pass written out independently (tests/support/make_torch_golden.py), which
# every run compares with, and which --force-regen does not touch.
GOLDEN = Path(__file__).parents[1] / "support" / "golden"
PHOTOS = ("chelsea", "coffee")
DEPTH = 53  # MobileNetV2's layers in sequence, for the tolerance policy


@pytest.fixture(scope="module")
def photo_logits(imagenet_classifier):
    """Logits of each sample photo from the classifier's fast inference form (folded BatchNorm)."""
    model, variables = imagenet_classifier.inference_form()
    photos = classify_experiment.sample_photos()
    batch = np.stack([images.preprocess(p, imagenet_classifier.preprocessing) for p in photos.values()])
    return dict(zip(photos, np.asarray(predict_in_chunks(model.apply, variables, batch))))


@pytest.fixture(scope="module")
def decoded(photo_logits):
    probabilities = np.asarray(jax.nn.softmax(np.stack(list(photo_logits.values())), axis=-1))
    return dict(zip(photo_logits, decode_predictions(probabilities, 5)))


def test_chelsea_is_a_cat_and_coffee_is_espresso(decoded):
    assert any(index in CAT_CLASSES for index, _, _ in decoded["chelsea"][:3])
    index, label, probability = decoded["coffee"][0]
    assert (index, label) == (967, "espresso") and probability > 0.9


@pytest.mark.parametrize("photo", PHOTOS)
def test_logits_of_the_photos_match_torch_on_torchvisions_own_pipeline(photo_logits, photo):
    """jaxdl's decode, resize, crop, normalisation, conversion and folded network against torch's logits.

    Seen failing on broken variants: jaxdl's preprocessing resizing with NEAREST instead of BILINEAR (logits
    off by 3.07), and the stride of block 3 moved to block 4 in jaxdl's BLOCKS (off by 16.2).
    """
    expected = np.load(GOLDEN / "torch_reference.npz")[photo]
    tolerance.assert_close(photo_logits[photo], expected, tolerance.deep_network(DEPTH, np.abs(expected).max()))


@pytest.mark.parametrize("photo", PHOTOS)
def test_golden_logits_and_top5(photo_logits, photo, ndarrays_regression):
    logits = photo_logits[photo]
    probabilities = np.asarray(jax.nn.softmax(logits))
    top5 = np.argsort(-probabilities)[:5]
    # Top-5 indices compare exactly: the closest logits among them (coffee's 3rd and 4th) differ by 0.05,
    # 100x the logit tolerance, so a changed order is a real change.
    logit_tolerance = tolerance.deep_network(DEPTH, np.abs(logits).max())
    probability_tolerance = tolerance.probabilities(DEPTH, np.ptp(logits))
    golden = GOLDEN / f"{photo}.npz"
    if golden.is_file():  # the policy's margin, recorded; the regression fixture does the check and regen
        stored = np.load(golden)
        tolerance.assert_close(logits, stored["logits"], logit_tolerance)
        tolerance.assert_close(probabilities[top5], stored["top5_probabilities"], probability_tolerance)
    ndarrays_regression.check(
        {"logits": logits, "top5_indices": top5, "top5_probabilities": probabilities[top5]}, fullpath=golden,
        tolerances={"logits": {"atol": logit_tolerance.atol, "rtol": logit_tolerance.rtol},
                    "top5_probabilities": {"atol": probability_tolerance.atol, "rtol": probability_tolerance.rtol}})


def test_bfloat16_inference_agrees_on_the_top_classes(imagenet_classifier, photo_logits):
    """Half precision keeps the ranking that matters: the same top-1 class, and the same top-5 set.

    bfloat16 keeps 8 bits of mantissa (about 2 decimal digits), so logits move by around 1%;
    coffee's 3rd and 4th logits differ by 0.05, and the top-5 may change order, not members.
    """
    from jaxdl import predict

    model, variables = imagenet_classifier.inference_form()
    photos = classify_experiment.sample_photos()
    batch = np.stack([images.preprocess(p, imagenet_classifier.preprocessing) for p in photos.values()])
    half = predict(model, batch, variables=variables, precision="bfloat16")
    assert half.dtype == np.float32 and half.shape == (2, 1000)
    for photo, outputs in zip(photos, half):
        full = photo_logits[photo]
        assert outputs.argmax() == full.argmax()
        assert set(np.argsort(-outputs)[:5]) == set(np.argsort(-full)[:5])
        assert not np.array_equal(outputs, full)  # it did compute in another precision


def test_unfolded_model_gives_the_same_logits(imagenet_classifier, jaxdl_cache):
    """Folding BatchNorm into the convs is exact in real numbers; in float32 it reorders a deep network's sums.

    Logits, not probabilities: most of 1000 probabilities sit below any probability tolerance. Seen failing
    with the running mean left out of the folded bias (off by 17.4).
    """
    from jaxdl.pretrained.classifier import ImageClassifier

    slow = ImageClassifier.load("imagenet", fast=False)
    batch = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
    fast_logits = np.asarray(predict_in_chunks(*_apply_and_variables(imagenet_classifier), batch))
    slow_logits = np.asarray(predict_in_chunks(*_apply_and_variables(slow), batch))
    tolerance.assert_close(fast_logits, slow_logits, tolerance.deep_network(DEPTH, np.abs(slow_logits).max()))


def _apply_and_variables(classifier):
    model, variables = classifier.inference_form()
    return model.apply, variables


def test_inference_weights_stay_on_the_device_between_calls(imagenet_classifier):
    """A forward pass copies only its images: the folded weights (14 MB) were sent host to device on
    every call while `inference_form` kept them as NumPy arrays (batch 1 ran at 0.87x the speed)."""
    model, variables = imagenet_classifier.inference_form()
    images_on_device = jax.device_put(np.zeros((1, 224, 224, 3), np.float32))
    predict_in_chunks(model.apply, variables, images_on_device).block_until_ready()  # compiled outside the guard
    with jax.transfer_guard_host_to_device("disallow"):
        predict_in_chunks(model.apply, variables, images_on_device).block_until_ready()


def test_image_loading_converts_modes_and_honours_exif(tmp_path):
    rotated = Image.new("RGB", (300, 200), (200, 10, 10))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    assert images.load_image(tmp_path / "rotated.jpg").size == (200, 300)
    Image.new("L", (40, 50), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (40, 50), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert images.load_image(tmp_path / "gray.png").mode == "RGB"
    assert images.load_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)  # on white


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    photos = classify_experiment.sample_photos()
    photos["chelsea"].save(folder / "chelsea.png")
    photos["coffee"].convert("L").save(folder / "coffee_gray.jpg", quality=95)
    photos["coffee"].save(folder / "coffee.jpg", quality=95)
    (folder / "coffee_cut.jpg").write_bytes((folder / "coffee.jpg").read_bytes()[:5000])
    (folder / "notes.png").write_text("not a picture")
    return folder


def run_cli(*args, cache):
    return subprocess.run([sys.executable, "-m", "jaxdl.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "JAXDL_CACHE": str(cache)})


def test_classify_json_reports_every_image_and_names_the_bad_ones(photo_files, jaxdl_cache, imagenet_classifier):
    done = run_cli("classify", "--json", "--top", "3", photo_files / "chelsea.png", photo_files / "notes.png",
                   photo_files / "coffee_gray.jpg", photo_files / "coffee_cut.jpg", photo_files / "missing.jpg",
                   photo_files / "coffee.jpg", cache=jaxdl_cache)
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [Path(line["image"]).name for line in lines] == ["chelsea.png", "coffee_gray.jpg", "coffee.jpg"]
    assert all(len(line["top"]) == 3 and set(line["top"][0]) == {"index", "label", "probability"} for line in lines)
    assert lines[0]["top"][0]["index"] in CAT_CLASSES
    assert lines[2]["top"][0]["label"] == "espresso"
    errors = done.stderr.strip().splitlines()
    assert any("notes.png: not an image" in e for e in errors)
    assert any("coffee_cut.jpg: damaged or truncated image" in e for e in errors)
    assert any("missing.jpg: no such file" in e for e in errors)


LIBRARY_BATCHES = (1, 7, 32)


@pytest.fixture(scope="module")
def classify_by_the_cli(jaxdl_cache):
    """`jaxdl classify --json --top 1000` on the first 1, 7 and 32 cat photos, a process each, run at once: the
    probability of every class per photo, as `{count: (paths, probabilities)}`."""
    from tests.conftest import CATS

    runs = {}
    for count in LIBRARY_BATCHES:
        paths = sorted(CATS.glob("*.jpg"))[:count]
        command = [sys.executable, "-m", "jaxdl.cli", "classify", "--json", "--top", "1000", "--batch-size",
                   str(count), *map(str, paths)]
        runs[count] = paths, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                              env={**os.environ, "JAXDL_CACHE": str(jaxdl_cache)})
    results = {}
    for count, (paths, process) in runs.items():
        out, err = process.communicate()
        assert process.returncode == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        assert [line["image"] for line in lines] == [str(path) for path in paths]
        probabilities = np.zeros((count, 1000))
        for row, line in enumerate(lines):
            for entry in line["top"]:
                probabilities[row, entry["index"]] = entry["probability"]
        results[count] = paths, probabilities
    return results


@pytest.mark.requires_cats
@pytest.mark.parametrize("count", LIBRARY_BATCHES)
def test_the_library_gives_what_jaxdl_classify_gives(count, classify_by_the_cli, imagenet_classifier):
    """`ImageClassifier.probabilities` in this process (JAX's one CPU device) and `jaxdl classify` (a CPU device per
    core, batches split over them, its program cache) on the same photos: the same probabilities, every class.

    One image runs on one device on either path; 7 and 32 are split over the CLI's devices, in other chunks."""
    paths, from_cli = classify_by_the_cli[count]
    batch, loaded, errors = images.load_batch(paths, imagenet_classifier.preprocessing)
    assert not errors and len(loaded) == count
    from_library = imagenet_classifier.probabilities(batch, batch_size=count)
    assert from_library.shape == (count, 1000)
    # Another split of the same deep network's work: its sums in another order (`probabilities`' bound, logits
    # spanning 20 as the photos' do).
    tolerance.assert_close(from_library, from_cli, tolerance.probabilities(DEPTH, 20))
    assert (from_library.argmax(-1) == from_cli.argmax(-1)).all()


def test_classify_text_output_and_bad_weights(photo_files, imagenet_classifier, main_here):
    code, out, _ = main_here("classify", "--top", "2", photo_files / "coffee.jpg")
    assert code == 0
    assert out.splitlines()[1].startswith("  1. espresso (967): ")
    code, _, err = main_here("classify", "--weights", photo_files / "nowhere", photo_files / "coffee.jpg")
    assert code == 2 and "--weights" in err and "nowhere" in err


def test_classify_gives_jax_a_cpu_device_per_core_unless_told_otherwise(monkeypatch):
    """`jaxdl classify` splits batches over a CPU device per core; a device count the user set, and a
    JAX already running (which cannot take the setting), are left as they are."""
    from jaxdl import cli

    code = ("from jaxdl import cli; cli.one_cpu_device_per_core(); import jax, os; "
            "print(jax.device_count(), len(os.sched_getaffinity(0)))")
    environment = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=environment)
    devices, cores = map(int, done.stdout.split()[-2:])
    assert devices == cores
    # A count the user chose in XLA_FLAGS: JAX is not asked to change it.
    monkeypatch.setattr(jax.config, "update", lambda *args: pytest.fail(f"jax.config.update{args}"))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3")
    cli.one_cpu_device_per_core()
    monkeypatch.undo()
    # In this process JAX has started: nothing changes, and nothing fails.
    before = jax.device_count()
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    cli.one_cpu_device_per_core()
    assert jax.device_count() == before


def test_convert_command_writes_a_model_classify_can_use(tmp_path, jaxdl_cache, photo_files, main_here):
    from jaxdl.pretrained import weights as pretrained

    source = pretrained.torchvision_weights_path()
    done = run_cli("convert", "torchvision", source, tmp_path / "converted", cache=jaxdl_cache)
    assert done.returncode == 0, done.stderr
    code, _, err = main_here("convert", "torchvision", source, tmp_path / "converted")
    assert code == 1 and "already exists" in err
    code, out, _ = main_here("classify", "--json", "--weights", tmp_path / "converted", photo_files / "coffee.jpg")
    assert json.loads(out)["top"][0]["label"] == "espresso"


@pytest.mark.parametrize("arguments, message", [
    (["classify", "--top", "0", "x.jpg"], "argument --top: must be at least 1, got 0"),
    (["classify", "--batch-size", "two", "x.jpg"], "argument --batch-size: expected a positive integer, got 'two'"),
    (["finetune", "data", "--out", "m", "--val-split", "1.5"], "argument --val-split: must be in [0, 1), got 1.5"),
    (["finetune", "data", "--out", "m", "--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
])
def test_bad_command_line_arguments_are_named(arguments, message, capsys):
    from jaxdl.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(arguments)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
