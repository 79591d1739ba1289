"""MNIST digits: the blogs' MLP (784-128-10) and Keras's classic CNN, trained from a tfds source.

Data, in this order: Keras's `mnist.npz` given with `--data PATH` (in-memory
arrays); tfds `mnist` prepared as ArrayRecord in `--data-dir` or the default
tfds directory (streamed from disk by grain); `--mock` runs the same workflow
on tfds's mock data (random images: it checks the pipeline, not accuracy).
Pixels stay uint8 up to the device; the models rescale them by 1/255 first,
as a Keras `Rescaling` layer does. Adam, sparse categorical cross-entropy,
accuracy; the test split is the validation data, as in tfds's Keras example.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import optax

from experiments.common import Check, checkpointing, finish, parser, run_dir
from jaxdl import MLP, ConvNet, count_params, evaluate, fit, predict
from jaxdl.data import DatasetNotPreparedError, tfds_source
from jaxdl.losses import confusion_matrix
from jaxdl.plots import plot_confusion_matrix, plot_history

# 784 -> 128 relu -> 10: 100,480 + 1,290 = 101,770 parameters.
MLP_MODEL = MLP(features=(128,), num_outputs=10, input_scale=1 / 255)
# keras.io's "Simple MNIST convnet": 320 + 18,496 + 16,010 = 34,826 parameters ("valid" convolutions).
CNN_MODEL = ConvNet(layers=(("conv", 32, 3), ("maxpool", 2), ("conv", 64, 3), ("maxpool", 2), ("flatten",),
                            ("dropout", 0.5), ("dense", 10)), padding="VALID", input_scale=1 / 255)
MLP_PARAMS, CNN_PARAMS = 101_770, 34_826
REAL_DATA_TARGETS = "MLP >= 0.98, CNN >= 0.992"
MOCK_EXAMPLES = 128


def checks(metrics: dict) -> tuple[Check, ...]:
    """Parameter counts always; test accuracy only on the real data (mock images are random)."""
    counts = (Check("mlp_params", f"{MLP_PARAMS:,}", lambda v: v == MLP_PARAMS),
              Check("cnn_params", f"{CNN_PARAMS:,}", lambda v: v == CNN_PARAMS))
    if metrics.get("data") == "mock":
        return counts
    return counts + (Check("mlp_test_accuracy", ">= 0.98", lambda v: v >= 0.98),
                     Check("cnn_test_accuracy", ">= 0.992", lambda v: v >= 0.992))


def find_data(data_path: str | None, data_dir: str | None):
    """`(train, test, description)`: arrays from an `.npz`, or tfds sources; DatasetNotPreparedError if none."""
    if data_path:
        with np.load(data_path) as npz:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(npz.files)
            if missing:
                raise ValueError(f"{data_path} is not Keras's mnist.npz: it lacks {sorted(missing)}")
            return ((npz["x_train"][..., None], npz["y_train"].astype(np.int32)),
                    (npz["x_test"][..., None], npz["y_test"].astype(np.int32)), f"keras npz {data_path}")
    return tfds_source("mnist", "train", data_dir), tfds_source("mnist", "test", data_dir), "tfds mnist"


def suite_args() -> tuple[list[str], list[tuple[str, str, str]]]:
    """What `experiments.suite` passes: the real data when the default tfds dir has it, else `--mock`."""
    try:
        find_data(None, os.environ.get("TFDS_DATA_DIR"))
        return [], []
    except DatasetNotPreparedError as error:
        reason = f"tfds mnist is not prepared in {error.looked_in}, and no --data mnist.npz was given"
        return ["--mock"], [("test accuracy on real MNIST", REAL_DATA_TARGETS, f"skipped: {reason}")]


def labels_of(data) -> np.ndarray:
    return data[1] if isinstance(data, tuple) else np.asarray([example["label"] for example in data], np.int32)


def train_and_test(model, train, test, *, epochs: int, batch_size: int, seed: int, verbose: bool,
                   checkpoint: dict | None = None):
    """Fits on `train` (arrays or a source), validating on `test`; returns state, history, accuracy, logits."""
    arrays = isinstance(train, tuple)
    state, history = fit(model, *(train if arrays else (train,)), loss="sparse_categorical_crossentropy",
                         optimizer=optax.adam(1e-3), epochs=epochs, batch_size=batch_size, seed=seed,
                         validation_data=test, verbose=verbose, **(checkpoint or {}))
    logits = predict(state, test[0] if arrays else test, batch_size=512)
    accuracy = evaluate(state, *(test if arrays else (test,)), loss="sparse_categorical_crossentropy",
                        batch_size=512)["accuracy"]
    return state, history, accuracy, logits


def run(argv=None) -> dict:
    cli = parser(__doc__, precision=True)
    cli.add_argument("--data", default=None, help="Keras's mnist.npz (x_train, y_train, x_test, y_test)")
    cli.add_argument("--data-dir", default=None, help="tfds data dir holding mnist as ArrayRecord "
                                                      "(default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    cli.add_argument("--mock", action="store_true", help="tfds mock data: random images, the pipeline only")
    cli.add_argument("--mlp-epochs", type=int, default=20)
    cli.add_argument("--cnn-epochs", type=int, default=15)
    cli.add_argument("--batch-size", type=int, default=128)
    args = cli.parse_args(argv)
    out = run_dir("mnist", args.out)
    checkpoints = checkpointing(args)

    mocking = contextlib.nullcontext()
    if args.mock:
        import tensorflow_datasets as tfds

        mocking = tfds.testing.mock_data(num_examples=MOCK_EXAMPLES)
        args.mlp_epochs, args.cnn_epochs = min(args.mlp_epochs, 1), min(args.cnn_epochs, 1)
    with mocking:
        train, test, description = find_data(args.data, args.data_dir)
        description = "mock" if args.mock else description
        runs = {name: train_and_test(model, train, test, epochs=epochs, batch_size=args.batch_size,
                                     seed=args.seed, verbose=not args.quiet, checkpoint=checkpoints(name))
                for name, model, epochs in (("mlp", MLP_MODEL, args.mlp_epochs), ("cnn", CNN_MODEL,
                                                                                   args.cnn_epochs))}
        truth = labels_of(test)
    metrics = {"data": description, "train_samples": len(train[1] if isinstance(train, tuple) else train),
               "test_samples": int(len(truth))}
    for name, (state, history, accuracy, logits) in runs.items():
        plot_history(history, out / f"{name}_history.png", f"MNIST, {name.upper()}")
        matrix = np.asarray(confusion_matrix(truth, logits.argmax(axis=1), 10))
        plot_confusion_matrix(matrix, [str(d) for d in range(10)], out / f"{name}_confusion_matrix.png",
                              f"MNIST {name.upper()}, test split")
        metrics.update({f"{name}_params": count_params(state.variables), f"{name}_test_accuracy": accuracy,
                        f"{name}_epochs": len(history["loss"]), f"{name}_confusion_matrix": matrix.tolist()})
    return finish(out, metrics)


if __name__ == "__main__":
    run()
