"""Weighted fusion: a learned softmax gate per modality and sample scales each modality's tokens."""
from __future__ import annotations

import torch
import torch.nn as nn

from mmstory.fusion.common import Features, ModalityEmbedding, masked_mean


class WeightedFusion(nn.Module):
    """Gate logits = a linear score of each modality's mean token + a learned per-modality bias; softmax
    over the modalities present in the batch. Tokens are scaled by gate * (number present), so equal
    gates leave them unchanged, then concatenated. The gates are returned as ``gates`` (B, M), in the
    order of ``gate_names``, so they can be read out and plotted."""

    def __init__(self, *, dim: int, modalities: list[str] = ("image", "audio", "question")):
        super().__init__()
        self.modality = ModalityEmbedding(dim, modalities)
        self.score = nn.Linear(dim, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)
        self.bias = nn.ParameterDict({m: nn.Parameter(torch.zeros(1)) for m in modalities})  # 1-d for FSDP2

    def forward(self, inputs: Features) -> dict:
        names = self.modality.ordered(inputs)
        logits = torch.stack([self.score(masked_mean(*inputs[m])).squeeze(-1) + self.bias[m] for m in names], dim=1)
        gates = logits.softmax(dim=1)  # (B, M)
        scale = gates * len(names)
        tokens = torch.cat([self.modality(m, inputs[m][0] * scale[:, i, None, None]) for i, m in enumerate(names)], dim=1)
        mask = torch.cat([inputs[m][1] for m in names], dim=1)
        return {"tokens": tokens, "mask": mask, "gates": gates, "gate_names": names}
