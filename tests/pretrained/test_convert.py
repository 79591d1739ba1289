"""Reading torchvision and Keras weight files: formats, parity with torch, and every bad file."""
import json
import os
import pickle
import zipfile

import h5py
import jax
import numpy as np
import pytest

from jaxdl.models.mobilenet_v2 import folded
from jaxdl.pretrained import weights as pretrained
from jaxdl.pretrained.convert import ConversionError, from_keras, from_torchvision
from jaxdl.pretrained.torchfile import UnsafePickleError, WeightFileError, load_state_dict
from tests.support import tolerance


@pytest.fixture(scope="module")
def weights_path():
    return pretrained.torchvision_weights_path()


@pytest.fixture(scope="module")
def state_dict(weights_path):
    return load_state_dict(weights_path)


def test_legacy_reader_matches_torch_load(weights_path, state_dict):
    import torch

    reference = torch.load(weights_path, map_location="cpu", weights_only=True)
    assert list(state_dict) == list(reference) and len(state_dict) == 314
    for name, tensor in reference.items():
        np.testing.assert_array_equal(state_dict[name], tensor.numpy(), err_msg=name)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_both_torch_serializations_convert_identically(tmp_path, state_dict, zip_format):
    import torch

    path = tmp_path / "resaved.pth"
    tensors = {name: torch.from_numpy(np.array(value)) for name, value in state_dict.items()}
    torch.save(tensors, path, _use_new_zipfile_serialization=zip_format)
    assert zipfile.is_zipfile(path) == zip_format
    reread = load_state_dict(path)
    assert all(np.array_equal(reread[k], state_dict[k]) for k in state_dict)


def test_torchvision_convention_matches_torch_to_1e5(weights_path, state_dict):
    """The real ImageNet weights through our Flax model and through torch's own ops."""
    import torch

    from jaxdl.references.torch_mobilenet_v2 import forward

    images = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        expected = forward({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                           torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    model, variables = from_torchvision(weights_path)
    assert (model.convention, model.alpha, model.include_top) == ("torchvision", 1.0, True)
    logits = np.asarray(jax.jit(model.apply)(variables, images))
    expected_probabilities = np.asarray(jax.nn.softmax(expected))
    tolerance.assert_close(jax.nn.softmax(logits), expected_probabilities, tolerance.CROSS_FRAMEWORK_PROBABILITIES)
    tolerance.assert_close(logits, expected, tolerance.deep_network(53, np.abs(expected).max()))
    fast_model, fast_variables = folded(model, variables)
    fast = np.asarray(jax.jit(fast_model.apply)(fast_variables, images))
    tolerance.assert_close(jax.nn.softmax(fast), expected_probabilities, tolerance.CROSS_FRAMEWORK_PROBABILITIES)
    tolerance.assert_close(fast, expected, tolerance.deep_network(53, np.abs(expected).max()))


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    legacy = tmp_path / "evil.pth"
    legacy.write_bytes(pickle.dumps(Exploit(marker), protocol=2))
    with pytest.raises(UnsafePickleError, match=r"evil.pth: refused: the file asks for the Python global "
                                                r"(posix|os)\.system"):
        load_state_dict(legacy)
    archive = tmp_path / "evil_zip.pth"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"weight": Exploit(marker)}, protocol=2))
    with pytest.raises(UnsafePickleError, match="refused"):
        from_torchvision(archive)
    assert not marker.exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_truncated_weight_file_is_a_clear_error(tmp_path, state_dict, zip_format):
    import torch

    whole = tmp_path / "whole.pth"
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, whole,
               _use_new_zipfile_serialization=zip_format)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(WeightFileError, match=r"cut.pth: .*(truncated|damaged)"):
        from_torchvision(cut)


def test_weights_of_another_architecture_name_the_first_mismatch(tmp_path):
    import torch

    resnet_like = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64),
                   "bn1.bias": torch.zeros(64), "bn1.running_mean": torch.zeros(64), "bn1.running_var": torch.ones(64),
                   "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    path = tmp_path / "resnet.pth"
    torch.save(resnet_like, path)
    with pytest.raises(ConversionError, match=r"resnet.pth: not MobileNetV2 weights .*the file has 3 layers"):
        from_torchvision(path)

    h5 = tmp_path / "other.h5"
    with h5py.File(h5, "w") as file:
        file.attrs["layer_names"] = [b"Conv1", b"bn_Conv1"]
        conv = file.create_group("Conv1")
        conv.attrs["weight_names"] = [b"Conv1/kernel:0"]
        conv.create_dataset("Conv1/kernel:0", data=np.zeros((7, 7, 3, 64), np.float32))
        bn = file.create_group("bn_Conv1")
        bn.attrs["weight_names"] = [f"bn_Conv1/{n}:0".encode() for n in ("gamma", "beta", "mean", "var")]
        for n in ("gamma", "beta", "mean", "var"):
            bn.create_dataset(f"bn_Conv1/{n}:0", data=np.zeros(64, np.float32))
    with pytest.raises(ConversionError, match="other.h5: not MobileNetV2 weights"):
        from_keras(h5)


def test_non_weight_files_are_clear_errors(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(ConversionError, match="notes.h5: not a readable Keras weight file"):
        from_keras(text)
    with pytest.raises(WeightFileError, match="notes.h5: not a readable PyTorch state dict"):
        from_torchvision(text)
    with pytest.raises(FileNotFoundError, match="no Keras weight file at"):
        from_keras(tmp_path / "missing.h5")
    with pytest.raises(FileNotFoundError, match="no weight file at"):
        from_torchvision(tmp_path / "missing.pth")


def test_checksum_mismatch_is_refused_before_conversion(tmp_path, weights_path, monkeypatch):
    monkeypatch.setenv("JAXDL_CACHE", str(tmp_path / "cache"))
    altered = tmp_path / "altered.pth"
    data = bytearray(weights_path.read_bytes())
    data[-1] ^= 0xFF
    altered.write_bytes(bytes(data))
    with pytest.raises(pretrained.ChecksumError, match=r"altered.pth: sha256 is [0-9a-f]{64}, expected b0353104"):
        pretrained.verify(altered, pretrained.TORCHVISION_IMAGENET.sha256)
    wrong = pretrained.WeightFile(**{**pretrained.TORCHVISION_IMAGENET.__dict__, "sha256": "0" * 64})
    with pytest.raises(pretrained.ChecksumError, match="expected 0000"):
        pretrained.torchvision_imagenet(wrong)
    assert not any((tmp_path / "cache").glob("mobilenet_v2_*/model.json"))  # nothing cached from a bad file


def test_a_stale_cached_conversion_is_converted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXDL_CACHE", str(tmp_path))
    model, _, metadata = pretrained.torchvision_imagenet()
    cached = next(tmp_path.glob("mobilenet_v2_torchvision_*"))
    (cached / "model.json").write_text('{"class": "MobileNetV2", "config": {"depthwise": "old"}}')
    again, variables, _ = pretrained.torchvision_imagenet()
    assert again == model and metadata["sha256"] == pretrained.TORCHVISION_IMAGENET.sha256
    assert variables["params"]["Conv1"]["kernel"].shape == (3, 3, 3, 32)


def keras_legacy_h5(path, num_classes: int, include_top: bool = True, bias=None):
    """A legacy Keras HDF5 file of MobileNetV2(alpha=0.35) in the layout the released files use (see
    `tests.support.keras_reference.save_legacy_h5`), written from Flax's shapes without Keras: zero kernels, BatchNorm
    as the identity, and a head of zero kernel and bias `bias`, so its probabilities are softmax(bias) for any
    image."""
    import jax.numpy as jnp

    from jaxdl.models.mobilenet_v2 import MobileNetV2, layer_plan

    model = MobileNetV2(alpha=0.35, include_top=include_top, num_classes=num_classes)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    with h5py.File(path, "w") as file:
        plan = layer_plan(include_top)
        file.attrs["layer_names"] = [name.encode() for name, _ in plan]
        for name, kind in plan:
            if kind == "bn":
                channels = shapes[name]["scale"].shape[0]
                arrays = {"gamma": np.ones(channels), "beta": np.zeros(channels), "moving_mean": np.zeros(channels),
                          "moving_variance": np.ones(channels)}
            elif kind == "dense":
                arrays = {"kernel": np.zeros(shapes[name]["kernel"].shape), "bias": np.asarray(bias)}
            else:
                height, width, inputs, outputs = shapes[name]["kernel"].shape
                arrays = {"kernel": np.zeros((height, width, outputs, inputs) if kind == "depthwise"
                                             else (height, width, inputs, outputs))}
            group = file.create_group(name)
            group.attrs["weight_names"] = [f"{name}/{key}:0".encode() for key in arrays]
            for key, array in arrays.items():
                group.create_dataset(f"{name}/{key}:0", data=np.asarray(array, np.float32))
    return path


def test_a_head_that_is_not_imagenets_converts_and_classifies_by_index(tmp_path, main_here):
    """`jaxdl convert` of a 3-class MobileNetV2 records that its class names are unknown (null), and `jaxdl
    classify`, of the saved model and of the file itself, labels the classes "class INDEX" with the model's own
    probabilities (softmax of the head's bias: its kernel is zero). Seen failing with convert saving `classes:
    []`, read back as ImageNet's 1000 names: classify died with "ValueError: 3 class scores but 1000 class names"
    (a traceback from `jaxdl classify`)."""
    from PIL import Image

    bias = np.array([0.5, -1.0, 2.0], np.float32)
    source = keras_legacy_h5(tmp_path / "three.h5", 3, bias=bias)
    image = tmp_path / "grey.png"
    Image.new("RGB", (40, 30), (120, 130, 140)).save(image)
    code, converted, err = main_here("convert", "keras", source, tmp_path / "three")
    assert code == 0, err

    expected = np.exp(bias - bias.max()) / np.exp(bias - bias.max()).sum()  # 0.178, 0.040, 0.782 by hand
    for weights in (tmp_path / "three", source):
        code, out, err = main_here("classify", "--json", "--weights", weights, image)
        assert code == 0, err
        top = json.loads(out)["top"]
        assert [entry["index"] for entry in top] == [2, 0, 1]
        assert [entry["label"] for entry in top] == ["class 2", "class 0", "class 1"]
        # a softmax of 3 float32 logits against numpy's in float32: a few roundings (ONE_OP)
        tolerance.assert_close(np.array([entry["probability"] for entry in top]), expected[[2, 0, 1]], tolerance.ONE_OP)
    code, out, _ = main_here("classify", "--top", "1", "--weights", tmp_path / "three", image)
    assert code == 0 and out.splitlines()[1] == f"  1. class 2 (2): {expected[2]:.2%}"
    assert json.loads((tmp_path / "three" / "model.json").read_text())["metadata"]["classes"] is None
    assert "3 classes, names unknown" in converted


def test_classify_refuses_features_only_models_and_names_that_do_not_fit_the_head(tmp_path, main_here):
    """A MobileNetV2 without its classifier (include_top=False) converts, recorded without classes, and
    `jaxdl classify` refuses it in one line (exit 2, before compiling); a saved model whose class names are not
    one per class is refused naming its directory. A directory that `jaxdl convert` wrote before (classes `[]`)
    classifies by index. Seen failing with tracebacks: "decode_predictions expects (images, classes)
    probabilities, got shape (1, 7, 7, 1280)" and "3 class scores but 1000 class names"."""
    features = keras_legacy_h5(tmp_path / "features.h5", 1000, include_top=False)
    image = tmp_path / "grey.png"
    from PIL import Image

    Image.new("RGB", (40, 30), (120, 130, 140)).save(image)
    code, converted, err = main_here("convert", "keras", features, tmp_path / "features")
    assert code == 0, err
    for weights in (tmp_path / "features", features):
        code, out, err = main_here("classify", "--weights", weights, image)
        assert (code, out) == (2, "")
        assert f"--weights {weights}: MobileNetV2(include_top=False) ends in features, not class scores" in err

    source = keras_legacy_h5(tmp_path / "three.h5", 3, bias=np.zeros(3))
    assert main_here("convert", "keras", source, tmp_path / "three")[0] == 0
    config_file = tmp_path / "three" / "model.json"
    config = json.loads(config_file.read_text())
    config["metadata"]["classes"] = ["cat", "dog"]
    config_file.write_text(json.dumps(config))
    code, out, err = main_here("classify", "--weights", tmp_path / "three", image)
    assert (code, out) == (2, "")
    assert f"--weights {tmp_path / 'three'}: 2 class names are recorded for a model of 3 classes" in err
    config["metadata"]["classes"] = []  # as `jaxdl convert` saved a head that is not ImageNet's before
    config_file.write_text(json.dumps(config))
    code, out, err = main_here("classify", "--json", "--top", "1", "--weights", tmp_path / "three", image)
    assert code == 0, err
    assert json.loads(out)["top"][0]["label"] == "class 0"  # equal scores: the first index comes first
    assert json.loads((tmp_path / "features" / "model.json").read_text())["metadata"]["classes"] is None
    assert "no classifier layer" in converted
