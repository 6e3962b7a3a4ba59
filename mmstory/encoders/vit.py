"""A plain ViT built from the shared layers, for training from scratch (no library needed)."""
from __future__ import annotations

import torch
import torch.nn as nn

from mmstory.encoders.base import CLIP_MEAN, CLIP_STD, Encoder, EncoderOutput, full_mask
from mmstory.layers import MLP, Transformer, init_weights


class ViTEncoder(Encoder):
    """Patch embedding + class token + learned positions + Transformer.

    tokens: (B, 1 + (S/p)^2, width) incl. the class token; pooled: the class token (B, width).
    """

    modality = "image"

    def __init__(self, *, image_size: int = 64, patch_size: int = 8, width: int = 256, depth: int = 4,
                 heads: int = 4, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.width = self.pooled_width = width
        self.preprocess = {"image_size": image_size, "mean": CLIP_MEAN, "std": CLIP_STD}
        self.patch = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.zeros(1, 1 + (image_size // patch_size) ** 2, width))
        self.transformer = Transformer(width, depth, heads, mlp_ratio=mlp_ratio, dropout=dropout)
        init_weights(self)
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.cls, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> EncoderOutput:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, 3, H, W) -> (B, N, D)
        if x.shape[1] + 1 != self.pos.shape[1]:
            raise ValueError(f"ViTEncoder built for {self.preprocess['image_size']} px images got "
                             f"{x.shape[1]} patches; resize inputs to that size")
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.transformer(x)
        return EncoderOutput(x, full_mask(x), x[:, 0])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def resizable_mlps(self) -> list[MLP]:
        return [m for m in self.transformer.modules() if isinstance(m, MLP)]
