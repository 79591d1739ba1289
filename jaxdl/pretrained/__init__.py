"""Pretrained vision models: ImageNet weights, their conversion, classifying photos and fine-tuning.

`weights` (the weight files, checked by sha256, and the converted models
cached under `$JAXDL_CACHE`), `convert` (Keras `.h5` and torchvision
weights to jaxdl's MobileNetV2), `torchfile` (reading `.pth` files without
torch), `imagenet_classes` (the class names), `classifier` (`ImageClassifier`) and
`finetune` (a new head on a frozen or partly unfrozen backbone:
`finetune.finetune(...)`; the module is exported rather than the function,
which would shadow it). Built on `jaxdl.training`, `jaxdl.models`,
`jaxdl.runtime` and `jaxdl.data`; only the command line imports it.
"""
from jaxdl.pretrained import convert, finetune, imagenet_classes, torchfile, weights
from jaxdl.pretrained.classifier import ImageClassifier
from jaxdl.pretrained.convert import ConversionError, from_keras, from_torchvision
from jaxdl.pretrained.imagenet_classes import CAT_CLASSES, class_names, decode_predictions
from jaxdl.pretrained.torchfile import UnsafePickleError, WeightFileError, load_state_dict
from jaxdl.pretrained.weights import (
    KERAS_SHA256,
    TORCHVISION_IMAGENET,
    ChecksumError,
    WeightFile,
    cache_dir,
    keras_imagenet,
    torchvision_imagenet,
    torchvision_weights_path,
)

__all__ = [
    "convert", "finetune", "imagenet_classes", "torchfile", "weights",
    "ImageClassifier",
    "ConversionError", "from_keras", "from_torchvision",
    "CAT_CLASSES", "class_names", "decode_predictions",
    "UnsafePickleError", "WeightFileError", "load_state_dict",
    "KERAS_SHA256", "TORCHVISION_IMAGENET", "ChecksumError", "WeightFile", "cache_dir", "keras_imagenet",
    "torchvision_imagenet", "torchvision_weights_path",
]
