"""An image classifier: a model, its variables, its preprocessing and its class names, together.

This is what `jaxdl classify` runs and what `jaxdl convert` and fine-tuning
save: everything needed to go from a photo file to named classes, so a model
directory works in any process without extra arguments.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import numpy as np

from jaxdl import images, imagenet, pretrained
from jaxdl.checkpoint import load_model, save_model
from jaxdl.convert import from_keras, from_torchvision
from jaxdl.finetune import FineTuneModel, fast_inference
from jaxdl.models.mobilenet_v2 import MobileNetV2, folded
from jaxdl.train import predict


@dataclasses.dataclass(frozen=True)
class ImageClassifier:
    model: object
    variables: dict
    preprocessing: dict
    class_names: tuple[str, ...]
    outputs: str = "logits"  # or "probabilities"

    @classmethod
    def load(cls, weights: str | os.PathLike = "imagenet", *, fast: bool = True) -> "ImageClassifier":
        """From "imagenet", a saved model directory, or a Keras (.h5, .keras) or torchvision (.pth) file.

        `fast` folds MobileNetV2's BatchNorm into its convs (exact, inference only).
        """
        if str(weights) == "imagenet":
            model, variables, metadata = pretrained.torchvision_imagenet()
        else:
            path = Path(weights)
            if path.is_dir():
                model, variables, metadata = load_model(path)
            elif path.suffix in (".pth", ".pt"):
                model, variables = from_torchvision(path)
                metadata = {"preprocessing": images.TORCHVISION}
            elif path.suffix in (".h5", ".keras"):
                model, variables = from_keras(path)
                metadata = {"preprocessing": images.KERAS}
            elif not path.exists():
                raise FileNotFoundError(f"--weights {path}: no such file or directory (or say 'imagenet')")
            else:
                raise ValueError(f"--weights {path}: expected 'imagenet', a saved model directory, a Keras "
                                 ".h5/.keras file or a torchvision .pth file")
        classes = metadata.get("classes") or imagenet.class_names()
        outputs = metadata.get("outputs") or _outputs_of(model)
        if fast and isinstance(model, MobileNetV2):
            model, variables = folded(model, variables)
        elif fast and isinstance(model, FineTuneModel):
            model, variables = fast_inference(model, variables)
        return cls(model, variables, dict(metadata["preprocessing"]), tuple(classes), outputs)

    def save(self, directory, *, overwrite: bool = False, **extra_metadata) -> Path:
        metadata = {"preprocessing": self.preprocessing, "classes": list(self.class_names),
                    "outputs": self.outputs, **extra_metadata}
        return save_model(directory, self.model, self.variables, metadata=metadata, overwrite=overwrite)

    def probabilities(self, batch: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Class probabilities for preprocessed images (N, H, W, 3)."""
        outputs = predict(self.model, batch, variables=self.variables, batch_size=min(batch_size, len(batch)))
        return outputs if self.outputs == "probabilities" else np.asarray(jax.nn.softmax(outputs, axis=-1))

    def classify(self, paths, top: int = 5, batch_size: int = 32):
        """`(results, errors)`: per loaded image (path, [(index, name, probability), ...]); per failure a line."""
        batch, loaded, errors = images.load_batch(paths, self.preprocessing)
        if not loaded:
            return [], errors
        decoded = imagenet.decode_predictions(self.probabilities(batch, batch_size), top, self.class_names)
        return list(zip(loaded, decoded)), errors


def _outputs_of(model) -> str:
    if isinstance(model, MobileNetV2) and model.include_top and model.head_activation == "softmax":
        return "probabilities"
    return "logits"
