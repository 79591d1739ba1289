"""Palmer penguins: species from bill length, bill depth, flipper length and body mass.

Dense(10, relu) -> Dense(3, softmax), 83 parameters, Adam, categorical
cross-entropy, 100 epochs on a stratified 80/20 split (seed 0). The tutorial
trains on the raw features and ends near 59% test accuracy, never predicting
Chinstrap: `--unscaled` reproduces that setting (for seeds 0-4: 0.33 to 0.68
test accuracy, and at most 2 of the 14 test Chinstraps recognised; which
seed lands where depends on the processor too). By default the features are
standardized with the training split's mean and deviation, as they should be.
The model is then saved, reloaded in a new Python process, and its
predictions compared with the ones made before saving.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import optax

from experiments.common import Check, checkpointing, finish, parser, run_dir
from jaxdl import MLP, count_params, fit, predict, save_model
from jaxdl.plots import plot_confusion_matrix, plot_history
from jaxdl.training import confusion_matrix

FEATURES = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"]
SPECIES = ["Adelie", "Chinstrap", "Gentoo"]
# Band over seeds 0-4 (the seed also draws the split): standardized test accuracy 0.971-1.0.
CHECKS = (
    Check("params", "83", lambda v: v == 83),
    Check("test_accuracy", ">= 0.95 standardized (tutorial, unscaled: ~0.59)", lambda v: v >= 0.95),
    Check("reload_identical", "true", lambda v: v is True),
)


def load_split(seed: int = 0):
    """(x_train, y_train), (x_test, y_test) with one-hot labels: a stratified 80/20 split."""
    from palmerpenguins import load_penguins
    from sklearn.model_selection import train_test_split

    frame = load_penguins().dropna(subset=FEATURES + ["species"])
    x = frame[FEATURES].to_numpy(np.float32)
    labels = frame["species"].map(SPECIES.index).to_numpy(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(x, labels, test_size=0.2, stratify=labels,
                                                        random_state=seed)
    one_hot = np.eye(len(SPECIES), dtype=np.float32)
    return (x_train, one_hot[y_train]), (x_test, one_hot[y_test])


def standardize(x_train, x_test):
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    return (x_train - mean) / std, (x_test - mean) / std


def predictions_in_new_process(model_dir, x) -> np.ndarray:
    """Loads the saved model in a fresh interpreter and returns its outputs for `x`."""
    code = ("import json, sys, numpy as np; from jaxdl import load_model, predict; "
            "model, variables, _ = load_model(sys.argv[1]); "
            "x = np.asarray(json.loads(sys.stdin.read()), np.float32); "
            "print(json.dumps(predict(model, x, variables=variables).tolist()))")
    result = subprocess.run([sys.executable, "-c", code, str(model_dir)], input=json.dumps(x.tolist()),
                            capture_output=True, text=True, check=True)
    return np.asarray(json.loads(result.stdout.strip().splitlines()[-1]), np.float32)


def run(argv=None) -> dict:
    cli = parser(__doc__, precision=True)
    cli.add_argument("--unscaled", action="store_true", help="train on raw features, as the tutorial does")
    cli.add_argument("--epochs", type=int, default=100)
    args = cli.parse_args(argv)
    out = run_dir("penguins", args.out)
    (x_train, y_train), (x_test, y_test) = load_split(args.seed)
    if not args.unscaled:
        x_train, x_test = standardize(x_train, x_test)
    model = MLP(features=(10,), num_outputs=len(SPECIES))
    state, history = fit(model, x_train, y_train, loss="categorical_crossentropy", optimizer=optax.adam(1e-3),
                         epochs=args.epochs, batch_size=32, seed=args.seed, validation_data=(x_test, y_test),
                         verbose=not args.quiet, **checkpointing(args)("model"))
    logits = predict(state, x_test)
    truth = y_test.argmax(axis=1)
    matrix = np.asarray(confusion_matrix(truth, logits.argmax(axis=1), len(SPECIES)))
    plot_history(history, out / "history.png", "Palmer penguins")
    plot_confusion_matrix(matrix, SPECIES, out / "confusion_matrix.png", "Palmer penguins, test split")

    saved = save_model(out / "model", model, state.variables, metadata={"classes": SPECIES}, overwrite=True)
    reloaded = predictions_in_new_process(saved, x_test)
    return finish(out, {
        "params": count_params(state.variables),
        "test_accuracy": float((logits.argmax(axis=1) == truth).mean()),
        "test_samples": int(len(truth)),
        "confusion_matrix": matrix.tolist(),
        "reload_identical": bool(np.array_equal(reloaded, logits)),
        "standardized": not args.unscaled,
    })


if __name__ == "__main__":
    run()
