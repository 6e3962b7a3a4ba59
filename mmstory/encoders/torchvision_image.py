"""torchvision ResNets: the layer4 feature map as tokens, its average as the pooled vector."""
from __future__ import annotations

import torch
import torch.nn as nn

from mmstory.encoders.base import EncoderOutput, full_mask, pretrained_error

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TorchvisionResNetEncoder(nn.Module):
    """``arch`` in torchvision.models (resnet18/34/50/101/152). ``pretrained``: False, True (torchvision's
    default weights, downloaded) or a local state-dict file (``.pth`` loaded with weights_only=True, or
    ``.safetensors``)."""

    modality = "image"

    def __init__(self, *, arch: str = "resnet18", pretrained: bool | str = False, image_size: int = 224):
        super().__init__()
        import torchvision

        if not arch.startswith("resnet") or not hasattr(torchvision.models, arch):
            raise ValueError(f"unknown torchvision ResNet '{arch}'; valid: resnet18, resnet34, resnet50, resnet101, resnet152")
        self.args = {"arch": arch, "image_size": image_size}
        builder = getattr(torchvision.models, arch)
        try:
            net = builder(weights="DEFAULT" if pretrained is True else None)
            if isinstance(pretrained, str):
                net.load_state_dict(_load_state_dict(pretrained))
        except Exception as e:
            if not pretrained:
                raise
            raise pretrained_error("torchvision", arch, pretrained, e) from e
        self.width = self.pooled_width = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net
        self.preprocess = {"image_size": image_size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> EncoderOutput:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))  # (B, C, H', W')
        tokens = x.flatten(2).transpose(1, 2)
        return EncoderOutput(tokens, full_mask(tokens), tokens.mean(1))

    def checkpoint_args(self, folder) -> dict:
        return {**self.args, "pretrained": False}


def _load_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors only, never code
