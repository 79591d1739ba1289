"""MobileNetV2 (Sandler et al., 2018) as one Linen module, faithful to two reference ports.

`convention="keras"` reproduces `keras.applications.MobileNetV2`: BatchNorm
epsilon 1e-3 and momentum 0.999, TF "same" padding for the first conv, and
Keras's `correct_pad` zero padding before every stride-2 depthwise conv. A
Dense `predictions` layer with softmax is the head.
`convention="torchvision"` reproduces `torchvision.models.mobilenet_v2`:
padding 1 on every 3x3 conv, BatchNorm epsilon 1e-5, and a head of
dropout(0.2) plus a linear layer returning logits.

Module names are Keras's layer names (`Conv1`, `bn_Conv1`,
`expanded_conv_depthwise`, `block_1_expand_BN`, ..., `Conv_1_bn`,
`predictions`), whatever the convention, so a parameter path reads like the
Keras layer it came from.

Two speed options change how, not what, the network computes:
- `conv_implementation`: XLA:CPU runs grouped convolutions
  (`feature_group_count=C`) and 1x1 convolutions far slower than
  shifted multiply-adds and matrix products, while GPU and TPU libraries are
  fast at them; "auto" picks per backend (see `Conv`).
- `fold_bn`: each BatchNorm folded into the conv before it (see
  `fold_batch_norm`), giving conv -> bias -> ReLU6; inference only.
`jaxdl.runtime.inference.apply_in_chunks` runs a batch the way XLA:CPU runs it
fastest (in chunks, over a CPU device per core where there are several), the
network's top once per batch (`body_and_top`), with the blocks `CPU_ROW_STRIPS`
names computed a few rows at a time. `MobileNetV2.inference_form` is the
network as generic code runs it for inference (`jaxdl.models.contract`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdl.models.contract import InferenceForm

ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
MIN_INPUT_SIZE = 32


@dataclasses.dataclass(frozen=True)
class Convention:
    batch_norm_epsilon: float
    batch_norm_momentum: float  # Flax semantics: running = momentum * running + (1 - momentum) * batch
    head_dropout: float
    default_classifier_activation: str | None


CONVENTIONS = {
    "keras": Convention(1e-3, 0.999, 0.0, "softmax"),
    "torchvision": Convention(1e-5, 0.9, 0.2, None),
}

# (expansion, output channels before alpha, stride) of blocks 0..16, as in the paper's table 2.
BLOCKS = ((1, 16, 1),
          (6, 24, 2), (6, 24, 1),
          (6, 32, 2), (6, 32, 1), (6, 32, 1),
          (6, 64, 2), (6, 64, 1), (6, 64, 1), (6, 64, 1),
          (6, 96, 1), (6, 96, 1), (6, 96, 1),
          (6, 160, 2), (6, 160, 1), (6, 160, 1),
          (6, 320, 1))


def make_divisible(value: float, divisor: int = 8) -> int:
    """Keras's `_make_divisible`: round to a multiple of `divisor`, never dropping more than 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def block_prefix(block_id: int) -> str:
    return "expanded_conv_" if block_id == 0 else f"block_{block_id}_"


def correct_pad(size: tuple[int, int], kernel: int = 3) -> tuple[tuple[int, int], tuple[int, int]]:
    """Keras's `correct_pad`: ((0, 1), (0, 1)) for even sizes, ((1, 1), (1, 1)) for odd."""
    half = kernel // 2
    return tuple((half - (1 - s % 2), half) for s in size)


def same_padding(size: tuple[int, int], kernel: int, stride: int) -> tuple[tuple[int, int], ...]:
    """TF/Keras "same" padding (the extra pixel, if any, at the bottom/right)."""
    pads = []
    for s in size:
        total = max((-(-s // stride) - 1) * stride + kernel - s, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


def _taps(x: jnp.ndarray, kernel_size: int, stride: int):
    """The kernel_size**2 strided windows of a padded NHWC `x`, one per kernel tap, row-major."""
    out_h = (x.shape[1] - kernel_size) // stride + 1
    out_w = (x.shape[2] - kernel_size) // stride + 1
    for i in range(kernel_size):
        for j in range(kernel_size):
            yield x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride, :]


def _depthwise_stride_one(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """A stride-1 depthwise conv of a padded NHWC `x` (kernel HW1C), as shifted multiply-adds over rows of
    width x channels: the same products summed in the same order as over NHWC windows (bitwise the same
    result), but XLA:CPU's loop then runs along a whole row rather than along the channels alone, which
    is faster (docs/numerics.md#mobilenetv2-inference-on-cpu)."""
    n, height, width, channels = x.shape
    k = kernel.shape[0]
    out_h, out_w = height - k + 1, width - k + 1
    rows = x.reshape(n, height, width * channels)
    y = sum(rows[:, i:i + out_h, j * channels:(j + out_w) * channels] * jnp.tile(kernel[i, j, 0], out_w)
            for i in range(k) for j in range(k))
    return y.reshape(n, out_h, out_w, channels)


def _multiply_adds(x: jnp.ndarray, kernel: jnp.ndarray, stride: int) -> jnp.ndarray:
    """A conv over few input channels (the 3-channel stem) as one multiply-add per tap and channel: faster
    than gathering its patches for a matrix product (docs/numerics.md#mobilenetv2-inference-on-cpu)."""
    k, channels = kernel.shape[0], kernel.shape[2]
    return sum(tap[..., c:c + 1] * kernel[t // k, t % k, c]
               for t, tap in enumerate(_taps(x, k, stride)) for c in range(channels))


# Convs over at most this many input channels run as multiply-adds on CPU (`Conv`): the 3-channel stem.
MULTIPLY_ADD_CHANNELS = 4


class MobileNetConv(nn.Module):
    """A conv with explicit padding, in the kernel layout of Flax's `nn.Conv` (HWIO; depthwise HW1C).

    `implementation` picks how it is computed; the result is the same:
    - "xla": `lax.conv_general_dilated` (depthwise as `feature_group_count=C`),
      what GPU and TPU convolution libraries run fast;
    - "matmul": what XLA:CPU runs fast. Its grouped convolutions and small
      convolutions are generic loops, an order of magnitude slower than
      plain vector work: so depthwise convs become nine shifted
      multiply-adds, 1x1 convs a matrix product over channels, convs over
      at most `MULTIPLY_ADD_CHANNELS` input channels (the stem) one
      multiply-add per tap and channel, and other convs a matrix product
      over gathered patches (im2col).
    - "auto": "matmul" on CPU, "xla" elsewhere.
    Written by hand because XLA exposes no switch for this choice.
    """

    features: int
    kernel_size: int = 1
    stride: int = 1
    padding: Any = ((0, 0), (0, 0))  # explicit pairs, or "SAME" (TF semantics)
    depthwise: bool = False
    use_bias: bool = False
    implementation: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels, k = x.shape[-1], self.kernel_size
        shape = (k, k, 1, channels) if self.depthwise else (k, k, channels, self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape).astype(self.dtype)
        padding = same_padding(x.shape[1:3], k, self.stride) if self.padding == "SAME" else self.padding
        if any(p for pair in padding for p in pair):
            x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
        implementation = self.implementation
        if implementation == "auto":
            implementation = "matmul" if jax.default_backend() == "cpu" else "xla"
        if implementation == "xla":
            y = jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), "VALID",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                             feature_group_count=channels if self.depthwise else 1)
        elif implementation != "matmul":
            raise ValueError(f"conv implementation must be 'auto', 'matmul' or 'xla', got {self.implementation!r}")
        elif self.depthwise and self.stride == 1:
            y = _depthwise_stride_one(x, kernel)
        elif self.depthwise:
            y = sum(tap * kernel[i // k, i % k, 0] for i, tap in enumerate(_taps(x, k, self.stride)))
        elif k == 1:
            y = jnp.einsum("nhwc,cd->nhwd", x[:, ::self.stride, ::self.stride], kernel[0, 0])
        elif channels <= MULTIPLY_ADD_CHANNELS:
            y = _multiply_adds(x, kernel, self.stride)
        else:
            patches = jnp.concatenate(list(_taps(x, k, self.stride)), axis=-1)
            y = jnp.einsum("nhwc,cd->nhwd", patches, kernel.reshape(k * k * channels, self.features))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (y.shape[-1],)).astype(self.dtype)
        return y


class MobileNetV2(nn.Module):
    """MobileNetV2 on NHWC float images (preprocessed as the weights require).

    Like `keras.applications.MobileNetV2`: `alpha` scales the channels,
    `include_top` adds the classifier, otherwise `pooling` (None, "avg",
    "max") shapes the features. `classifier_activation` defaults to the
    convention's ("softmax" for Keras, logits for torchvision).
    `train=True` runs BatchNorm on batch statistics (call `apply` with
    `mutable=["batch_stats"]`) and enables the head's dropout.
    """

    alpha: float = 1.0
    include_top: bool = True
    pooling: str | None = None
    num_classes: int = 1000
    classifier_activation: str | None = "default"
    convention: str = "keras"
    conv_implementation: str = "auto"
    fold_bn: bool = False
    dtype: Any = jnp.float32

    @property
    def head_activation(self) -> str | None:
        """The classifier's activation once "default" is resolved by the convention."""
        if self.classifier_activation == "default":
            return CONVENTIONS[self.convention].default_classifier_activation
        return self.classifier_activation

    @nn.nowrap  # a helper of __call__: not a method Flax records (its arguments include functions)
    def _conv_unit(self, conv_name, bn_name, features, *, kernel=1, stride=1, padding=((0, 0), (0, 0)),
                   depthwise=False, relu=True, train=False):
        """conv -> BatchNorm -> optional ReLU6, the unit every layer of the network is made of, as a
        function of its input: its modules are made once, so it can run on several pieces of an image."""
        conv_cfg = CONVENTIONS[self.convention]
        conv = MobileNetConv(features, kernel, stride, padding, depthwise=depthwise, use_bias=self.fold_bn,
                    implementation=self.conv_implementation, dtype=self.dtype, name=conv_name)
        norm = None if self.fold_bn else nn.BatchNorm(
            use_running_average=not train, momentum=conv_cfg.batch_norm_momentum,
            epsilon=conv_cfg.batch_norm_epsilon, dtype=self.dtype, name=bn_name)

        def apply(x):
            x = conv(x) if norm is None else norm(conv(x))
            return nn.relu6(x) if relu else x

        return apply

    def _three_by_three_padding(self, x, stride):
        if self.convention == "torchvision" or stride == 1:
            return ((1, 1), (1, 1))
        return correct_pad(x.shape[1:3])

    @nn.nowrap  # not a Flax method: it takes the variables, not a scope
    def inference_form(self, variables) -> InferenceForm:
        """The network with its BatchNorm folded into the convs (exact, inference only), run in chunks on CPU.

        Args:
          variables: this model's variables; without `batch_stats` (folded
            already) they are used as they are.

        Returns:
          An `InferenceForm` of the folded network, `chunked`.
        """
        model, variables = folded(self, variables) if "batch_stats" in variables else (self, variables)
        return InferenceForm(model, variables, chunked=True)

    @nn.compact
    def __call__(self, x, train: bool = False, part: str = "all", row_strips: tuple = ()):
        """The network on images `x`; `part` runs one side of the split before `Conv_1`.

        "body" maps images to block 16's output, and "top" maps that to what the
        whole network returns (the last conv, then the pooling or the head), so
        that the weight-heavy top can run on a whole batch while the body runs
        in chunks (`jaxdl.runtime.inference.apply_in_chunks`). "all" is both.
        `row_strips`, pairs (block, rows), computes those blocks (in inference)
        `rows` output rows at a time, each strip from its expansion to its
        projection, so that a large block's expanded activations stay in cache
        (see `CPU_ROW_STRIPS`); the result is the same.
        """
        if self.convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {sorted(CONVENTIONS)}, got {self.convention!r}")
        if self.pooling not in (None, "avg", "max"):
            raise ValueError(f"pooling must be None, 'avg' or 'max', got {self.pooling!r}")
        if part not in ("all", "body", "top"):
            raise ValueError(f"part must be 'all', 'body' or 'top', got {part!r}")
        if train and self.fold_bn:
            raise ValueError("a MobileNetV2 with fold_bn=True is for inference only; train the unfolded model")
        if train and row_strips:
            raise ValueError("row_strips is for inference: BatchNorm's batch statistics need whole images")
        for pair in row_strips:
            if (len(pair) != 2 or not all(isinstance(v, int) for v in pair) or not 0 <= pair[0] < len(BLOCKS)
                    or pair[1] < 1):
                raise ValueError(f"row_strips takes pairs (block, rows) with a block in 0..{len(BLOCKS) - 1} and at "
                                 f"least 1 row, got {pair!r} in {row_strips!r}")
        unit = functools.partial(self._conv_unit, train=train)
        if part != "top":
            x = self._body(x.astype(self.dtype), unit, dict(row_strips))
        return x if part == "body" else self._top(x, unit, train)

    @nn.nowrap  # a helper of __call__: not a method Flax records (its arguments include functions)
    def _body(self, x, unit, row_strips: dict):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"MobileNetV2 takes NHWC images with 3 channels, got shape {x.shape}")
        if min(x.shape[1:3]) < MIN_INPUT_SIZE:
            raise ValueError(f"MobileNetV2 needs images of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}, "
                             f"got {x.shape[1]}x{x.shape[2]}")
        first_padding = ((1, 1), (1, 1)) if self.convention == "torchvision" else "SAME"
        x = unit("Conv1", "bn_Conv1", make_divisible(32 * self.alpha), kernel=3, stride=2, padding=first_padding)(x)
        for block_id in range(len(BLOCKS)):
            x = self._block(x, block_id, unit, row_strips.get(block_id))
        return x

    @nn.nowrap  # a helper of __call__: not a method Flax records (its arguments include functions)
    def _block(self, x, block_id, unit, strip_rows: int | None):
        """Inverted residual block `block_id`: expand (1x1), depthwise 3x3, project (1x1), with a residual
        where the shape allows; in strips of `strip_rows` output rows where given."""
        expansion, filters, stride = BLOCKS[block_id]
        prefix, (height, in_channels) = block_prefix(block_id), (x.shape[1], x.shape[-1])
        out_channels = make_divisible(int(filters * self.alpha))
        channels = expansion * in_channels if block_id else in_channels
        expand = unit(f"{prefix}expand", f"{prefix}expand_BN", channels) if block_id else (lambda x: x)
        depthwise = unit(f"{prefix}depthwise", f"{prefix}depthwise_BN", channels, kernel=3, stride=stride,
                         depthwise=True)
        project = unit(f"{prefix}project", f"{prefix}project_BN", out_channels, relu=False)
        (top, bottom), columns = self._three_by_three_padding(x, stride)
        out_height = (height + top + bottom - 3) // stride + 1

        def rows(first: int, count: int):
            """Output rows [first, first + count): the input rows they read, expanded, zero rows where the
            padding lies (the padding is of the expanded activations), then depthwise and projection."""
            low = first * stride - top
            high = low + (count - 1) * stride + 3
            expanded = expand(x[:, max(low, 0):min(high, height)])
            expanded = jnp.pad(expanded, ((0, 0), (max(-low, 0), max(high - height, 0)), columns, (0, 0)))
            y = project(depthwise(expanded))
            return y + x[:, first:first + count] if stride == 1 and in_channels == out_channels else y

        step = strip_rows or out_height
        return jnp.concatenate([rows(first, min(step, out_height - first)) for first in range(0, out_height, step)],
                               axis=1)

    @nn.nowrap  # a helper of __call__: not a method Flax records (its arguments include functions)
    def _top(self, x, unit, train):
        last_channels = make_divisible(1280 * self.alpha) if self.alpha > 1.0 else 1280
        x = unit("Conv_1", "Conv_1_bn", last_channels)(x)

        if not self.include_top:
            if self.pooling == "avg":
                return x.mean(axis=(1, 2))
            if self.pooling == "max":
                return x.max(axis=(1, 2))
            return x
        x = x.mean(axis=(1, 2))
        conv_cfg = CONVENTIONS[self.convention]
        if conv_cfg.head_dropout:
            x = nn.Dropout(conv_cfg.head_dropout, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="predictions")(x)
        if self.head_activation == "softmax":
            return nn.softmax(x)
        if self.head_activation is not None:
            raise ValueError(f"classifier_activation must be 'softmax' or None, got {self.head_activation!r}")
        return x


# On CPU, block 1 (the widest expanded activations: 112x112x96 at 224) runs in strips of 14 of its
# 56 output rows (`row_strips`), each strip from its expansion to its projection; strips elsewhere,
# or of other heights, were slower (docs/numerics.md#mobilenetv2-inference-on-cpu). The chunks and
# streams a batch runs in are the runtime's (`jaxdl.runtime.inference`).
CPU_ROW_STRIPS = ((1, 14),)


@functools.cache
def body_and_top(model) -> tuple:
    """`jaxdl.runtime.inference.apply_in_chunks`'s `apply` and `top` for `model`: a MobileNetV2 split before
    `Conv_1` (`part`), its body in row strips on CPU; any other model whole (no top). Cached: each model's pair
    is one jit cache key."""
    if isinstance(model, MobileNetV2):
        strips = CPU_ROW_STRIPS if jax.default_backend() == "cpu" else ()
        return (functools.partial(model.apply, part="body", row_strips=strips),
                functools.partial(model.apply, part="top"))
    return model.apply, None


def layer_plan(include_top: bool = True) -> list[tuple[str, str]]:
    """(layer name, kind) of every layer with weights, in network order.

    Kinds: "conv", "depthwise", "bn", "dense". Variable dicts are sorted by
    name, so converters and `fold_batch_norm` take the order from here.
    """
    plan = [("Conv1", "conv"), ("bn_Conv1", "bn")]
    for block_id in range(len(BLOCKS)):
        prefix = block_prefix(block_id)
        if block_id:
            plan += [(f"{prefix}expand", "conv"), (f"{prefix}expand_BN", "bn")]
        plan += [(f"{prefix}depthwise", "depthwise"), (f"{prefix}depthwise_BN", "bn"),
                 (f"{prefix}project", "conv"), (f"{prefix}project_BN", "bn")]
    plan += [("Conv_1", "conv"), ("Conv_1_bn", "bn")]
    return plan + [("predictions", "dense")] if include_top else plan


def batch_norm_pairs() -> list[tuple[str, str]]:
    """(conv, BatchNorm) layer-name pairs: every BatchNorm follows the conv it normalises."""
    plan = layer_plan(include_top=False)
    return [(plan[i - 1][0], name) for i, (name, kind) in enumerate(plan) if kind == "bn"]


def fold_batch_norm(variables, epsilon: float) -> dict:
    """Folds every BatchNorm into the conv before it, for a `fold_bn=True` model.

    BN(conv(x, W)) = conv(x, W * s) + (beta - mean * s), with
    s = gamma / sqrt(var + epsilon): an exact rewrite of the inference function.
    """
    params = {k: dict(v) for k, v in variables["params"].items()}
    stats = variables["batch_stats"]
    for conv, bn in batch_norm_pairs():
        bn_params = params.pop(bn)
        scale = np.asarray(bn_params["scale"], np.float64) / np.sqrt(np.asarray(stats[bn]["var"], np.float64) + epsilon)
        kernel = np.asarray(params[conv]["kernel"], np.float64)
        params[conv] = {
            "kernel": (kernel * scale).astype(np.float32),  # the output channel is the last kernel axis
            "bias": (np.asarray(bn_params["bias"], np.float64)
                     - np.asarray(stats[bn]["mean"], np.float64) * scale).astype(np.float32),
        }
    return {"params": params}


def folded(model: MobileNetV2, variables) -> tuple[MobileNetV2, dict]:
    """The same network with BatchNorm folded into the convs, for fast inference."""
    if model.fold_bn:
        return model, variables
    epsilon = CONVENTIONS[model.convention].batch_norm_epsilon
    return model.clone(fold_bn=True), fold_batch_norm(variables, epsilon)
