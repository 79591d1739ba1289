"""The epoch loop: runs the compiled, guarded steps over one epoch of any input adapter's batches.

Two forms, one `typing.Protocol` (`EpochLoop`): `run(state, previous, epoch,
resume, after_dispatch, before_dispatch) -> (state, previous, sums, steps run,
steps accepted)`.

- `ScannedEpochs`: in-memory arrays live on the device and an epoch is one
  compiled `lax.scan` (`steps.compiled_epoch`), which removes the per-step
  dispatch that dominates small models;
- `StreamedEpochs`: host batches from an adapter, put on the device(s) two
  ahead (`jaxdl.data.prefetch.to_device`), `steps_per_execution` steps per compiled call
  (`steps.compiled_steps`): sources, and arrays where a compiled loop is slow
  (`steps.loops_are_slow`) or checkpointed within epochs.

The divergence guard's decision comes back as the number of accepted steps.
This module knows nothing of callbacks, logs or files: `before_dispatch` and
`after_dispatch` are how the run checkpoints inside an epoch, moves its
progress bar and calls batch hooks (an `after_dispatch` returning True ends
the epoch there), and `Resume` where a checkpoint taken inside an epoch left
it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxdl.data import prefetch
from jaxdl.training.steps import zero_totals


@dataclasses.dataclass
class Resume:
    """Where a checkpoint taken inside an epoch stood: batches done, the epoch's first step, its running sums."""

    batches_done: int
    start_step: int
    totals: dict
    totals_accepted: int = 0


class EpochLoop(Protocol):
    """One epoch of compiled steps, whatever the input's path to the device."""

    def run(self, state, previous, epoch: int, resume: Resume | None = None,
            after_dispatch: Callable | None = None, before_dispatch: Callable | None = None) -> tuple:
        """`(state, previous, sums, steps run, steps accepted)` of one epoch (see the module's docstring)."""
        ...


@dataclasses.dataclass
class ScannedEpochs:
    """The in-memory path: the arrays live on the device, an epoch is one compiled scan.

    Arrays' orders are drawn in the program from `shuffle_rng` and the step
    count; a cached source's come from `orders(epoch)` (its own orders), and
    `run_epoch` then takes the order in place of the key.
    """

    x: jax.Array
    y: jax.Array
    weights: jax.Array
    shuffle_rng: jax.Array | None
    run_epoch: Callable
    steps_per_epoch: int
    orders: Callable[[int], np.ndarray] | None = None

    def run(self, state, previous, epoch: int, resume: Resume | None = None, after_dispatch=None,
            before_dispatch=None):
        """`(state, previous, sums, steps run, steps accepted)` of one epoch (whole: no `resume` or calls back
        within it)."""
        del resume, after_dispatch, before_dispatch
        order = self.shuffle_rng if self.orders is None else np.asarray(self.orders(epoch), np.int32)
        state, previous, sums, accepted = self.run_epoch(state, previous, self.x, self.y, self.weights, order)
        return state, previous, sums, self.steps_per_epoch, int(accepted)


@dataclasses.dataclass
class StreamedEpochs:
    """Host batches prefetched to the device, `steps_per_execution` steps per compiled call.

    `batches_of(epoch, start_step, skip)` gives an epoch's host batches after
    its first `skip` (an adapter's `host_batches`).
    """

    batches_of: Callable
    run_steps: Callable
    metrics: tuple
    steps_per_execution: int
    put: Callable
    put_state: Callable
    batch_norm: bool = False

    def run(self, state, previous, epoch: int, resume: Resume | None = None, after_dispatch=None,
            before_dispatch=None):
        """`(state, previous, sums, steps run, steps accepted)` of one epoch.

        `resume` goes on from a checkpoint taken inside this epoch;
        `before_dispatch(batches done, steps in the call)` is called before
        every compiled call, `after_dispatch(state, previous, totals, batches
        done, start step)` after it (the checkpoints within an epoch); when
        that returns True, the epoch ends there.
        """
        start_step = int(state.step) if resume is None else resume.start_step
        done = 0 if resume is None else resume.batches_done
        totals = zero_totals(self.metrics) if resume is None else resume.totals
        # Placed as the state is: an argument placed otherwise than the call before's output would recompile.
        healthy, totals = self.put_state((jnp.bool_(True), totals))
        steps = 0
        host_batches = self.batches_of(epoch, start_step, done)
        for group in prefetch.to_device(prefetch.stacked(host_batches, self.steps_per_execution), put=self.put):
            if self.batch_norm and "mask" in group:
                raise ValueError(f"a batch of {group['mask'].shape[-1]} examples (padded to split over the "
                                 "devices) reached a model with BatchNorm statistics, which padding rows would "
                                 "enter; make every batch a multiple of the mesh's device count")
            if before_dispatch is not None:
                before_dispatch(done + steps, group["x"].shape[0])
            state, previous, healthy, totals = self.run_steps(state, previous, healthy, totals, group)
            steps += group["x"].shape[0]
            if after_dispatch is not None and after_dispatch(state, previous, totals, done + steps, start_step):
                break
        accepted = int(totals.pop("accepted_steps")) - (0 if resume is None else int(resume.totals_accepted))
        return state, previous, totals, steps, accepted
