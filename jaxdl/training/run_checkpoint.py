"""The checkpoint of a `fit` run: everything it holds, and everything compared before it is continued.

One description, `RunConfig`, says what must be equal for a checkpoint to
continue a run (the model, optimizer, loss, batch size, data order, the
data's identity, each callback's class and settings, ...); it is written into
every checkpoint and checked against the new call before anything is loaded,
so what is saved and what is compared cannot drift apart. `Position` says
where in the run a checkpoint stands. `RunCheckpoints` writes and reads them
with orbax's `CheckpointManager` (asynchronously: training goes on while the
files are written), names a failed save, and cleans up after any exit.

Checkpoint ids count batches seen (epoch * batches per epoch + batches done),
so they only grow along a run; a run over data of another size is refused
by the config, never mixed into the same directory.

Paths are `etils.epath` paths (orbax's own), so `gs://` and other remote
directories stay remote; only process 0 moves an unreadable checkpoint aside, and only one
whose bytes are shown to be bad (`bytes_are_bad`): an access error is raised as it is.

What this module leaves to others: when to save (the run, `jaxdl.training.trainer`),
and how a train state is built (`jaxdl.training.steps`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import time
import types
import warnings
from typing import TYPE_CHECKING, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdl.data.arrays import positive_int
from jaxdl.models.saving import keys_as_data, keys_like
from jaxdl.training import metrics as metric_sums
from jaxdl.training.epoch_loop import Resume

if TYPE_CHECKING:
    from jaxdl.training.adapters import InputAdapter
    from jaxdl.training.plan import RunPlan


class CheckpointSaveError(RuntimeError):
    """Writing a run's checkpoint failed; the checkpoints before it are intact.

    `state` and `history` hold the run as it stood when the error surfaced,
    so the trained state is not lost with the save.
    """

    def __init__(self, message: str, *, state=None, history=None):
        super().__init__(message)
        self.state, self.history = state, history


def as_path(directory):
    """`directory` as an `etils.epath.Path`: local paths made absolute, `gs://...` and the like left remote."""
    from etils import epath

    path = epath.Path(directory)
    return path if "://" in os.fspath(directory) else epath.Path(os.path.abspath(os.fspath(directory)))


# --- what is compared -------------------------------------------------------------------------


def callback_description(callback) -> dict:
    """A callback's class and settings (`Callback.settings()`): saved, and compared on resume.

    jaxdl's own callbacks are named by class name, as `model_config` names
    jaxdl's models, so that a run checkpoint does not depend on the module
    jaxdl keeps them in; any other class by `module.QualifiedName`.
    """
    settings = callback.settings() if hasattr(callback, "settings") else {}
    cls = type(callback)
    name = cls.__qualname__ if cls.__module__.startswith("jaxdl.") else f"{cls.__module__}.{cls.__qualname__}"
    return {"class": name, "settings": json.loads(json.dumps(settings, default=str))}


def _plain_values(value, path: str, found: list, seen: set, depth: int = 0) -> None:
    """Appends `(path, value)` for every plain value reachable from `value` through closures, partials, tuples,
    lists and dicts: numbers, strings, dtypes and small arrays, each under a path naming where it was found
    (`scale.step_size`: the `step_size` a function made by optax's `scale` closes over). Other objects are
    recorded by their type's name, never by their `repr` (which may hold an address)."""
    if len(found) >= 256 or depth > 12:
        return
    if value is None or isinstance(value, (bool, int, float, str)):
        found.append((path, value))
    elif isinstance(value, (np.ndarray, np.generic, jax.Array)):
        array = np.asarray(value)
        found.append((path, array.tolist() if array.size <= 16 else f"{array.dtype} array of shape {array.shape}"))
    elif isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        found.append((path, str(np.dtype(value))))
    elif isinstance(value, type) and isinstance(getattr(value, "dtype", None), np.dtype):  # jnp.bfloat16
        found.append((path, str(value.dtype)))
    elif id(value) in seen:
        return
    elif isinstance(value, types.FunctionType):
        seen.add(id(value))
        owner = value.__qualname__.split(".")[0]  # the factory that made it: `scale` for optax.scale's update
        for name, cell in zip(value.__code__.co_freevars, value.__closure__ or ()):
            with contextlib.suppress(ValueError):  # a cell not filled yet
                _plain_values(cell.cell_contents, f"{owner}.{name}", found, seen, depth + 1)
    elif isinstance(value, functools.partial):
        seen.add(id(value))
        _plain_values((value.func, value.args, value.keywords), path, found, seen, depth + 1)
    elif isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple: optax's GradientTransformation
        seen.add(id(value))
        for field in value._fields:
            _plain_values(getattr(value, field), path, found, seen, depth + 1)
    elif isinstance(value, (tuple, list)):
        seen.add(id(value))
        for index, item in enumerate(value):
            _plain_values(item, f"{path}[{index}]", found, seen, depth + 1)
    elif isinstance(value, dict):
        seen.add(id(value))
        for key, item in value.items():
            _plain_values(item, f"{path}[{key!r}]", found, seen, depth + 1)
    else:
        found.append((path, type(value).__qualname__))


def _named_values(value) -> dict:
    """`_plain_values` as `{path: value}` (JSON): a path met again with another value gets a number."""
    found: list = []
    _plain_values(value, "", found, set())
    named: dict = {}
    for path, item in found:
        key, number = path, 1
        while key in named and named[key] != item:
            number += 1
            key = f"{path} ({number})"
        named[key] = item
    return json.loads(json.dumps(named, default=str))


def optimizer_probe(optimizer) -> list[float] | None:
    """Where three steps of `optimizer` take a probe's two parameters (on the CPU), or None where it cannot.

    Optax keeps a learning rate and the like in closures, not in the
    optimizer state: the steps on a fixed probe show them (Adam(1e-3) and
    Adam(1e-1) go apart from the first step, SGD and SGD with momentum from
    the second), and the same optimizer built again in another process steps
    alike. An optimizer that cannot take a one-leaf tree (labels or a mask
    per parameter, extra arguments) gives None: its hyperparameters are
    compared as `_named_values` reads them.
    """
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # no CPU backend in this process: the default device
        cpu = None
    try:
        with jax.default_device(cpu) if cpu is not None else contextlib.nullcontext():
            params = {"probe": np.asarray([0.5, -1.5], np.float32)}
            state = optimizer.init(params)
            for gradient in ([0.25, -0.5], [-1.0, 0.75], [0.5, 0.5]):
                updates, state = optimizer.update({"probe": np.asarray(gradient, np.float32)}, state, params)
                params = optax.apply_updates(params, updates)
            return [float(value) for value in np.asarray(params["probe"])]
    except Exception:  # noqa: BLE001 - any optimizer may refuse the probe, in its own way
        return None


def function_description(function) -> dict:
    """A function of yours as a run checkpoint records it: its name, module and qualified name, and a digest of
    its code and of the plain values it closes over (a threshold given to a factory of metrics), so that the
    same function defined again in another process is the same, and another one of the same name is not."""
    digest = hashlib.sha256()
    code = getattr(function, "__code__", None)

    def feed(code, doc=None):
        digest.update(code.co_code + repr(code.co_names).encode())
        for constant in code.co_consts:
            if isinstance(constant, types.CodeType):
                feed(constant)
            elif isinstance(constant, frozenset):  # a set's order depends on the process's string hashing
                digest.update(repr(sorted(map(repr, constant))).encode())
            elif doc is None or constant is not doc:  # its docstring may change
                digest.update(repr(constant).encode())

    if code is not None:
        feed(code, function.__doc__)
    closed_over = _named_values((function, getattr(function, "__defaults__", None)))
    digest.update(json.dumps(closed_over, sort_keys=True).encode())
    return {"name": metric_sums.name_of(function),
            "function": f"{getattr(function, '__module__', None)}.{getattr(function, '__qualname__', None)}",
            "code": digest.hexdigest()[:16]}


def metric_description(metric):
    """A metric as a run checkpoint records it: a built-in's name (with its settings), a function's description."""
    found = metric_sums.get_metric(metric)
    return function_description(metric) if found.reads_batch else found.description()


def run_config(model, state, plan: RunPlan, inputs: InputAdapter, callbacks: Sequence) -> dict:
    """What must be equal for a checkpoint to continue this run (JSON): a difference is named, not loaded.

    Read from the model and state (the optimizer: its state's structure, the
    hyperparameters its functions close over, its steps on a probe), the
    run's plan (loss, metrics, batch size, seed, ...), the input adapter (its
    kind, size, order and identity) and the callbacks' settings.
    """
    from jaxdl.models import model_config

    try:
        described = model_config(model) if model is not None else None
    except (TypeError, ValueError):  # a module whose config is not plain data: its class names it
        described = type(model).__name__
    shapes = [list(np.shape(leaf)) for leaf in jax.tree.leaves(state.opt_state)]
    return {"model": json.loads(json.dumps(described, default=str)),
            "parameters": [list(np.shape(leaf)) for leaf in jax.tree.leaves(state.params)],
            "optimizer": f"{jax.tree.structure(state.opt_state)} {shapes}",
            "input_shape": list(state.input_shape), "batch_size": plan.batch_size, "seed": plan.seed,
            "shuffle": inputs.shuffle, "drop_remainder": inputs.drop_remainder, "loss": plan.loss_description(),
            "metrics": [metric_description(metric) for metric in plan.metrics],
            "checkpoint_every": plan.every_steps, "train_flag": plan.train_flag,
            "data": inputs.kind, "examples": inputs.num_examples, "batches_per_epoch": inputs.batches_per_epoch,
            "validation_split": inputs.validation_split, "data_fingerprint": inputs.fingerprint(),
            "callbacks": [callback_description(c) for c in callbacks],
            "prng_impl": str(jax.random.key_impl(state.dropout_rng)),
            "optimizer_hyperparameters": _named_values(state.tx), "optimizer_probe": optimizer_probe(state.tx)}


# The optimizer's hyperparameters: what `resume_with_new_optimizer=True` lets differ.
OPTIMIZER_HYPERPARAMETERS = ("optimizer_hyperparameters", "optimizer_probe")
# Recorded by later versions of jaxdl: a checkpoint written before one was recorded is not compared on it.
_RECORDED_LATER = ("prng_impl", *OPTIMIZER_HYPERPARAMETERS)


def _same(key: str, saved, now) -> bool:
    if key == "optimizer_probe" and saved is not None and now is not None:
        # The same steps computed on another processor differ by a few roundings (a square root, a division,
        # FMA contraction); 1e-5 relative is ~80 float32 eps, and another hyperparameter moves them far more.
        return len(saved) == len(now) and bool(np.allclose(saved, now, rtol=1e-5, atol=1e-7, equal_nan=True))
    return saved == now


def check_same_run(saved: dict | None, current: dict, directory, new_optimizer: bool = False) -> bool:
    """Refuses a checkpoint whose config differs from this call's, naming every difference.

    Keys of another PRNG implementation (`jax_default_prng_impl`) are
    refused first, by name: their data has another shape, and the run's
    random numbers (dropout, shuffling) would not be those of the saved run.
    A checkpoint written before jaxdl recorded the implementation (or the
    optimizer's hyperparameters) is not compared on it.

    Args:
        saved: the config saved in the checkpoint (None when it has none).
        current: this call's (`run_config`).
        directory: the checkpoint directory, for the messages.
        new_optimizer: accept other optimizer hyperparameters (a learning
            rate); the structure of its state must still be the same.

    Returns:
        Whether the optimizer's hyperparameters differ (accepted with
        `new_optimizer`).

    Raises:
        ValueError: naming the PRNG implementations, or every difference.
    """
    if not isinstance(saved, dict):
        raise ValueError(f"{directory} holds checkpoints that jaxdl's fit did not write; pass another "
                         "checkpoint_dir")
    saved_impl, impl = saved.get("prng_impl"), current.get("prng_impl")
    if saved_impl is not None and saved_impl != impl:
        raise ValueError(f"the checkpoint in {directory} was saved with {saved_impl} keys and this call's keys are "
                         f"{impl} (jax_default_prng_impl): to resume it, call "
                         f"jax.config.update('jax_default_prng_impl', '{saved_impl}') (or set "
                         f"JAX_DEFAULT_PRNG_IMPL={saved_impl}) before fit; or pass another checkpoint_dir")
    differences = [key for key in current if (saved.get(key) is not None or key not in _RECORDED_LATER)
                   and not _same(key, saved.get(key), current[key])]
    optimizer_differs = any(key in OPTIMIZER_HYPERPARAMETERS for key in differences)
    if new_optimizer:
        differences = [key for key in differences if key not in OPTIMIZER_HYPERPARAMETERS]
    if differences:
        if "optimizer_hyperparameters" in differences and "optimizer_probe" in differences:
            differences.remove("optimizer_probe")  # the named hyperparameters say it
        named = "; ".join(f"{key}: {_described_difference(key, saved.get(key), current[key])}"
                          for key in differences)
        accept = (", or pass resume_with_new_optimizer=True to go on from the saved state with this call's "
                  "optimizer" if set(differences) <= set(OPTIMIZER_HYPERPARAMETERS) else "")
        raise ValueError(f"the checkpoint in {directory} is of another run ({named}); pass another "
                         f"checkpoint_dir, or delete it to start afresh{accept}")
    return optimizer_differs


def _described_difference(key: str, saved, now) -> str:
    """One key's difference: named entries for the optimizer's hyperparameters and the metrics, else the JSON."""
    if key == "optimizer_hyperparameters":
        absent = "(absent)"
        changed = [f"{name} saved {saved.get(name, absent)}, now {now.get(name, absent)}"
                   + (" (minus the learning rate)" if name.endswith("step_size") else "")
                   for name in [*now, *(name for name in saved if name not in now)]
                   if saved.get(name, absent) != now.get(name, absent)]
        more = f"; and {len(changed) - 6} more" if len(changed) > 6 else ""
        return "; ".join(changed[:6]) + more
    if key == "optimizer_probe":
        return (f"its steps on a probe go elsewhere (saved {saved}, now {now}): another learning rate or "
                "hyperparameter")
    if key == "metrics" and isinstance(saved, list):
        return _metrics_difference(saved, now)
    return _difference(saved, now)


def _metrics_difference(saved: list, now: list) -> str:
    """Which metrics differ, by name: added, removed, or of another function or setting under one name."""
    def by_name(entries):
        return {entry if isinstance(entry, str) else entry.get("name"): entry for entry in entries}

    before, after = by_name(saved), by_name(now)
    named = [f"{name!r} is another metric than the saved run's ({_difference(before[name], after[name])})"
             for name in after if name in before and before[name] != after[name]]
    named += [f"{name!r} is new" for name in after if name not in before]
    named += [f"{name!r} is gone" for name in before if name not in after]
    return "; ".join(named) or f"the same metrics in another order (saved {list(before)}, now {list(after)})"


def _difference(saved, now) -> str:
    """`saved X, now Y`, each shown around where their JSON texts first differ."""
    saved_text, now_text = json.dumps(saved, default=str), json.dumps(now, default=str)
    first = next((i for i, (a, b) in enumerate(zip(saved_text, now_text)) if a != b),
                 min(len(saved_text), len(now_text)))
    start = max(first - 40, 0)

    def around(text):
        return ("..." if start else "") + text[start:first + 40] + ("..." if len(text) > first + 40 else "")

    return f"saved {around(saved_text)}, now {around(now_text)}"


# --- what is held -----------------------------------------------------------------------------


def arrays_of(state) -> dict:
    """What a checkpoint keeps of a train state: everything training changes (keys as their raw data)."""
    arrays = {"params": state.params, "opt_state": state.opt_state, "batch_stats": keys_as_data(state.batch_stats),
              "step": state.step, "dropout_key": jax.random.key_data(state.dropout_rng)}
    if state.dynamic_scale is not None:  # float16's loss scale and its count of finite steps
        arrays["loss_scale"] = {"scale": state.dynamic_scale.scale, "fin_steps": state.dynamic_scale.fin_steps}
    return arrays


def with_arrays(state, arrays: dict):
    """`state` with a checkpoint's arrays (its model, optimizer and frozen variables are the caller's)."""
    key = jax.random.wrap_key_data(jnp.asarray(arrays["dropout_key"]), impl=jax.random.key_impl(state.dropout_rng))

    def as_device(tree):
        return jax.tree.map(jnp.asarray, tree)

    scale = state.dynamic_scale
    if scale is not None:
        scale = scale.replace(**as_device(arrays["loss_scale"]))
    return state.replace(params=as_device(arrays["params"]), opt_state=as_device(arrays["opt_state"]),
                         batch_stats=keys_like(state.batch_stats, arrays["batch_stats"]),
                         step=jnp.asarray(arrays["step"], jnp.int32),
                         dropout_rng=key, dynamic_scale=scale)


def with_hyperparameters_of(state, opt_state):
    """`state` whose `optax.inject_hyperparams` states hold the hyperparameters of `opt_state` (same structure)."""
    injected = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)

    def is_injected(node) -> bool:
        return isinstance(node, injected)

    def take(restored, fresh):
        return restored._replace(hyperparams=fresh.hyperparams) if is_injected(restored) else restored

    return state.replace(opt_state=jax.tree.map(take, state.opt_state, opt_state, is_leaf=is_injected))


def _tree_like(state, totals: dict, meta: dict) -> dict:
    """The structure of a checkpoint's arrays, for orbax to restore into."""
    like = {"state": arrays_of(state), "previous": arrays_of(state), "totals": totals,
            "callbacks": {key: arrays_of(state) for key in meta.get("kept_callbacks", [])}}
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(np.shape(leaf), np.asarray(leaf).dtype), like)


# --- writing and reading ----------------------------------------------------------------------


def _is_first_process() -> bool:
    """Process 0 alone changes the directory (moves, deletes) where every process reads it."""
    return jax.process_index() == 0


# tensorstore's status codes (its errors are `ValueError("CODE: ...")`) that say the bytes read are bad:
# a checksum or a decoding failed, a file is shorter than its index says, a file the index names is missing.
# Every other code is raised as it is: access (PERMISSION_DENIED, UNAUTHENTICATED, UNAVAILABLE, DEADLINE_EXCEEDED)
# or a meaning not known to be the bytes'.
_BAD_BYTES_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND")


def bytes_are_bad(error: BaseException) -> bool:
    """Whether a checkpoint's read failed on its own bytes (so it is moved aside), not on access to them.

    Bad bytes: JSON metadata that does not parse (`JSONDecodeError`,
    `UnicodeDecodeError`), a file of the checkpoint missing
    (`FileNotFoundError`: it is incomplete), and tensorstore's `DATA_LOSS`
    (a checksum or a decoding failed), `OUT_OF_RANGE` (a file shorter than
    its index says) and `NOT_FOUND`. Anything else, access above all
    (`PermissionError`, tensorstore's `PERMISSION_DENIED`, `UNAUTHENTICATED`,
    `UNAVAILABLE`, `DEADLINE_EXCEEDED`) and errors of unknown meaning, says
    nothing shown about the bytes: the checkpoint may well be good.

    Args:
        error: what orbax raised reading one checkpoint.

    Returns:
        True when the checkpoint's bytes are shown to be bad.
    """
    if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError, IsADirectoryError,
                          NotADirectoryError)):
        return True
    if isinstance(error, OSError):  # EACCES, EPERM, EIO, a timeout, a connection: the bytes were not read
        return False
    code = str(error).split(":", 1)[0].strip() if isinstance(error, ValueError) else ""
    return code in _BAD_BYTES_CODES


class CheckpointStore:
    """Saves and restores a training run in `directory` with orbax's `CheckpointManager`.

    Each checkpoint is one step of the run: `tree` (the train state's arrays,
    the fallback state, the epoch's running sums, callbacks' arrays) and
    `meta` (JSON: where in the run it was taken, the history, callbacks'
    counters, the run's config). Orbax writes into a temporary directory and
    renames it when complete, so a crash during a save leaves the previous
    checkpoint as the latest; `keep` checkpoints are kept. Saves are
    asynchronous: training goes on while the files are written. A save that
    fails is a `CheckpointSaveError` naming the directory and the cause, with
    its temporary directory removed.
    """

    def __init__(self, directory, keep: int = 3):
        import orbax.checkpoint as ocp

        keep = positive_int("keep", keep)
        self.directory = as_path(directory)
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("tree", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                                 cleanup_tmp_directories=True))  # saves a crash cut short
        self.closed = False

    def save(self, step: int, tree, meta: dict) -> None:
        """Starts writing checkpoint `step`; the arrays are copied to the host first, so training may go on."""
        ocp = self._ocp
        meta = json.loads(json.dumps(meta))  # a copy: the save is written later, and the run goes on changing it
        with _naming_failures(self, f"starting checkpoint {step}"):
            self.manager.save(step, args=ocp.args.Composite(tree=ocp.args.StandardSave(jax.device_get(tree)),
                                                             meta=ocp.args.JsonSave(meta)), force=True)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps(), reverse=True)

    def restore(self, like: Callable, check: Callable) -> tuple[dict, dict] | None:
        """`(meta, tree)` of the newest readable checkpoint, or None when the directory has none.

        `check(meta)` raises when the checkpoint belongs to another run (that
        error propagates); `like(meta)` gives the tree's structure. A
        checkpoint whose own bytes are shown to be bad (`bytes_are_bad`:
        truncated, corrupted, incomplete) is moved aside as `unreadable-N`
        with a warning naming it, and the one before it is tried. Any other
        error (permissions, credentials, a network) is raised as it is, with
        a note naming the checkpoint, which is left in place.

        Args:
            like: `like(meta)` gives the structure of the checkpoint's arrays.
            check: `check(meta)` raises when the checkpoint is of another run.

        Returns:
            `(meta, tree)`, or None when the directory holds no checkpoint.

        Raises:
            ValueError: when no checkpoint can be read, naming them; and when
                the directory holds only checkpoints moved aside before, naming
                them (the run is not started afresh over them: take them out
                of the directory to do so).
        """
        ocp = self._ocp
        steps = self.steps()
        for step in steps:
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            except Exception as error:  # noqa: BLE001 - orbax, tensorstore and JSON each raise their own kinds
                self._unreadable(step, error)
                continue
            check(meta)
            try:
                tree = self.manager.restore(step, args=ocp.args.Composite(
                    tree=ocp.args.StandardRestore(like(meta)))).tree
            except Exception as error:  # noqa: BLE001 - orbax and tensorstore each raise their own kinds
                self._unreadable(step, error)
                continue
            return meta, tree
        aside = self.moved_aside()
        afresh = ("the run is not started afresh over them: move them out of the directory (or delete them) to "
                  "start it afresh, or pass another checkpoint_dir")
        if steps:
            moved = f" (moved aside as {', '.join(aside)}, as the warnings say)" if aside else ""
            raise ValueError(f"none of the checkpoints in {self.directory} ({', '.join(map(str, steps))}) can be "
                             f"read{moved}; {afresh}")
        if aside:
            raise ValueError(f"{self.directory} holds only checkpoints moved aside as unreadable "
                             f"({', '.join(aside)}), no checkpoint to resume from; {afresh}")
        return None

    def moved_aside(self) -> list[str]:
        """The names of the checkpoints moved aside as unreadable (`unreadable-N`), oldest first."""
        if not self.directory.exists():
            return []
        names = [entry.name for entry in self.directory.iterdir() if entry.name.startswith("unreadable-")]
        return sorted(names, key=lambda name: (len(name), name))

    def _unreadable(self, step: int, error: Exception) -> None:
        """Moves a checkpoint whose bytes are bad aside (kept for inspection); raises any other error as it is."""
        bad = self.directory / str(step)
        if not bytes_are_bad(error):
            error.add_note(f"checkpoint {bad} could not be read, for a reason not shown to be its bytes (access, "
                           "credentials, a network); it was left in place: fix the cause and call fit again")
            raise error
        aside = self.directory / f"unreadable-{step}"
        warnings.warn(f"checkpoint {bad} cannot be read ({type(error).__name__}: {str(error)[:200]}); moved to "
                      f"{aside}, trying the one before it", RuntimeWarning, stacklevel=4)
        if _is_first_process() and bad.exists() and not aside.exists():  # one process moves it, for all
            bad.rename(aside)
        self.manager.reload()

    def close(self) -> None:
        """Waits for the last save to be written (a failure named, as `save` names it), then closes."""
        if self.closed:
            return
        self.closed = True
        try:
            with _naming_failures(self, "finishing the last save"):
                self.manager.wait_until_finished()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - closing after a failed save: the save's error is the one to see
                pass

    def close_quietly(self) -> BaseException | None:
        """`close`, for a run that is ending with another error: returns the save's failure instead of raising."""
        try:
            self.close()
        except Exception as error:  # noqa: BLE001 - whatever the save raised is returned, not raised
            return error
        return None

    def remove_temporary(self) -> None:
        """Deletes what a failed save left half-written (orbax's `*.orbax-checkpoint-tmp*` directories).

        Orbax's background threads may still be writing into them when the
        failure surfaces: they are waited for first (their failure is the
        one being reported), and a removal that races a last write is tried
        again (seen under load: ENOTEMPTY from the tree removal).
        """
        if not _is_first_process() or not self.directory.exists():
            return
        with contextlib.suppress(Exception):
            self.manager.wait_until_finished()
        for entry in self.directory.iterdir():
            if "orbax-checkpoint-tmp" not in entry.name:
                continue
            for attempt in range(3):
                try:
                    entry.rmtree() if entry.is_dir() else entry.unlink()
                    break
                except OSError:
                    if attempt == 2:
                        raise
                    time.sleep(0.2)


@contextlib.contextmanager
def _naming_failures(checkpoints: CheckpointStore, what: str):
    """Turns any failure of a save into a `CheckpointSaveError` naming the directory, cleaning up after it."""
    try:
        yield
    except CheckpointSaveError:
        raise
    except Exception as error:  # orbax, tensorstore and the file system each raise their own
        checkpoints.remove_temporary()
        kept = checkpoints.steps()
        raise CheckpointSaveError(
            f"saving a checkpoint of the run in {checkpoints.directory} failed ({type(error).__name__}: "
            f"{error}); the checkpoints saved before it ({', '.join(map(str, kept)) or 'none'}) are intact, and "
            f"the half-written one was removed (the failure surfaced while {what})") from error


@dataclasses.dataclass
class RunCheckpoints:
    """What `fit` saves of a run and takes back: its state, position, history and callbacks' state.

    `config` (see `run_config`) is saved with every checkpoint and compared
    before one is restored. Callbacks' saved states are matched by their
    place in a list whose classes and settings the config has already
    checked to be the same. With `new_optimizer`, a checkpoint whose
    optimizer had other hyperparameters is resumed with this call's: its
    state (moments, step count) is restored, and the hyperparameters that
    `optax.inject_hyperparams` keeps in the state are this call's.
    """

    saver: CheckpointStore
    callbacks: Sequence
    plan: RunPlan
    batches_per_epoch: int
    config: dict
    restored: tuple | None = None
    new_optimizer: bool = False

    @property
    def directory(self):
        return self.saver.directory

    def restore(self, run, previous, zero_totals: dict):
        """Puts the newest readable checkpoint into `run`; returns `(previous, Resume or None)`."""
        optimizer_differs = []

        def check(meta):
            optimizer_differs.append(check_same_run(meta.get("config"), self.config, self.saver.directory,
                                                    self.new_optimizer))

        self.restored = self.saver.restore(lambda meta: _tree_like(run.state, zero_totals, meta), check)
        if self.restored is None:
            return previous, None
        meta, tree = self.restored
        fresh = run.state.opt_state
        run.state, previous = with_arrays(run.state, tree["state"]), with_arrays(run.state, tree["previous"])
        if optimizer_differs[-1]:  # resumed with a new optimizer: its own injected hyperparameters
            run.state, previous = (with_hyperparameters_of(state, fresh) for state in (run.state, previous))
        run.history, run.resumed_epoch, run.stop_training = meta["history"], meta["epoch"], meta["stop_training"]
        run.resumed_batches = meta["batches_done"]
        if not meta["batches_done"]:
            return previous, None
        totals = jax.tree.map(jnp.asarray, tree["totals"])
        return previous, Resume(meta["batches_done"], meta["start_step"], totals, int(totals["accepted_steps"]))

    def restore_callbacks(self, run) -> None:
        """Callbacks' counters, after their `on_train_begin` reset them."""
        if self.restored is None:
            return
        meta, tree = self.restored
        for index, (callback, values) in enumerate(zip(self.callbacks, meta["callbacks"])):
            kept = tree["callbacks"].get(str(index))
            callback.restore_checkpoint_state(values, None if kept is None else with_arrays(run.state, kept))

    def save(self, run, previous, totals, epoch: int, batches_done: int, start_step: int, state=None) -> None:
        state = run.state if state is None else state
        meta = {"config": self.config, "epoch": epoch, "batches_done": batches_done, "start_step": start_step,
                "history": run.history, "stop_training": run.stop_training and not batches_done, "callbacks": []}
        kept = {}
        for index, callback in enumerate(self.callbacks):
            values, callback_state = callback.checkpoint_state()
            meta["callbacks"].append(values)
            if callback_state is not None:
                kept[str(index)] = arrays_of(callback_state)
        meta["kept_callbacks"] = sorted(kept)
        tree = {"state": arrays_of(state), "previous": arrays_of(previous), "totals": totals, "callbacks": kept}
        try:
            self.saver.save(epoch * self.batches_per_epoch + batches_done, tree, meta)
        except CheckpointSaveError as error:
            error.state, error.history = state, run.history
            raise

    def within_epoch(self, run, epoch: int):
        """The `after_dispatch` hook that saves every `every_steps` batches, or None for epoch checkpoints.

        No save after a step the divergence guard refused (the run stops at
        that epoch's end, unsaved), and none at the epoch's last batch, whose
        place the end-of-epoch checkpoint takes.
        """
        every, per_call = self.plan.every_steps, self.plan.steps_per_execution
        if every is None:
            return None

        def after_dispatch(state, previous, totals, batches_done, start_step):
            crossed = batches_done // every > (batches_done - per_call) // every
            if not crossed or batches_done >= self.batches_per_epoch:
                return
            if int(totals["accepted_steps"]) < batches_done:
                return  # a refused step: saving would claim batches that were never applied
            self.save(run, previous, totals, epoch, batches_done, start_step, state=state)

        return after_dispatch

    def close(self, run=None) -> None:
        try:
            self.saver.close()
        except CheckpointSaveError as error:
            if run is not None:
                error.state, error.history = run.state, run.history
            raise

