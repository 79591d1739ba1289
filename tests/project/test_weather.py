"""experiments.weather: the Carpentries regression episode on a generated CSV laid out as the real one."""
import json
import math

import numpy as np
import optax
import pandas as pd
import pytest

from experiments import weather
from jaxdl import MLP, EarlyStopping, fit
from jaxdl.training.steps import create_train_state, seed_rngs
from tests.support import tolerance

CITIES = ("BASEL", "BUDAPEST", "DE_BILT", "DRESDEN", "DUSSELDORF", "HEATHROW", "KASSEL", "LJUBLJANA", "MAASTRICHT",
          "MALMO", "MONTELIMAR", "MUENCHEN", "OSLO", "PERPIGNAN", "ROMA", "SONNBLICK", "STOCKHOLM", "TOURS")
MEASURES = ("cloud_cover", "wind_speed", "wind_gust", "humidity", "pressure", "global_radiation", "precipitation",
            "sunshine", "temp_mean", "temp_min", "temp_max")


def weather_columns() -> list[str]:
    """89 weather columns named as the light CSV's (city_measure), BASEL's first, BASEL_sunshine among them."""
    names = [f"{city}_{measure}" for city in CITIES for measure in MEASURES]
    return names[:weather.LESSON_FEATURES]


def write_weather_csv(path, rows: int, seed: int = 0):
    """DATE, MONTH and 89 weather columns of plausible magnitudes; sunshine follows yesterday's, so it is learnable."""
    rng = np.random.default_rng(seed)
    dates = pd.date_range("2000-01-01", periods=rows, freq="D")
    frame = {"DATE": dates.strftime("%Y%m%d").astype(int), "MONTH": dates.month}
    sunshine = np.clip(6 + 3 * np.sin(np.arange(rows) / 58) + rng.normal(0, 2, rows), 0, 15)
    for name in weather_columns():
        scale = {"pressure": 1.0, "humidity": 0.8, "sunshine": 6.0}.get(name.split("_", 1)[1], 10.0)
        frame[name] = np.round(scale + rng.normal(0, 0.1 * scale, rows), 2)
    frame["BASEL_sunshine"] = np.round(sunshine, 1)
    pd.DataFrame(frame).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    """The workflow once on a generated CSV: rows 0..91 (64 training days), 3 epochs, 10 Monte-Carlo samples.

    Compiling a network costs seconds and training these few epochs nothing, so the run trains two networks:
    the base one (twice: plain and with early stopping, one compiled program) and the dropout one (with
    Monte-Carlo dropout). The smaller and the BatchNorm networks run the same `train` with another model;
    their parameter counts are tested from shapes, and `make demo` trains all five. `--logdir` is tested with
    the CNN episode (TensorBoard's writer imports torch: seconds, once is enough)."""
    root = tmp_path_factory.mktemp("weather")
    path = write_weather_csv(root / "weather_prediction_dataset_light.csv", rows=93)
    metrics = weather.run(["--quiet", "--out", str(root), "--data", str(path), "--days", "91", "--epochs", "3",
                           "--mc-samples", "10", "--refinements", "early_stopping", "dropout"])
    return metrics, root, path


def test_the_lessons_parameter_counts():
    assert weather.lesson_param_counts() == {"base": 14_101, "small": 961, "batch_norm": 14_457,
                                             "batch_norm_non_trainable": 178}


def test_the_workflow_runs_end_to_end_on_a_csv_laid_out_as_the_real_one(csv_run):
    metrics, root, path = csv_run
    assert metrics["lesson_params"] == [14_101, 961, 14_457, 178]
    assert metrics["features"] == 89 and metrics["data"].startswith(f"weather CSV {path}, rows 0..91")
    assert (metrics["train_samples"], metrics["val_samples"], metrics["test_samples"]) == (64, 14, 14)  # 92 rows
    assert metrics["params"] == 14_101 and "small_params" not in metrics and "batch_norm_params" not in metrics
    assert 1 <= metrics["early_stopping_epoch"] <= 3 and metrics["early_stopping_best_epoch"] <= 3
    assert metrics["mc_samples"] == 10 and metrics["mc_dropout_mean_std"] > 0
    for key in ("train_rmse", "test_rmse", "baseline_rmse", "early_stopping_test_rmse", "dropout_test_rmse",
                "mc_dropout_test_rmse"):
        assert math.isfinite(metrics[key]) and metrics[key] > 0, key
    assert json.loads((root / "weather" / "metrics.json").read_text()) == metrics
    for plot in ("history.png", "refinements.png", "predictions.png", "mc_dropout.png"):
        assert (root / "weather" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot


def test_the_baseline_is_todays_sunshine_of_the_test_days(csv_run):
    """The run's baseline RMSE, recomputed by hand from the CSV and the same seeded split."""
    metrics, _, path = csv_run
    frame = pd.read_csv(path)
    rows = np.arange(92)  # X: rows 0..91; y: the day after each
    *_, (test_rows,) = weather.split(0, rows)
    today, tomorrow = frame["BASEL_sunshine"].to_numpy()[test_rows], frame["BASEL_sunshine"].to_numpy()[test_rows + 1]
    by_hand = math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(today, tomorrow)) / len(test_rows))
    # float32 values of the CSV (one rounding each) against float64 ones: a few roundings apart.
    tolerance.assert_close(metrics["baseline_rmse"], by_hand, tolerance.ONE_OP)
    assert metrics["baseline"] == "tomorrow = today (today's BASEL_sunshine)"


def test_baseline_rmse_on_a_tiny_table(tmp_path):
    pd.DataFrame({"DATE": [20000101, 20000102, 20000103, 20000104, 20000105], "MONTH": [1] * 5,
                  "BASEL_temp_mean": [2.0, 3.0, 1.0, 0.5, 4.0],
                  "BASEL_sunshine": [1.0, 3.0, 2.0, 6.0, 5.0]}).to_csv(tmp_path / "tiny.csv", index=False)
    x, y, today, names = weather.load_weather(tmp_path / "tiny.csv", days=3)
    assert names == ["BASEL_temp_mean", "BASEL_sunshine"] and x.shape == (4, 2)
    assert y.tolist() == [3.0, 2.0, 6.0, 5.0] and today.tolist() == [1.0, 3.0, 2.0, 6.0]
    # Errors -2, 1, -4, 1: squares 4 + 1 + 16 + 1 = 22 over 4 days.
    assert weather.rmse(today, y) == math.sqrt(22 / 4)  # small integers: exact in float64


def test_bad_csv_files_are_named(tmp_path):
    frame = pd.DataFrame({"DATE": range(6), "MONTH": [1] * 6, "BASEL_sunshine": [1.0] * 6, "OSLO_humidity": [0.5] * 6})
    frame.drop(columns=["BASEL_sunshine"]).to_csv(tmp_path / "no_target.csv", index=False)
    with pytest.raises(ValueError, match=r"no_target.csv: no column BASEL_sunshine; its columns are DATE, MONTH"):
        weather.load_weather(tmp_path / "no_target.csv", days=3)
    frame.to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(ValueError, match=r"short.csv: 6 rows, but X takes rows 0..1095 .* at least 1097 rows"):
        weather.load_weather(tmp_path / "short.csv")
    frame.assign(OSLO_humidity=["wet"] * 6).to_csv(tmp_path / "text.csv", index=False)
    with pytest.raises(ValueError, match=r"text.csv: column OSLO_humidity holds non-numeric values \(e.g. 'wet'\)"):
        weather.load_weather(tmp_path / "text.csv", days=3)
    frame.assign(OSLO_humidity=[0.5, 0.5, None, 0.5, 0.5, 0.5]).to_csv(tmp_path / "gap.csv", index=False)
    with pytest.raises(ValueError, match=r"gap.csv: column OSLO_humidity has no value in data row 2"):
        weather.load_weather(tmp_path / "gap.csv", days=3)
    with pytest.raises(FileNotFoundError, match=r"--data .*missing.csv: no such file"):
        weather.load_weather(tmp_path / "missing.csv")


def test_early_stopping_stops_where_a_constructed_validation_loss_starts_rising():
    """A linear unit trained by SGD on y = 1 from x = 1 moves its output p geometrically towards 1:
    p_t - 1 = (1 - 4 lr)^t (p_0 - 1). A validation target c between p_0 and 1 is passed on the way, so the
    validation loss (p_t - c)^2 falls, then rises for ever: the best epoch and the stop are known in advance."""
    model, rate, patience = MLP(features=(), num_outputs=1), 0.05, 3
    p0 = float(create_train_state(model, optax.sgd(rate), (1,), seed_rngs(0)[0]).params["logits"]["kernel"][0, 0])
    factor = 1 - 4 * rate  # d/dp of (p - 1)^2 is 2 (p - 1), for the kernel and the bias alike (x = 1)
    c = 1 + (p0 - 1) * factor ** 5.6  # crossed between the 5th and 6th updates, nearer the 6th
    p = 1 + (p0 - 1) * factor ** np.arange(1, 40)  # the output after each epoch (one step each)
    expected_val = (p - c) ** 2
    best = int(np.argmin(expected_val))
    assert best == 5 and np.all(np.diff(expected_val[best:]) > 0)  # the construction: a minimum, then a rise

    ones = np.ones((4, 1), np.float32)
    stop = EarlyStopping("val_loss", patience=patience, restore_best_weights=True)
    state, history = fit(model, ones, ones, loss="mse", metrics=(), optimizer=optax.sgd(rate), epochs=39,
                         batch_size=4, validation_data=(ones, np.full((4, 1), c, np.float32)), callbacks=[stop],
                         verbose=0)
    assert stop.best_epoch == best and stop.stopped_epoch == best + patience
    assert len(history["val_loss"]) == best + patience + 1  # stopped: the epochs after the best, then no more
    # float32 steps against the float64 closed form: a few roundings per step over 9 steps.
    tolerance.assert_close(np.asarray(history["val_loss"]), expected_val[:best + patience + 1], tolerance.FEW_OPS)
    restored = float(state.params["logits"]["kernel"][0, 0] + state.params["logits"]["bias"][0])
    tolerance.assert_close(restored, p[best], tolerance.FEW_OPS)  # the best epoch's weights, not the last's


def test_the_suites_checks_compare_the_network_with_its_own_runs_baseline():
    metrics = {"lesson_params": [14_101, 961, 14_457, 178], "test_rmse": 48.4, "baseline_rmse": 64.0,
               "early_stopping_epoch": 59, "epochs": 200, "mc_dropout_mean_std": 27.3}
    checks = weather.checks(metrics)
    assert [c.metric for c in checks] == ["lesson_params", "test_rmse", "early_stopping_epoch", "mc_dropout_mean_std"]
    assert all(check.holds(metrics[check.metric]) for check in checks)
    assert checks[1].reference == "< baseline_rmse (64)"
    worse = {**metrics, "test_rmse": 70.0, "early_stopping_epoch": 200}
    assert [c.metric for c in weather.checks(worse) if not c.holds(worse[c.metric])] == ["test_rmse",
                                                                                         "early_stopping_epoch"]
