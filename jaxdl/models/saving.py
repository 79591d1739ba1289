"""Saving a trained model to a directory and loading it in another process (model export).

A training run's checkpoints (state, position, history) are `jaxdl.training.run_checkpoint`'s.

A model directory holds `model.json` (the model's class and config, plus any
metadata such as class names) and `variables/`, an orbax checkpoint of the
variables. Saving writes into a temporary sibling directory first and renames
it into place, so an interrupted or failed save never damages what was there.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdl.models import class_path, model_config, model_from_config
from jaxdl.models.nnx_modules import is_nnx_module

CONFIG_FILE = "model.json"
VARIABLES_DIR = "variables"


def is_key(leaf) -> bool:
    """Whether `leaf` is a typed random key (a `jax.random.key` array), which orbax cannot write as it is."""
    return jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key)


def keys_as_data(tree):
    """`tree` with its typed random keys as their raw data (`jax.random.key_data`), which a checkpoint can hold:
    an NNX module's `nnx.Rngs` streams carry keys among its variables."""
    return jax.tree.map(lambda leaf: jax.random.key_data(leaf) if is_key(leaf) else leaf, tree)


def keys_like(template, tree):
    """`tree` read back from a checkpoint, as arrays, its raw key data wrapped as keys (of the same
    implementation) wherever `template` holds a key; `keys_as_data`'s inverse."""
    return jax.tree.map(
        lambda like, leaf: jax.random.wrap_key_data(jnp.asarray(leaf), impl=jax.random.key_impl(like))
        if is_key(like) else jnp.asarray(leaf), template, tree)


# --- Flax NNX modules: their whole state as one nested dict of arrays ---------------------------


def _path_keys(tree) -> dict:
    """`{"a/b/c": leaf}` of a nested dict, its keys as strings (a checkpoint gives list indices back as strings)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path): leaf for path, leaf in flat}


def _nnx_saved_variables(module_or_variables) -> dict:
    """An NNX module's variables as one nested dict of arrays (random keys as their raw data), as `save_model`
    writes them: from the module itself (`nnx.state`), or from a state's `variables` (its trained and carried
    parts, which together are the module's whole state)."""
    if is_nnx_module(module_or_variables):
        parts = [nnx.state(module_or_variables)]
    else:
        parts = [module_or_variables["params"], module_or_variables.get("batch_stats", nnx.State({}))]
    merged: dict = {}
    for part in parts:
        _merge_into(merged, nnx.to_pure_dict(part))
    return keys_as_data(merged)


def _merge_into(target: dict, source: dict) -> None:
    for key, value in source.items():
        if isinstance(value, dict):
            _merge_into(target.setdefault(key, {}), value)
        else:
            target[key] = value


def _load_into(module, saved: dict, where: str):
    """Writes `saved` (as `_nnx_saved_variables` gives them, read back from a checkpoint) into `module` in place.

    Raises:
      ValueError: the saved variables are not this module's (another
        structure, or another shape), naming what differs and `where`.
    """
    state = nnx.state(module)
    like_tree = nnx.to_pure_dict(state)
    like, found = _path_keys(like_tree), _path_keys(saved)
    if set(like) != set(found):
        missing, extra = sorted(set(like) - set(found)), sorted(set(found) - set(like))
        raise ValueError(f"{where} holds the variables of another module than the {type(module).__name__} given: "
                         f"missing {missing[:5]}, not in the module {extra[:5]}")
    for path, leaf in like.items():
        expected = jax.random.key_data(leaf).shape if is_key(leaf) else np.shape(leaf)
        if np.shape(found[path]) != expected:
            raise ValueError(f"{where}: {path} has shape {np.shape(found[path])}, the module's {expected}")
    # In the module's own order and dtypes, then its keys wrapped back.
    aligned = [found[path] if is_key(leaf) else np.asarray(found[path], leaf.dtype) for path, leaf in like.items()]
    aligned = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like_tree), aligned)
    nnx.replace_by_pure_dict(state, keys_like(like_tree, aligned))
    nnx.update(module, state)
    return module


def save_variables(directory: str | os.PathLike, variables) -> None:
    """Writes a model's variables (a pytree of arrays) as an orbax checkpoint (the directory must not exist).

    A whole TrainState is refused: its optimizer state would come back as
    plain lists and its random keys cannot be written, so it could not
    resume training. Save `state.variables`.
    """
    import orbax.checkpoint as ocp  # imported when used: it is a fifth of a cached `jaxdl classify` start-up

    if hasattr(variables, "opt_state") and hasattr(variables, "apply_fn"):
        raise TypeError(f"{type(variables).__name__} is a whole training state; jaxdl saves model variables "
                        "(save_variables(directory, state.variables) or save_model), and cannot yet save a "
                        "training state to resume from (optimizer state, step and keys)")
    if any(is_key(leaf) for leaf in jax.tree.leaves(variables)):
        raise TypeError("the variables hold a random key (a jax.random.key array), which a checkpoint of model "
                        "variables does not store; save state.variables, or jax.random.key_data(key) if needed")

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(Path(directory).absolute(), jax.device_get(variables))
        checkpointer.wait_until_finished()


def load_variables(directory: str | os.PathLike):
    import orbax.checkpoint as ocp

    path = Path(directory).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(path)
    return jax.tree.map(np.asarray, restored)


def write_atomically(directory: str | os.PathLike, write, *, overwrite: bool = False) -> Path:
    """Calls `write(tmp_dir)` and moves the result to `directory` only if it succeeded.

    The result is written into a temporary sibling and renamed into place in
    one step, so a reader finds the whole directory or none. A `directory`
    that another process saved while `write` ran is kept, never replaced
    without `overwrite` (the rename refuses an existing target: Linux's
    `renameat2(RENAME_NOREPLACE)`; elsewhere `os.rename`, which refuses a
    non-empty directory). With `overwrite`, the new directory and the old
    one are exchanged in one step (`renameat2(RENAME_EXCHANGE)`), so the path
    never goes missing; where the OS or file system has no exchange, the old
    one is moved away first and there is a moment with no `directory`.

    Args:
        directory: where the result goes; its parent is created if needed.
        write: called with the temporary directory to fill.
        overwrite: replace an existing `directory` (else it is refused).

    Returns:
        The absolute path of `directory`.

    Raises:
        FileExistsError: `directory` exists and `overwrite` is False: before
            `write` is called, or when its result would be moved into place
            (another process saved it meanwhile; its directory is kept, and a
            caller for whom the other's result is as good, as a conversion
            cached on first use, may take it).
    """
    target = Path(directory).absolute()
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(staging)
        _move_into_place(staging, target, overwrite)
    finally:
        if staging.exists():
            _remove(staging)
    return target


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # renameat2(2)'s flags (linux/fs.h)


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """Linux's `renameat2(source, target, flags)`: False where the OS or file system lacks it (EINVAL, ENOSYS)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes  # imported when used: a saved model's reader never renames

    try:
        call = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library older than glibc 2.28
        return False
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd = -100  # AT_FDCWD: the paths are absolute anyway
    if call(at_cwd, os.fsencode(source), at_cwd, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(source), None, str(target))  # EEXIST: FileExistsError, ...


def _move_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    """Renames `staging` to `target`, replacing a target only with `overwrite` (see `write_atomically`)."""
    for _ in range(5):  # a target that comes and goes meanwhile (other processes saving too) is met again
        try:
            _rename_no_replace(staging, target)
            return
        except FileExistsError:
            if not overwrite:
                raise FileExistsError(f"{target} appeared while it was being written (another process saved it "
                                      "meanwhile); it was kept and this one discarded: pass overwrite=True "
                                      "(--overwrite) to replace it") from None
        try:
            exchanged = _renameat2(staging, target, _RENAME_EXCHANGE)
        except FileNotFoundError:  # the target went away meanwhile: rename into its place again
            continue
        if exchanged:
            _remove(staging)  # the previous directory, now at the staging path
            return
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))  # no exchange here
        os.replace(target, old / "previous")
        try:
            os.replace(staging, target)
        except OSError:
            os.replace(old / "previous", target)  # put the previous one back: nothing saved is lost
            raise
        shutil.rmtree(old)
        return
    raise FileExistsError(f"{target} kept changing while it was being replaced (other processes saving it)")


def _rename_no_replace(staging: Path, target: Path) -> None:
    """Renames `staging` to `target`; FileExistsError where `target` exists (an empty one may be replaced
    where renameat2 is missing: POSIX's rename refuses only non-empty directories)."""
    if _renameat2(staging, target, _RENAME_NOREPLACE):
        return
    if target.exists():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    try:
        os.rename(staging, target)
    except OSError as error:
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from error
        raise


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


# Suffixes of single-file model formats: a `save_model` path ending in one would make a directory that looks
# like a file of that format.
FILE_SUFFIXES = (".keras", ".h5", ".hdf5", ".pt", ".pth", ".pkl", ".pickle", ".msgpack", ".npz", ".onnx",
                 ".safetensors", ".json", ".zip")


def _check_directory_name(directory) -> None:
    """Refuses a model directory named like a model file, before anything is written."""
    suffix = Path(directory).suffix.lower()
    if suffix in FILE_SUFFIXES:
        raise ValueError(f"save_model writes a directory (model.json and an orbax checkpoint), not a single file: "
                         f"{str(directory)!r} ends in {suffix!r}, so the directory would look like a {suffix} file; "
                         f"name it without the suffix, e.g. {str(Path(directory).with_suffix(''))!r}")


def save_model(directory: str | os.PathLike, model, variables=None, *, metadata: dict | None = None,
               overwrite: bool = False) -> Path:
    """Saves a trained model, its config and variables, as one directory that `load_model` reads back.

    The model's config (its dataclass fields) goes to `model.json`, the
    variables to an orbax checkpoint beside it. The directory is written
    into a temporary sibling and renamed into place in one step, so a
    reader finds the whole directory or none, and an existing one is never
    replaced unless asked (docs/checkpoints.md). A Linen module of your own
    is saved by its import path; `load_model` then needs the class
    (`custom_classes=[MyModel]`). A Flax NNX module is saved by its class's
    import path and its whole state (`nnx.state`: parameters, batch
    statistics, random streams, your own variables); its constructor's
    arguments are not kept, so `load_model(directory, into=MyModule(...))`
    fills a module your code builds, as Flax's checkpointing guide restores
    into an abstract module.

    Args:
      directory: the model directory to write; its parent is created if
        needed.
      model: the Flax Linen module (jaxdl's or your own) whose fields are
        plain numbers, strings, tuples, mappings (`FrozenDict`), dtypes,
        modules, or functions and classes saved by import path (flax's,
        JAX's and optax's, `act=nn.relu`, or your own defined at the top of
        a module; see `jaxdl.models.model_config`); or a Flax NNX module
        instance.
      variables: the model's variables, e.g. `state.variables` (not a whole
        `TrainState`); for an NNX module, None (default) saves the module's
        own state, and a state's `variables` save those instead.
      metadata: JSON-serializable entries saved with the config (class
        names, preprocessing, ...) and returned by `load_model`; None
        (default) saves none.
      overwrite: replace an existing `directory` (exchanged in one step
        where the OS can); default False.

    Returns:
      The absolute path of `directory`.

    Raises:
      FileExistsError: `directory` exists and `overwrite` is False, before
        anything is written or because another process saved it meanwhile
        (its directory is kept).
      TypeError: `model` is not a Linen module or has a field a config
        cannot hold (a lambda, a closure, a `functools.partial`: the message
        names the field); `variables` is a whole training state or holds a
        random key.
      ValueError: `directory` ends in a file suffix (`m.keras`, `m.h5`):
        jaxdl writes a directory, not Keras's single file.
    """
    _check_directory_name(directory)
    if is_nnx_module(model):
        config = {"class": class_path(type(model)), "family": "nnx", "config": None, "metadata": metadata or {}}
        variables = _nnx_saved_variables(model if variables is None else variables)
    else:
        if variables is None:
            raise TypeError(f"save_model(directory, {type(model).__name__}(...), variables): a Linen module holds no "
                            "variables; pass them (e.g. state.variables)")
        config = {**model_config(model), "metadata": metadata or {}}

    def write(path: Path):
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        save_variables(path / VARIABLES_DIR, variables)

    return write_atomically(directory, write, overwrite=overwrite)


def read_model(directory: str | os.PathLike, custom_classes=()):
    """`(model, metadata)` from a directory written by `save_model`, without reading the variables."""
    path = Path(directory)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} is not a saved jaxdl model: {CONFIG_FILE} is missing")
    try:
        config = json.loads(config_path.read_text())
        if config.get("family") == "nnx":
            raise TypeError(f"it holds a Flax NNX module ({config['class']}), which jaxdl cannot build (its "
                            "constructor's arguments are not saved): load it into one your code builds, "
                            "load_model(directory, into=YourModule(rngs=nnx.Rngs(0)))")
        return model_from_config(config, custom_classes), config.get("metadata", {})
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{config_path} is not a valid jaxdl model config: {error}") from error


def load_model(directory: str | os.PathLike, custom_classes=(), *, into=None):
    """Loads a model saved by `save_model`: the module rebuilt from its config, and its variables.

    It works in any process: nothing of the saving process is needed beyond
    your own model classes, which a config only names; jaxdl never imports
    code that a file names (as Keras's `custom_objects`).

    Args:
      directory: a directory written by `save_model`.
      custom_classes: the Linen classes of your own that the saved model may
        name (including nested modules), and your own functions its fields
        hold (flax's, JAX's and optax's are found without); default none.
      into: for a saved Flax NNX module, an instance of its class to fill
        (built by your code, e.g. `MyModule(rngs=nnx.Rngs(0))`): its
        variables are replaced in place by the saved ones. None (default)
        for a Linen model.

    Returns:
      `(model, variables, metadata)`: the Linen module (or the NNX module
      `into`, filled), its variables as numpy arrays, and the metadata dict
      saved with it.

    Raises:
      FileNotFoundError: `directory` has no `model.json` or no variables
        checkpoint.
      ValueError: `model.json` is not a valid config, or names a class or
        function that is neither jaxdl's, flax's, JAX's, optax's nor among
        `custom_classes`; a saved NNX module
        without `into`, or `into` of another class or other variables; `into`
        with a saved Linen model.
    """
    path = Path(directory)
    config_path = path / CONFIG_FILE
    saved_nnx = config_path.is_file() and json.loads(config_path.read_text()).get("family") == "nnx"
    if into is not None or saved_nnx:
        return _load_nnx(path, into)
    model, metadata = read_model(directory, custom_classes)
    return model, load_variables(path / VARIABLES_DIR), metadata


def _load_nnx(path: Path, into):
    """`load_model` of a saved NNX module: its variables written into `into`."""
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("family") != "nnx":
        raise ValueError(f"load_model(..., into=...) fills a Flax NNX module, but {path} holds a Linen model "
                         f"({config.get('class')}); leave into out")
    if into is None:
        raise ValueError(f"{path} holds a Flax NNX module ({config['class']}), which jaxdl cannot build (its "
                         "constructor's arguments are not saved): pass one your code builds to fill, "
                         "load_model(directory, into=YourModule(rngs=nnx.Rngs(0)))")
    if not is_nnx_module(into) or class_path(type(into)) != config["class"]:
        raise ValueError(f"{path} holds a {config['class']}, but into= is a {class_path(type(into))}")
    variables = load_variables(path / VARIABLES_DIR)
    return _load_into(into, variables, str(path)), variables, config.get("metadata", {})


def fingerprint(directory: str | os.PathLike) -> str:
    """Names, sizes and modification times of a saved model's files: changes whenever it is re-saved."""
    root = Path(directory)
    entries = sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in root.rglob("*") if p.is_file())
    return json.dumps([str(root.absolute()), entries])
