"""Transfer-learning models: a pretrained MobileNetV2 backbone, always in inference mode, and a new head.

These are plain Linen modules (saved and rebuilt by config like every model
here); training them is `jaxdl.pretrained.finetune`'s job, inference `jaxdl.pretrained.classifier`'s.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxdl.models.mobilenet_v2 import MobileNetV2, folded
from jaxdl.models.small import activation, keras_batch_norm, kernel_init


class ClassifierHead(nn.Module):
    """Optional BatchNorm, Dense+ReLU+dropout layers of `hidden` units, then `num_classes` logits.

    The default is the tutorial's single Dense layer; the Carpentries lesson's
    head is `ClassifierHead(10, hidden=(50,), dropout_rate=0.5, input_batch_norm=True)`.
    """

    num_classes: int
    hidden: Sequence[int] = ()
    dropout_rate: float = 0.0
    input_batch_norm: bool = False
    activation: str = "relu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features, train: bool = False):
        x = features.astype(self.dtype)
        if self.input_batch_norm:
            x = keras_batch_norm(train, self.dtype, name="batch_norm")(x)
        for i, width in enumerate(self.hidden):
            x = activation(self.activation)(nn.Dense(width, dtype=self.dtype, kernel_init=kernel_init,
                                                     name=f"dense_{i}")(x))
            if self.dropout_rate:
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=kernel_init, name="logits")(x)


class FineTuneModel(nn.Module):
    """A pooled-feature backbone (always in inference mode) followed by a head; logits out."""

    backbone: MobileNetV2
    head: nn.Module

    @nn.compact
    def __call__(self, images, train: bool = False):
        return self.head(self.backbone(images, train=False), train=train)


def feature_backbone(model: MobileNetV2, variables: dict) -> tuple[MobileNetV2, dict]:
    """The pretrained network without its classifier, returning average-pooled features."""
    params = {k: v for k, v in variables["params"].items() if k != "predictions"}
    return model.clone(include_top=False, pooling="avg"), {**variables, "params": params}


def fast_inference(model, variables: dict) -> tuple[Any, dict]:
    """The same model with MobileNetV2's BatchNorm folded into its convs (exact, inference only).

    Takes a MobileNetV2 or a FineTuneModel; a model already folded, or any
    other model, comes back unchanged.
    """
    if isinstance(model, MobileNetV2):
        return folded(model, variables) if "batch_stats" in variables else (model, variables)
    if not isinstance(model, FineTuneModel) or "backbone" not in variables.get("batch_stats", {}):
        return model, variables
    backbone_variables = {"params": variables["params"]["backbone"],
                          "batch_stats": variables["batch_stats"]["backbone"]}
    fast_backbone, fast_variables = folded(model.backbone, backbone_variables)
    result = {"params": {"backbone": fast_variables["params"], "head": variables["params"]["head"]}}
    if "head" in variables.get("batch_stats", {}):
        result["batch_stats"] = {"head": variables["batch_stats"]["head"]}
    return model.clone(backbone=fast_backbone), result
