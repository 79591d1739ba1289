"""Data-parallel training over several devices: the same training as on one device, really split.

The CPU becomes four devices only in a fresh process (XLA reads
--xla_force_host_platform_device_count at start-up), so the runs happen in
subprocesses (`tests/support/data_parallel_runs.py`, which also runs `tests/support/fit_shard_shapes.py`), once per
module, and the tests read what they wrote.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.support import tolerance

REPOSITORY = Path(__file__).resolve().parents[2]
RUNS = [f"{name}/{kind}" for name in ("mlp", "bn_cnn", "nnx") for kind in ("arrays", "source")]


def run_in_subprocess(out: Path, devices: int, *arguments) -> tuple[dict, dict]:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env = {**os.environ, "XLA_FLAGS": flags.strip()}
    done = subprocess.run([sys.executable, "-m", "tests.support.data_parallel_runs", str(out), *arguments],
                          cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(f"{out}.npz")), json.loads(Path(f"{out}.json").read_text())


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    """One process with 4 devices: every run on all 4 and on 1 of them."""
    return run_in_subprocess(tmp_path_factory.mktemp("dp") / "four", 4)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Two processes with 2 devices each, joined by `jaxdl.runtime.distributed.initialize`."""
    return run_in_subprocess(tmp_path_factory.mktemp("dp") / "two", 2, "--processes", "2")


def results_of(arrays: dict, run: str) -> dict:
    return {key[len(run):]: value for key, value in arrays.items() if key.startswith(run + "/")}


@pytest.mark.parametrize("run", RUNS)
def test_four_devices_train_as_one_device_does(four_devices, run):
    """The MLP (with dropout, a padded last batch) and a BatchNorm CNN, from arrays and from a source."""
    arrays, facts = four_devices
    reference = results_of(arrays, run.split("/")[0] + "/arrays/one")
    trained = results_of(arrays, run + "/many")
    assert set(trained) == set(reference) and len(trained) >= 5
    tolerance.assert_close(trained, reference, tolerance.DATA_PARALLEL, err_msg=run)
    # The parameters live whole on all 4 devices; on the reference, on 1.
    assert facts[run + "/many"] == {"devices": 4, "replicated": True}
    assert facts[run.split("/")[0] + "/arrays/one"] == {"devices": 1, "replicated": True}


def test_batchnorm_statistics_are_the_global_batchs(four_devices):
    """Means over a batch split over 4 devices are the whole batch's: the running statistics match one device's."""
    arrays, _ = four_devices
    for kind in ("arrays", "source"):
        stats = results_of(arrays, f"bn_cnn/{kind}/many")
        reference = results_of(arrays, "bn_cnn/arrays/one")
        means = [key for key in stats if "batch_stats" in key]
        assert means and all(np.abs(stats[key]).max() > 0 for key in means)
        tolerance.assert_close({k: stats[k] for k in means}, {k: reference[k] for k in means},
                               tolerance.DATA_PARALLEL)


def test_batches_are_split_over_the_data_axis(four_devices):
    _, facts = four_devices
    assert facts["devices"] == 4
    assert facts["batch"] == {"spec": "P('data',)", "expected": "P('data',)", "rows_per_device": [4, 4, 4, 4]}


def test_fits_compiled_steps_see_a_quarter_of_each_batch_per_device(four_devices):
    """What the model is given inside the programs `fit` compiles, on 4 devices, for arrays (the scanned epoch and
    its validation) and for a source (the streamed steps): each device holds 4 rows of a batch of 16.

    `put_global_batch` splitting (above) says nothing of what `fit` computes: seen failing on a variant that
    replicates the batch (every device computing all 16 rows), which trains to the same numbers. Recorded in
    the 4-device process by `tests/support/fit_shard_shapes.py`.
    """
    facts = four_devices[1]
    assert facts["devices"] == 4
    seen = facts["fit_shard_shapes"]
    # Each copy of a step in a program reports (the scanned epoch runs its last step after the scan): the same.
    batches = {path: sorted({tuple(map(str, entry)) for entry in seen[path] if entry[1][0] == 16})
               for path in ("arrays", "source")}
    train, inference = ("train", "[16, 3]", "[4, 3]", "4"), ("inference", "[16, 3]", "[4, 3]", "4")
    assert batches == {"arrays": [inference, train], "source": [train]}


def test_a_hand_written_loop_with_the_step_factory_trains_data_parallel(four_devices):
    arrays, facts = four_devices
    tolerance.assert_close(results_of(arrays, "mlp/step/many"), results_of(arrays, "mlp/step/one"),
                           tolerance.DATA_PARALLEL)
    assert facts["mlp/step/many"] == {"devices": 4, "replicated": True}


def test_evaluate_and_predict_give_one_devices_numbers(four_devices):
    arrays, _ = four_devices
    tolerance.assert_close(arrays["evaluate/many"], arrays["evaluate/one"], tolerance.DATA_PARALLEL)
    assert arrays["predict/many"].shape == (5, 3)  # 5 rows, padded to 8 to split, then cut back
    tolerance.assert_close(arrays["predict/many"], arrays["predict/one"], tolerance.DATA_PARALLEL)


def test_chunked_inference_spread_over_the_devices_equals_one_piece(four_devices):
    """As `jaxdl classify` runs with a CPU device per core: each device takes a share of the batch (7 images
    padded to 8), and the top runs once on each share."""
    arrays, facts = four_devices
    logits = arrays["chunked/one_piece"].astype(np.float64)
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    assert arrays["chunked/mesh"].shape == (7, 10) and facts["chunked/mesh"] == 4
    # the same few ops on other batch sizes: XLA may pick other kernels
    tolerance.assert_close(arrays["chunked/mesh"], probabilities, tolerance.FEW_OPS)
    # The classifier: a batch of fewer images than devices runs on one device, with its weights there alone.
    assert [facts[f"placement/{n}"] for n in (3, 4)] == [[1, False], [4, True]]
    for n in (3, 4):
        tolerance.assert_close(arrays[f"placement/{n}"], probabilities[:n], tolerance.FEW_OPS)


def test_what_the_devices_cannot_split_is_an_error_naming_the_numbers(four_devices):
    errors = four_devices[1]["errors"]
    assert errors["indivisible"].startswith("batch_size=6 cannot be split over the mesh's 4 devices")
    assert "multiple of 4" in errors["indivisible"]
    assert "the last batch of each epoch holds 6 examples (70 examples, batch_size=16)" in \
        errors["batch_norm_last_batch"] and "drop_remainder=True" in errors["batch_norm_last_batch"]
    assert errors["no_data_axis"].startswith("the mesh has axes ('model',) but no 'data' axis")
    assert errors["batch_norm_iterable"].startswith("a batch of 8 examples (padded to split over the devices) "
                                                    "reached a model with BatchNorm statistics")


def test_a_mesh_must_be_a_jax_mesh():
    from jaxdl import MLP, fit
    from tests.support.toy_data import CE, blobs

    x, y = blobs(16)
    with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh, got list"):
        fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, mesh=["cpu:0"], verbose=0)


@pytest.mark.parametrize("run", ["mlp/source", "bn_cnn/arrays", "nnx/source"])
def test_two_processes_train_as_one_process_does(two_processes, four_devices, run):
    """Each process reads its half of every batch of a source; the global batch, and the training, are the same."""
    arrays, facts = two_processes
    assert facts["processes"] == 2 and facts["devices"] == 4
    tolerance.assert_close(results_of(arrays, run + "/many"), results_of(four_devices[0], run.split("/")[0]
                                                                         + "/arrays/one"), tolerance.DATA_PARALLEL)
    assert facts[run + "/many"] == {"devices": 4, "replicated": True}


def test_two_processes_each_get_every_prediction(two_processes, four_devices):
    tolerance.assert_close(two_processes[0]["predict/many"], four_devices[0]["predict/one"], tolerance.DATA_PARALLEL)


def test_distributed_initialize_reads_the_environment(monkeypatch):
    from jaxdl.runtime import distributed

    for name in (distributed.COORDINATOR, distributed.PROCESS_COUNT, distributed.PROCESS_ID,
                 *distributed._CLUSTER_SIZES):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False  # one process: nothing to join
    monkeypatch.setenv(distributed.COORDINATOR, "localhost:1234")
    with pytest.raises(ValueError, match=r"\$JAX_COORDINATOR_ADDRESS is set, but \$JAX_NUM_PROCESSES and "
                                         r"\$JAX_PROCESS_ID not"):
        distributed.initialize()
    monkeypatch.setenv(distributed.PROCESS_COUNT, "2")
    monkeypatch.setenv(distributed.PROCESS_ID, "2")
    with pytest.raises(ValueError, match=r"\$JAX_PROCESS_ID=2 must be from 0 to \$JAX_NUM_PROCESSES-1=1"):
        distributed.initialize()


# The bound the runs pass as device_data_bytes: 64 KiB, a sixteenth of their 1 MiB dataset, four of its batches.
DEVICE_DATA_LIMIT = 65536


@pytest.fixture(scope="module")
def device_memory(tmp_path_factory):
    """One process with 2 devices: predict, evaluate and fit, each with a bound on device data and without."""
    out = tmp_path_factory.mktemp("memory") / "runs"
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    done = subprocess.run([sys.executable, "-m", "tests.support.device_memory_runs", str(out), str(DEVICE_DATA_LIMIT)],
                          cwd=REPOSITORY, env={**os.environ, "XLA_FLAGS": flags.strip()}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(f"{out}.npz")), json.loads(Path(f"{out}.json").read_text())


@pytest.mark.parametrize("run", ["predict", "evaluate", "fit_arrays", "fit_cached_source"])
def test_data_larger_than_the_bound_take_device_memory_of_a_few_batches_not_the_dataset(device_memory, run):
    """Past `device_data_bytes`, data stream: at most PREFETCH_DEPTH + 2 batches on a device at once (those put
    ahead, the one computing, the one being put), and the same numbers as the dataset placed whole.

    Seen failing before the fix: every run placed the whole dataset on each of the 2 devices (with 4096
    examples, predict's peak was 1,048,576 bytes per device against a bound of 65,536).
    """
    arrays, facts = device_memory
    bounded, whole = facts[f"{run}/bounded"], facts[f"{run}/whole"]
    # The spy sees whole placements (the default places this small dataset whole on CPU): it can tell them apart.
    assert whole["peak"] >= facts["dataset_bytes"] * 3 // 4  # fit's validation quarter is placed apart
    assert bounded["largest"] <= facts["batch_bytes"] + 4 * 64 + 4 * 64  # one batch (and its weights and mask)
    assert bounded["peak"] <= (facts["prefetch_depth"] + 2) * bounded["largest"] <= DEVICE_DATA_LIMIT
    results = {key: value for key, value in arrays.items() if key.startswith(f"{run}/bounded")}
    assert results
    for key, value in results.items():
        # Different programs (one scan over the whole; steps or batches one by one) of the same operations.
        tolerance.assert_close(value, arrays[key.replace("/bounded", "/whole")], tolerance.FEW_OPS, err_msg=key)


def test_the_default_bound_on_data_placed_whole(monkeypatch):
    """"auto": on CPU a quarter of the memory available over the devices that copy the data; on an accelerator
    an eighth of a device's memory, or 256 MiB where it is not reported; a number of bytes as given."""
    from jaxdl import data
    from jaxdl.data import prefetch

    class Device:
        process_index = 0

        def __init__(self, platform, memory=None):
            self.platform, self.memory = platform, memory

        def memory_stats(self):
            return None if self.memory is None else {"bytes_limit": self.memory}

    monkeypatch.setattr(prefetch, "available_memory", lambda: 8 * 2**30)
    assert data.device_data_limit([Device("cpu"), Device("cpu")]) == 2**30  # 8 GiB / 4 / 2 devices
    assert data.device_data_limit([Device("gpu", 16 * 2**30), Device("gpu", 8 * 2**30)]) == 2**30
    assert data.device_data_limit([Device("tpu")]) == 256 * 2**20
    assert data.device_data_limit([Device("gpu", 2**40)], 1000) == 1000
    assert prefetch.fits_on_device(1000, [Device("cpu")], 1000)
    assert not prefetch.fits_on_device(1001, [Device("cpu")], 1000)
    for bad in (-1, True, 1.5, "all"):
        with pytest.raises(ValueError, match="device_data_bytes must be 'auto' or a non-negative number of bytes"):
            data.device_data_limit([Device("cpu")], bad)
