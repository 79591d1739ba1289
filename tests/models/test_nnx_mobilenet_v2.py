"""MobileNetV2 as a Flax NNX module: torchvision's weights' logits (Keras's: tests/models/test_mobilenet_v2.py), its
modes, head-only fine-tuning through `fit`."""
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.common import shared_data_dir
from jaxdl import count_params, fit, trained_module
from jaxdl.data import images as image_io
from jaxdl.models import MobileNetV2, MobileNetV2NNX
from jaxdl.models.heads import feature_backbone

PHOTOS = [shared_data_dir() / "boef.jpg"] + [shared_data_dir() / "cats" / name for name in ("f01.jpg", "m01.jpg")]
pytestmark = pytest.mark.requires_cats


@pytest.fixture(scope="module")
def torchvision(jaxdl_cache):
    from jaxdl.pretrained import torchvision_imagenet

    return torchvision_imagenet()


def leaves(tree):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def same(a, b) -> bool:
    return len(leaves(a)) == len(leaves(b)) and all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))


def test_logits_on_the_sample_photos_equal_the_linen_ports(torchvision):
    model, variables, metadata = torchvision
    photos, _, _ = image_io.load_images(PHOTOS, [0, 0, 0], metadata["preprocessing"])
    module = MobileNetV2NNX(model, variables)
    module.eval()
    # Bitwise: the bridge runs the Linen module's own apply on the same variables, in the same program.
    linen = jax.jit(model.apply)(variables, photos)
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, x: m(x))(module, photos)), np.asarray(linen))
    # Real weights: the tutorial's Keras network calls the rabbit of boef.jpg a Shih-Tzu (ImageNet class 155),
    # torchvision's a Pekinese (154, the other small long-haired dog).
    assert np.argmax(linen, axis=-1)[0] == 154


class CatOrNot(nnx.Module):
    """The transfer-learning tutorial's model, NNX-style: a pretrained backbone and a new Linear head."""

    def __init__(self, backbone: MobileNetV2NNX, rngs: nnx.Rngs):
        self.backbone = backbone
        self.head = nnx.Linear(1280, 2, rngs=rngs)

    def __call__(self, images):
        return self.head(self.backbone(images))


@pytest.fixture(scope="module")
def small_photos():
    """Twelve random 32x32 images: what these tests check (which variables change) does not depend on the
    pixels, and MobileNetV2 takes any size from 32 up."""
    images = np.random.default_rng(0).uniform(-1, 1, (12, 32, 32, 3)).astype(np.float32)
    return images, np.arange(12, dtype=np.int32) % 2


def fine_tune(torchvision, small_photos, *, frozen: bool, wrt):
    backbone, variables = feature_backbone(*torchvision[:2])
    model = CatOrNot(MobileNetV2NNX(backbone, variables, frozen=frozen), nnx.Rngs(0))
    before = jax.tree.map(np.array, nnx.state(model))
    state, history = fit(model, *small_photos, loss="sparse_categorical_crossentropy", optimizer=optax.adam(1e-2),
                         epochs=2, batch_size=4, verbose=0, wrt=wrt)
    return model, before, state, history


def test_head_only_fine_tuning_through_fit_leaves_the_backbone_bitwise_unchanged(torchvision, small_photos):
    model, before, state, history = fine_tune(torchvision, small_photos, frozen=True,
                                              wrt=nnx.All(nnx.Param, nnx.PathContains("head")))
    assert same(nnx.state(model.backbone), before["backbone"])  # weights and BatchNorm statistics
    assert not same(nnx.state(model.head), before["head"])  # ... while the head trained, in place
    assert sum(np.size(p) for p in jax.tree.leaves(state.params)) == 1280 * 2 + 2  # only the head is optimised
    assert history["loss"][1] < history["loss"][0]
    assert same(nnx.state(trained_module(state)), nnx.state(model))  # the state holds what the module holds
    assert count_params(model) == 2_257_984 + 2562  # MobileNetV2 without its top (Keras's count), and the head


def test_training_mode_drops_and_updates_statistics_evaluation_mode_does_neither_and_refusals(torchvision):
    model, variables, _ = torchvision
    module = MobileNetV2NNX(model, variables)
    module.train()
    with pytest.raises(ValueError, match=r"dropout, which needs a key: build it with rngs=nnx.Rngs\(dropout=SEED\)"):
        module(np.zeros((1, 32, 32, 3), np.float32))
    dropout = MobileNetV2NNX(model, variables, rngs=nnx.Rngs(dropout=0))
    dropout.train()
    images = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    before = jax.tree.map(np.array, nnx.state(dropout, nnx.BatchStat))
    call = nnx.jit(lambda m, x: m(x))
    assert not np.array_equal(call(dropout, images), call(dropout, images))  # a new dropout mask at each call
    assert not same(nnx.state(dropout, nnx.BatchStat), before)  # training mode: BatchNorm's averages move
    dropout.eval()
    stats = jax.tree.map(np.array, nnx.state(dropout, nnx.BatchStat))
    np.testing.assert_array_equal(call(dropout, images), call(dropout, images))  # evaluation: no dropout
    assert same(nnx.state(dropout, nnx.BatchStat), stats)  # ... and the averages stay
    with pytest.raises(TypeError, match="wraps jaxdl's Linen MobileNetV2; model is Dense"):
        MobileNetV2NNX(nn.Dense(3), variables)
    with pytest.raises(TypeError, match=r"needs the model's variables, .* got dict with \['batch_stats'\]"):
        MobileNetV2NNX(MobileNetV2(), {"batch_stats": {}})
