"""Training: `fit`, `evaluate` and `predict`, and the parts they are made of.

`trainer` (fit, evaluate, predict), `plan` (a run's checked settings, one
frozen value), `steps` (the train state and the compiled step factories),
`epoch_loop` (the loops over one epoch's batches),
`adapters` (arrays and sources as batches), `callbacks` (and the `History`
`fit` returns), `optimizers` (Keras's optimizer names), `progress` (what `fit`
shows), `losses` (losses), `metrics` (metrics: names, your functions, top-k,
precision, recall, AUC), `precision` (mixed precision), `run_checkpoint` (a
run's checkpoints and resuming), `uncertainty` (Monte-Carlo dropout) and
`sweeps` (grid sweeps). Training builds on `jaxdl.models`, `jaxdl.runtime` and
`jaxdl.data`; none of those imports it.
"""
from jaxdl.training import losses, metrics
from jaxdl.training.callbacks import (
    Callback,
    CSVLogger,
    EarlyStopping,
    FitRun,
    History,
    ModelCheckpoint,
    ReduceLROnPlateau,
    TensorBoard,
)
from jaxdl.training.losses import confusion_matrix
from jaxdl.training.precision import with_precision
from jaxdl.training.run_checkpoint import CheckpointSaveError
from jaxdl.training.steps import TrainState, create_train_state, make_eval_step, make_train_step, metrics_from_sums
from jaxdl.training.sweeps import SweepTable, configurations, sweep
from jaxdl.training.trainer import evaluate, fit, predict
from jaxdl.training.uncertainty import mc_predict

__all__ = [
    "fit", "evaluate", "predict",
    "TrainState", "create_train_state", "make_eval_step", "make_train_step", "metrics_from_sums",
    "Callback", "CSVLogger", "EarlyStopping", "FitRun", "History", "ModelCheckpoint", "ReduceLROnPlateau",
    "TensorBoard",
    "CheckpointSaveError", "with_precision", "losses", "metrics", "confusion_matrix",
    "mc_predict", "SweepTable", "configurations", "sweep",
]
