"""torchvision's MobileNetV2 and its ImageNet preprocessing in plain torch and PIL, as the reference for the
torchvision convention (torchvision itself is not installable beside this machine's torch).

Written from torchvision's published architecture (`torchvision/models/mobilenetv2.py`) and transforms
(`Resize(256)`, `CenterCrop(224)`, `ToTensor()`, `Normalize(...)`); it imports nothing from jaxdl, so a
defect in jaxdl's block table or preprocessing cannot reappear here and agree with itself.
"""
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own spelling of it
from PIL import Image

# torchvision's `inverted_residual_setting`: expansion t, output channels c, repeats n, first stride s.
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
# Each block as (expansion, stride): a stage's first block takes its stride, the repeats stride 1.
BLOCKS = tuple((t, s if i == 0 else 1) for t, _, n, s in INVERTED_RESIDUAL_SETTING for i in range(n))

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(image: Image.Image, resize: int = 256, crop: int = 224) -> np.ndarray:
    """torchvision's ImageNet evaluation transform on a PIL image, as an HWC float32 array.

    `Resize(resize)`: the short side becomes `resize`, the long side `int(resize * long / short)`, PIL
    bilinear. `CenterCrop(crop)`: top-left at `int(round((side - crop) / 2))`. Then /255 and normalised.
    """
    width, height = image.size
    if width <= height:
        size = (resize, int(resize * height / width))
    else:
        size = (int(resize * width / height), resize)
    image = image.convert("RGB").resize(size, Image.BILINEAR)
    left, top = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
    pixels = np.asarray(image.crop((left, top, left + crop, top + crop)), np.float32) / 255.0
    return (pixels - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)


def forward(state_dict: dict, images_nchw: torch.Tensor) -> torch.Tensor:
    """Logits of torchvision's `mobilenet_v2` in evaluation mode, from its state dict."""
    def batch_norm(x, prefix):
        return F.batch_norm(x, state_dict[f"{prefix}.running_mean"], state_dict[f"{prefix}.running_var"],
                            state_dict[f"{prefix}.weight"], state_dict[f"{prefix}.bias"], training=False, eps=1e-5)

    def conv_bn(x, prefix, stride=1, groups=1, relu=True):
        weight = state_dict[f"{prefix}.0.weight"]
        x = batch_norm(F.conv2d(x, weight, stride=stride, padding=(weight.shape[-1] - 1) // 2, groups=groups),
                       f"{prefix}.1")
        return F.relu6(x) if relu else x

    x = conv_bn(images_nchw, "features.0", stride=2)
    for block_id, (expansion, stride) in enumerate(BLOCKS):
        inputs, prefix = x, f"features.{block_id + 1}.conv"
        layer = 0
        if expansion != 1:
            x = conv_bn(x, f"{prefix}.0")
            layer = 1
        x = conv_bn(x, f"{prefix}.{layer}", stride=stride, groups=x.shape[1])
        x = batch_norm(F.conv2d(x, state_dict[f"{prefix}.{layer + 1}.weight"]), f"{prefix}.{layer + 2}")
        if stride == 1 and inputs.shape[1] == x.shape[1]:
            x = x + inputs
    x = conv_bn(x, "features.18")
    x = x.mean(dim=(2, 3))
    return F.linear(x, state_dict["classifier.1.weight"], state_dict["classifier.1.bias"])
