"""What `fit` shows as Keras shows it: in a terminal a kept line per epoch, a bar over its steps and then its
metrics; in a pipe (a log file, a notebook without widgets) and with verbose=2 one plain line per epoch.

The display is read from a real pseudo-terminal (`os.openpty`) and a real pipe put in place of
`sys.stdout` and `sys.stderr`, so `isatty()` answers as it does for a user.
"""
import fcntl
import functools
import io
import os
import struct
import sys
import termios
import tty

import pytest
from tqdm import notebook, std

from jaxdl import MLP, fit
from jaxdl.training import progress
from tests.support.toy_data import CE, blobs

EPOCHS, BATCH = 3, 8  # 60 examples: 8 steps an epoch (the last batch padded); 6 with validation_split=0.2


def shown(monkeypatch, kind: str, columns: int = 160, **options) -> tuple[str, dict]:
    """`(everything fit wrote to stdout and stderr, history)`, both streams a pty (`kind="pty"`, 24 rows of
    `columns`; 0 x 0 where `columns` is 0, as a pty never sized) or a pipe."""
    if kind == "pty":
        reader, writer = os.openpty()
        tty.setraw(writer)  # no "\n" -> "\r\n" translation: the bytes read are the bytes written
        fcntl.ioctl(writer, termios.TIOCSWINSZ, struct.pack("HHHH", 24 if columns else 0, columns, 0, 0))
    else:
        reader, writer = os.pipe()
    stream = os.fdopen(writer, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", stream)
    monkeypatch.setattr(sys, "stderr", stream)
    x, y = blobs()
    try:
        _, history = fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, epochs=EPOCHS, batch_size=BATCH,
                         **options)
    finally:
        monkeypatch.undo()
        stream.close()
    chunks = []
    while chunk := _read(reader):
        chunks.append(chunk)
    os.close(reader)
    return b"".join(chunks).decode(), history


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # a pty's reader, once its writer is closed and drained
        return b""


def epoch_line(history: dict, epoch: int) -> str:
    """The epoch's metrics as fit shows them (Keras's format), from the history's numbers."""
    return " - ".join(f"{name}: {values[epoch]:.4f}" for name, values in history.items())


@pytest.mark.parametrize("columns", [100, 0])
def test_a_terminal_keeps_a_line_per_epoch_with_a_bar_over_its_steps(monkeypatch, columns):
    """Each epoch's line ends with all its metrics, however narrow the terminal (or unsized: tqdm drew nothing in
    a terminal of 0 rows)."""
    # tqdm redraws at most every 0.1 s: every update drawn, so that each compiled call's is seen
    monkeypatch.setattr(progress, "tqdm_auto", type("auto", (), {"tqdm": functools.partial(std.tqdm, mininterval=0)}))
    text, history = shown(monkeypatch, "pty", columns, verbose="auto", validation_split=0.2)  # 1 on a terminal
    lines = text.split("\n")
    assert len(lines) == EPOCHS + 1 and lines[-1] == ""  # one line kept per epoch, nothing after
    for epoch, line in enumerate(lines[:-1]):
        drawn = line.split("\r")
        assert all(draw.startswith(f"Epoch {epoch + 1}/{EPOCHS}: ") for draw in drawn if draw), drawn
        assert " 0/6 " in drawn[1] and " 6/6 " in drawn[-1], drawn  # the bar starts empty, ends full
        assert len(drawn[1]) <= (columns or 80)  # the moving bar fits the terminal (80 where it tells no width)
        # then the epoch's metrics, all of them: the kept line is longer than the terminal is wide, and not cut
        assert drawn[-1].rstrip().endswith(epoch_line(history, epoch) + "]") and len(drawn[-1].rstrip()) > 100
        # a scanned epoch is one compiled call: its bar moves once, from 0 to 6 steps
        assert [draw for draw in drawn if "/6 " in draw and " 0/6 " not in draw and " 6/6 " not in draw] == []


def test_a_streamed_epochs_bar_moves_after_each_compiled_call(monkeypatch):
    monkeypatch.setattr(progress, "tqdm_auto", type("auto", (), {"tqdm": functools.partial(std.tqdm, mininterval=0)}))
    text, history = shown(monkeypatch, "pty", verbose=1, device_data_bytes=0, steps_per_execution=4)
    first = text.split("\n")[0].split("\r")
    counts = [draw.split("|")[2].split()[0] for draw in first if draw.count("|") >= 2]
    assert counts[0] == "0/8" and counts[-1] == "8/8"  # 8 steps, 4 per call: after 4 and 8
    assert [count for i, count in enumerate(counts) if i == 0 or count != counts[i - 1]] == \
        ["0/8", "4/8", "8/8"]
    assert first[-1].rstrip().endswith(epoch_line(history, 0) + "]")  # tqdm pads over the longer bar drawn before


@pytest.mark.parametrize("kind, verbose", [("pipe", 1), ("pipe", "auto"), ("pty", 2)])
def test_a_pipe_and_verbose_2_print_one_plain_line_per_epoch(monkeypatch, kind, verbose):
    text, history = shown(monkeypatch, kind, verbose=verbose)
    assert "\r" not in text  # no carriage-return noise in a log file
    assert text.splitlines() == [f"Epoch {e + 1}/{EPOCHS} - {epoch_line(history, e)}" for e in range(EPOCHS)]


def test_a_notebook_with_widgets_counts_as_a_display_that_redraws(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    assert not progress.dynamic_display() and not progress.Progress(1, EPOCHS).bars
    monkeypatch.setattr(progress.autonotebook, "tqdm", notebook.tqdm)  # what tqdm chose in a Jupyter kernel
    assert progress.dynamic_display() and progress.Progress(1, EPOCHS).bars
