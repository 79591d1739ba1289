"""Weather: tomorrow's sunshine hours in Basel from today's weather, the Carpentries regression episode.

The episode "Monitor the training process" of the Carpentries lesson
"Introduction to deep learning". Data: `weather_prediction_dataset_light.csv`
(Zenodo record 5071376; 3,654 days x 91 columns: DATE, MONTH and 89 weather
columns of 18 European cities), given with `--data PATH`. X = the first three
years (rows 0 to 1095) without DATE and MONTH (89 features, raw units); y = the
next day's `BASEL_sunshine` (hours); split 70/15/15 with scikit-learn (seed 0).
Without `--data`, the same workflow runs on scikit-learn's bundled diabetes
data (442 patients, 10 features in their raw units, disease progression a
year later) and says so: this machine cannot download the weather file.

The network: Dense(100, relu) -> Dense(50, relu) -> Dense(1), 14,101
parameters for 89 features; Adam(1e-3), MSE, RMSE, batch 32, 200 epochs,
validated on the validation split every epoch. Beside it the naive baseline
"tomorrow = today" (today's `BASEL_sunshine`; on diabetes: the training
mean), and the episode's refinements, each trained and reported: a smaller
network (10/5 units, 961 parameters); early stopping on val_loss (patience
10, best weights restored); BatchNorm on the inputs (14,457 parameters, 178
of them non-trainable); dropout 0.2 after each hidden layer; and Monte-Carlo
dropout on that network (`jaxdl.mc_predict`: dropout on at prediction, 100
samples per input, mean and standard deviation). `--logdir DIR` logs every
run to TensorBoard and CSV. Plots go to `runs/weather/`.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from experiments.common import Check, checkpointing, finish, parser, run_dir
from jaxdl import MLP, CSVLogger, EarlyStopping, TensorBoard, count_params, fit, mc_predict, predict
from jaxdl.models.summary import count_by_kind
from jaxdl.plots import plot_history, save_figure

TARGET = "BASEL_sunshine"
DROPPED = ("DATE", "MONTH")
DAYS = 365 * 3  # X is rows 0..DAYS (the lesson's `data.loc[:365 * 3]`, 1,096 days), y the day after each
LESSON_FEATURES = 89  # the light CSV's weather columns: the lesson's parameter counts are for these

# The lesson's networks. One object each, shared by every run of the process (compiled steps are cached
# by model): the base network trains twice, without and with early stopping.
BASE = MLP(features=(100, 50), num_outputs=1)
SMALL = MLP(features=(10, 5), num_outputs=1)
BATCH_NORM = MLP(features=(100, 50), num_outputs=1, input_batch_norm=True)
DROPOUT = MLP(features=(100, 50), num_outputs=1, dropout_rate=0.2)
REFINEMENTS = ("small", "early_stopping", "batch_norm", "dropout")  # "dropout" includes Monte-Carlo dropout
LESSON_PARAMS = {"base": 14_101, "small": 961, "batch_norm": 14_457, "batch_norm_non_trainable": 178}

def checks(metrics: dict) -> tuple[Check, ...]:
    """The parameter counts for the lesson's 89 features (whatever the data: counted from shapes); the network
    beating the naive baseline; early stopping stopping before the last epoch; Monte-Carlo dropout spreading its
    samples. Bands over seeds 0-4 on diabetes: see the README."""
    baseline = metrics.get("baseline_rmse", float("nan"))
    return (
        Check("lesson_params", "14,101 961 14,457 178 (89 inputs)",
              lambda v: v == list(LESSON_PARAMS.values())),
        Check("test_rmse", f"< baseline_rmse ({baseline:.4g})", lambda v: v < baseline),
        Check("early_stopping_epoch", f"< {metrics.get('epochs', 200)} epochs",
              lambda v: v < metrics.get("epochs", 200)),
        Check("mc_dropout_mean_std", "> 0", lambda v: v > 0),
    )


def _reading_error(path, message: str) -> ValueError:
    return ValueError(f"{path}: {message} (expected the light weather CSV of Zenodo record 5071376: DATE, MONTH, "
                      f"then weather columns such as {TARGET})")


def load_weather(path: str | os.PathLike, days: int = DAYS):
    """`(x, y, today, feature names)` from the weather CSV: rows 0..days, and the next day's `BASEL_sunshine`.

    `today` is each row's own `BASEL_sunshine`, the baseline's prediction.
    A file that is missing, lacks DATE, MONTH or `BASEL_sunshine`, has
    non-numeric or missing weather values, or too few rows is an error naming
    the file and what is wrong.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file (download weather_prediction_dataset_light.csv "
                                "from https://zenodo.org/record/5071376)")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise _reading_error(path, f"not a readable CSV ({type(error).__name__}: {error})") from None
    missing = [name for name in (*DROPPED, TARGET) if name not in frame.columns]
    if missing:
        shown = ", ".join(map(str, frame.columns[:6])) + (", ..." if len(frame.columns) > 6 else "")
        raise _reading_error(path, f"no column {', '.join(missing)}; its columns are {shown}")
    if len(frame) < days + 2:
        raise _reading_error(path, f"{len(frame)} rows, but X takes rows 0..{days} and y the day after each, so "
                                   f"it needs at least {days + 2} rows (or a smaller --days)")
    features = frame.drop(columns=list(DROPPED))
    text = [name for name in features.columns if not pd.api.types.is_numeric_dtype(features[name])]
    if text:
        raise _reading_error(path, f"column {text[0]} holds non-numeric values (e.g. "
                                   f"{features[text[0]].iloc[0]!r})" + (f", and {len(text) - 1} more columns do"
                                                                          if len(text) > 1 else ""))
    used = features.iloc[:days + 2]
    holes = used.columns[used.isna().any()].tolist()
    if holes:
        row = int(used[holes[0]].isna().to_numpy().argmax())
        raise _reading_error(path, f"column {holes[0]} has no value in data row {row}"
                                   + (f" ({len(holes)} columns have gaps)" if len(holes) > 1 else ""))
    x = features.iloc[:days + 1].to_numpy(np.float32)
    y = features[TARGET].iloc[1:days + 2].to_numpy(np.float32)
    today = features[TARGET].iloc[:days + 1].to_numpy(np.float32)
    return x, y, today, list(features.columns)


def load_diabetes_data():
    """`(x, y, feature names)`: scikit-learn's diabetes data in raw units (unscaled, as the weather features)."""
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes(scaled=False)
    return bunch.data.astype(np.float32), bunch.target.astype(np.float32), list(bunch.feature_names)


def split(seed: int, *arrays):
    """70/15/15, as the lesson: 30% held out, then halved into validation and test (scikit-learn, `seed`).

    Returns `(train, val, test)`, each a tuple of the given arrays' rows.
    """
    from sklearn.model_selection import train_test_split

    first = train_test_split(*arrays, test_size=0.3, random_state=seed)
    train, held_out = first[0::2], first[1::2]
    second = train_test_split(*held_out, test_size=0.5, random_state=seed)
    return tuple(train), tuple(second[0::2]), tuple(second[1::2])


def rmse(predictions, targets) -> float:
    """Root mean squared error, in float64 (sklearn's `root_mean_squared_error`)."""
    predictions, targets = np.asarray(predictions, np.float64).reshape(-1), np.asarray(targets, np.float64)
    if predictions.shape != targets.reshape(-1).shape:
        raise ValueError(f"predictions have {predictions.size} values, targets {targets.size}")
    return float(np.sqrt(np.mean((predictions - targets.reshape(-1)) ** 2)))


def lesson_param_counts() -> dict:
    """The lesson's counts, for 89 input features, from shapes alone (nothing initialised)."""
    sample = jnp.zeros((1, LESSON_FEATURES))

    def kinds(model):
        return count_by_kind(jax.eval_shape(lambda: model.init(jax.random.key(0), sample)))

    batch_norm = kinds(BATCH_NORM)
    return {"base": kinds(BASE)["total"], "small": kinds(SMALL)["total"], "batch_norm": batch_norm["total"],
            "batch_norm_non_trainable": batch_norm["non_trainable"]}


def plot_predictions(splits: dict, path, title: str):
    """Predicted against true, one panel per split, with the y = x line of a perfect prediction."""
    fig, axes = plt.subplots(1, len(splits), figsize=(4.5 * len(splits), 4.2), squeeze=False)
    for ax, (name, (truth, predicted)) in zip(axes[0], splits.items()):
        ax.scatter(truth, predicted, s=8, alpha=0.6)
        low, high = float(min(truth.min(), predicted.min())), float(max(truth.max(), predicted.max()))
        ax.plot([low, high], [low, high], color="black", linewidth=1, label="y = x")
        ax.set(xlabel="true", ylabel="predicted", title=f"{name}: RMSE {rmse(predicted, truth):.3g}")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_refinements(histories: dict, path):
    """Every network's validation RMSE per epoch in one panel: where each overfits, where early stopping ends."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, history in histories.items():
        ax.plot(np.arange(1, len(history["val_rmse"]) + 1), history["val_rmse"], label=name)
    ax.set(xlabel="epoch", ylabel="validation RMSE", title="the refinements, validation RMSE")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def plot_uncertainty(truth, mean, std, path, title: str):
    """Monte-Carlo dropout: mean prediction against the truth, each marker's area growing with its std."""
    fig, ax = plt.subplots(figsize=(5, 4.5))
    sizes = 5 + 300 * std / max(float(std.max()), 1e-12)
    points = ax.scatter(truth, mean, s=sizes, c=std, cmap="viridis", alpha=0.6)
    low, high = float(min(truth.min(), mean.min())), float(max(truth.max(), mean.max()))
    ax.plot([low, high], [low, high], color="black", linewidth=1)
    fig.colorbar(points, ax=ax, label="standard deviation over the samples")
    ax.set(xlabel="true", ylabel="mean of the Monte-Carlo samples", title=title)
    fig.tight_layout()
    return save_figure(fig, path)


def run(argv=None) -> dict:
    cli = parser(__doc__)
    cli.add_argument("--data", default=None, help="weather_prediction_dataset_light.csv (default: diabetes)")
    cli.add_argument("--days", type=int, default=DAYS, help="X is rows 0..DAYS of the CSV (default: 3 years)")
    cli.add_argument("--epochs", type=int, default=200)
    cli.add_argument("--patience", type=int, default=10, help="early stopping's patience (epochs)")
    cli.add_argument("--mc-samples", type=int, default=100, help="Monte-Carlo dropout samples per input")
    cli.add_argument("--logdir", default=None, help="log every run to TensorBoard and CSV under this folder")
    cli.add_argument("--refinements", nargs="*", choices=REFINEMENTS, default=list(REFINEMENTS),
                     help="which refinements to train after the base network (default: all; each is a network "
                          "to compile, so a quick check may pick fewer)")
    args = cli.parse_args(argv)
    if args.days < 1 or args.epochs < 1 or args.mc_samples < 1 or args.patience < 0:
        raise SystemExit("error: --days, --epochs and --mc-samples must be positive, --patience not negative")
    out = run_dir("weather", args.out)
    checkpoints = checkpointing(args)
    started = time.perf_counter()

    if args.data:
        x, y, today, names = load_weather(args.data, args.days)
        data = f"weather CSV {args.data}, rows 0..{args.days}, target: next day's {TARGET}"
        (x_train, y_train, _), (x_val, y_val, _), (x_test, y_test, today_test) = split(args.seed, x, y, today)
        baseline, baseline_test = "tomorrow = today (today's BASEL_sunshine)", today_test
    else:
        x, y, names = load_diabetes_data()
        data = ("scikit-learn diabetes (stand-in for the weather CSV, which --data did not give: 442 patients, "
                "10 features, disease progression after one year)")
        (x_train, y_train), (x_val, y_val), (x_test, y_test) = split(args.seed, x, y)
        baseline, baseline_test = "the training mean", np.full_like(y_test, y_train.mean())
        print(f"no --data given: the weather workflow runs on {data}", flush=True)

    if args.logdir:
        print(f"logging to TensorBoard under {args.logdir} (tensorboard --logdir {args.logdir}) and to "
              f"{args.logdir}/NAME.csv, one run per network", flush=True)

    histories = {}

    def train(name, model, stop=False):
        """Fits `model` (with early stopping when `stop`); returns its state, history and the EarlyStopping.

        The optimizer is fit's default, Adam(1e-3), one object for every run: the base network's second
        run (with early stopping) reuses its compiled epoch.
        """
        callbacks = [EarlyStopping("val_loss", patience=args.patience, restore_best_weights=True)] if stop else []
        if args.logdir:
            callbacks += [TensorBoard(Path(args.logdir) / name), CSVLogger(Path(args.logdir) / f"{name}.csv")]
        state, history = fit(model, x_train, y_train, loss="mse", metrics=("rmse",), epochs=args.epochs,
                             batch_size=32, seed=args.seed, validation_data=(x_val, y_val), callbacks=callbacks,
                             verbose=not args.quiet, **checkpoints(name))
        histories[name] = history
        return state, history, (callbacks[0] if stop else None)

    def test_rmse(state):
        return rmse(predict(state, x_test), y_test)

    metrics = {"data": data, "features": len(names), "train_samples": len(y_train), "val_samples": len(y_val),
               "test_samples": len(y_test), "epochs": args.epochs,
               "lesson_params": list(lesson_param_counts().values())}

    state, history, _ = train("base", BASE)
    plot_history(history, out / "history.png", f"base network ({count_params(state.variables):,} parameters)")
    train_predictions, test_predictions = predict(state, x_train)[:, 0], predict(state, x_test)[:, 0]
    plot_predictions({"training set": (y_train, train_predictions), "test set": (y_test, test_predictions)},
                     out / "predictions.png", "base network")
    metrics.update(params=count_params(state.variables), train_rmse=rmse(train_predictions, y_train),
                   val_rmse=history["val_rmse"][-1], test_rmse=rmse(test_predictions, y_test),
                   best_val_rmse_epoch=int(np.argmin(history["val_rmse"])) + 1,
                   baseline=baseline, baseline_rmse=rmse(baseline_test, y_test))

    if "small" in args.refinements:
        state, _, _ = train("small", SMALL)
        metrics.update(small_params=count_params(state.variables), small_test_rmse=test_rmse(state))

    if "early_stopping" in args.refinements:
        state, history, stop = train("early_stopping", BASE, stop=True)
        metrics.update(early_stopping_epoch=len(history["loss"]), early_stopping_best_epoch=stop.best_epoch + 1,
                       early_stopping_test_rmse=test_rmse(state))

    if "batch_norm" in args.refinements:
        state, history, _ = train("batch_norm", BATCH_NORM, stop=True)
        kinds = count_by_kind(state.variables)
        metrics.update(batch_norm_params=kinds["total"], batch_norm_non_trainable=kinds["non_trainable"],
                       batch_norm_epochs=len(history["loss"]), batch_norm_test_rmse=test_rmse(state))

    if "dropout" in args.refinements:
        state, history, _ = train("dropout", DROPOUT, stop=True)
        metrics.update(dropout_epochs=len(history["loss"]), dropout_test_rmse=test_rmse(state))
        mean, std = mc_predict(DROPOUT, state.variables, x_test, args.mc_samples, jax.random.key(args.seed))
        plot_uncertainty(y_test, mean[:, 0], std[:, 0], out / "mc_dropout.png",
                         f"Monte-Carlo dropout, {args.mc_samples} samples per input")
        metrics.update(mc_samples=args.mc_samples, mc_dropout_test_rmse=rmse(mean, y_test),
                       mc_dropout_mean_std=float(std.mean()), mc_dropout_max_std=float(std.max()))
    plot_refinements(histories, out / "refinements.png")
    if args.logdir:
        metrics["logdir"] = str(args.logdir)
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    _print_summary(metrics)
    return finish(out, metrics)


def _print_summary(metrics: dict) -> None:
    """The refinements side by side: test RMSE of each network and the baseline's."""
    rows = [("baseline: " + metrics["baseline"], metrics["baseline_rmse"]),
            (f"base network ({metrics['params']:,} parameters, {metrics['epochs']} epochs)", metrics["test_rmse"])]
    if "small_test_rmse" in metrics:
        rows.append((f"smaller network ({metrics['small_params']:,} parameters)", metrics["small_test_rmse"]))
    if "early_stopping_test_rmse" in metrics:
        rows.append((f"early stopping (stopped after epoch {metrics['early_stopping_epoch']}, best "
                     f"{metrics['early_stopping_best_epoch']})", metrics["early_stopping_test_rmse"]))
    if "batch_norm_test_rmse" in metrics:
        rows.append((f"BatchNorm on the inputs ({metrics['batch_norm_params']:,} parameters, "
                     f"{metrics['batch_norm_non_trainable']} non-trainable)", metrics["batch_norm_test_rmse"]))
    if "dropout_test_rmse" in metrics:
        rows += [("dropout 0.2", metrics["dropout_test_rmse"]),
                 (f"Monte-Carlo dropout mean ({metrics['mc_samples']} samples; mean std "
                  f"{metrics['mc_dropout_mean_std']:.3g})", metrics["mc_dropout_test_rmse"])]
    width = max(len(name) for name, _ in rows)
    print(f"\n{'test RMSE':>{width + 12}}")
    for name, value in rows:
        print(f"{name:<{width}}  {value:10.4f}")


if __name__ == "__main__":
    run()
