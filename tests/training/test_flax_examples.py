"""Models as flax's examples write them train unchanged: `BatchNorm(axis_name='batch')`, `train: bool`, `act=nn.relu`.

Flax's examples/imagenet ResNet (`tests/support/flax_resnet.py`) names the axis of `jax.pmap`'s devices in its
BatchNorm; jaxdl binds it to the one global batch its jit-compiled steps see, so the statistics are the whole
batch's, as flax's pmap examples compute after their `pmean`. The 4-device runs happen in a subprocess
(`tests/support/flax_example_runs.py`: the CPU becomes 4 devices only in a fresh process).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxdl import create_train_state, fit, load_model, make_train_step, save_model
from jaxdl.models.contract import apply_binding_axis_names
from tests.support import tolerance
from tests.support.flax_resnet import ResNet, ResNet18, ResNetBlock
from tests.support.toy_data import CE, blobs

REPOSITORY = Path(__file__).resolve().parents[2]


def test_flaxs_imagenet_resnet18_trains_through_fit_saves_and_loads(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, 16).astype(np.int32)
    model = ResNet18(num_classes=10, num_filters=8)  # flax's: train: bool, act=nn.relu, BatchNorm(axis_name='batch')
    state, history = fit(model, x, y, loss=CE, optimizer=optax.sgd(0.1, momentum=0.9), epochs=1, batch_size=8,
                         verbose=0)
    assert np.isfinite(history["loss"]).all()
    # Two training steps moved the running statistics off their start (means 0, variances 1), momentum 0.9.
    stats = state.batch_stats["bn_init"]
    assert np.all(stats["mean"] != 0) and np.abs(stats["var"] - 1).max() > 0.01

    save_model(tmp_path / "resnet", model, state.variables)
    config = json.loads((tmp_path / "resnet" / "model.json").read_text())["config"]
    assert config["act"] == {"import": "flax.linen:relu"} and config["conv"] == {"import": "flax.linen:Conv"}
    loaded, variables, _ = load_model(tmp_path / "resnet", custom_classes=[ResNet, ResNetBlock])
    assert (loaded.act, loaded.conv, loaded.block_cls) == (nn.relu, nn.Conv, ResNetBlock)
    assert loaded == ResNet18(num_classes=10, num_filters=8, stage_sizes=(2, 2, 2, 2))  # a list comes back a tuple
    jax.tree.map(np.testing.assert_array_equal, variables, jax.device_get(state.variables))


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("flax_examples") / "runs"
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    done = subprocess.run([sys.executable, "-m", "tests.support.flax_example_runs", str(out)], cwd=REPOSITORY,
                          env={**os.environ, "XLA_FLAGS": flags.strip()}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(f"{out}.npz"))


def run(arrays: dict, axis_name: str, devices: str) -> dict:
    prefix = f"{axis_name}/{devices}/"
    return {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)}


@pytest.mark.parametrize("devices", ["1", "4"])
def test_batchnorm_with_axis_name_batch_trains_as_with_none(four_devices, devices):
    """Parameters, running statistics and losses of `axis_name='batch'` against `axis_name=None`."""
    named, unnamed = run(four_devices, "batch", devices), run(four_devices, "None", devices)
    assert int(named.pop("devices")) == int(unnamed.pop("devices")) == int(devices)
    assert len(named) > 10 and set(named) == set(unnamed)
    # The same operations on the same numbers, but for flax's concatenation of the two statistics before its
    # pmean (with an axis name only): a few ops. Seen here: equal to the bit.
    tolerance.assert_close(named, unnamed, tolerance.FEW_OPS)


def test_batchnorm_with_axis_name_batch_on_4_devices_computes_the_global_batchs_statistics(four_devices):
    """Split over 4 devices, each seeing 4 of a batch's 16 images, the statistics are still the whole batch's."""
    split, whole = run(four_devices, "batch", "4"), run(four_devices, "None", "1")
    split.pop("devices"), whole.pop("devices")
    stats = [key for key in split if key.startswith("batch_stats")]
    assert stats and all(np.abs(split[key]).max() > 0 for key in stats)
    tolerance.assert_close(split, whole, tolerance.DATA_PARALLEL)


class NNXNormed(nnx.Module):
    """A dense layer, NNX's BatchNorm over the axis `axis_name`, and a classifier."""

    def __init__(self, axis_name, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(3, 8, rngs=rngs)
        self.norm = nnx.BatchNorm(8, axis_name=axis_name, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.norm(self.hidden(x))))


def test_an_nnx_batchnorm_with_axis_name_batch_trains_as_with_none_in_your_own_loop():
    x, y = blobs(n=16)
    step = make_train_step(CE)
    trained = {}
    for axis_name in ("batch", None):
        state = create_train_state(NNXNormed(axis_name, nnx.Rngs(0)), optax.adam(1e-2))
        for rows in (slice(0, 8), slice(8, 16)):
            state, sums = step(state, {"x": x[rows], "y": y[rows]})
        trained[axis_name] = (state.params, state.batch_stats, sums)
    assert np.abs(jax.tree.leaves(trained["batch"][1]["norm"]["mean"])[0]).max() > 0  # running means moved off 0
    # As the Linen ResNet's: a few ops at most, equal to the bit here.
    tolerance.assert_close(jax.tree.leaves(trained["batch"]), jax.tree.leaves(trained[None]), tolerance.FEW_OPS)


def test_any_other_name_error_of_a_model_is_raised_as_it_is():
    def model(variables, x):
        return undefined_layer(x)  # noqa: F821 - the model's own mistake

    with pytest.raises(NameError, match=r"^name 'undefined_layer' is not defined$"):  # untouched
        apply_binding_axis_names(model, {}, np.zeros((2, 3)))
