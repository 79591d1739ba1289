"""Every loader against damaged and hostile input, property-based (hypothesis).

Each file loader gets genuine files mutated at random: truncated, bits
flipped, a span overwritten, bytes inserted, emptied, or replaced by random
bytes, plus the attacks its format invites (a PNG declaring a huge image).
Every case must end in a correct load or in the loader's own error naming
the file; any other exception, a crash or an unbounded allocation (memory
limits are set low here) fails. The default suite runs `QUICK` examples per
loader (3 for Keras files, fuzzed in test_mobilenet_v2.py); `pytest -m slow
tests/project/test_fuzz_loaders.py tests/models/test_mobilenet_v2.py` runs `THOROUGH` each.
Seeds are derandomized: a run is the same on every machine.
"""
import io
import os
import struct
import subprocess
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from jaxdl import data
from jaxdl.data import images
from jaxdl.pretrained.torchfile import WeightFileError, load_state_dict

QUICK, THOROUGH = 25, 1000
EXAMPLES = pytest.mark.parametrize("examples", [QUICK, pytest.param(THOROUGH, marks=pytest.mark.slow)],
                                   ids=["quick", "thorough"])
MUTATIONS = ("truncate", "flip bits", "overwrite span", "insert bytes", "empty", "random bytes")


def mutated(genuine: bytes, kind: str, seed: int, payload: bytes) -> bytes:
    """`genuine` damaged one way, positions drawn from `seed`."""
    rng = np.random.default_rng(seed)
    where = int(rng.integers(0, len(genuine)))
    if kind == "truncate":
        return genuine[:where]
    if kind == "flip bits":
        damaged = bytearray(genuine)
        for position in rng.integers(0, len(genuine), size=int(rng.integers(1, 9))):
            damaged[position] ^= 1 << int(rng.integers(0, 8))
        return bytes(damaged)
    if kind == "overwrite span":
        return genuine[:where] + payload + genuine[where + len(payload):]
    if kind == "insert bytes":
        return genuine[:where] + payload + genuine[where:]
    if kind == "empty":
        return b""
    return payload


damage = st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 2**32 - 1), st.binary(min_size=1, max_size=64))


def fuzz(examples: int, strategy, check, always=()) -> int:
    """Runs `check` on `examples` cases drawn from `strategy`, and on the `always` cases first (failures
    found earlier, kept as regressions); returns how many drawn cases ran."""
    ran = []

    def property_holds(case):
        ran.append(case)
        check(case)

    for case in always:
        check(case)
    settings(max_examples=examples, deadline=None, derandomize=True, database=None,
             suppress_health_check=list(HealthCheck))(given(strategy)(property_holds))()
    print(f"{len(ran)} examples")
    return len(ran)


def write(tmp_path, name: str, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def assert_names_the_file(error: Exception, path) -> None:
    assert str(path) in str(error) or path.name in str(error), f"{type(error).__name__}: {error}"


# --- .pth (torchvision weights) -------------------------------------------------------------------


@pytest.fixture(scope="module", params=[True, False], ids=["zip", "legacy"])
def genuine_pth(request):
    state = torch.nn.Linear(3, 2).state_dict()
    state.update({"matrix": torch.arange(12.0).reshape(3, 4), "counts": torch.arange(5)})
    buffer = io.BytesIO()
    torch.save(state, buffer, _use_new_zipfile_serialization=request.param)
    return buffer.getvalue(), {name: tensor.numpy() for name, tensor in state.items()}


@EXAMPLES
def test_damaged_pth_files_load_or_raise_a_weight_file_error_naming_the_file(tmp_path, genuine_pth, examples):
    genuine, expected = genuine_pth
    limit = 64 * len(genuine)  # a flipped size cannot make the loader allocate more than this

    def check(case):
        path = write(tmp_path, "weights.pth", mutated(genuine, *case))
        try:
            loaded = load_state_dict(path, max_bytes=limit)
        except WeightFileError as error:
            assert_names_the_file(error, path)
            return
        assert all(isinstance(array, np.ndarray) for array in loaded.values())
        assert sum(array.nbytes for array in loaded.values()) <= limit

    # the two cases that crashed the loader with zipfile's own errors before (see jaxdl/pretrained/torchfile.py)
    found = [("overwrite span", 0, b"\x80"), ("flip bits", 256, b"\x00")]
    assert fuzz(examples, damage, check, always=found) == examples


class Foreign:
    """An object whose pickle calls `function(*arguments)` when loaded: what a hostile checkpoint hides."""

    def __init__(self, function, arguments):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return self.function, self.arguments


crafted_pth = st.fixed_dictionaries({
    "numel": st.integers(0, 2**40), "data_numel": st.integers(0, 64),
    "size": st.lists(st.integers(-3, 2**33), max_size=4), "stride": st.lists(st.integers(-2**40, 2**33), max_size=4),
    "offset": st.integers(-2**40, 2**40), "zip_format": st.booleans(),
    "foreign": st.sampled_from([None, (os.system, ("touch pwned",)), (eval, ("1",)), (getattr, ("text", "upper")),
                                (subprocess.Popen, (["true"],)), (np.frombuffer, (b"\0" * 8,))])})


@EXAMPLES
def test_crafted_pth_layouts_and_globals_are_loaded_within_bounds_or_refused(tmp_path, examples, monkeypatch):
    """Declared sizes, strides and offsets of any value, and pickles calling functions a state dict never
    needs: each loads within its storage and `max_bytes`, or is refused; no code of the file's choosing runs."""
    from tests.pretrained.test_torchfile import Storage, Tensor, write_checkpoint

    monkeypatch.chdir(tmp_path)
    limit = 1 << 20

    def check(case):
        storage = Storage(case["numel"], np.zeros(case["data_numel"], np.float32).tobytes())
        state = {"weight": Tensor(storage, tuple(case["size"]), tuple(case["stride"]), case["offset"])}
        if case["foreign"] is not None:
            state["extra"] = Foreign(*case["foreign"])
        path = write_checkpoint(tmp_path / "crafted.pth", state, case["zip_format"])
        try:
            loaded = load_state_dict(path, max_bytes=limit)
        except WeightFileError as error:
            assert_names_the_file(error, path)
            return
        finally:
            assert not (tmp_path / "pwned").exists()
        assert case["foreign"] is None and sum(array.nbytes for array in loaded.values()) <= limit

    assert fuzz(examples, crafted_pth, check) == examples


# --- images ---------------------------------------------------------------------------------------


def encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A genuine PNG whose header (CRC fixed) declares another size: a decompression bomb's header."""
    genuine = bytearray(encoded("PNG"))
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(genuine[24:29])
    genuine[16:24] = struct.pack(">II", width, height)
    genuine[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(genuine)


image_cases = st.one_of(
    st.tuples(st.sampled_from(["PNG", "JPEG"]), damage),
    st.tuples(st.just("bomb"), st.tuples(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1))))


@EXAMPLES
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own notice; ours refuses
def test_damaged_and_bomb_images_load_or_raise_an_image_error_naming_the_file(tmp_path, examples):
    genuine = {fmt: encoded(fmt) for fmt in ("PNG", "JPEG")}
    max_pixels = 10_000  # the genuine 32x24 images pass; a declared bomb is refused from its header

    def check(case):
        kind, detail = case
        content = png_declaring(*detail) if kind == "bomb" else mutated(genuine[kind], *detail)
        path = write(tmp_path, "photo.png" if kind != "JPEG" else "photo.jpg", content)
        try:
            image = images.load_image(path, max_pixels=max_pixels)
        except images.ImageError as error:
            assert str(error).startswith(str(path)), error
            return
        assert image.mode == "RGB" and image.width * image.height <= max_pixels

    assert fuzz(examples, image_cases, check) == examples


# --- HDF5 (Keras weights): in tests/models/test_mobilenet_v2.py, beside the Keras files its parity tests build ---


# --- sources --------------------------------------------------------------------------------------

feature_values = st.one_of(
    st.none(), st.text(max_size=3), st.integers(-5, 5), st.floats(allow_nan=True),
    st.lists(st.floats(-1, 1), max_size=4).map(np.asarray),
    st.sampled_from([np.zeros(3, np.float32), np.zeros((3, 1), np.float32), np.zeros(3, np.uint8),
                     np.array(["a", "b", "c"]), np.zeros(3, bool)]))
examples_strategy = st.one_of(
    st.dictionaries(st.sampled_from(["image", "label", "x", "other"]), feature_values, max_size=4),
    feature_values, st.tuples(feature_values, feature_values))


@EXAMPLES
def test_any_example_is_read_or_refused_with_a_value_error(examples):
    features = data.Features(("image", "label"), input_shape=(3,))

    def check(example):
        try:
            batch = features(example)
        except ValueError as error:
            assert "feature" in str(error) or "an example is" in str(error), error
            return
        assert batch["x"].shape == (3,) and np.issubdtype(batch["y"].dtype, np.number)

    assert fuzz(examples, examples_strategy, check) == examples
