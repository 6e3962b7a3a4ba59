"""Concatenate the tokens of every present modality, each tagged with a modality embedding."""
from __future__ import annotations

import torch
import torch.nn as nn

from mmstory.fusion.common import Features, ModalityEmbedding


class ConcatFusion(nn.Module):
    """tokens (B, sum N_m, D), mask (B, sum N_m): the decoder cross-attends to all of them."""

    def __init__(self, *, dim: int, modalities: list[str] = ("image", "audio", "question")):
        super().__init__()
        self.modality = ModalityEmbedding(dim, modalities)

    def forward(self, inputs: Features) -> dict[str, torch.Tensor]:
        names = self.modality.ordered(inputs)
        tokens = torch.cat([self.modality(m, inputs[m][0]) for m in names], dim=1)
        mask = torch.cat([inputs[m][1] for m in names], dim=1)
        return {"tokens": tokens, "mask": mask}
