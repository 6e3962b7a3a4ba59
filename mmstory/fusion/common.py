"""Pieces every fusion module shares: ordering the present modalities and tagging their tokens."""
from __future__ import annotations

import torch
import torch.nn as nn

Features = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (tokens (B, N, D), mask (B, N) bool)


class ModalityEmbedding(nn.Module):
    """One learned vector per modality, added to its tokens so later layers know where a token came from.
    ``ordered`` returns the present modalities in the configured order (any subset, never empty)."""

    def __init__(self, dim: int, modalities: list[str]):
        super().__init__()
        self.modalities = list(modalities)
        self.embed = nn.ParameterDict({m: nn.Parameter(torch.randn(dim) * 0.02) for m in self.modalities})

    def ordered(self, inputs: Features) -> list[str]:
        unknown = [m for m in inputs if m not in self.embed]
        if unknown:
            raise KeyError(f"fusion got unknown modality {unknown}; configured modalities: {self.modalities}")
        if not inputs:
            raise ValueError("fusion needs at least one modality; got none")
        return [m for m in self.modalities if m in inputs]

    def forward(self, name: str, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.embed[name]


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, N, D), (B, N) -> (B, D) mean over real tokens."""
    w = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * w).sum(1) / w.sum(1).clamp(min=1.0)
