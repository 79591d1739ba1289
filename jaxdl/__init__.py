"""jaxdl: functional deep learning on JAX (Flax Linen models, Optax optimizers, jit-compiled steps)."""
from jaxdl.data import tfds_source
from jaxdl.models import MLP, ConvNet, count_params, trained_module
from jaxdl.models.saving import load_model, save_model
from jaxdl.models.summary import summary
from jaxdl.training import (
    Callback,
    CSVLogger,
    EarlyStopping,
    FitRun,
    History,
    ModelCheckpoint,
    ReduceLROnPlateau,
    TensorBoard,
    TrainState,
    create_train_state,
    evaluate,
    fit,
    make_eval_step,
    make_train_step,
    mc_predict,
    metrics_from_sums,
    predict,
    sweep,
)

__version__ = "0.2.0"

# The names `from jaxdl import ...` offers (each module's others are reached through the module).
__all__ = [
    "load_model", "save_model",
    "ConvNet", "MLP", "count_params", "summary", "trained_module",
    "Callback", "CSVLogger", "EarlyStopping", "FitRun", "History", "ModelCheckpoint", "ReduceLROnPlateau",
    "TensorBoard",
    "TrainState", "create_train_state", "make_eval_step", "make_train_step", "metrics_from_sums",
    "evaluate", "fit", "predict", "tfds_source", "mc_predict", "sweep",
]
