"""Training-history and confusion-matrix figures, written as PNG files (matplotlib, with its file-only Agg backend).

`plot_history(history, "history.png")` draws what `fit` returns, a panel per
quantity with its validation curve; `plot_confusion_matrix` draws
`jaxdl.training.confusion_matrix`'s counts with the class names. The
experiments and `jaxdl finetune` write both beside their results.
"""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

__all__ = ["plot_history", "plot_confusion_matrix", "save_figure"]


def plot_history(history: dict[str, list], path: str | os.PathLike, title: str = "") -> Path:
    """Writes the curves of a training history: one panel per quantity (loss, each metric), training and
    validation (its `val_` twin) together, by epoch.

    Args:
      history: `{name: [value per epoch]}`, as `fit` returns it.
      path: the PNG file to write; its folder is created if needed.
      title: a title over the panels; none by default.

    Returns:
      The path written.
    """
    names = [k for k in history if not k.startswith("val_")]
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        epochs = np.arange(1, len(history[name]) + 1)
        ax.plot(epochs, history[name], label="train")
        if f"val_{name}" in history:
            ax.plot(epochs, history[f"val_{name}"], label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_confusion_matrix(matrix, class_names, path: str | os.PathLike, title: str = "") -> Path:
    """Writes a confusion matrix as a grid of counts, true classes as rows and predicted ones as columns.

    Args:
      matrix: the square counts, as `jaxdl.training.confusion_matrix` returns them.
      class_names: a name per class, in label order.
      path: the PNG file to write; its folder is created if needed.
      title: the title; "confusion matrix" by default.

    Returns:
      The path written.

    Raises:
      ValueError: `matrix` is not square with one row per class name.
    """
    matrix = np.asarray(matrix)
    if matrix.shape != (len(class_names), len(class_names)):
        raise ValueError(f"plot_confusion_matrix: matrix has shape {matrix.shape}, but {len(class_names)} class "
                         f"names need ({len(class_names)}, {len(class_names)})")
    fig, ax = plt.subplots(figsize=(1.2 * len(class_names) + 2, 1.2 * len(class_names) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(col, row, str(count), ha="center", va="center",
                color="white" if count > matrix.max() / 2 else "black")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path) -> Path:
    """Writes `fig` as a PNG (creating folders) and closes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
