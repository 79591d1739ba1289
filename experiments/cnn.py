"""Convolutional networks: the Carpentries episode "Advanced layer types", with dropout and a grid search.

Data, in this order: Dollar Street 10 (`--data DIR` holding `train_images.npy`,
`train_labels.npy`, `test_images.npy`, `test_labels.npy` from Zenodo record
10970014: 64x64x3 photos of household objects, 10 classes); or CIFAR-10
through tfds (`--cifar10`, prepared as ArrayRecord in `--data-dir`; the
lesson's older variant: the first 5,000 training images). Neither can be
downloaded here: without them `--counts-only` computes the parameter counts
alone (from shapes; nothing trains), which is what `experiments.suite` runs.

A seeded 80/20 split of the training images validates every epoch; the test
images are kept for the end. The lesson's networks (`padding="VALID"`, as
Keras's default; counts for 64x64x3 inputs):
- [Conv(50, 3, relu) -> MaxPool(2)] x 2 -> Flatten -> Dense(50, relu) -> Dense(10): 514,510;
- Conv(50, 3) x 2 -> Flatten -> Dense(10), no pooling: 1,823,960 (counted, not trained);
- a third conv + pool block: 137,060 (trained in the grid search);
- dense only, Flatten -> Dense(50) -> Dense(50) -> Dense(10): 617,510.
Then dropout after each pooling layer: a sweep of the dropout rate (0.2 to
0.95, `jaxdl.sweep`) with early stopping on val_loss (best weights
restored), and a grid search over the number of conv blocks x the dropout
rate that prints and plots its table and saves the best model (lowest
val_loss) with `jaxdl.save_model`. Adam(1e-3), sparse categorical
cross-entropy on logits, accuracy, batch 32. Runs that the sweep and the grid
share (same blocks, rate, seed and epochs) train once.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np

from experiments.common import Check, checkpointing, finish, parser, run_dir
from jaxdl import MLP, ConvNet, CSVLogger, EarlyStopping, TensorBoard, count_params, evaluate, fit, save_model, sweep
from jaxdl.plots import plot_history, save_figure

FILES = ("train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy")
IMAGE_SHAPE = (64, 64, 3)
NUM_CLASSES = 10
CIFAR_TRAIN_IMAGES = 5_000
DROPOUT_RATES = (0.2, 0.35, 0.5, 0.65, 0.8, 0.95)
GRID_BLOCKS = (1, 2, 3)
GRID_RATES = (0.2, 0.5, 0.8)
LOSS = "sparse_categorical_crossentropy"
LESSON_PARAMS = {"cnn": 514_510, "no_pooling": 1_823_960, "three_blocks": 137_060, "dense_only": 617_510}
REAL_DATA_TARGET = "> 0.1 (chance, 10 classes)"


def conv_layers(blocks: int = 2, dropout: float = 0.0) -> tuple:
    """[Conv(50, 3, relu) -> MaxPool(2) (-> Dropout)] x blocks -> Flatten -> Dense(50, relu) -> Dense(10)."""
    layers = []
    for _ in range(blocks):
        layers += [("conv", 50, 3), ("maxpool", 2)] + ([("dropout", dropout)] if dropout else [])
    return tuple(layers) + (("flatten",), ("dense", 50, "relu"), ("dense", NUM_CLASSES))


NO_POOLING = (("conv", 50, 3), ("conv", 50, 3), ("flatten",), ("dense", NUM_CLASSES))


def models(input_scale: float | None) -> dict:
    """The lesson's four networks (dropout comes later, per rate)."""
    return {"cnn": ConvNet(conv_layers(2), padding="VALID", input_scale=input_scale),
            "no_pooling": ConvNet(NO_POOLING, padding="VALID", input_scale=input_scale),
            "three_blocks": ConvNet(conv_layers(3), padding="VALID", input_scale=input_scale),
            "dense_only": MLP(features=(50, 50), num_outputs=NUM_CLASSES, input_scale=input_scale)}


def param_counts(image_shape=IMAGE_SHAPE) -> dict:
    """Each network's parameter count for `image_shape` inputs, from shapes alone (nothing initialised)."""
    sample = jax.ShapeDtypeStruct((1, *image_shape), np.float32)
    return {name: count_params(jax.eval_shape(lambda x, m=model: m.init(jax.random.key(0), x), sample))
            for name, model in models(None).items()}


def checks(metrics: dict) -> tuple[Check, ...]:
    """The four parameter counts for 64x64x3 images always; accuracy above chance when real data trained."""
    counts = tuple(Check(f"{name}_params_64x64", f"{count:,}", lambda v, c=count: v == c)
                   for name, count in LESSON_PARAMS.items())
    if metrics.get("data", "").startswith("none"):
        return counts
    return counts + (Check("cnn_test_accuracy", REAL_DATA_TARGET, lambda v: v > 0.1),)


def default_data_dir() -> Path:
    from experiments.common import shared_data_dir

    return shared_data_dir() / "dollar-street-10"


def suite_args() -> tuple[list[str], list[tuple[str, str, str]]]:
    """Dollar Street 10 from the shared data when it is there, else CIFAR-10 if tfds has it, else counts only."""
    folder = default_data_dir()
    if all((folder / name).is_file() for name in FILES):
        return ["--data", str(folder)], []
    from jaxdl.data import DatasetNotPreparedError, tfds_source

    try:
        tfds_source("cifar10", "train", os.environ.get("TFDS_DATA_DIR"))
        return ["--cifar10"], []
    except (DatasetNotPreparedError, ValueError) as error:
        looked = getattr(error, "looked_in", "the default tfds directory")
        reason = (f"no Dollar Street 10 in {folder} (no --data DIR given) and tfds cifar10 is not prepared in "
                  f"{looked}")
        return ["--counts-only"], [("test accuracy (Dollar Street 10 or CIFAR-10)", REAL_DATA_TARGET,
                                    f"skipped: {reason}")]


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{path}: not a readable .npy array ({type(error).__name__}: {error})") from None


def load_dollar_street(directory: str | os.PathLike):
    """`(train, test)` pairs of (images, labels) from Dollar Street 10's four `.npy` files, checked.

    Images must be (N, 64, 64, 3), labels (N,) integer classes 0..9, as many
    as the images; each problem is an error naming the file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--data {directory}: no such folder (Dollar Street 10: {', '.join(FILES)} "
                                "from https://zenodo.org/records/10970014)")
    missing = [name for name in FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"--data {directory} lacks {', '.join(missing)} (Dollar Street 10 needs "
                                f"{', '.join(FILES)})")
    splits = []
    for split in ("train", "test"):
        images_path, labels_path = directory / f"{split}_images.npy", directory / f"{split}_labels.npy"
        images, labels = _load_array(images_path), _load_array(labels_path)
        if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
            raise ValueError(f"{images_path} holds images of shape {images.shape}; Dollar Street 10's are "
                             f"(N, {', '.join(map(str, IMAGE_SHAPE))})")
        if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
            raise ValueError(f"{images_path} holds {images.dtype} values, not pixel numbers")
        labels = labels.reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else labels
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{labels_path} must hold integer class labels of shape (N,); got {labels.dtype} "
                             f"of shape {labels.shape}")
        if len(labels) != len(images):
            raise ValueError(f"{labels_path} has {len(labels)} labels but {images_path} has {len(images)} images")
        if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise ValueError(f"{labels_path} holds classes {labels.min()}..{labels.max()}; Dollar Street 10 has "
                             f"classes 0..{NUM_CLASSES - 1}")
        splits.append((images, labels.astype(np.int32)))
    return splits[0], splits[1]


def load_cifar10(data_dir: str | None, train_images: int = CIFAR_TRAIN_IMAGES):
    """`(train, test)` from tfds cifar10 (ArrayRecord): the first `train_images` training images, all test images."""
    from jaxdl import tfds_source

    def arrays(split, count=None):
        source = tfds_source("cifar10", split, data_dir)
        examples = [source[i] for i in range(len(source) if count is None else min(count, len(source)))]
        return (np.stack([e["image"] for e in examples]).astype(np.uint8),
                np.asarray([e["label"] for e in examples], np.int32))

    return arrays("train", train_images), arrays("test")


def as_model_input(images: np.ndarray) -> tuple[np.ndarray, float | None]:
    """`(images, input_scale)`: uint8 pixels stay uint8 and the model rescales by 1/255 on the device;
    float pixels in 0..255 are scaled here, floats already in [0, 1] are left as they are."""
    if np.issubdtype(images.dtype, np.integer):
        return images.astype(np.uint8), 1 / 255
    images = images.astype(np.float32)
    return (images / 255.0 if images.size and images.max() > 1.5 else images), None


def plot_sweep(table, path, title: str):
    """Validation and test accuracy against the dropout rate."""
    rows = [row for row in table.rows if not row["error"]]
    fig, ax = plt.subplots(figsize=(5, 3.8))
    rates = [row["dropout_rate"] for row in rows]
    for metric in ("val_accuracy", "test_accuracy"):
        ax.plot(rates, [row[metric] for row in rows], marker="o", label=metric)
    ax.set(xlabel="dropout rate", ylabel="accuracy", title=title)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def plot_grid(table, blocks, rates, path, title: str):
    """The grid search's validation accuracy, conv blocks x dropout rate, the best cell outlined."""
    values = np.full((len(blocks), len(rates)), np.nan)
    for row in table.rows:
        if not row["error"]:
            values[blocks.index(row["conv_blocks"]), rates.index(row["dropout_rate"])] = row["val_accuracy"]
    fig, ax = plt.subplots(figsize=(1.4 * len(rates) + 2.5, 1.1 * len(blocks) + 2))
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        ax.text(j, i, "failed" if np.isnan(value) else f"{value:.3f}", ha="center", va="center", color="white")
    if table.best is not None:
        i, j = blocks.index(table.best["conv_blocks"]), rates.index(table.best["dropout_rate"])
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(len(rates)), [str(r) for r in rates])
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set(xlabel="dropout rate", ylabel="conv blocks", title=title)
    fig.colorbar(image, ax=ax, label="val_accuracy")
    fig.tight_layout()
    return save_figure(fig, path)


def run(argv=None) -> dict:
    cli = parser(__doc__)
    cli.add_argument("--data", default=None, help="Dollar Street 10 folder with the four .npy files")
    cli.add_argument("--cifar10", action="store_true", help="CIFAR-10 from tfds (the first 5,000 training images)")
    cli.add_argument("--data-dir", default=None, help="tfds data dir holding cifar10 as ArrayRecord")
    cli.add_argument("--counts-only", action="store_true", help="parameter counts only, no data, no training")
    cli.add_argument("--epochs", type=int, default=10, help="epochs of the networks without dropout")
    cli.add_argument("--sweep-epochs", type=int, default=20, help="most epochs of each sweep and grid run")
    cli.add_argument("--patience", type=int, default=5, help="early stopping's patience in the sweep and grid")
    cli.add_argument("--subset", type=int, default=None, help="train on the first N training images only")
    cli.add_argument("--rates", type=float, nargs="+", default=list(DROPOUT_RATES), help="dropout rates to sweep")
    cli.add_argument("--blocks", type=int, nargs="+", default=list(GRID_BLOCKS), help="grid: conv blocks")
    cli.add_argument("--grid-rates", type=float, nargs="+", default=list(GRID_RATES), help="grid: dropout rates")
    cli.add_argument("--logdir", default=None, help="log every run to TensorBoard and CSV under this folder")
    cli.add_argument("--skip-dense", action="store_true",
                     help="do not train the dense-only network (a network fewer to compile, for quick checks)")
    args = cli.parse_args(argv)
    bad_rates = [rate for rate in args.rates + args.grid_rates if not 0 <= rate < 1]
    if bad_rates:
        raise SystemExit(f"error: --rates and --grid-rates take dropout rates in [0, 1), got {bad_rates}")
    if min(args.blocks) < 1:
        raise SystemExit(f"error: --blocks takes positive numbers of conv blocks, got {args.blocks}")
    out = run_dir("cnn", args.out)
    counts = param_counts()
    metrics = {f"{name}_params_64x64": count for name, count in counts.items()}
    if args.counts_only:
        print("parameter counts for 64x64x3 images (no data: nothing trained): "
              + ", ".join(f"{name} {count:,}" for name, count in counts.items()), flush=True)
        return finish(out, {"data": "none (parameter counts only)", **metrics})
    if args.data:
        (x_train, y_train), (x_test, y_test) = load_dollar_street(args.data)
        data = f"Dollar Street 10 {args.data}"
    elif args.cifar10:
        (x_train, y_train), (x_test, y_test) = load_cifar10(args.data_dir)
        data = f"tfds cifar10, first {len(y_train)} training images"
    else:
        raise SystemExit("error: pass --data DIR (Dollar Street 10), --cifar10, or --counts-only")
    if args.subset is not None:
        if args.subset < 2:
            raise SystemExit(f"error: --subset must be at least 2 (a training and a validation image), got "
                             f"{args.subset}")
        x_train, y_train = x_train[:args.subset], y_train[:args.subset]
    from sklearn.model_selection import train_test_split

    x_train, input_scale = as_model_input(x_train)
    x_test, _ = as_model_input(x_test)
    x_train, x_val, y_train, y_val = train_test_split(x_train, y_train, test_size=0.2, random_state=args.seed)
    metrics.update(data=data, image_shape=list(x_train.shape[1:]), train_samples=len(y_train),
                   val_samples=len(y_val), test_samples=len(y_test))
    checkpoints = checkpointing(args)
    if args.logdir:
        print(f"logging to TensorBoard under {args.logdir} (tensorboard --logdir {args.logdir}) and to "
              f"{args.logdir}/NAME.csv, one run per network", flush=True)

    def train(name, model, epochs, stop: bool):
        callbacks = [EarlyStopping("val_loss", patience=args.patience, restore_best_weights=True)] if stop else []
        if args.logdir:
            callbacks += [TensorBoard(Path(args.logdir) / name), CSVLogger(Path(args.logdir) / f"{name}.csv")]
        state, history = fit(model, x_train, y_train, loss=LOSS, epochs=epochs, batch_size=32, seed=args.seed,
                             validation_data=(x_val, y_val), callbacks=callbacks, verbose=not args.quiet,
                             **checkpoints(name))
        test = evaluate(state, x_test, y_test, loss=LOSS, batch_size=32)
        best = callbacks[0].best_epoch if stop and callbacks[0].best_epoch is not None else len(history["loss"]) - 1
        return state, history, {"val_loss": history["val_loss"][best], "val_accuracy": history["val_accuracy"][best],
                                "test_accuracy": test["accuracy"], "test_loss": test["loss"],
                                "epochs": len(history["loss"]), "params": count_params(state.variables)}

    # One model object per architecture: compiled steps are keyed by the model's `apply`, a bound method, and
    # bound methods of two equal models compare unequal (Python compares their `self` by identity).
    networks = models(input_scale)
    by_layers = {networks["cnn"].layers: networks["cnn"]}
    for name in ("cnn",) if args.skip_dense else ("dense_only", "cnn"):
        _, history, result = train(name, networks[name], args.epochs, stop=False)
        plot_history(history, out / f"{name}_history.png", f"{name} ({result['params']:,} parameters)")
        metrics.update({f"{name}_{key}": value for key, value in result.items()})

    trained = {}  # (blocks, rate) -> (model, state, result): the sweep's runs reused by the grid

    def with_dropout(conv_blocks: int, dropout_rate: float) -> dict:
        key = (int(conv_blocks), float(dropout_rate))
        if key not in trained:
            layers = conv_layers(*key)
            model = by_layers.setdefault(layers, ConvNet(layers, padding="VALID", input_scale=input_scale))
            state, history, result = train(f"blocks{key[0]}_dropout{key[1]:g}", model, args.sweep_epochs, stop=True)
            trained[key] = model, state, result
        return trained[key][2]

    print("\ndropout rate sweep (2 conv blocks, early stopping on val_loss)", flush=True)
    rates_table = sweep(lambda dropout_rate: with_dropout(2, dropout_rate), {"dropout_rate": args.rates},
                        out / "dropout_sweep.csv", monitor="val_loss", mode="min")
    plot_sweep(rates_table, out / "dropout_sweep.png", "dropout after each pooling layer")
    print("\ngrid search: conv blocks x dropout rate (early stopping on val_loss)", flush=True)
    grid = sweep(with_dropout, {"conv_blocks": args.blocks, "dropout_rate": args.grid_rates},
                 out / "grid_search.csv", monitor="val_loss", mode="min")
    plot_grid(grid, list(args.blocks), list(args.grid_rates), out / "grid_search.png", "grid search")
    metrics.update(dropout_sweep=[{k: row[k] for k in ("dropout_rate", "val_loss", "val_accuracy", "test_accuracy",
                                                       "epochs", "error") if k in row} for row in rates_table.rows],
                   best_dropout_rate=None if rates_table.best is None else rates_table.best["dropout_rate"],
                   grid_search=[{k: row[k] for k in ("conv_blocks", "dropout_rate", "val_loss", "val_accuracy",
                                                     "test_accuracy", "error") if k in row} for row in grid.rows])
    if grid.best is not None:
        model, state, result = trained[(int(grid.best["conv_blocks"]), float(grid.best["dropout_rate"]))]
        saved = save_model(out / "best_model", model, state.variables, overwrite=True,
                           metadata={"config": grid.best_config, **result, "data": data})
        print(f"best model ({grid.verdict()}) saved to {saved}", flush=True)
        metrics.update(best_config=grid.best_config, best_val_loss=result["val_loss"],
                       best_test_accuracy=result["test_accuracy"], best_model=str(saved))
    return finish(out, metrics)


if __name__ == "__main__":
    run()
