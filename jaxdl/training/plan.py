"""The plan of a run: what `fit` and `evaluate` decide from their arguments, once, as one frozen value.

`fit` checks its arguments, resolves the mesh, the device-memory bound and
the model's train flag, and writes the outcome here; every part of the run
(the input adapter, the epoch loop, validation, the run checkpoint, the
epochs) reads the plan instead of being handed the same dozen values again.
Frozen, so that no part changes what another part relies on; plain data
besides the mesh and the loss, as big_vision's configs are.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from jaxdl.models.contract import AUTO


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """The settings of one `fit` or `evaluate` call, checked.

    Attributes:
      loss: a loss name from `jaxdl.training.losses` or a function
        `(outputs, batch) -> per-example loss`.
      metrics: the metrics (names, `Metric`s, functions), checked
        (`jaxdl.training.metrics.checked`).
      batch_size: examples per step over all devices.
      mesh: the `jax.sharding.Mesh` whose `data` axis splits each batch.
      whole_limit: the bytes per device that in-memory data may take to be
        placed whole (`jaxdl.data.device_data_limit`).
      train_flag: the model's training keyword, resolved (None: it takes
        none).
      rng_streams: the random streams the model draws from in training.
      features: a source's `(input, label)` feature names, or None.
      transform: what computes `(x, y)` from a source's example, or None.
      cache: how a random-access source's decoded examples are kept
        ("auto", True, False or a byte bound).
      epochs: the epoch to end at; 0 for an evaluation.
      initial_epoch: the epoch to start at.
      seed: the run's seed (initialisation and shuffling).
      shuffle: whether each epoch reads the data in a new order.
      drop_remainder: whether a smaller last batch is dropped.
      steps_per_epoch: an iterable's batches per epoch, or None.
      steps_per_execution: steps per compiled call on the streamed path.
      every_steps: checkpoint every this many batches; None: at each
        epoch's end.
      verbosity: 0 silent, 1 a progress bar, 2 a line per epoch.
    """

    loss: Any
    metrics: tuple
    batch_size: int
    mesh: Any
    whole_limit: int
    train_flag: str | None = AUTO
    rng_streams: tuple[str, ...] = ("dropout", "augment")
    features: Sequence[str] | None = None
    transform: Callable | None = None
    cache: bool | int | str = "auto"
    epochs: int = 0
    initial_epoch: int = 0
    seed: int = 0
    shuffle: bool = False
    drop_remainder: bool = False
    steps_per_epoch: int | None = None
    steps_per_execution: int = 1
    every_steps: int | None = None
    verbosity: int = 0

    def loss_description(self) -> str:
        """The loss as a run checkpoint records it: its name, or a function's qualified name."""
        return self.loss if isinstance(self.loss, str) else getattr(self.loss, "__qualname__", repr(self.loss))
