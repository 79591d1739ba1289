"""jaxdl: functional deep learning on JAX (Flax Linen models, Optax optimizers, jit-compiled steps)."""
from jaxdl.checkpoint import load_model, save_model
from jaxdl.models import ConvNet, MLP, count_params
from jaxdl.model_summary import summary
from jaxdl.callbacks import (Callback, CSVLogger, EarlyStopping, FitRun, ModelCheckpoint, ReduceLROnPlateau,
                             TensorBoard)
from jaxdl.train import TrainState, create_train_state, make_eval_step, make_train_step, summarize
from jaxdl.driver import evaluate, fit, predict
from jaxdl.data import tfds_source
from jaxdl.uncertainty import mc_predict
from jaxdl.tuning import sweep

__version__ = "0.1.0"
