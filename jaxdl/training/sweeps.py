"""Hyperparameter sweeps: every configuration of a grid trained once, one table of their final metrics.

`sweep(train_fn, grid)` calls `train_fn(**config)` for each combination of
the grid's values (in the grid's order, the last name varying fastest, as
`itertools.product`), times it, and returns a `SweepTable`: one row per
configuration with its values, the metrics `train_fn` returned, its seconds
and its error. A configuration that raises is a row whose `error` holds the
exception's type and message; the sweep goes on (a diverging learning rate
must not cost the rest of the grid). The best row is the one whose
`monitor` is lowest (`mode="min"`) or highest (`mode="max"`), among rows
without error, as Keras's callbacks choose; a metric may be any real number
(Python, numpy scalar, 0-d numpy or JAX array), never a bool, NaN or infinity.

It is a grid and a table, not a tuner: no search strategy, no scheduling,
no persistence beyond the CSV. To keep what a configuration trained (its
model), let `train_fn` store it, e.g. in a dict keyed by its arguments, and
look up `table.best` afterwards (`experiments/cnn.py` does so).
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import math
import numbers
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

RESERVED = ("seconds", "error")


@dataclasses.dataclass
class SweepTable:
    """The result of `sweep`: rows (dicts) in grid order, their columns, and the best row's index.

    `best` is the best row (a dict) or None when no configuration finished
    with a finite `monitor` value.
    """

    rows: list[dict[str, Any]]
    columns: list[str]
    parameters: list[str]
    monitor: str
    mode: str
    best_index: int | None

    @property
    def best(self) -> dict[str, Any] | None:
        return None if self.best_index is None else self.rows[self.best_index]

    @property
    def best_config(self) -> dict[str, Any] | None:
        """The best row's grid values alone: `train_fn(**table.best_config)` trains it again."""
        return None if self.best is None else {name: self.best[name] for name in self.parameters}

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["error"]]

    def format(self) -> str:
        """The table as aligned text, the best row marked with `*`, and a line naming the best configuration."""
        header = ["", *self.columns]
        lines = [header] + [["*" if i == self.best_index else "", *(_cell(row.get(c)) for c in self.columns)]
                            for i, row in enumerate(self.rows)]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
        text.insert(1, "  ".join("-" * width for width in widths).rstrip())
        return "\n".join(text + [self.verdict()])

    def verdict(self) -> str:
        """One line: the best configuration and its monitored value, or why there is none."""
        failed = len(self.failed)
        failures = f"; {failed} of {len(self.rows)} configurations failed" if failed else ""
        if self.best is None:
            return f"no configuration reported a finite {self.monitor!r} ({self.mode}){failures}"
        config = ", ".join(f"{name}={self.best[name]!r}" for name in self.parameters)
        return (f"best by {self.monitor} ({self.mode}): {config} -> {self.monitor} = "
                f"{_cell(self.best[self.monitor])}{failures}")

    def __str__(self) -> str:
        return self.format()

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Writes the rows (the columns as header; empty cells for metrics a row lacks) and returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.columns, restval="")
            writer.writeheader()
            writer.writerows(self.rows)
        return path


def _real(value) -> float | None:
    """`value` as a float when it is one real number, else None.

    Metrics come straight from training as Python numbers, numpy scalars
    (`np.float32(0.3)`) or 0-d numpy and JAX arrays (`history["val_loss"][-1]`,
    `jnp.mean(...)`): all are real numbers to compare. Bools, strings, complex
    numbers and arrays of several values are not (None).
    """
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Real):  # int, float, numpy integer and floating scalars
        return float(value)
    if hasattr(value, "__array__") and np.ndim(value) == 0:  # 0-d numpy arrays, JAX arrays
        array = np.asarray(value)
        if array.dtype.kind in "iuf":
            return float(array)
    return None


def _cell(value) -> str:
    if value is None:
        return ""
    real = _real(value)
    if real is not None and np.asarray(value).dtype.kind == "f":  # floats of any kind; integers as they are
        return f"{real:.4g}"
    return str(value)


def configurations(grid: Mapping[str, Sequence]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, as keyword dicts; a grid that cannot be swept is a ValueError."""
    if not isinstance(grid, Mapping) or not grid:
        raise ValueError(f"grid must be a non-empty dict of name -> list of values, got {grid!r}")
    for name, values in grid.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"grid name {name!r} is not a keyword argument name (train_fn is called with **config)")
        if name in RESERVED:
            raise ValueError(f"grid name {name!r} is a column of the sweep's table ({', '.join(RESERVED)}); rename it")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise ValueError(f"grid[{name!r}] must be a list of values, got {values!r}")
        if not values:
            raise ValueError(f"grid[{name!r}] is empty: the grid would have no configuration")
    names = list(grid)
    return [dict(zip(names, combination)) for combination in itertools.product(*(grid[n] for n in names))]


def _best_index(rows: list[dict], monitor: str, mode: str) -> int | None:
    candidates = []
    for index, row in enumerate(rows):
        value = _real(row.get(monitor))
        if row["error"] or value is None or not math.isfinite(value):  # NaN is never best
            continue
        candidates.append((value if mode == "min" else -value, index))
    return min(candidates)[1] if candidates else None  # ties: the first in grid order


def sweep(train_fn: Callable[..., Mapping[str, Any]], grid: Mapping[str, Sequence],
          out: str | os.PathLike | None = None, *, monitor: str = "val_loss", mode: str = "min",
          verbose: bool = True) -> SweepTable:
    """Trains every configuration of `grid` with `train_fn(**config) -> {metric: value}`; returns their table.

    Configurations run one after another in the grid's order (the last name
    varying fastest, as `itertools.product`), each timed. A configuration
    that fails is a row, not the end of the sweep: an `Exception` raised by
    `train_fn`, or a return value that is not a dict of metrics, is reported
    in its row's `error` with a line on the output. KeyboardInterrupt stops
    the sweep as usual.

    Args:
      train_fn: `train_fn(**config) -> {metric: value}`, called once per
        configuration; a metric may be any real number (never a bool, NaN or
        infinity to count as best).
      grid: `{name: [values, ...]}`, each name a keyword argument of
        `train_fn`.
      out: a path to write the table to as CSV; None (default) writes none.
      monitor: the metric that chooses the best row; default "val_loss".
      mode: "min" (default) takes the lowest `monitor`, "max" the highest,
        among rows without error.
      verbose: print a line per configuration and the table; default True.

    Returns:
      A `SweepTable`: one row per configuration (its values, the metrics
      `train_fn` returned, `seconds`, `error`) and `best`, the best row or
      None when no configuration finished with a finite `monitor`.

    Raises:
      ValueError: if `mode` is not "min" or "max", `train_fn` is not
        callable, or `grid` is not a non-empty dict of non-empty lists whose
        names are keyword names and not the table's own columns.
      OSError: if `out` cannot be written.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"sweep mode must be 'min' or 'max', got {mode!r}")
    if not callable(train_fn):
        raise ValueError(f"train_fn must be a function train_fn(**config) -> dict of metrics, got {train_fn!r}")
    configs = configurations(grid)
    parameters, metric_names, rows = list(grid), [], []
    for number, config in enumerate(configs, 1):
        described = ", ".join(f"{name}={value!r}" for name, value in config.items())
        started = time.perf_counter()
        metrics, error = {}, ""
        try:
            result = train_fn(**config)
            if not isinstance(result, Mapping):
                raise TypeError(f"train_fn returned {type(result).__name__}, not a dict of metrics")
            metrics = dict(result)
        except Exception as caught:  # noqa: BLE001 - a failed configuration is a row, not the end of the sweep
            error = f"{type(caught).__name__}: {caught}".splitlines()[0]
            if verbose:
                print(f"sweep {number}/{len(configs)} ({described}) failed: {error}", flush=True)
                traceback.print_exception(caught, limit=-3)
        seconds = time.perf_counter() - started
        clashes = sorted(set(metrics) & (set(parameters) | set(RESERVED)))
        if clashes:
            error = error or f"train_fn returned metrics named like grid or table columns: {clashes}"
            metrics = {k: v for k, v in metrics.items() if k not in clashes}
        metric_names += [name for name in metrics if name not in metric_names]
        rows.append({**config, **metrics, "seconds": round(seconds, 3), "error": error})
        if verbose and not error:
            shown = ", ".join(f"{name}={_cell(value)}" for name, value in metrics.items())
            print(f"sweep {number}/{len(configs)} ({described}): {shown} [{seconds:.1f} s]", flush=True)
    columns = parameters + metric_names + list(RESERVED)
    table = SweepTable(rows, columns, parameters, monitor, mode, _best_index(rows, monitor, mode))
    if out is not None:
        table.to_csv(out)
    if verbose:
        print(table.format(), flush=True)
        if out is not None:
            print(f"sweep table written to {out}", flush=True)
    return table
