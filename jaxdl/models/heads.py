"""Transfer-learning models: a pretrained MobileNetV2 backbone, always in inference mode, and a new head.

These are plain Linen modules (saved and rebuilt by config like every model
here); training them is `jaxdl.pretrained.finetune`'s job, inference `jaxdl.pretrained.classifier`'s.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxdl.models.contract import InferenceForm
from jaxdl.models.mobilenet_v2 import MobileNetV2
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

    @nn.nowrap  # not a Flax method: it takes the variables, not a scope
    def inference_form(self, variables) -> InferenceForm:
        """The backbone's fast inference form (`MobileNetV2.inference_form`) under the same head, run in chunks.

        Args:
          variables: this model's variables (`params` and `batch_stats` of
            `backbone` and `head`).

        Returns:
          An `InferenceForm` with the backbone's BatchNorm folded (where it
          still has statistics) and the head's variables as they are.
        """
        if "backbone" not in variables.get("batch_stats", {}):
            return InferenceForm(self, variables, chunked=True)
        fast = self.backbone.inference_form({"params": variables["params"]["backbone"],
                                             "batch_stats": variables["batch_stats"]["backbone"]})
        result = {"params": {"backbone": fast.variables["params"], "head": variables["params"]["head"]}}
        if "head" in variables.get("batch_stats", {}):
            result["batch_stats"] = {"head": variables["batch_stats"]["head"]}
        return InferenceForm(self.clone(backbone=fast.model), result, chunked=True)


def feature_backbone(model: MobileNetV2, variables: dict) -> tuple[MobileNetV2, dict]:
    """The pretrained network without its classifier, returning average-pooled features."""
    params = {k: v for k, v in variables["params"].items() if k != "predictions"}
    return model.clone(include_top=False, pooling="avg"), {**variables, "params": params}
