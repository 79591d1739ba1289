"""jaxdl.data.idx: IDX files read with numpy, on small files the tests write (the real ones: test_mnist_real)."""
import gzip

import numpy as np
import pytest

from jaxdl.data import load_mnist, read_idx, read_idx_pair
from jaxdl.data.idx import MNIST_FILES


def idx_bytes(magic: int, shape: tuple, values: np.ndarray | None = None) -> bytes:
    """An IDX file: the big-endian magic number and sizes, then `values` (default: zeros of `shape`)."""
    values = np.zeros(shape, np.uint8) if values is None else values
    return magic.to_bytes(4, "big") + b"".join(size.to_bytes(4, "big") for size in shape) + values.tobytes()


def write(path, data: bytes, compress: bool = True):
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def test_a_small_pair_reads_back_gzipped_or_not(tmp_path):
    pixels = np.arange(3 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(3, 28, 28)
    images = write(tmp_path / "images.gz", idx_bytes(2051, (3, 28, 28), pixels))
    labels = write(tmp_path / "labels", idx_bytes(2049, (3,), np.array([7, 0, 9], np.uint8)), compress=False)
    got_images, got_labels = read_idx_pair(images, labels)
    np.testing.assert_array_equal(got_images, pixels)
    assert got_labels.tolist() == [7, 0, 9]


def test_a_truncated_gzip_file_is_an_error_naming_it(tmp_path):
    whole = gzip.compress(idx_bytes(2051, (10, 28, 28)))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=rf"{path}: not a complete gzip file .*truncated"):
        read_idx(path, 2051)


def test_a_payload_shorter_or_longer_than_its_header_is_an_error_naming_it(tmp_path):
    short = write(tmp_path / "short.gz", idx_bytes(2051, (10, 28, 28))[:-100])  # a whole gzip stream, cut IDX
    with pytest.raises(ValueError, match=rf"{short}: 7,740 bytes of values, but its header declares shape "
                                         r"\(10, 28, 28\) \(7,840\); the file is truncated"):
        read_idx(short, 2051)
    long = write(tmp_path / "long.gz", idx_bytes(2049, (5,)) + b"\x00")
    with pytest.raises(ValueError, match=rf"{long}: .*the file is padded"):
        read_idx(long, 2049)
    header = write(tmp_path / "header.gz", idx_bytes(2051, (10, 28, 28))[:9])
    with pytest.raises(ValueError, match=rf"{header}: truncated in its header"):
        read_idx(header, 2051)


def test_a_wrong_magic_number_is_an_error_naming_the_file_and_the_expected_kind(tmp_path):
    labels = write(tmp_path / "labels.gz", idx_bytes(2049, (4,)))
    with pytest.raises(ValueError, match=rf"{labels}: magic number 2049, expected 2051 \(images\)"):
        read_idx(labels, 2051)  # the labels file given as images
    text = write(tmp_path / "notes.gz", b"<html>not found</html>")
    with pytest.raises(ValueError, match=rf"{text}: magic number \d+, expected 2049 \(labels\)"):
        read_idx(text, 2049)
    floats = write(tmp_path / "floats.gz", b"\x00\x00\x0d\x01" + (1).to_bytes(4, "big") + b"\x00" * 4)
    with pytest.raises(ValueError, match=rf"{floats}: magic number 3329 is not an IDX header of unsigned bytes"):
        read_idx(floats)


def test_images_and_labels_of_different_counts_are_an_error_naming_both_files(tmp_path):
    images = write(tmp_path / "images.gz", idx_bytes(2051, (5, 28, 28)))
    labels = write(tmp_path / "labels.gz", idx_bytes(2049, (4,)))
    with pytest.raises(ValueError, match=rf"{images} holds 5 images but {labels} holds 4 labels"):
        read_idx_pair(images, labels)
    small = write(tmp_path / "small.gz", idx_bytes(2051, (4, 14, 14)))
    with pytest.raises(ValueError, match=rf"{small}: images of shape \(14, 14\), expected \(28, 28\)"):
        read_idx_pair(small, labels)
    eleven = write(tmp_path / "eleven.gz", idx_bytes(2049, (4,), np.array([0, 1, 10, 2], np.uint8)))
    with pytest.raises(ValueError, match=rf"{eleven}: label 10 outside 0..9"):
        read_idx_pair(write(tmp_path / "four.gz", idx_bytes(2051, (4, 28, 28))), eleven)


def test_a_directory_missing_one_of_the_four_files_names_it(tmp_path):
    for split, (images, labels) in MNIST_FILES.items():
        write(tmp_path / f"{images}.gz", idx_bytes(2051, (2, 28, 28)))
        if split == "train":
            write(tmp_path / f"{labels}.gz", idx_bytes(2049, (2,)))
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}: no t10k-labels-idx1-ubyte.gz"):
        load_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_mnist(tmp_path / "absent")
