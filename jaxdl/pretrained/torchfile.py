"""Reads PyTorch state-dict files into numpy arrays without PyTorch, and without running their code.

`torch.save` files are pickles, and unpickling can call any Python function a
file names. Here every global a file asks for is looked up in a short allow
list of what a state dict of tensors needs (`OrderedDict`, the tensor
rebuild functions, the storage types); anything else, such as `os.system`,
is refused before it is called. Both serializations are read: the zip
archive of PyTorch >= 1.6 and the legacy stream of earlier versions.
Written by hand because no maintained library reads these files without
importing torch (and `torch.load(weights_only=True)` needs torch itself).

A file is untrusted input, so nothing it declares is believed before it is
checked. What the unpickler hands the file (allowed globals, storages,
tensors) is `_Sealed`: pickle opcodes cannot change it. Each tensor is checked against its storage once the whole
pickle is read and the tensor's name is known: no negative size, offset or
stride, no stride 0 on a dimension longer than 1, and every element it views
inside the storage. The bytes all of them need are checked against
`max_bytes`; only then are storages read, each exactly as large as it is
declared, from an archive member of that size or the rest of a legacy file,
never inflating more than that. Arrays are built by slicing and indexing,
which cannot reach outside the storage, never by `as_strided`.

`torch.load(weights_only=True)` is the bar to beat. Read in torch 2.13's
`torch/_weights_only_unpickler.py`, and tried on the crafted files of
tests/pretrained/test_torchfile.py, this is what this loader refuses and that one accepts:
- globals: torch allows twelve `torch._utils._rebuild_*` functions (quantized,
  sparse, nested, meta, wrapper-subclass and numpy-backed tensors among them),
  `torch._tensor._rebuild_from_type_v2`, `torch.Tensor` and the tensor and
  storage classes, `torch.nn.Parameter`, `torch.Size`, `torch.device`, the
  dtypes and quantization schemes, `collections.Counter`, `builtins.set`,
  `bytearray` and `complex`, `_codecs.encode`, and whatever
  `torch.serialization.add_safe_globals` adds. This loader allows
  `collections.OrderedDict`, `torch._utils._rebuild_tensor`,
  `_rebuild_tensor_v2` and `_rebuild_parameter`, and the nine storage types.
- BUILD: torch sets the state of tensors (through `set_`), parameters,
  OrderedDicts and instances of any allowed type; this loader only of the
  file's own OrderedDicts (a state dict's `_metadata`).
- stride 0: torch loads a (4096, 4096) tensor of strides (0, 0) over one
  float, as it loads its own `x.expand(...)`; this loader refuses both.
- size: torch.load takes no limit on what a file makes it allocate; this
  loader refuses a file whose tensors need more than `max_bytes`.
Both refuse negative strides and offsets, views past the end of their
storage, storage members of another size than declared (a zip bomb's among
them), and BUILD, SETITEM and APPEND on the allow-listed globals.
"""
from __future__ import annotations

import collections
import io
import math
import os
import pickle
import reprlib
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# The largest checkpoint jaxdl converts, torchvision's MobileNetV2, is 14 MB on disk; it needs 28 MB of
# max_bytes (14 MB of storages read, then 14 MB of arrays returned) and, saved as a zip, 43 KB of
# data.pkl. The caps are far above any real state dict and far below what a crafted file can claim.
MAX_BYTES = 2 * 1024**3
"""Default `max_bytes` of `load_state_dict`: bytes of storages read plus bytes of arrays returned."""
MAX_PICKLE_BYTES = 64 * 1024**2
"""Largest data.pkl of a zip checkpoint read: the pickle holds only names, shapes and storage keys."""
MAX_DIMS = 32
"""Most dimensions of a tensor: what numpy 1 allows (numpy 2 allows 64)."""


class WeightFileError(ValueError):
    """The file is not a readable PyTorch state dict (truncated, corrupt, crafted, or something else)."""


class UnsafePickleError(WeightFileError, pickle.UnpicklingError):
    """The file asks the unpickler for something a state dict never needs; refused before it happens.

    A WeightFileError, so that callers (`jaxdl convert`) report it as they report any bad file.
    """


class _Refused(Exception):  # noqa: N818 - caught in _unpickle, which raises a WeightFileError
    """A refusal inside the unpickler, which does not know the file's path; `_unpickle` names the file."""


class _Sealed:
    """Base of every object the unpickler hands to a file: pickle opcodes cannot change it.

    A file may apply BUILD (set state), SETITEM(S) and APPEND(S) to any object on
    the unpickler's stack, and the allow-listed globals outlive the load: setting
    a storage type's dtype would corrupt every later load in the process. So no
    `__dict__` (`__slots__`) for BUILD to update, and the methods the C unpickler
    calls refuse: `__setstate__` for BUILD (it is called instead of any setattr),
    `__setitem__` for SETITEM(S), `extend` for APPEND(S) (tried before
    `append`); ADDITEMS finds no `add` and fails. What remains for those opcodes
    is the containers the file builds for itself in this load: OrderedDicts take
    BUILD (a state dict's `_metadata`), dicts SETITEM, lists APPEND. (Not
    `dataclass(frozen=True, slots=True)`: it adds a `__setstate__` that sets fields.)
    """

    __slots__ = ()

    def __setstate__(self, state):
        raise _Refused(f"the file sets the state of {self!r} (pickle BUILD); only a state dict's own "
                       "OrderedDicts take state")

    def __setitem__(self, key, value):
        raise _Refused(f"the file sets an item of {self!r} (pickle SETITEM); only a state dict's own "
                       "dicts take items")

    def extend(self, items):
        raise _Refused(f"the file appends to {self!r} (pickle APPEND); only a state dict's own lists "
                       "take items")


class _Global(_Sealed):
    """An allow-listed function or class as the file sees it: calling it calls `function`."""

    __slots__ = ("name", "function")

    def __init__(self, name: str, function):
        self.name, self.function = name, function

    def __call__(self, *args):
        return self.function(*args)

    def __repr__(self):
        return self.name


class _StorageType(_Sealed):
    """torch.FloatStorage and the like: in a persistent id, the dtype of a storage."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name, self.dtype = f"torch.{name}", np.dtype(STORAGE_DTYPES[name])

    def __repr__(self):
        return self.name


class _Storage(_Sealed):
    """A storage of the file, as its persistent id declares it; `data` is read once its tensors are checked."""

    __slots__ = ("dtype", "key", "numel", "data")

    def __init__(self, dtype: np.dtype, key: str, numel: int):
        self.dtype, self.key, self.numel = dtype, key, numel
        self.data: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def __repr__(self):
        return f"storage {self.key}"


class _TensorRef(_Sealed):
    """A tensor as the file declares it: `size` and `stride` in elements of `storage`, from `offset`."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __repr__(self):
        return f"a tensor of size {reprlib.repr(self.size)}"

    def materialize(self) -> np.ndarray:
        """A new array of the tensor's values, once `_checked_nbytes` accepted it and its storage is read.

        Slicing and integer indexing, never `as_strided`: numpy clips slices and
        checks indices, so no tensor reads outside its storage even if a check
        above were wrong.
        """
        data, numel = self.storage.data, math.prod(self.size)
        if numel == 0:
            return np.zeros(self.size, data.dtype)
        if _is_contiguous(self.size, self.stride):
            return data[self.offset:self.offset + numel].reshape(self.size).copy()
        index = np.array(self.offset, np.int64)
        for axis, (n, s) in enumerate(zip(self.size, self.stride)):
            index = index + (np.arange(n, dtype=np.int64) * s).reshape((n,) + (1,) * (len(self.size) - axis - 1))
        return data[index]


def _is_contiguous(size: tuple, stride: tuple) -> bool:
    """Whether the elements are in C order without gaps (torch's rule: size-1 dimensions' strides do not matter)."""
    expected = 1
    for n, s in zip(reversed(size), reversed(stride)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _rebuild_tensor(storage, offset, size, stride, *unused):
    """torch._utils._rebuild_tensor(_v2): the view is recorded here, checked once the tensor's name is known."""
    if not isinstance(storage, _Storage):
        raise _Refused(f"a tensor's storage is {reprlib.repr(storage)}, not a storage of the file")
    if not (type(offset) is int and isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
            and len(size) == len(stride) <= MAX_DIMS and all(type(n) is int for n in (*size, *stride))):
        raise _Refused(f"a tensor of offset {reprlib.repr(offset)}, size {reprlib.repr(size)} and stride "
                       f"{reprlib.repr(stride)}, where integers are needed, one stride per dimension and "
                       f"at most {MAX_DIMS} dimensions")
    return _TensorRef(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(tensor, *unused):
    """torch._utils._rebuild_parameter: a parameter is its tensor here."""
    if not isinstance(tensor, _TensorRef):
        raise _Refused(f"a parameter of {reprlib.repr(tensor)}, not of a tensor")
    return tensor


ALLOWED_GLOBALS = {
    **{(module, name): _Global(f"{module}.{name}", function) for (module, name), function in {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }.items()},
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _StateDictUnpickler(pickle.Unpickler):
    """One pickle of the file: globals from ALLOWED_GLOBALS only, storages collected by key."""

    def __init__(self, file):
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"the file asks for the Python global {module}.{name}, which a state dict of "
                           "tensors never needs; nothing from the file was run") from None

    def persistent_load(self, saved_id):
        """The storage of torch.save's id ("storage", type, key, location, numel[, view]); view is legacy-only."""
        if not (isinstance(saved_id, tuple) and len(saved_id) in (5, 6) and saved_id[0] == "storage"):
            raise _Refused(f"unexpected persistent id {reprlib.repr(saved_id)}")
        storage_type, key, _location, numel = saved_id[1:5]
        if not isinstance(storage_type, _StorageType):
            raise _Refused(f"{reprlib.repr(storage_type)} is not a tensor storage type")
        if not (isinstance(key, str) and type(numel) is int and numel >= 0):
            raise _Refused(f"storage {reprlib.repr(key)} of {reprlib.repr(numel)} values")
        if len(saved_id) == 6 and saved_id[5] is not None:
            raise _Refused(f"storage {key} is a view into another storage, which this reader does not support")
        storage = self.storages.setdefault(key, _Storage(storage_type.dtype, key, numel))
        if (storage.dtype, storage.numel) != (storage_type.dtype, numel):
            raise _Refused(f"storage {key} is declared as {storage.numel} {storage.dtype} values and as "
                           f"{numel} {storage_type.dtype} values")
        return storage


def _unpickle(unpickler: _StateDictUnpickler, path):
    """unpickler.load(), every failure a WeightFileError naming the file."""
    try:
        return unpickler.load()
    except _Refused as refusal:
        raise UnsafePickleError(f"{path}: refused: {refusal}") from None
    # CPython's unpickler allocates a counted bytes or str object before reading it, so a length the file
    # declares but cannot back fails here, unless the allocation succeeds (untouched) and the read falls short.
    except (MemoryError, OverflowError) as error:
        raise WeightFileError(f"{path}: not a readable PyTorch state dict (corrupt or crafted): it declares an "
                              f"object too large to allocate ({type(error).__name__})") from error
    # Besides UnpicklingError and EOFError, a malformed pickle fails in the operations it asks for: TypeError
    # for a wrong call, AttributeError for APPEND or BUILD on a builtin without `extend` or `__dict__`, ...
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise WeightFileError(f"{path}: not a readable PyTorch state dict (truncated or corrupt): "
                              f"{type(error).__name__}: {error}") from error


def _checked_nbytes(path, name, tensor: _TensorRef) -> int:
    """The bytes of the array `tensor` becomes, after checking that it lies inside its storage.

    Stride 0 is refused on dimensions of size > 1. `torch.save` writes it for an
    expanded tensor (`x.expand(...)`), but the parameters and buffers of a module
    are never expanded views, and a stride 0 lets one element of a file stand for
    millions of array elements.
    """
    if not isinstance(name, str):
        raise WeightFileError(f"{path}: a tensor is keyed by {reprlib.repr(name)}, not by a parameter name")
    size, stride, offset, storage = tensor.size, tensor.stride, tensor.offset, tensor.storage
    layout = f"size {reprlib.repr(size)}, stride {reprlib.repr(stride)}, offset {reprlib.repr(offset)}"
    if offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
        raise WeightFileError(f"{path}: tensor {name!r} has a negative size, stride or offset ({layout}); "
                              "corrupt or crafted file")
    if any(s == 0 and n > 1 for n, s in zip(size, stride)):
        raise WeightFileError(f"{path}: tensor {name!r} has stride 0 ({layout}), an expanded view, which a "
                              "state dict never holds; save x.contiguous() instead")
    numel = math.prod(size)
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if numel else 0
    if extent > storage.numel:
        raise WeightFileError(f"{path}: tensor {name!r} ({layout}) needs {extent} values of {storage!r}, "
                              f"which holds {storage.numel} (truncated or corrupt file)")
    return numel * storage.dtype.itemsize


def _storages_of(tensors: dict[str, _TensorRef]) -> dict[str, _Storage]:
    """The storages the tensors view, by key, each once."""
    return {tensor.storage.key: tensor.storage for tensor in tensors.values()}


def _select_tensors(path, unpickled, max_bytes: int) -> dict[str, _TensorRef]:
    """The state dict's tensors by name, checked against their storages and max_bytes; nothing read yet."""
    state = unpickled
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightFileError(f"{path}: holds a {type(state).__name__}, not a state dict")
    tensors = {name: value for name, value in state.items() if isinstance(value, _TensorRef)}
    returned = sum(_checked_nbytes(path, name, tensor) for name, tensor in tensors.items())
    read = sum(storage.nbytes for storage in _storages_of(tensors).values())
    if read + returned > max_bytes:
        raise WeightFileError(f"{path}: refused: its tensors need {read + returned:,} bytes "
                              f"({read:,} of storages read, {returned:,} of arrays returned), above "
                              f"max_bytes={max_bytes:,}; pass a larger max_bytes if the file is genuine")
    return tensors


def _read_storage(archive: zipfile.ZipFile, member: str, storage: _Storage, path) -> np.ndarray:
    """The storage's bytes: refused unless the archive member is as large as declared, and read with at most
    the declared bytes decompressed, whatever the archive says."""
    try:
        info = archive.getinfo(member)
    except KeyError:
        raise WeightFileError(f"{path}: {storage!r} is missing from the archive (no {member})") from None
    if info.file_size != storage.nbytes:
        raise WeightFileError(f"{path}: {storage!r} declares {storage.nbytes:,} bytes, but its archive member "
                              f"{member} holds {info.file_size:,} (corrupt or crafted file)")
    with archive.open(info) as file:
        raw = file.read(storage.nbytes)
    if len(raw) != storage.nbytes:
        raise WeightFileError(f"{path}: {storage!r} is truncated")
    return np.frombuffer(raw, storage.dtype)


def _read_zip(path: Path, select) -> dict[str, _TensorRef]:
    """The tensors of a zip checkpoint, `select`ed from its data.pkl, with their storages read."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pickles:
                raise WeightFileError(f"{path}: a zip file without data.pkl; not a PyTorch checkpoint")
            info = archive.getinfo(pickles[0])
            if info.file_size > MAX_PICKLE_BYTES:
                raise WeightFileError(f"{path}: refused: its {info.filename} holds {info.file_size:,} bytes, "
                                      f"more than the {MAX_PICKLE_BYTES:,} read of a state dict's pickle")
            with archive.open(info) as file:
                pickled = file.read(MAX_PICKLE_BYTES)
            tensors = select(_unpickle(_StateDictUnpickler(io.BytesIO(pickled)), path))
            prefix = pickles[0][: -len("data.pkl")]
            for storage in _storages_of(tensors).values():
                storage.data = _read_storage(archive, f"{prefix}data/{storage.key}", storage, path)
        return tensors
    # zipfile raises BadZipFile, EOFError or zlib.error for damaged data, NotImplementedError for an
    # unknown compression method, RuntimeError for an encrypted member, and UnicodeDecodeError for a
    # member name flagged UTF-8 that is not (found by tests/project/test_fuzz_loaders.py).
    except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError, OSError,
            UnicodeDecodeError) as error:
        raise WeightFileError(f"{path}: damaged zip archive (truncated download?): {error}") from error


def _read_legacy(path: Path, select) -> dict[str, _TensorRef]:
    """The tensors of a legacy checkpoint, `select`ed from its object pickle, with their storages read.

    The file is five pickles (magic number, protocol version, system info, the
    object, its storage keys), then each storage as an int64 count and its bytes.
    """
    with open(path, "rb") as file:
        file_size = os.fstat(file.fileno()).st_size
        if _unpickle(_StateDictUnpickler(file), path) != LEGACY_MAGIC:
            raise WeightFileError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor the legacy format)")
        _unpickle(_StateDictUnpickler(file), path)  # protocol version
        _unpickle(_StateDictUnpickler(file), path)  # system info
        main = _StateDictUnpickler(file)
        tensors = select(_unpickle(main, path))
        keys = _unpickle(_StateDictUnpickler(file), path)
        if not (isinstance(keys, list) and all(isinstance(key, str) for key in keys)):
            raise WeightFileError(f"{path}: its storage keys are {reprlib.repr(keys)}, not a list of strings "
                                  "(corrupt file)")
        needed = _storages_of(tensors)
        for key in keys:
            storage = main.storages.get(key)
            if storage is None:
                raise WeightFileError(f"{path}: storage {key} is listed but never used")
            count_bytes = file.read(8)
            if len(count_bytes) < 8:
                raise WeightFileError(f"{path}: truncated: {storage!r} is missing")
            (count,) = struct.unpack("<q", count_bytes)
            left = file_size - file.tell()
            if count != storage.numel or storage.nbytes > left:
                raise WeightFileError(f"{path}: truncated or corrupt: {storage!r} should hold {storage.numel:,} "
                                      f"values ({storage.nbytes:,} bytes); the file says {count:,}, and has "
                                      f"{left:,} bytes left")
            if key in needed:
                raw = file.read(storage.nbytes)
                if len(raw) != storage.nbytes:
                    raise WeightFileError(f"{path}: truncated: {storage!r}")
                storage.data = np.frombuffer(raw, storage.dtype)
            else:
                file.seek(storage.nbytes, os.SEEK_CUR)
    unwritten = [repr(storage) for storage in needed.values() if storage.data is None]
    if unwritten:
        raise WeightFileError(f"{path}: {', '.join(unwritten)} never written (truncated file?)")
    return tensors


def load_state_dict(path: str | os.PathLike, max_bytes: int = MAX_BYTES) -> collections.OrderedDict[str, np.ndarray]:
    """Parameter name -> numpy array, in the file's order, from a `torch.save`d state dict.

    A file whose tensors need more than `max_bytes` (bytes of storages read plus
    bytes of arrays returned) is refused before anything is allocated. Raises
    FileNotFoundError, or WeightFileError (UnsafePickleError if the file asks for
    more than a state dict needs) with a message that starts with the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weight file at {path}")
    try:
        is_zip = zipfile.is_zipfile(path)
    except zipfile.BadZipFile as error:  # is_zipfile lets some damage through (found by test_fuzz_loaders)
        raise WeightFileError(f"{path}: damaged zip archive (truncated download?): {error}") from error
    read = _read_zip if is_zip else _read_legacy
    tensors = read(path, lambda unpickled: _select_tensors(path, unpickled, max_bytes))
    return collections.OrderedDict((name, tensor.materialize()) for name, tensor in tensors.items())
