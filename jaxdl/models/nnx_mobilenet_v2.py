"""MobileNetV2 as a Flax NNX module: the Linen port, with its (pretrained) variables, through Flax's `nnx.bridge`.

The network is the Linen `MobileNetV2` run by `nnx.bridge.ToNNX`, so its
outputs are the Linen port's, bitwise, and every pretrained weight jaxdl
converts (torchvision, Keras) serves both families. The variables become the
NNX module's own: `nnx.Param` for the weights, `nnx.BatchStat` for
BatchNorm's running averages. As every NNX module, it runs in training mode
after `model.train()` (BatchNorm on batch statistics, updating its averages;
the classifier's dropout on) and in evaluation mode after `model.eval()`.

A backbone for transfer learning is built `frozen=True`: it then runs in
evaluation mode even while the model around it trains, as a Keras base model
with `trainable = False` does, so its BatchNorm statistics never change.
Which weights train is the optimizer's filter, as for any NNX module
(`fit(..., wrt=nnx.All(nnx.Param, nnx.PathContains("head")))`, the
`wrt` of `nnx.Optimizer`).
"""
from __future__ import annotations

from flax import nnx
from flax.nnx import bridge
from flax.nnx.bridge import variables as bridge_variables

from jaxdl.models.mobilenet_v2 import MobileNetV2


class MobileNetV2NNX(nnx.Module):
    """A Linen `MobileNetV2` and its variables as an NNX module (`nnx.bridge.ToNNX`).

    Args:
      model: the Linen `MobileNetV2` (as `jaxdl.pretrained.torchvision_imagenet`
        or `from_keras` return it).
      variables: its variables, `{"params": ..., "batch_stats": ...}`.
      frozen: run in evaluation mode always (BatchNorm on its running
        averages, no dropout), whatever mode the model around it is in: a
        backbone for head-only fine-tuning.
      rngs: the `nnx.Rngs` of the classifier's dropout (a "dropout"
        stream), needed to train a model with its top; None without one.

    Raises:
      TypeError: `model` is not a Linen `MobileNetV2`, or `variables` lacks
        its "params".
    """

    def __init__(self, model: MobileNetV2, variables: dict, *, frozen: bool = False, rngs: nnx.Rngs | None = None):
        if not isinstance(model, MobileNetV2):
            raise TypeError(f"MobileNetV2NNX wraps jaxdl's Linen MobileNetV2; model is {type(model).__name__}")
        if not isinstance(variables, dict) or "params" not in variables:
            raise TypeError("MobileNetV2NNX needs the model's variables, {'params': ..., 'batch_stats': ...}; got "
                            f"{type(variables).__name__}" + (f" with {sorted(variables)}" if hasattr(variables, "keys")
                                                              else ""))
        self.network = bridge.ToNNX(model, rngs=rngs)
        # The variables are given, so no `lazy_init` (it would run the network once to make them): they are
        # set as ToNNX's own attributes, in the types its `lazy_init` gives them.
        for name, value in bridge_variables.linen_vars_to_nnx_attrs(variables).items():
            setattr(self.network, name, nnx.data(value))
        self.frozen = frozen
        self.use_running_average = False  # what `model.train()` / `model.eval()` set, as on nnx.BatchNorm
        self.needs_dropout_key = model.include_top and rngs is None

    def __call__(self, images):
        """Logits (or the convention's classifier output; features without a top) of NHWC `images`.

        Raises:
          ValueError: training mode with a top and no dropout stream.
        """
        train = not (self.frozen or self.use_running_average)
        if train and self.needs_dropout_key:
            raise ValueError("MobileNetV2NNX in training mode runs its classifier's dropout, which needs a key: "
                             "build it with rngs=nnx.Rngs(dropout=SEED), or frozen=True for a backbone")
        return self.network(images, train=train, mutable=["batch_stats"] if train else False)
