"""Write in-memory images and labels as a tensorflow-datasets ArrayRecord dataset, without TensorFlow.

Written by hand because tfds's own `store_as_tfds_dataset` and the PNG
encoding of `tfds.features.Image` from arrays both need TensorFlow; here
Pillow encodes the PNGs and tfds's `GeneratorBasedBuilder` writes the
ArrayRecord shards and metadata, so `tfds_source(name, split, data_dir)`
reads the result as it reads any prepared tfds dataset. With `name="mnist"`,
`version="3.0.1"` and 28x28x1 images the files have the layout of tfds's
MNIST, which the tests and the input-pipeline benchmark use offline.
"""
from __future__ import annotations

import io
import os

import numpy as np


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_image_dataset(data_dir: str | os.PathLike, name: str, splits: dict, *, num_classes: int,
                        version: str = "1.0.0") -> str:
    """Writes `splits` ({split: (uint8 images (N, H, W, C), integer labels (N,))}) as a tfds dataset.

    Features are `image` (`tfds.features.Image`, PNG) and `label`
    (`ClassLabel`), as in tfds's image-classification datasets. Returns the
    directory written (`data_dir/name/version`).
    """
    import tensorflow_datasets as tfds

    checked = {}
    for split, (images, labels) in splits.items():
        images, labels = np.asarray(images), np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"split {split!r}: images must be uint8 of shape (N, height, width, 1 or 3), got "
                             f"{images.dtype} {images.shape}")
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"split {split!r}: labels must be {len(images)} integers, got {labels.dtype} "
                             f"{labels.shape}")
        checked[split] = images, labels
    shape = next(iter(checked.values()))[0].shape[1:]

    def examples(images, labels):
        for index, (image, label) in enumerate(zip(images, labels)):
            yield index, {"image": _png(image), "label": int(label)}

    with tfds.core.registered.skip_registration():  # a dataset of this name may already be registered

        class Builder(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version(version)

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=shape), "label": tfds.features.ClassLabel(
                        num_classes=num_classes)}), supervised_keys=("image", "label"),
                    disable_shuffling=True)  # examples stay in the order given

            def _split_generators(self, dl_manager):
                return {split: self._generate_examples(*arrays) for split, arrays in checked.items()}

            def _generate_examples(self, images, labels):
                return examples(images, labels)

        Builder.name = name
        builder = Builder(data_dir=os.fspath(data_dir), file_format="array_record")
        builder.download_and_prepare()
    return os.fspath(builder.data_dir)
