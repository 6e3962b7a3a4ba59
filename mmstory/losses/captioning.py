"""Autoregressive cross-entropy over the caption/answer tokens only."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CaptionLoss(nn.Module):
    """logits (B, S, V) at position t predict tokens[t + 1]; only positions where ``target_mask`` is
    True (caption/answer tokens and the final EOS) count — prompt, BOS and padding are ignored.
    Returns ``{"caption_loss": mean over target tokens}``."""

    def __init__(self, *, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        if "logits" not in outputs:
            return {}
        logits = outputs["logits"][:, :-1]
        targets = batch["tokens"][:, 1:].masked_fill(~batch["target_mask"][:, 1:], -100)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=-100, label_smoothing=self.label_smoothing)
        return {"caption_loss": loss}
