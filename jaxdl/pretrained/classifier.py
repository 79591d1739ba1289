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

from jaxdl.data import images
from jaxdl.models.contract import inference_form
from jaxdl.models.mobilenet_v2 import MobileNetV2, body_and_top
from jaxdl.models.saving import VARIABLES_DIR, load_variables, read_model, save_model
from jaxdl.pretrained import imagenet_classes, weights as pretrained
from jaxdl.pretrained.convert import from_keras, from_torchvision
from jaxdl.runtime import compiler, program_cache as aot, sharding
from jaxdl.runtime.inference import apply_in_chunks, inference_mesh, predict_in_chunks


@dataclasses.dataclass(eq=False)  # compared by identity: its variables are arrays
class ImageClassifier:
    """Classifies photo files: a model with its variables, preprocessing and class names.

    What `jaxdl classify` runs: build one with `ImageClassifier.load(...)`,
    then `classify(paths)` for named classes or `probabilities(images)` for
    the scores of preprocessed images; `save(directory)` keeps all of it in
    one model directory that works in any process (docs/pretrained.md). With
    a `program_cache`, the compiled forward pass is kept on disk for the
    next process (`jaxdl.runtime.program_cache.cached_program`): its key is the lowered program,
    the variables included as constants, so the variables are read and the
    model traced in every process, and XLA's compile is what a cached program
    saves.

    Attributes:
      model: the Flax Linen module (a MobileNetV2 or a fine-tuned model).
      variables: its variables, or None until they are read from `source`.
      preprocessing: how photos are turned into the model's input
        (`jaxdl.data.images.KERAS`, `jaxdl.data.images.TORCHVISION` or the saved one).
      class_names: a name per class, or None (classes shown by index).
      outputs: "logits" (a softmax is applied) or "probabilities".
      program_cache: a folder for compiled programs; None compiles in memory.
      source: the saved model directory the variables come from, if any.
      fast: run MobileNetV2 with its BatchNorm folded into the convs.
    """

    model: object
    variables: dict | None
    preprocessing: dict
    class_names: tuple[str, ...] | None  # None: unknown, the classes are shown by index ("class 7")
    outputs: str = "logits"  # or "probabilities"
    # a folder for compiled programs (see jaxdl.runtime.program_cache); None: compile in memory
    program_cache: str | None = None
    source: str | None = None  # the saved model the variables come from
    fast: bool = True
    _inference: tuple | None = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _replicated: dict | None = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _programs: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def load(cls, weights: str | os.PathLike = "imagenet", *, fast: bool = True,
             program_cache: str | os.PathLike | None = None) -> "ImageClassifier":
        """From "imagenet", a saved model directory, or a Keras (.h5, .keras) or torchvision (.pth) file.

        The class names are the saved ones; where none are saved (a weight
        file, or a directory saved without them), ImageNet's for a head of
        1000 classes, otherwise none: `classify` then labels each class by
        its index ("class 7").

        Args:
          weights: "imagenet", a saved model directory or a weight file.
          fast: fold MobileNetV2's BatchNorm into its convs (exact, inference only).
          program_cache: a folder to keep the compiled forward pass in for the next process.

        Returns:
          The classifier.

        Raises:
          FileNotFoundError: `weights` names nothing.
          ValueError: `weights` is no model jaxdl reads, its model ends in
            features rather than class scores, or its saved class names do
            not match its number of classes.
        """
        path = Path(weights)
        variables, source = None, None
        if str(weights) == "imagenet" or path.is_dir():
            source = pretrained.torchvision_imagenet_dir() if str(weights) == "imagenet" else path
            model, metadata = read_model(source)
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
        classes = _saved_class_names(metadata, model, weights)
        outputs = metadata.get("outputs") or _outputs_of(model)
        classifier = cls(model, variables, dict(metadata["preprocessing"]), classes, outputs,
                         None if program_cache is None else str(program_cache),
                         None if source is None else str(source), fast)
        if program_cache is None:
            classifier.inference_form()
        return classifier

    def materialize(self) -> "ImageClassifier":
        """Reads the variables if they are not read yet."""
        if self.variables is None:
            self.variables = load_variables(Path(self.source) / VARIABLES_DIR)
        return self

    def inference_form(self) -> tuple[object, dict]:
        """`(model, variables)` to run, the variables on the device: with `fast`, BatchNorm folded into the convs
        (computed once)."""
        if self._inference is None:
            self.materialize()
            model, variables = self.model, self.variables
            if self.fast:
                fast = inference_form(model, variables)
                model, variables = fast.model, fast.variables
            # On the device once, so that no forward pass copies the weights from the host again.
            self._inference = (model, jax.device_put(variables))
        return self._inference

    def placement(self, batch_size: int) -> tuple[dict, object]:
        """`(variables, mesh)` for a batch: split over this process's CPU devices where each gets an image
        (`inference_mesh`), the variables then replicated over them (once); else on one device, no mesh."""
        _, variables = self.inference_form()
        mesh = inference_mesh()
        if mesh is None or batch_size < mesh.size:
            return variables, None
        if self._replicated is None:
            self._replicated = jax.device_put(variables, sharding.replicated(mesh))
        return self._replicated, mesh

    def forward_plan(self, batch_size: int) -> tuple:
        """`(apply, variables, options)`: `apply_in_chunks(apply, variables, images, **options)` gives the model's
        outputs for a batch of `batch_size` as `jaxdl classify` computes them (a MobileNetV2's top once per
        share, the batch over the CPU devices where `placement` says)."""
        apply, top = body_and_top(self.inference_form()[0])
        variables, mesh = self.placement(batch_size)
        return apply, variables, {"top": top, "mesh": mesh}

    def save(self, directory, *, overwrite: bool = False, **extra_metadata) -> Path:
        """Saves the classifier as a model directory that `ImageClassifier.load` and `load_model` read back.

        The model and its variables go through `jaxdl.models.saving.save_model`,
        with the preprocessing, the class names and the kind of outputs in its
        metadata, so the directory classifies in any process without extra
        arguments.

        Args:
          directory: the model directory to write.
          overwrite: replace a directory that exists; default False.
          **extra_metadata: more JSON-serializable entries for the metadata.

        Returns:
          The directory written, as a `Path`.

        Raises:
          FileExistsError: `directory` exists and `overwrite` is False, or
            another process wrote it meanwhile.
          TypeError: the variables cannot be saved (see `save_model`).
        """
        self.materialize()
        metadata = {"preprocessing": self.preprocessing,
                    "classes": None if self.class_names is None else list(self.class_names),
                    "outputs": self.outputs, **extra_metadata}
        return save_model(directory, self.model, self.variables, metadata=metadata, overwrite=overwrite)

    def _probabilities(self, images):
        apply, variables, options = self.forward_plan(len(images))
        outputs = apply_in_chunks(apply, variables, images, **options)
        return outputs if self.outputs == "probabilities" else jax.nn.softmax(outputs, axis=-1)

    def probabilities(self, batch: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Class probabilities of preprocessed images, run in batches of one compiled shape.

        Args:
          batch: preprocessed images, shape (N, H, W, 3), as
            `jaxdl.data.images.load_batch` gives them with this classifier's
            `preprocessing`.
          batch_size: the most images per compiled forward pass (the last
            pass padded); default 32.

        Returns:
          A numpy array (N, classes) of probabilities (a softmax of the
          model's logits, or its own probabilities).
        """
        size = min(batch_size, len(batch))
        if self.program_cache is None:
            chunks = []
            for start in range(0, len(batch), size):
                chunk = batch[start:start + size]
                apply, variables, options = self.forward_plan(len(chunk))
                chunks.append(predict_in_chunks(apply, variables, chunk, **options))
            outputs = np.concatenate(chunks)
            return outputs if self.outputs == "probabilities" else np.asarray(jax.nn.softmax(outputs, axis=-1))
        # One program per batch shape and dtype: the variables are its constants, part of its cache key.
        signature = ((size, *batch.shape[1:]), batch.dtype)
        if signature not in self._programs:
            # Outside the trace: the variables placed on their devices once, as arrays rather than values traced.
            self.forward_plan(size)
            self._programs[signature] = aot.cached_program(self._probabilities, (batch[:size],), self.program_cache,
                                                           cpu_options=compiler.INFERENCE_CPU_OPTIONS)
        forward = self._programs[signature]
        chunks = []
        for start in range(0, len(batch), size):
            chunk = batch[start:start + size]
            padded = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            chunks.append(np.asarray(forward(padded))[: len(chunk)])
        return np.concatenate(chunks)

    def labels(self, count: int) -> tuple[str, ...]:
        """The label of each of `count` classes: its name, or "class INDEX" where the names are unknown.

        Raises:
          ValueError: the names are known but not `count` of them.
        """
        if self.class_names is None:
            return tuple(f"class {index}" for index in range(count))
        if len(self.class_names) != count:
            raise ValueError(f"{self.source or 'the model'}: the model gives {count} class scores, but "
                             f"{len(self.class_names)} class names are recorded")
        return tuple(self.class_names)

    def classify(self, paths, top: int = 5, batch_size: int = 32):
        """The `top` classes of each photo file, by probability, with their labels.

        The files are read and preprocessed as the classifier's
        `preprocessing` says; a file that cannot be read is an error line in
        the result, not an exception, so the other files are still
        classified.

        Args:
          paths: the image files to classify.
          top: how many classes to give per image; default 5.
          batch_size: the most images per compiled forward pass; default 32.

        Returns:
          `(results, errors)`: `results` a list of `(path, [(index, label,
          probability), ...])` per loaded image, labels being the class names
          or "class INDEX" where they are unknown; `errors` a line per file
          that could not be loaded.

        Raises:
          ValueError: the model's outputs are not one score per class, or
            not as many as its class names.
        """
        batch, loaded, errors = images.load_batch(paths, self.preprocessing)
        if not loaded:
            return [], errors
        probabilities = self.probabilities(batch, batch_size)
        if probabilities.ndim != 2:
            raise ValueError(f"{self.source or 'the model'}: its outputs, of shape {probabilities.shape[1:]} per "
                             "image, are not class scores")
        decoded = imagenet_classes.decode_predictions(probabilities, top, self.labels(probabilities.shape[1]))
        return list(zip(loaded, decoded)), errors


def _head_size(model) -> int | None:
    """How many classes `model` scores: 0 for a MobileNetV2 without its classifier, None where not known."""
    if isinstance(model, MobileNetV2):
        return model.num_classes if model.include_top else 0
    head = getattr(model, "head", None)
    return getattr(head, "num_classes", None)


def _saved_class_names(metadata: dict, model, weights) -> tuple[str, ...] | None:
    """The class names `metadata` records for `model`: a list, None (none recorded), or, where the key is absent
    or an empty list (as `jaxdl convert` wrote before), ImageNet's for a head of 1000 classes and None otherwise."""
    head_size = _head_size(model)
    if head_size == 0:
        raise ValueError(f"--weights {weights}: MobileNetV2(include_top=False) ends in features, not class scores, "
                         "so there is nothing to classify; use weights with their classifier layer, or fine-tune "
                         "a head (jaxdl finetune)")
    names = metadata.get("classes", [])
    if names is None:
        return None
    if not names:
        return imagenet_classes.class_names() if head_size == 1000 else None
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"--weights {weights}: its class names must be a list of strings, got {names!r}")
    if head_size is not None and len(names) != head_size:
        raise ValueError(f"--weights {weights}: {len(names)} class names are recorded for a model of {head_size} "
                         "classes")
    return tuple(names)


def _outputs_of(model) -> str:
    if isinstance(model, MobileNetV2) and model.include_top and model.head_activation == "softmax":
        return "probabilities"
    return "logits"
