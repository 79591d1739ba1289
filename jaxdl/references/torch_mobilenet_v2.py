"""torchvision's MobileNetV2 forward pass in plain torch.nn.functional (torchvision itself is not installable
beside this machine's torch), as the reference for the torchvision convention."""
import torch
import torch.nn.functional as F

from jaxdl.models.mobilenet_v2 import BLOCKS


def forward(state_dict: dict, images_nchw: torch.Tensor) -> torch.Tensor:
    def conv_bn(x, prefix, stride=1, groups=1, relu=True):
        weight = state_dict[f"{prefix}.0.weight"]
        x = F.conv2d(x, weight, stride=stride, padding=(weight.shape[-1] - 1) // 2, groups=groups)
        bn = f"{prefix}.1"
        x = F.batch_norm(x, state_dict[f"{bn}.running_mean"], state_dict[f"{bn}.running_var"],
                         state_dict[f"{bn}.weight"], state_dict[f"{bn}.bias"], training=False, eps=1e-5)
        return F.relu6(x) if relu else x

    x = conv_bn(images_nchw, "features.0", stride=2)
    for block_id, (expansion, _, stride) in enumerate(BLOCKS):
        inputs, prefix = x, f"features.{block_id + 1}.conv"
        layer = 0
        if expansion != 1:
            x = conv_bn(x, f"{prefix}.0")
            layer = 1
        x = conv_bn(x, f"{prefix}.{layer}", stride=stride, groups=x.shape[1])
        project = state_dict[f"{prefix}.{layer + 1}.weight"]
        x = F.conv2d(x, project)
        bn = f"{prefix}.{layer + 2}"
        x = F.batch_norm(x, state_dict[f"{bn}.running_mean"], state_dict[f"{bn}.running_var"],
                         state_dict[f"{bn}.weight"], state_dict[f"{bn}.bias"], training=False, eps=1e-5)
        if stride == 1 and inputs.shape[1] == x.shape[1]:
            x = x + inputs
    x = conv_bn(x, "features.18")
    x = x.mean(dim=(2, 3))
    return F.linear(x, state_dict["classifier.1.weight"], state_dict["classifier.1.bias"])
