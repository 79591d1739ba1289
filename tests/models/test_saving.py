"""Saving models: jaxdl's classes and the user's own, and a clear refusal for what cannot be saved."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax.core import FrozenDict

from jaxdl import fit, load_model, predict, save_model
from jaxdl.models.saving import save_variables


class UserCNN(nn.Module):
    """A module of the user's, as flax's examples write them."""

    features: int = 4
    activation: str = "relu"

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = getattr(nn, self.activation)(nn.Conv(self.features, (3, 3))(x))
        return nn.Dense(2)(x.reshape((x.shape[0], -1)))


class WithAFunction(nn.Module):
    act: object = nn.relu

    @nn.compact
    def __call__(self, x, train: bool = False):
        return self.act(nn.Dense(2)(x))


class WithOptions(nn.Module):
    """Keyword arguments of a layer held in a FrozenDict field."""

    options: FrozenDict = FrozenDict({"features": 3, "use_bias": False})

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(2)(nn.Dense(**self.options)(x))


def squared_relu(x):
    """A user's own activation, defined at the top of a module: saved by its import path."""
    return jax.nn.relu(x) ** 2


def scaled_tanh(scale):
    def act(x):  # a closure: no module holds it by name
        return scale * jax.numpy.tanh(x)
    return act


def trained(model, shape):
    x = np.random.default_rng(0).normal(size=(8, *shape)).astype(np.float32)
    state, _ = fit(model, x, (x.reshape(8, -1).mean(axis=1) > 0).astype(np.int32),
                   loss="sparse_categorical_crossentropy", epochs=1, verbose=0)
    return x, state


def test_a_users_own_module_saves_by_import_path_and_loads_with_its_class(tmp_path):
    model = UserCNN(features=3, activation="tanh")
    x, state = trained(model, (5, 5, 1))
    save_model(tmp_path / "cnn", model, state.variables)
    with pytest.raises(ValueError, match=r"class is (tests\.models\.)?test_saving:UserCNN.*custom_classes=\[UserCNN\]"):
        load_model(tmp_path / "cnn")
    loaded, variables, _ = load_model(tmp_path / "cnn", custom_classes=[UserCNN])
    assert loaded == model
    np.testing.assert_array_equal(predict(loaded, x, variables=variables), predict(state, x))


X3 = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)


@pytest.mark.parametrize("model, field, saved_as", [
    (WithAFunction(act=nn.relu), "act", {"import": "flax.linen:relu"}),
    (WithAFunction(act=squared_relu), "act", {"import": f"{__name__}:squared_relu"}),
    (WithOptions(), "options", {"frozen_dict": {"features": 3, "use_bias": False}}),
], ids=["flax activation", "user's function", "FrozenDict"])
def test_fields_holding_functions_and_frozen_dicts_save_and_load(tmp_path, model, field, saved_as):
    variables = model.init(jax.random.key(0), X3)
    save_model(tmp_path / "m", model, variables)
    assert json.loads((tmp_path / "m" / "model.json").read_text())["config"][field] == saved_as
    own = [getattr(model, field)] if getattr(model, field) is squared_relu else []  # flax's need not be given
    if own:
        with pytest.raises(ValueError, match=r"names .*:squared_relu, which is neither flax's.*"
                                             r"custom_classes=\[\.\.\., squared_relu\]"):
            load_model(tmp_path / "m", custom_classes=[type(model)])
    loaded, loaded_variables, _ = load_model(tmp_path / "m", custom_classes=[type(model), *own])
    assert loaded == model and type(getattr(loaded, field)) is type(getattr(model, field))
    np.testing.assert_array_equal(loaded.apply(loaded_variables, X3), model.apply(variables, X3))


@pytest.mark.parametrize("act, held", [
    (lambda x: x, "a lambda"),
    (scaled_tanh(2.0), r"a function made inside another \(scaled_tanh.<locals>.act, a closure\)"),
], ids=["lambda", "closure"])
def test_what_cannot_be_saved_by_config_is_refused_naming_the_field(tmp_path, act, held):
    model = WithAFunction(act=act)
    with pytest.raises(TypeError, match=rf"WithAFunction.act holds {held}.*import path.*"
                                        r"save_variables\(directory, state.variables\)"):
        save_model(tmp_path / "m", model, model.init(jax.random.key(0), X3))
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("name", ["m.keras", "m.h5", "model.PTH"])
def test_a_path_named_like_a_model_file_is_refused_before_anything_is_written(tmp_path, name):
    """Keras's `model.save("m.keras")` writes one file; jaxdl writes a directory, which must not pass for one."""
    model = UserCNN()
    variables = model.init(jax.random.key(0), np.zeros((1, 5, 5, 1), np.float32))
    stem = name.rsplit(".", 1)[0]
    with pytest.raises(ValueError, match=rf"save_model writes a directory .*not a single file: .*{name}' ends in "
                                         rf"'\.{name.rsplit('.', 1)[1].lower()}'.* e\.g\. '.*{stem}'"):
        save_model(tmp_path / name, model, variables)
    assert os.listdir(tmp_path) == []
    assert save_model(tmp_path / stem, model, variables).is_dir()


def test_a_whole_train_state_is_refused_with_what_to_save_instead(tmp_path):
    _, state = trained(UserCNN(), (5, 5, 1))
    with pytest.raises(TypeError, match=r"TrainState is a whole training state.*state.variables"):
        save_variables(tmp_path / "state", state)
    with pytest.raises(TypeError, match="hold a random key"):
        save_variables(tmp_path / "keys", {"params": state.params, "rng": jax.random.key(0)})
    save_variables(tmp_path / "variables", state.variables)
    assert (tmp_path / "variables").is_dir()


def test_a_target_that_appears_during_the_write_is_kept_not_replaced(tmp_path):
    """Another process's save finishing first (its directory created inside `write`): its files are kept.

    Before the fix, overwrite=False replaced it: two first runs of a conversion at once lost one's files.
    """
    from jaxdl.models.saving import write_atomically

    target = tmp_path / "model"

    def write(staging):
        (staging / "mine.txt").write_text("mine")
        target.mkdir()  # the other process renames its complete directory into place meanwhile
        (target / "theirs.txt").write_text("theirs")

    with pytest.raises(FileExistsError, match=f"{target} appeared while it was being written"):
        write_atomically(target, write)
    assert sorted(p.name for p in target.iterdir()) == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging directory left behind


def test_overwriting_leaves_the_target_in_place_at_every_step(tmp_path, monkeypatch):
    """overwrite=True swaps the new directory in: readers never find the path missing between two renames.

    Every file-system call the module makes is followed by a look at the target; before the fix the
    first of its two renames moved the old directory away, leaving no target until the second.
    """
    import shutil

    from jaxdl.models import saving as checkpoint

    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    seen = []

    def looking(function):
        def call(*args, **kwargs):
            result = function(*args, **kwargs)
            seen.append((function.__name__, (target / "old.txt").exists() or (target / "new.txt").exists()))
            return result
        return call

    for name in ("replace", "rename"):
        monkeypatch.setattr(checkpoint.os, name, looking(getattr(os, name)))
    monkeypatch.setattr(checkpoint.shutil, "rmtree", looking(shutil.rmtree))
    checkpoint.write_atomically(target, lambda staging: (staging / "new.txt").write_text("new"), overwrite=True)
    assert seen and all(present for _, present in seen), seen
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the old directory deleted, no staging left


def test_two_first_uses_of_a_cached_conversion_keep_the_one_saved_first(tmp_path, monkeypatch):
    """The other process's conversion, saved while this one wrote its own, is the one kept and returned."""
    from jaxdl import MLP
    from jaxdl.models import saving as checkpoint
    from jaxdl.models.saving import read_model
    from jaxdl.pretrained import weights as pretrained

    monkeypatch.setenv("JAXDL_CACHE", str(tmp_path))
    model = MLP(features=(2,), num_outputs=2)
    variables = model.init(jax.random.key(0), np.zeros((1, 3), np.float32))
    save_variables_now, the_other_saved = checkpoint.save_variables, []

    def and_the_other_saves_first(directory, saved):
        save_variables_now(directory, saved)
        if not the_other_saved:  # this process's variables are written: the other one's save completes now
            the_other_saved.append(True)
            save_model(tmp_path / "conversion", model, variables, metadata={"by": "the other"})

    monkeypatch.setattr(checkpoint, "save_variables", and_the_other_saves_first)
    path = pretrained._cached("conversion", lambda: (model, variables), {"by": "this process"})
    assert path == tmp_path / "conversion" and read_model(path)[1] == {"by": "the other"}
    assert [p.name for p in tmp_path.iterdir()] == ["conversion"]  # no staging directory left behind
