"""What `fit` shows while it trains, as Keras shows it: one line per epoch, kept.

`verbose=1` where a bar can be redrawn in place (stderr is a terminal, or a
Jupyter kernel where tqdm draws its notebook widget) keeps one tqdm bar per
epoch on screen, over the epoch's steps, ending with the epoch's metrics.
The bar moves between compiled calls, never inside one: a streamed epoch's
after each call of `steps_per_execution` steps, a scanned epoch's (one call)
at its end, so showing it costs the steps nothing. Elsewhere (a pipe, a log
file, a notebook without widgets) and with `verbose=2`, an epoch is one
plain line when it ends, with no carriage return.
"""
from __future__ import annotations

import os
import sys

from tqdm import auto as tqdm_auto, autonotebook, std as tqdm_std


def dynamic_display() -> bool:
    """Whether a progress bar can be redrawn in place: stderr is a terminal, or tqdm draws notebook widgets."""
    return autonotebook.tqdm is not tqdm_std.tqdm or sys.stderr.isatty()  # autonotebook's: std or notebook


def _sized(stream) -> bool:
    """Whether the terminal `stream` writes to tells its size (a pseudo-terminal never sized tells 0 x 0)."""
    try:
        return min(os.get_terminal_size(stream.fileno())) > 0
    except (AttributeError, OSError, ValueError):
        return False


def format_logs(logs: dict[str, float]) -> str:
    """`loss: 0.1234 - accuracy: 0.9000`, as Keras writes an epoch's logs."""
    return " - ".join(f"{name}: {value:.4f}" for name, value in logs.items())


class EpochLine:
    """One epoch's display: a bar over its steps (`bar`), a plain line printed at its end, or nothing (no
    `header`: silent)."""

    def __init__(self, header: str | None = None, bar=None):
        self.header, self.bar = header, bar

    def advance_to(self, done: int) -> None:
        """The epoch's steps done so far (called between compiled calls)."""
        if self.bar is not None and done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def end(self, done: int, logs: dict[str, float]) -> None:
        """The epoch ended after `done` steps with `logs`: the bar completed and kept, or the line printed."""
        if self.bar is None:
            if self.header is not None:
                print(f"{self.header} - {format_logs(logs)}", flush=True)
            return
        if self.bar.total is None:  # an iterable's epoch: its length is known now
            self.bar.total = done
        self.advance_to(done)
        # The kept line whole, however long its metrics: a terminal's width trims only the bar while it moves
        self.bar.ncols, self.bar.dynamic_ncols = None, False
        self.bar.set_postfix_str(format_logs(logs), refresh=False)
        self.bar.close()

    def close(self) -> None:
        """The epoch stopped without logs (fit stops and says why): the bar is kept as it stands."""
        if self.bar is not None:
            self.bar.close()


class Progress:
    """`fit`'s display for a run of `epochs` epochs at Keras's `verbosity` (0, 1 or 2; see `fit`)."""

    def __init__(self, verbosity: int, epochs: int):
        self.verbosity, self.epochs = verbosity, epochs
        self.bars = verbosity == 1 and dynamic_display()

    def epoch(self, epoch: int, steps: int | None, done: int = 0) -> EpochLine:
        """The display of epoch `epoch` (0-based) of `steps` steps (None: unknown), `done` of them already run
        (a run resumed inside it)."""
        if not self.verbosity:
            return EpochLine()
        header = f"Epoch {epoch + 1}/{self.epochs}"
        if not self.bars:
            return EpochLine(header)
        # As wide as the terminal while it moves; 80 x 24 where it tells no size (tqdm would draw nothing in 0 rows).
        # A notebook's widget sizes itself.
        width = {} if autonotebook.tqdm is not tqdm_std.tqdm else \
            {"dynamic_ncols": True} if _sized(sys.stderr) else {"ncols": 80, "nrows": 24}
        return EpochLine(header, tqdm_auto.tqdm(total=steps, initial=done, desc=header, unit="step", leave=True,
                                                **width))
