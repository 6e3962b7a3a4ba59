"""torchvision ResNets: the layer4 feature map as tokens, its average as the pooled vector."""
from __future__ import annotations

import contextlib
import itertools

import torch
import torch.nn as nn
import torch.utils.checkpoint

from mmstory.encoders.base import Encoder, EncoderOutput, full_mask, pretrained_error

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TorchvisionResNetEncoder(Encoder):
    """``arch`` in torchvision.models (resnet18/34/50/101/152). ``pretrained``: False, True (torchvision's
    default weights, downloaded) or a local state-dict file (``.pth`` loaded with weights_only=True, or
    ``.safetensors``). With grad checkpointing (training only), each residual block is recomputed in backward."""

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
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> EncoderOutput:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        if self.grad_checkpointing and self.training:
            for block in itertools.chain(n.layer1, n.layer2, n.layer3, n.layer4):
                x = _checkpoint(block, x)
        else:
            x = n.layer4(n.layer3(n.layer2(n.layer1(x))))  # (B, C, H', W')
        tokens = x.flatten(2).transpose(1, 2)
        return EncoderOutput(tokens, full_mask(tokens), tokens.mean(1))

    def checkpoint_args(self, folder, key: str | None = None) -> dict:
        return {**self.args, "pretrained": False}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable


def _checkpoint(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)``, recomputed in backward. BatchNorm in training mode updates its running statistics on every
    call, so in eager mode the recomputation would count each batch twice: it runs with the block's buffers put
    back as the forward left them. torch.compile takes no such context (only dispatch modes), and needs none:
    its recomputation replays the graph without the buffer updates."""
    if torch.compiler.is_compiling():
        return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    return torch.utils.checkpoint.checkpoint(
        block, x, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), _buffers_restored(block)))


@contextlib.contextmanager
def _buffers_restored(module: nn.Module):
    saved = [b.clone() for b in module.buffers()]
    try:
        yield
    finally:  # also when checkpoint stops the recomputation early (by raising) once it has what it needs
        with torch.no_grad():
            for b, s in zip(module.buffers(), saved):
                b.copy_(s)


def _load_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors only, never code
