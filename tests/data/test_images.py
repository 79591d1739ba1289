"""Loading photos: oversized and high-bit-depth files, torchvision's resize and crop, image folders, augmentation."""
import struct
import warnings
import zlib

import jax
import numpy as np
import pytest
from PIL import Image

from jaxdl.data import images
from tests.support import tolerance


def png_declaring(path, width, height):
    """A 1x1 PNG whose header declares `width` x `height`: under 100 bytes, a huge image once decoded."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    # After the 8-byte signature: IHDR's length, b"IHDR", width and height, ..., then the CRC of type and data.
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_declaring_too_many_pixels_is_one_error_line_not_the_end_of_the_batch(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(good)
    bomb = png_declaring(tmp_path / "bomb.png", 20_000, 10_000)  # 200 megapixels: past Pillow's own limit too
    big = png_declaring(tmp_path / "big.png", 10_000, 10_000)  # 100 megapixels: past the default max_pixels
    assert bomb.stat().st_size < 100
    batch, loaded, errors = images.load_batch([good, bomb, big, good], images.TORCHVISION)
    assert batch.shape == (2, 224, 224, 3) and loaded == [str(good), str(good)]
    assert len(errors) == 2
    assert errors[0].startswith(f"{bomb}: image too large to decode safely (") and "pixels" in errors[0]
    assert errors[1] == (f"{big}: image too large to decode safely (10000x10000 = 100000000 pixels, "
                         f"over max_pixels={images.MAX_PIXELS})")


def test_max_pixels_limits_each_call_without_changing_pillows_global_limit(tmp_path):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (100, 80)).save(photo)
    pillow_limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(images.ImageError, match=r"photo.png: image too large .*8000 pixels, over max_pixels=7999"):
        images.load_image(photo, max_pixels=7999)
    assert images.load_image(photo, max_pixels=8000).size == (100, 80)
    batch, loaded, errors = images.load_batch([photo], images.KERAS, max_pixels=100)
    assert batch.shape == (0, 224, 224, 3) and loaded == [] and "over max_pixels=100" in errors[0]
    assert images.load_image(photo).size == (100, 80)
    assert Image.MAX_IMAGE_PIXELS == pillow_limit
    with pytest.raises(ValueError, match="max_pixels must be at least 1, got 0"):
        images.load_image(photo, max_pixels=0)


def mode_of(path):
    with Image.open(path) as image:
        return image.mode


SIXTEEN_BIT = [0, 255, 257, 0x12FF, 0x8000, 0xFF00, 0xFFFF]  # 0x12ff: 18 by `>> 8`, 19 by `/ 257` rounded
HIGH_BYTE = [0, 0, 1, 18, 128, 255, 255]


def test_a_16_bit_grayscale_png_keeps_its_gray_levels(tmp_path):
    gradient = np.arange(256, dtype=np.uint16)[None].repeat(4, axis=0) * 257  # 0 ... 65535
    Image.fromarray(gradient).save(tmp_path / "gradient.png")
    Image.fromarray(np.array([SIXTEEN_BIT], np.uint16)).save(tmp_path / "levels.png")
    assert mode_of(tmp_path / "gradient.png") == "I;16"
    loaded = np.asarray(images.load_image(tmp_path / "gradient.png"))
    np.testing.assert_array_equal(loaded, np.arange(256, dtype=np.uint8)[None, :, None].repeat(4, 0).repeat(3, 2))
    levels = np.asarray(images.load_image(tmp_path / "levels.png"))
    np.testing.assert_array_equal(levels[0, :, 0], HIGH_BYTE)


def test_32_bit_integer_and_float_grayscale_load_as_16_bit_and_as_0_to_1(tmp_path):
    (tmp_path / "levels.pgm").write_bytes(b"P5 7 1 65535\n" + np.array(SIXTEEN_BIT, ">u2").tobytes())
    assert mode_of(tmp_path / "levels.pgm") == "I"
    np.testing.assert_array_equal(np.asarray(images.load_image(tmp_path / "levels.pgm"))[0, :, 0], HIGH_BYTE)
    Image.fromarray(np.array([[-0.5, 0.0, 0.25, 0.5, 1.0, 1.5]], np.float32)).save(tmp_path / "levels.tif")
    assert mode_of(tmp_path / "levels.tif") == "F"
    np.testing.assert_array_equal(np.asarray(images.load_image(tmp_path / "levels.tif"))[0, :, 0],
                                  [0, 0, 63, 127, 255, 255])


def test_torchvision_resize_truncates_the_long_side_as_torchvision_does():
    assert images.resized_size(451, 300, 256) == (384, 256)  # 256 * 451 / 300 = 384.85
    assert images.resized_size(300, 451, 256) == (256, 384)
    assert images.resized_size(640, 640, 256) == (256, 256)


def test_torchvision_centre_crop_offsets_round_half_to_even_and_pad_short_sides():
    assert images.center_crop_offset(384, 224) == 80
    assert images.center_crop_offset(385, 224) == 80  # round(80.5)
    assert images.center_crop_offset(387, 224) == 82  # round(81.5)
    assert images.center_crop_offset(201, 224) == -11  # 23 pixels of padding: 11 before, 12 after


def test_torchvision_preprocessing_matches_resize_then_centre_crop():
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 451, 3), np.uint8))
    expected = np.asarray(photo.resize((384, 256), Image.BILINEAR).crop((80, 16, 304, 240)), np.float32) / 255.0
    expected = (expected - np.float32(images.TORCHVISION["mean"])) / np.float32(images.TORCHVISION["std"])
    pixels = images.preprocess(photo, images.TORCHVISION)
    assert pixels.shape == (224, 224, 3)
    tolerance.assert_close(pixels, expected, tolerance.ONE_OP)


def test_image_folder_reads_one_class_per_subfolder_and_names_bad_folders(tmp_path):
    for name in ("dogs", "cats"):
        (tmp_path / "data" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / name / "a.png")
    (tmp_path / "data" / "cats" / "notes.txt").write_text("not an image")
    paths, labels, classes = images.image_folder(tmp_path / "data")
    assert classes == ["cats", "dogs"] and labels.tolist() == [0, 1]
    assert [p.relative_to(tmp_path / "data").as_posix() for p in paths] == ["cats/a.png", "dogs/a.png"]
    with pytest.raises(FileNotFoundError, match="no such data folder"):
        images.image_folder(tmp_path / "nowhere")
    (tmp_path / "one" / "cats").mkdir(parents=True)
    (tmp_path / "one" / "cats" / "a.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="at least two classes, found 1 \\(cats\\)"):
        images.image_folder(tmp_path / "one")
    (tmp_path / "one" / "dogs").mkdir()
    with pytest.raises(ValueError, match="dogs: class 'dogs' has no images"):
        images.image_folder(tmp_path / "one")


def test_load_images_keeps_images_labels_and_paths_aligned(tmp_path):
    paths = [tmp_path / "a.png", tmp_path / "broken.png", tmp_path / "c.png"]
    Image.new("L", (8, 8), 10).save(paths[0])
    paths[1].write_text("not a photo")
    Image.new("L", (8, 8), 30).save(paths[2])
    reported = []
    batch, labels, kept = images.load_images(paths, np.array([0, 1, 2]), images.KERAS, report=reported.append)
    assert len(batch) == 2 and labels.tolist() == [0, 2] and kept == [paths[0], paths[2]]
    assert len(reported) == 1 and reported[0].startswith(f"skipped: {paths[1]}: not an image")


def test_augmentation_is_seeded_and_only_flips_when_it_does_not_pad():
    batch = np.random.default_rng(0).normal(size=(4, 8, 6, 3)).astype(np.float32)
    flipped = np.asarray(images.augment_images(jax.random.key(0), batch, pad=0))
    assert all(np.array_equal(f, i) or np.array_equal(f, i[:, ::-1]) for f, i in zip(flipped, batch))
    augmented = np.asarray(images.augment_images(jax.random.key(1), batch, pad=2))
    assert augmented.shape == batch.shape
    np.testing.assert_array_equal(augmented, np.asarray(images.augment_images(jax.random.key(1), batch, pad=2)))


def test_a_photo_enlarged_more_than_twice_is_used_with_a_warning_naming_it(tmp_path):
    """The issue's 20x15 photo, under both preprocessings, and photos at the limit, which load silently."""
    small, at_limit = tmp_path / "small.png", tmp_path / "at-limit.png"
    Image.new("RGB", (20, 15)).save(small)
    Image.new("RGB", (128, 112)).save(at_limit)  # torchvision: short side 112 -> 256 (2.29x); Keras: 2.0x
    with pytest.warns(UserWarning, match=rf"{small}: a 20x15 photo, enlarged 17.1x to reach the network's 224x224"):
        batch, _, _ = images.load_images([small], [0], images.TORCHVISION)
    assert batch.shape == (1, 224, 224, 3)  # used all the same
    with pytest.warns(UserWarning, match=r"a 20x15 photo, enlarged 14.9x"):
        images.load_images([small], [0], images.KERAS)
    with pytest.warns(UserWarning, match=r"a 128x112 photo, enlarged 2.3x"):
        images.load_images([at_limit], [0], images.TORCHVISION)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images.load_images([at_limit], [0], images.KERAS)  # 224/112 = 2.0x: not more than twice
