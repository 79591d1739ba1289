"""Data for `fit`, `evaluate` and `predict`: in-memory arrays, tfds and grain sources, and device prefetch.

Photos are `jaxdl.data.images` (loading, preprocessing, image folders and
their labels), imported by name where it is used: it imports Pillow, which
the rest of this package imports only when writing a dataset.
"""
from jaxdl.data.arrays import (
    batches,
    check_batch_size,
    check_dataset,
    class_indices,
    num_batches,
    ordered_batches,
    padded_indices,
    positive_int,
    process_part,
    rows_to_split,
    split_evenly,
    split_validation,
)
from jaxdl.data.idx import load_mnist, read_idx, read_idx_pair
from jaxdl.data.prefetch import PREFETCH_DEPTH, device_data_limit, fits_on_device, stacked, to_device
from jaxdl.data.prepare import TensorFlowMissingError, prepare
from jaxdl.data.sources import (
    DatasetNotPreparedError,
    Features,
    IterableBatches,
    SourceBatches,
    as_batches,
    epoch_seed,
    is_source,
    tfds_source,
)
from jaxdl.data.tfds_writer import write_image_dataset

# Every name imported above, as the package offered them before it had a list.
__all__ = [
    "batches", "check_batch_size", "check_dataset", "class_indices", "num_batches", "ordered_batches",
    "rows_to_split", "padded_indices", "positive_int", "process_part", "split_evenly", "split_validation",
    "PREFETCH_DEPTH", "device_data_limit", "fits_on_device", "stacked", "to_device",
    "write_image_dataset",
    "DatasetNotPreparedError", "Features", "IterableBatches", "SourceBatches", "as_batches", "epoch_seed",
    "is_source", "tfds_source",
    "load_mnist", "read_idx", "read_idx_pair",
    "TensorFlowMissingError", "prepare",
]
