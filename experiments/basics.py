"""Learning to round: a 34-parameter network learns whether x in [0, 1) is at least 0.5.

10,000 uniform random numbers, Dense(8, relu) -> Dense(2, softmax), Adam,
sparse categorical cross-entropy, 10 epochs of batch 32; then predictions
for 0.0, 0.1, ... 0.9, and a second run holding out 10% for validation.

The probe 0.5 sits on the decision boundary: after 10 epochs its class-1
probability is within 0.03 of 0.5 for every seed we tried (0 to 5), and the
class it lands in depends on the seed and on the processor (on an Intel Xeon
four of those six seeds put it in class 1, the default seed 2 among them; on
an AMD EPYC seed 2 puts it in class 0). So the check asks the tutorial's
answer of the nine other probes, and either class of 0.5.
"""
from __future__ import annotations

import numpy as np
import optax

from experiments.common import Check, checkpointing, finish, parser, run_dir
from jaxdl import MLP, count_params, fit, predict
from jaxdl.plots import plot_history

EXPECTED = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
BOUNDARY_PROBE = 5  # 0.5
# Bands over seeds 0-4: accuracy 0.9914-0.9992, val_accuracy 0.986-1.0.
CHECKS = (
    Check("params", "34", lambda v: v == 34),
    Check("predictions", "0 0 0 0 0 1 1 1 1 1 (0.5: either)",
          lambda v: v[:BOUNDARY_PROBE] == EXPECTED[:BOUNDARY_PROBE]
          and v[BOUNDARY_PROBE + 1:] == EXPECTED[BOUNDARY_PROBE + 1:]),
    Check("accuracy", ">= 0.95", lambda v: v >= 0.95),
    Check("val_accuracy", ">= 0.95", lambda v: v >= 0.95),
)


def rounding_data(n: int = 10_000, seed: int = 0):
    x = np.random.default_rng(seed).random((n, 1), dtype=np.float32)
    return x, (x[:, 0] >= 0.5).astype(np.int32)


def model() -> MLP:
    return MLP(features=(8,), num_outputs=2)


def run(argv=None) -> dict:
    cli = parser(__doc__, precision=True)
    cli.set_defaults(seed=2)
    args = cli.parse_args(argv)
    out = run_dir("basics", args.out)
    checkpoints = checkpointing(args)
    x, y = rounding_data(seed=args.seed)
    common = dict(loss="sparse_categorical_crossentropy", optimizer=optax.adam(1e-3), epochs=10,
                  batch_size=32, seed=args.seed, verbose=not args.quiet)
    state, history = fit(model(), x, y, **common, **checkpoints("model"))
    probes = np.arange(10, dtype=np.float32).reshape(-1, 1) / 10
    predictions = predict(state, probes).argmax(axis=-1).tolist()
    _, val_history = fit(model(), x, y, validation_split=0.1, **common, **checkpoints("validated"))
    plot_history(val_history, out / "history.png", "learning to round")
    return finish(out, {
        "params": count_params(state.variables),
        "accuracy": history["accuracy"][-1],
        "val_accuracy": val_history["val_accuracy"][-1],
        "predictions": predictions,
    })


if __name__ == "__main__":
    run()
