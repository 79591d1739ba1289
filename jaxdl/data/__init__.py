"""Data for `fit`, `evaluate` and `predict`: in-memory arrays, tfds and grain sources, and device prefetch.

The face offers what a user calls: sources (`tfds_source`, `as_batches`),
batches of in-memory arrays for a loop of one's own (`batches`), the MNIST
files (`load_mnist`, `read_idx`), preparing and writing tfds datasets
(`prepare`, `write_image_dataset`) and the device-memory bound
(`device_data_limit`, `PREFETCH_DEPTH`). The modules behind it (`arrays`:
checks and batching of arrays; `sources`: sources as batches; `prefetch`:
placing batches on devices; `idx`; `prepare`; `tfds_writer`) are jaxdl's own
machinery, imported by module where the training code needs them.

Photos are `jaxdl.data.images` (loading, preprocessing, image folders and
their labels), imported by name where it is used: it imports Pillow, which
the rest of this package imports only when writing a dataset.
"""
from jaxdl.data import arrays, idx, prefetch, sources
from jaxdl.data.arrays import batches
from jaxdl.data.idx import load_mnist, read_idx, read_idx_pair
from jaxdl.data.prefetch import PREFETCH_DEPTH, device_data_limit
from jaxdl.data.prepare import TensorFlowMissingError, prepare
from jaxdl.data.sources import (
    DatasetNotPreparedError,
    Features,
    IterableBatches,
    SourceBatches,
    as_batches,
    is_source,
    tfds_source,
)
from jaxdl.data.tfds_writer import write_image_dataset

__all__ = [
    "arrays", "idx", "prefetch", "sources",
    "batches",
    "load_mnist", "read_idx", "read_idx_pair",
    "PREFETCH_DEPTH", "device_data_limit",
    "TensorFlowMissingError", "prepare",
    "DatasetNotPreparedError", "Features", "IterableBatches", "SourceBatches", "as_batches", "is_source",
    "tfds_source",
    "write_image_dataset",
]
