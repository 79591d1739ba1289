"""Reading torchvision and Keras weight files: formats, parity with torch, and every bad file."""
import os
import pickle
import zipfile

import h5py
import jax
import numpy as np
import pytest

from jaxdl import pretrained
from jaxdl.convert import ConversionError, from_keras, from_torchvision
from jaxdl.models.mobilenet_v2 import folded
from jaxdl.torchfile import UnsafePickleError, WeightFileError, load_state_dict
from tests import tolerance


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
