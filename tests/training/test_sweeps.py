"""jaxdl.sweep: every configuration of a grid, one table, the best named, failures reported and not fatal."""
import csv

import pytest

from jaxdl import sweep
from jaxdl.training.sweeps import configurations


def fake_training(conv_blocks, dropout_rate):
    """A stand-in for a training run: known metrics, and one configuration that raises."""
    if conv_blocks == 3 and dropout_rate == 0.8:
        raise FloatingPointError("loss became NaN at epoch 4")
    return {"val_loss": conv_blocks * dropout_rate, "val_accuracy": 1 - conv_blocks * dropout_rate / 10}


def test_a_sweep_reports_a_failing_configuration_and_names_the_best(tmp_path, capsys):
    grid = {"conv_blocks": [1, 2, 3], "dropout_rate": [0.2, 0.8]}
    table = sweep(fake_training, grid, tmp_path / "sweep.csv")
    assert [(row["conv_blocks"], row["dropout_rate"]) for row in table.rows] == [
        (1, 0.2), (1, 0.8), (2, 0.2), (2, 0.8), (3, 0.2), (3, 0.8)]  # itertools.product order
    failed = table.rows[5]
    assert failed["error"] == "FloatingPointError: loss became NaN at epoch 4" and "val_loss" not in failed
    assert [row["error"] for row in table.rows[:5]] == [""] * 5
    assert all(row["seconds"] >= 0 for row in table.rows)
    assert table.columns == ["conv_blocks", "dropout_rate", "val_loss", "val_accuracy", "seconds", "error"]
    assert table.best_config == {"conv_blocks": 1, "dropout_rate": 0.2} and table.best["val_loss"] == 0.2
    assert table.failed == [failed]

    printed = capsys.readouterr().out
    assert "sweep 6/6 (conv_blocks=3, dropout_rate=0.8) failed: FloatingPointError: loss became NaN" in printed
    assert "best by val_loss (min): conv_blocks=1, dropout_rate=0.2 -> val_loss = 0.2; 1 of 6 configurations " \
           "failed" in printed
    assert f"sweep table written to {tmp_path / 'sweep.csv'}" in printed

    with open(tmp_path / "sweep.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == table.columns and len(rows) == 6
    assert rows[5]["val_loss"] == "" and rows[5]["error"].startswith("FloatingPointError")
    assert float(rows[3]["val_loss"]) == 2 * 0.8  # written by repr: reads back exactly

    by_accuracy = sweep(fake_training, grid, monitor="val_accuracy", mode="max", verbose=False)
    assert by_accuracy.best_config == {"conv_blocks": 1, "dropout_rate": 0.2}
    assert capsys.readouterr().out == ""


def test_a_sweep_where_nothing_finishes_has_no_best():
    def broken(rate):
        return None if rate == 0.5 else 1 / 0

    table = sweep(broken, {"rate": [0.5, 0.7]}, verbose=False)
    assert table.best is None and table.best_config is None
    assert [row["error"] for row in table.rows] == ["TypeError: train_fn returned NoneType, not a dict of metrics",
                                                    "ZeroDivisionError: division by zero"]
    assert table.verdict() == "no configuration reported a finite 'val_loss' (min); 2 of 2 configurations failed"


def test_bad_grids_and_modes_are_named():
    with pytest.raises(ValueError, match=r"grid\['rate'\] is empty"):
        configurations({"rate": []})
    with pytest.raises(ValueError, match=r"grid\['rate'\] must be a list of values, got 0.5"):
        configurations({"rate": 0.5})
    with pytest.raises(ValueError, match="grid name 'seconds' is a column of the sweep's table"):
        configurations({"seconds": [1]})
    with pytest.raises(ValueError, match="non-empty dict"):
        configurations({})
    with pytest.raises(ValueError, match="sweep mode must be 'min' or 'max', got 'auto'"):
        sweep(fake_training, {"conv_blocks": [1]}, mode="auto")


def test_numpy_and_jax_scalar_metrics_pick_the_best_row_and_nan_and_bools_never_do():
    """Metrics straight from a training run are numpy or JAX scalars (e.g. `history["val_loss"][-1]`)."""
    import jax.numpy as jnp
    import numpy as np

    kinds = {"float32": np.float32, "float64": np.float64, "int64": np.int64,
             "0-d array": lambda v: np.array(v, np.float32), "jax": lambda v: jnp.asarray(v, jnp.float32)}
    for kind, make in kinds.items():
        losses = {1: make(3), 2: make(1), 3: make(2)}
        table = sweep(lambda rate: {"val_loss": losses[rate]}, {"rate": [1, 2, 3]}, verbose=False)
        assert table.best_config == {"rate": 2}, kind
        assert table.verdict() == "best by val_loss (min): rate=2 -> val_loss = 1", kind
        high = sweep(lambda rate: {"val_loss": losses[rate]}, {"rate": [1, 2, 3]}, mode="max", verbose=False)
        assert high.best_config == {"rate": 1}, kind

    values = {1: np.float32("nan"), 2: jnp.asarray(jnp.nan), 3: np.float32(0.5), 4: np.float32(0.25)}
    assert sweep(lambda rate: {"val_loss": values[rate]}, {"rate": [1, 2, 3, 4]}, verbose=False).best_config == \
        {"rate": 4}
    not_numbers = {1: np.bool_(False), 2: True, 3: np.array([0.1, 0.2]), 4: "0.1", 5: jnp.asarray([0.0])}
    table = sweep(lambda rate: {"val_loss": not_numbers[rate]}, {"rate": [1, 2, 3, 4, 5]}, verbose=False)
    assert table.best is None  # bools, arrays of several values, strings: not one real number
