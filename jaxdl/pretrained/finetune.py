"""Transfer learning: a pretrained MobileNetV2 backbone, frozen, with a new classification head.

The backbone always runs in inference mode: its parameters and BatchNorm
statistics never change. Head-only training differentiates the head's
parameters alone (the optimizer state is head-sized too), and, without
augmentation, trains on features computed once per image ("cached
features"): the backbone then runs once per image instead of once per image
per epoch. With augmentation, or with the top blocks unfrozen, images go
through the backbone at every step ("end to end"). Both paths start from the
same head initialisation, shuffle and dropout keys, so from one seed they
reach the same head.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdl.data import images as image_io
from jaxdl.models.heads import ClassifierHead, FineTuneModel, feature_backbone
from jaxdl.models.mobilenet_v2 import BLOCKS, MobileNetV2, block_prefix, body_and_top, folded, layer_plan
from jaxdl.runtime.inference import apply_in_chunks, predict_in_chunks
from jaxdl.training.callbacks import Callback
from jaxdl.training.steps import create_train_state, new_train_state, seed_rngs
from jaxdl.training.trainer import fit

LOSS = "sparse_categorical_crossentropy"


def stage_layers(stage: int) -> list[str]:
    """Layer names of backbone stage `stage`: 0-16 the inverted-residual blocks (0 with the stem conv),
    17 the final 1x1 conv `Conv_1`."""
    names = [name for name, _ in layer_plan(include_top=False)]
    if stage == len(BLOCKS):
        return ["Conv_1", "Conv_1_bn"]
    prefix = block_prefix(stage)
    stem = ["Conv1", "bn_Conv1"] if stage == 0 else []
    return stem + [n for n in names if n.startswith(prefix)]


def top_stage_layers(unfreeze: int) -> list[str]:
    """Layers of the top `unfreeze` stages: 1 is `Conv_1`, 2 adds block 16, ... 18 is the whole backbone."""
    stages = len(BLOCKS) + 1
    if not 0 <= unfreeze <= stages:
        raise ValueError(f"unfreeze must be between 0 and {stages} (the backbone's stages), got {unfreeze}")
    return [name for stage in range(stages - unfreeze, stages) for name in stage_layers(stage)]


@dataclasses.dataclass(frozen=True)
class FrozenBackboneApply:
    """`apply_fn` for end-to-end head training: images -> frozen backbone -> head.

    Trainable params are {"head": ..., optionally "backbone": top stages};
    the rest of the backbone comes from the frozen collection
    "frozen_backbone" and gets no gradient.
    """

    backbone: MobileNetV2
    head: nn.Module
    augment: bool = False

    def __call__(self, variables, images, train: bool = False, rngs=None, mutable=False):
        frozen = variables["frozen_backbone"]
        backbone_variables = {**frozen, "params": {**frozen["params"], **variables["params"].get("backbone", {})}}
        if train and self.augment:
            images = image_io.augment_images(rngs["augment"], images)
        features = apply_in_chunks(self.backbone.apply, backbone_variables, images)
        head_variables = {"params": variables["params"]["head"]}
        if "batch_stats" in variables:
            head_variables["batch_stats"] = variables["batch_stats"]
        return self.head.apply(head_variables, features, train=train, rngs=rngs, mutable=mutable)


@dataclasses.dataclass
class FineTuned:
    """The outcome of `finetune`: a model with all its variables, and the training history."""

    model: FineTuneModel
    variables: dict
    history: dict[str, list]
    state: Any = None  # the final TrainState (head-sized params and optimizer state)


def _head_module(head, num_classes):
    if head is None:
        if num_classes is None:
            raise ValueError("finetune needs num_classes (or a head module)")
        return ClassifierHead(int(num_classes))
    if "train" not in inspect.signature(head.__call__).parameters:
        raise TypeError(f"the head {type(head).__name__} must take (features, train: bool); wrap it, or use "
                        "ClassifierHead")
    return head


def finetune(images, labels, *, backbone: MobileNetV2, backbone_variables: dict, head: nn.Module | None = None,
             num_classes: int | None = None, validation_data: tuple | None = None, epochs: int = 20,
             batch_size: int = 32, learning_rate: float = 1e-3, unfreeze: int = 0,
             backbone_learning_rate: float = 1e-5, augment: bool = False, cache_features: bool | None = None,
             seed: int = 0, callbacks: Sequence[Callback] = (), verbose: bool = True,
             checkpoint_dir=None, checkpoint_every: int | str = "epoch") -> FineTuned:
    """Trains a new head on a frozen pretrained backbone (plus, with `unfreeze`, its top stages).

    The backbone runs in inference mode and its BatchNorm statistics never
    change. Head-only training without augmentation computes the backbone's
    features once per image and trains the head on them ("cached
    features"); with `augment` or `unfreeze`, images go through the backbone
    at every step. Both paths reach the same head from one seed. Training
    runs through `fit` with sparse categorical cross-entropy and Adam
    (docs/pretrained.md).

    Args:
      images: preprocessed NHWC image arrays (as `jaxdl.data.images` loads them).
      labels: integer class labels, one per image.
      backbone: a `MobileNetV2` (with or without its top; the top is
        removed).
      backbone_variables: the backbone's pretrained variables (`params` and
        `batch_stats`).
      head: a Linen module taking `(features, train)`; None (default) is one
        Dense layer of `num_classes` (`ClassifierHead`).
      num_classes: the number of classes of the default head; needed when
        `head` is None.
      validation_data: `(images, labels)` evaluated after every epoch; None
        (default) evaluates nothing.
      epochs: the number of epochs; default 20.
      batch_size: the batch size; default 32.
      learning_rate: Adam's learning rate for the head; default 1e-3.
      unfreeze: how many of the backbone's top stages train too (1 is
        `Conv_1`, 2 adds block 16, ..., 18 the whole backbone); default 0.
      backbone_learning_rate: Adam's learning rate for the unfrozen stages;
        default 1e-5.
      augment: random flips and crops of the images at every step (needs
        the backbone at every step); default False.
      cache_features: train on features computed once; None (default) caches
        unless `augment` or `unfreeze` need the backbone at every step.
      seed: the seed of the head's initialisation, shuffling and dropout;
        default 0.
      callbacks: `jaxdl.training.callbacks.Callback`s, passed to `fit`.
      verbose: print progress, as `fit` does; default True.
      checkpoint_dir: a directory to checkpoint the training in and resume
        it from, as in `fit`; None (default) saves nothing.
      checkpoint_every: "epoch" (default) or a number of steps, as in `fit`.

    Returns:
      A `FineTuned`: the `FineTuneModel` (backbone and head), its whole
      variables as numpy arrays (ready for `save_model` or `predict`), the
      training history and the final `TrainState`.

    Raises:
      ValueError: if neither `head` nor `num_classes` is given; if
        `cache_features=True` with `augment` or `unfreeze`; if `unfreeze` is
        outside 0 to 18; and whatever `fit` raises for the data and
        arguments.
      TypeError: if `head` does not take a `train` argument.
    """
    head = _head_module(head, num_classes)
    if cache_features is None:
        cache_features = not augment and unfreeze == 0
    if cache_features and (augment or unfreeze):
        raise ValueError("cached features cannot be augmented or come from unfrozen blocks; "
                         "use cache_features=False")
    backbone, backbone_variables = feature_backbone(backbone, backbone_variables)
    unfrozen = top_stage_layers(unfreeze)
    fit_args = dict(loss=LOSS, epochs=epochs, batch_size=batch_size, seed=seed, callbacks=callbacks,
                    verbose=verbose, validation_data=validation_data, checkpoint_dir=checkpoint_dir,
                    checkpoint_every=checkpoint_every)
    if cache_features:
        state, history = _train_on_features(images, labels, backbone, backbone_variables, head,
                                            optax.adam(learning_rate), fit_args)
        head_params, head_stats, backbone_params = state.params, state.batch_stats, {}
    else:
        state, history = _train_end_to_end(images, labels, backbone, backbone_variables, head, unfrozen, augment,
                                           learning_rate, backbone_learning_rate, fit_args)
        head_params, head_stats = state.params["head"], state.batch_stats
        backbone_params = state.params.get("backbone", {})

    model = FineTuneModel(backbone=backbone, head=head)
    variables = {"params": {"backbone": {**backbone_variables["params"], **backbone_params}, "head": head_params},
                 "batch_stats": {"backbone": backbone_variables["batch_stats"]}}
    if head_stats:
        variables["batch_stats"]["head"] = head_stats
    variables = jax.tree.map(np.asarray, jax.device_get(variables))
    return FineTuned(model, variables, history, state)


FEATURE_BATCH = 32


def _features(backbone: MobileNetV2, variables: dict, images: np.ndarray) -> np.ndarray:
    """The backbone's features of `images`, computed as `jaxdl classify` computes outputs, in batches of one
    shape (the last padded): one compiled program serves every number of images and every run on an equal
    backbone (`body_and_top` is keyed by the model's value; `backbone.apply` would be a new key per copy)."""
    apply, top = body_and_top(backbone)
    batches = []
    for start in range(0, len(images), FEATURE_BATCH):
        batch = images[start:start + FEATURE_BATCH]
        padded = np.pad(batch, ((0, FEATURE_BATCH - len(batch)),) + ((0, 0),) * (batch.ndim - 1))
        batches.append(np.asarray(predict_in_chunks(apply, variables, padded, top=top))[:len(batch)])
    return np.concatenate(batches)


def _train_on_features(images, labels, backbone, backbone_variables, head, optimizer, fit_args):
    """Pooled features computed once (BatchNorm folded: the backbone is inference-only), then `fit` on them."""
    fast_backbone, fast_variables = folded(backbone, backbone_variables)
    features = _features(fast_backbone, fast_variables, images)
    if fit_args["validation_data"] is not None:
        val_images, val_labels = fit_args["validation_data"]
        val_features = _features(fast_backbone, fast_variables, val_images)
        fit_args = {**fit_args, "validation_data": (val_features, val_labels)}
    return fit(head, features, labels, optimizer=optimizer, **fit_args)


def _train_end_to_end(images, labels, backbone, backbone_variables, head, unfrozen, augment, learning_rate,
                      backbone_learning_rate, fit_args):
    """Images through the frozen backbone at every step; only the head (and unfrozen stages) differentiated."""
    init_rng, _ = seed_rngs(fit_args["seed"])  # the head starts exactly as `fit` starts it on cached features
    features = jax.eval_shape(backbone.apply, backbone_variables, jnp.zeros((1, *np.shape(images)[1:])))
    head_state = create_train_state(head, optax.identity(), features.shape[1:], init_rng)
    if unfrozen:
        frozen = {"params": {k: v for k, v in backbone_variables["params"].items() if k not in unfrozen},
                  "batch_stats": backbone_variables["batch_stats"]}
        params = {"head": head_state.params, "backbone": {k: backbone_variables["params"][k] for k in unfrozen}}
        optimizer = optax.multi_transform(
            {"head": optax.adam(learning_rate), "backbone": optax.adam(backbone_learning_rate)},
            {"head": "head", "backbone": "backbone"})
    else:  # nothing of the backbone trains: fold its BatchNorm for speed
        backbone, frozen = folded(backbone, backbone_variables)
        params, optimizer = {"head": head_state.params}, optax.adam(learning_rate)
    state = new_train_state(FrozenBackboneApply(backbone, head, augment), params, optimizer,
                            batch_stats=head_state.batch_stats, dropout_rng=head_state.dropout_rng,
                            input_shape=np.shape(images)[1:], frozen={"frozen_backbone": frozen})
    return fit(None, images, labels, state=state, **fit_args)


# --- data -------------------------------------------------------------------------------------

def stratified_split(labels, validation_split: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices: each class shuffled (seeded) and its last fraction held out."""
    if not 0.0 < validation_split < 1.0:
        raise ValueError(f"validation split must be between 0 and 1 (exclusive), got {validation_split}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        held_out = int(round(len(members) * validation_split))
        if held_out == 0 or held_out == len(members):
            raise ValueError(f"validation split {validation_split} leaves class {label} with no "
                             f"{'validation' if held_out == 0 else 'training'} images ({len(members)} in all)")
        train += list(members[:-held_out])
        val += list(members[-held_out:])
    return np.sort(train), np.sort(val)
