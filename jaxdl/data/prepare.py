"""Prepares a tensorflow-datasets dataset as ArrayRecord, the format `tfds_source` reads.

jaxdl reads tfds datasets without TensorFlow, but tfds needs TensorFlow to
*write* one (its builders encode images with it). `tfds build NAME
--file_format=array_record`, the command tfds documents, fails at import
without apache_beam in tfds 4.9.10; tfds's Python API does not, so this is
that call: the builder's `download_and_prepare(file_format="array_record",
download_config=DownloadConfig(manual_dir=..., try_download_gcs=False))`.

Online it downloads the dataset's files from their source; with
`manual_dir` it takes them from that directory instead, under the names
tfds registers for them (for MNIST the four original IDX files,
`train-images-idx3-ubyte.gz` ..., as in `../shared/data/mnist`). Never
from tfds's GCS mirror: `try_download_gcs=False` makes a prepared
dataset come from its source or your files, nothing else.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

INSTALL_HINT = "pip install 'jaxdl[prepare]' (or pip install tensorflow-cpu)"


class TensorFlowMissingError(ImportError):
    """tfds needs TensorFlow to write a dataset, and it is not installed."""


def require_tensorflow(what: str = "jaxdl.data.prepare") -> None:
    """Raises TensorFlowMissingError, saying what to install, when TensorFlow cannot be imported."""
    if importlib.util.find_spec("tensorflow") is None:
        raise TensorFlowMissingError(f"{what} needs TensorFlow: tensorflow-datasets writes datasets with it "
                                     f"(reading them, as jaxdl does, needs none). Install it with {INSTALL_HINT}")


def prepare(name: str, data_dir: str | os.PathLike | None = None,
            manual_dir: str | os.PathLike | None = None) -> dict:
    """Writes tfds dataset `name` as ArrayRecord under `data_dir`; returns what was written.

    `data_dir` defaults as tfds's does ($TFDS_DATA_DIR, else
    ~/tensorflow_datasets). `manual_dir` is a directory holding the
    dataset's source files (by the names tfds registers for them): given,
    nothing is downloaded that is found there. A dataset already prepared
    there is left as it is. Returns `{"name", "version", "path", "splits":
    {split: number of examples}}`; `tfds_source(name, split, data_dir)`
    then reads it.
    """
    require_tensorflow()
    if manual_dir is not None and not Path(manual_dir).is_dir():
        raise FileNotFoundError(f"manual_dir {manual_dir}: no such directory (it should hold the dataset's "
                                "downloaded files)")
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir),
                               file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(f"tensorflow-datasets has no dataset named {name!r} (see "
                         "https://www.tensorflow.org/datasets/catalog)") from error
    config = tfds.download.DownloadConfig(manual_dir=None if manual_dir is None else os.fspath(manual_dir),
                                          try_download_gcs=False)
    builder.download_and_prepare(file_format="array_record", download_config=config)
    return {"name": name, "version": str(builder.version), "path": os.fspath(builder.data_dir),
            "splits": {split: int(info.num_examples) for split, info in sorted(builder.info.splits.items())}}
