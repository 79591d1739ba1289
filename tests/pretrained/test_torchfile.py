"""jaxdl.pretrained.torchfile against crafted .pth files: each size, stride, archive member and pickle opcode a file
can use to read out of bounds, exhaust memory or corrupt later loads is refused with a clear error."""
import collections
import io
import os
import pickle
import re
import struct
import subprocess
import sys
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest
import torch

from jaxdl import cli
from jaxdl.pretrained import torchfile
from jaxdl.pretrained.torchfile import LEGACY_MAGIC, UnsafePickleError, WeightFileError, load_state_dict

FORMATS = pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])


class Storage:
    """A storage of a crafted file: pickled as torch.save's persistent id, its bytes written as `data`."""

    def __init__(self, numel=4, data=None, key="0"):
        self.numel, self.key = numel, key
        self.data = np.arange(numel, dtype=np.float32).tobytes() if data is None else data


class Tensor:
    """A float tensor of a crafted file, pickled as torch.save pickles one, with any layout."""

    def __init__(self, storage, size, stride, offset=0):
        self.storage, self.size, self.stride, self.offset = storage, size, stride, offset

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, self.offset, self.size, self.stride, False,
                                                 collections.OrderedDict())


class CheckpointPickler(pickle.Pickler):
    """torch.save's pickler: Storage objects become persistent ids, collected in `storages`."""

    def __init__(self, file, zip_format):
        super().__init__(file, protocol=2)
        self.zip_format, self.storages = zip_format, {}

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        self.storages[obj.key] = obj
        saved_id = ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return saved_id if self.zip_format else saved_id + (None,)


def write_checkpoint(path, state, zip_format=True):
    """`state` written in the layout of torch.save, zip or legacy, with its Storage objects' bytes."""
    pickled = io.BytesIO()
    pickler = CheckpointPickler(pickled, zip_format)
    pickler.dump(state)
    if zip_format:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", pickled.getvalue())
            archive.writestr("archive/version", "3\n")
            for storage in pickler.storages.values():
                archive.writestr(f"archive/data/{storage.key}", storage.data)
        return path
    with open(path, "wb") as file:
        for header in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True,
                                            "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(header, file, protocol=2)
        file.write(pickled.getvalue())
        pickle.dump(list(pickler.storages), file, protocol=2)
        for storage in pickler.storages.values():
            file.write(struct.pack("<q", storage.numel) + storage.data)
    return path


def zip_archive(members) -> bytes:
    """A zip archive built field by field from (name, stored bytes, method, crc32, size when extracted),
    so that a header can lie about the size, which zipfile will not write."""
    files, directory = bytearray(), bytearray()
    for name, data, method, crc, size in members:
        name = name.encode()
        directory += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, len(data),
                                 size, len(name), 0, 0, 0, 0, 0, len(files)) + name
        files += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(data), size,
                             len(name), 0) + name + data
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(directory), len(files), 0)
    return bytes(files + directory + end)


def zeros_bomb(mib):
    """(deflate stream, crc32) of `mib` MiB of zero bytes: one full-flushed MiB repeated, ~1 KB each,
    built in milliseconds where compressing the zeros would take seconds."""
    compressor, mebibyte = zlib.compressobj(9, zlib.DEFLATED, -15), bytes(2**20)
    block = compressor.compress(mebibyte) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(mebibyte, crc)
    return block * mib + compressor.flush(), crc


def load_error(path, error=WeightFileError, **kwargs) -> str:
    """The message of the `error` load_state_dict(path) raises, checked to start with the path."""
    with pytest.raises(error) as raised:
        load_state_dict(path, **kwargs)
    message = str(raised.value)
    assert message.startswith(f"{path}: "), message
    return message


def peak_traced_bytes(function) -> int:
    """The most memory Python and numpy allocated and held at once while `function()` ran (tracemalloc)."""
    tracemalloc.start()
    try:
        function()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.fixture(scope="module")
def genuine():
    """Tensors as torch.save writes them: a module's state dict (an OrderedDict whose `_metadata` is set by
    pickle BUILD), views with offsets and strides, a scalar, an empty tensor, integers and booleans."""
    state = torch.nn.Linear(3, 2).state_dict()
    matrix = torch.arange(12.0).reshape(3, 4)
    state.update({"matrix": matrix, "transposed": matrix.t(), "every_other": torch.arange(10.0)[1:9:2],
                  "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "counts": torch.arange(5),
                  "mask": torch.tensor([True, False, True])})
    return state


@pytest.fixture(params=[True, False], ids=["zip", "legacy"])
def genuine_path(request, tmp_path, genuine):
    path = tmp_path / "genuine.pth"
    torch.save(genuine, path, _use_new_zipfile_serialization=request.param)
    return path


def assert_loads_exactly(path, expected):
    loaded = load_state_dict(path)
    assert list(loaded) == list(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.numpy().dtype and loaded[name].shape == tuple(tensor.shape), name
        np.testing.assert_array_equal(loaded[name], tensor.numpy(), err_msg=name)


def test_genuine_files_load_exactly_views_included(genuine_path, genuine):
    assert_loads_exactly(genuine_path, genuine)


@pytest.mark.parametrize("size, stride, offset, problem", [
    ((64,), (-1,), 0, "negative"),  # read 63 floats before the storage
    ((2, 2), (2, -1), 1, "negative"),
    ((4,), (1,), -2, "negative"),  # numpy would read data[-2:], the storage's tail
    ((-1,), (1,), 0, "negative"),
    ((5,), (1,), 0, "needs 5 values of storage 0, which holds 4"),
    ((2, 2), (1, 3), 0, "needs 5 values"),
    ((2,), (1,), 3, "needs 5 values"),
])
def test_views_outside_their_storage_are_refused(tmp_path, size, stride, offset, problem):
    path = write_checkpoint(tmp_path / "strided.pth", {"weight": Tensor(Storage(4), size, stride, offset)})
    message = load_error(path)
    assert "tensor 'weight'" in message and problem in message


def test_a_huge_negative_stride_is_an_error_not_a_crash(tmp_path):
    """Read through as_strided, stride -2**40 points 4 TiB before the storage: a segfault. The load runs in
    a child process, which loads torchfile.py alone: importing the jaxdl package imports jax (~3 s)."""
    path = write_checkpoint(tmp_path / "crash.pth", {"weight": Tensor(Storage(4), (2,), (-2**40,))})
    child = ("import importlib.util, sys\n"
             "spec = importlib.util.spec_from_file_location('torchfile', sys.argv[1])\n"
             "torchfile = sys.modules['torchfile'] = importlib.util.module_from_spec(spec)\n"
             "spec.loader.exec_module(torchfile)\n"
             "try:\n"
             "    torchfile.load_state_dict(sys.argv[2])\n"
             "except torchfile.WeightFileError as error:\n"
             "    print(error)\n")
    result = subprocess.run([sys.executable, "-c", child, torchfile.__file__, str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, f"exit status {result.returncode}: {result.stderr}"
    assert result.stdout.startswith(f"{path}: tensor 'weight' has a negative size, stride or offset")


def test_expanded_tensors_are_refused(tmp_path):
    crafted = write_checkpoint(tmp_path / "expanded.pth",
                               {"weight": Tensor(Storage(1), (4096, 4096), (0, 0))})  # 64 MiB from 4 bytes
    assert "tensor 'weight' has stride 0" in load_error(crafted)
    saved = tmp_path / "torch_expanded.pth"
    torch.save({"bias": torch.zeros(3).expand(2, 3)}, saved)  # torch writes the strides (0, 1) as they are
    assert "tensor 'bias' has stride 0 (size (2, 3), stride (0, 1)" in load_error(saved)


@FORMATS
def test_a_4_tib_tensor_is_refused_before_anything_is_allocated(tmp_path, zip_format):
    numel = 2**40  # float32: 4 TiB, declared by a file of a few hundred bytes holding 16
    path = write_checkpoint(tmp_path / "huge.pth", {"weight": Tensor(Storage(numel, bytes(16)), (numel,), (1,))},
                            zip_format)
    assert path.stat().st_size < 1024
    messages = []
    peak = peak_traced_bytes(lambda: messages.append(load_error(path)))
    assert "refused: its tensors need 8,796,093,022,208 bytes" in messages[0] and "max_bytes" in messages[0]
    assert peak < 2**20


def test_max_bytes_caps_storages_read_plus_arrays_returned(tmp_path):
    path = tmp_path / "small.pth"
    torch.save({"weight": torch.ones(2, 3)}, path)  # 24 bytes of storage read, 24 of array returned
    np.testing.assert_array_equal(load_state_dict(path)["weight"], np.ones((2, 3), np.float32))
    np.testing.assert_array_equal(load_state_dict(path, max_bytes=48)["weight"], np.ones((2, 3), np.float32))
    message = load_error(path, max_bytes=47)
    assert "need 48 bytes (24 of storages read, 24 of arrays returned), above max_bytes=47" in message


def bomb_checkpoint(path, member, inflated_mib, declared_size):
    """A zip checkpoint of one 4-float tensor whose `member` ("data.pkl" or "data/0") is a deflate stream of
    `inflated_mib` MiB of zeros, its headers saying that it holds `declared_size` bytes."""
    pickled = io.BytesIO()
    CheckpointPickler(pickled, zip_format=True).dump({"weight": Tensor(Storage(4, bytes(16)), (4,), (1,))})
    bomb, crc = zeros_bomb(inflated_mib)
    if declared_size != inflated_mib * 2**20:
        crc = zlib.crc32(bytes(declared_size))  # what zipfile checks when it stops after declared_size bytes
    members = []
    for name, data in [("archive/data.pkl", pickled.getvalue()), ("archive/version", b"3\n"),
                       ("archive/data/0", bytes(16))]:
        if name == f"archive/{member}":
            members.append((name, bomb, zipfile.ZIP_DEFLATED, crc, declared_size))
        else:
            members.append((name, data, zipfile.ZIP_STORED, zlib.crc32(data), len(data)))
    path.write_bytes(zip_archive(members))
    return path


@pytest.mark.parametrize("member", ["data/0", "data.pkl"])
def test_a_zip_bomb_is_refused_before_it_is_inflated(tmp_path, member):
    path = bomb_checkpoint(tmp_path / "bomb.pth", member, 300, 300 * 2**20)
    assert path.stat().st_size < 400_000
    messages = []
    peak = peak_traced_bytes(lambda: messages.append(load_error(path)))
    assert f"archive/{member} holds 314,572,800" in messages[0]
    assert peak < 4 * 2**20  # inflating the member would show 300 MiB here


def test_a_zip_header_understating_its_member_inflates_only_what_it_declares(tmp_path):
    path = bomb_checkpoint(tmp_path / "understated.pth", "data/0", 300, 16)
    loaded = []
    peak = peak_traced_bytes(lambda: loaded.append(load_state_dict(path)))
    np.testing.assert_array_equal(loaded[0]["weight"], np.zeros(4, np.float32))
    assert peak < 4 * 2**20  # zipfile's own read() would inflate all 300 MiB, then keep 16 bytes


@pytest.mark.parametrize("zip_format, problem", [
    (True, "storage 0 declares 4,000 bytes, but its archive member archive/data/0 holds 16"),
    (False, "storage 0 should hold 1,000 values (4,000 bytes); the file says 1,000, and has 16 bytes left"),
], ids=["zip", "legacy"])
def test_a_storage_declared_larger_than_its_data_is_refused(tmp_path, zip_format, problem):
    state = {"weight": Tensor(Storage(1000, bytes(16)), (1000,), (1,))}
    assert problem in load_error(write_checkpoint(tmp_path / "short.pth", state, zip_format))


def build_on(global_line: bytes, state) -> bytes:
    """A pickle setting `state` on the allow-listed global `module\\nname\\n`: GLOBAL, the state, BUILD."""
    return b"\x80\x02c" + global_line + pickle.dumps(state, protocol=2)[2:-1] + b"b."


BUILDS = {
    "storage-type": build_on(b"torch\nFloatStorage\n", {"dtype": 5}),  # __dict__.update()
    "storage-type-slots": build_on(b"torch\nFloatStorage\n", (None, {"dtype": 5})),  # setattr()
    "rebuild-function": build_on(b"torch._utils\n_rebuild_tensor_v2\n", (None, {"__defaults__": (0, (4,))})),
    "ordered-dict-class": build_on(b"collections\nOrderedDict\n", {"fromkeys": None}),
}


@pytest.mark.parametrize("poison", BUILDS)
def test_build_on_an_allow_listed_global_is_refused_and_later_loads_are_intact(tmp_path, genuine, genuine_path,
                                                                               poison):
    path = tmp_path / "poison.pth"
    path.write_bytes(BUILDS[poison])
    assert "(pickle BUILD)" in load_error(path, UnsafePickleError)
    assert_loads_exactly(genuine_path, genuine)  # the same process, after the attempt


MUTATIONS = {
    "setitem-storage-type": b"\x80\x02ctorch\nFloatStorage\nK\x01K\x02s.",
    "setitems-ordered-dict-class": b"\x80\x02ccollections\nOrderedDict\n(K\x01K\x02u.",
    "append-rebuild-function": b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nK\x01a.",
    "appends-storage-type": b"\x80\x02ctorch\nFloatStorage\n(K\x01K\x02e.",
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_setitem_and_append_on_anything_but_a_container_are_refused(tmp_path, mutation):
    path = tmp_path / "mutation.pth"
    path.write_bytes(MUTATIONS[mutation])
    message = load_error(path, UnsafePickleError)
    assert re.search(r": refused: the file (sets an item of|appends to) [\w.]+ \(pickle (SETITEM|APPEND)\)", message)


@pytest.mark.parametrize("content", [
    pytest.param({"weight": Tensor("not a storage", (1,), (1,))}, id="tensor-of-a-string"),
    pytest.param({"weight": Tensor(Storage(4), (1.5,), (1,))}, id="size-not-an-integer"),
    pytest.param({"a": Tensor(Storage(4), (4,), (1,)), "b": Tensor(Storage(5), (5,), (1,))}, id="storage-redeclared"),
    pytest.param(b"\x80\x04\x8e" + struct.pack("<Q", 2**42) + b".", id="4-TiB-bytes-object"),
    pytest.param(b"\x80\x02ccollections\nOrderedDict\n)RK\x01a.", id="append-to-an-OrderedDict"),
    pytest.param(b"\x80\x02ctorch\nFloatStorage\n)R.", id="call-a-storage-type"),
    pytest.param(b"\x80\x02X\x06\x00\x00\x00moduleQ.", id="persistent-id-not-a-storage"),
])
def test_every_malformed_file_is_a_weight_file_error_naming_it(tmp_path, content):
    path = tmp_path / "malformed.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        write_checkpoint(path, content)
    load_error(path)


class Exploit:
    def __reduce__(self):
        return os.system, ("echo pwned",)


def test_jaxdl_convert_reports_a_refused_file_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "enable_compilation_cache", lambda: None)  # leaves jax's configuration alone
    evil, out = tmp_path / "evil.pth", tmp_path / "out"
    evil.write_bytes(pickle.dumps({"weight": Exploit()}, protocol=2))
    assert cli.main(["convert", "torchvision", str(evil), str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and not out.exists()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"jaxdl convert: {evil}: refused: "), captured.err
