"""Reads PyTorch state-dict files into numpy arrays without PyTorch, and without running their code.

`torch.save` files are pickles, and unpickling can call any Python function a
file names. Here every global a file asks for is looked up in a short allow
list of what a state dict of tensors needs (`OrderedDict`, the tensor
rebuild functions, the storage types); anything else, such as `os.system`,
is refused before it is called. Both serializations are read: the zip
archive of PyTorch >= 1.6 and the legacy stream of earlier versions.
Written by hand because no maintained library reads these files without
importing torch (and `torch.load(weights_only=True)` needs torch itself).
"""
from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class UnsafePickleError(pickle.UnpicklingError):
    """The file asks for a Python global that a state dict never needs."""


class WeightFileError(ValueError):
    """The file is not a readable PyTorch state dict (truncated, corrupt, or something else)."""


@dataclasses.dataclass
class _Storage:
    dtype: np.dtype
    key: str
    numel: int
    data: np.ndarray | None = None


@dataclasses.dataclass
class _TensorRef:
    """A tensor whose storage bytes may come later in the file (legacy format)."""

    storage: _Storage
    offset: int
    size: tuple
    stride: tuple

    def materialize(self, path) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise WeightFileError(f"{path}: storage {self.storage.key} was never written (truncated file?)")
        extent = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1 if all(self.size) else 0
        if extent > data.size:
            raise WeightFileError(f"{path}: a tensor of shape {self.size} needs {extent} values of storage "
                                  f"{self.storage.key}, which holds {data.size} (truncated or corrupt file)")
        view = np.lib.stride_tricks.as_strided(data[self.offset:], shape=self.size,
                                               strides=[s * data.itemsize for s in self.stride])
        return np.array(view)


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return _TensorRef(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(tensor, requires_grad=False, backward_hooks=None, *unused):
    return tensor


class _StorageType:
    def __init__(self, name):
        self.dtype = np.dtype(STORAGE_DTYPES[name])


ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file, path, load_storage=None):
        super().__init__(file)
        self.path, self.load_storage, self.storages = path, load_storage, {}

    def find_class(self, module, name):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.path}: refused: the file asks for the Python global {module}.{name}, which a "
                "state dict of tensors never needs; nothing from the file was run") from None

    def persistent_load(self, saved_id):
        if not isinstance(saved_id, tuple) or not saved_id or saved_id[0] != "storage":
            raise UnsafePickleError(f"{self.path}: refused: unexpected persistent id {saved_id!r}")
        storage_type, key, _location, numel = saved_id[1:5]
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"{self.path}: refused: {storage_type!r} is not a tensor storage type")
        key = str(key)
        if key not in self.storages:
            storage = _Storage(storage_type.dtype, key, int(numel))
            if self.load_storage is not None:
                storage.data = self.load_storage(storage)
            self.storages[key] = storage
        return self.storages[key]


def _unpickle(unpickler: _StateDictUnpickler, path):
    try:
        return unpickler.load()
    except UnsafePickleError:
        raise
    except (EOFError, pickle.UnpicklingError, struct.error, ValueError, TypeError, IndexError) as error:
        raise WeightFileError(f"{path}: not a readable PyTorch state dict (truncated or corrupt): {error}") from error


def _read_zip(path: Path):
    try:
        archive = zipfile.ZipFile(path)
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pickles:
            raise WeightFileError(f"{path}: a zip file without data.pkl; not a PyTorch checkpoint")
        prefix = pickles[0][: -len("data.pkl")]

        def load_storage(storage: _Storage) -> np.ndarray:
            raw = archive.read(f"{prefix}data/{storage.key}")
            if len(raw) < storage.numel * storage.dtype.itemsize:
                raise WeightFileError(f"{path}: storage {storage.key} is truncated")
            return np.frombuffer(raw, storage.dtype, count=storage.numel)

        with archive.open(pickles[0]) as file:
            result = _unpickle(_StateDictUnpickler(io.BytesIO(file.read()), path, load_storage), path)
        return result
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise WeightFileError(f"{path}: damaged zip archive (truncated download?): {error}") from error


def _read_legacy(path: Path):
    with open(path, "rb") as file:
        header = _StateDictUnpickler(file, path)
        if _unpickle(header, path) != LEGACY_MAGIC:
            raise WeightFileError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor the legacy format)")
        _unpickle(_StateDictUnpickler(file, path), path)  # protocol version
        _unpickle(_StateDictUnpickler(file, path), path)  # system info
        main = _StateDictUnpickler(file, path)
        result = _unpickle(main, path)
        keys = _unpickle(_StateDictUnpickler(file, path), path)
        for key in keys:
            storage = main.storages.get(str(key))
            if storage is None:
                raise WeightFileError(f"{path}: storage {key} is listed but never used")
            count_bytes = file.read(8)
            if len(count_bytes) < 8:
                raise WeightFileError(f"{path}: truncated: storage {key} is missing")
            (count,) = struct.unpack("<q", count_bytes)
            raw = file.read(count * storage.dtype.itemsize)
            if count != storage.numel or len(raw) < count * storage.dtype.itemsize:
                raise WeightFileError(f"{path}: truncated or corrupt: storage {key} should hold "
                                      f"{storage.numel} values")
            storage.data = np.frombuffer(raw, storage.dtype)
    return result


def load_state_dict(path: str | os.PathLike) -> collections.OrderedDict[str, np.ndarray]:
    """Parameter name -> numpy array, in the file's order, from a `torch.save`d state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weight file at {path}")
    result = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
    if isinstance(result, dict) and "state_dict" in result and isinstance(result["state_dict"], dict):
        result = result["state_dict"]
    if not isinstance(result, dict):
        raise WeightFileError(f"{path}: holds a {type(result).__name__}, not a state dict")
    return collections.OrderedDict(
        (name, value.materialize(path)) for name, value in result.items() if isinstance(value, _TensorRef))
