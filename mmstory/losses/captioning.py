"""Autoregressive cross-entropy over the caption/answer tokens only."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class CaptionLoss(nn.Module):
    """Cross-entropy of the next token at the positions where it is a target (caption/answer tokens and
    the final EOS); prompt, BOS and padding are ignored. Reads either

    - ``target_logits`` (N, V) and ``target_ids`` (N,): the head already applied only at those positions
      (``MultimodalModel.forward``'s fast path), or
    - ``logits`` (B, S, V) at every position, with ``batch["tokens"]`` and ``batch["target_mask"]``:
      position t predicts tokens[t + 1] where target_mask[t + 1] is True.

    Returns ``{"caption_loss": mean over target tokens}`` (of the global batch under torch.distributed)."""

    def __init__(self, *, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        if "target_logits" in outputs:
            logits, targets = outputs["target_logits"], outputs["target_ids"]
        elif "logits" in outputs:
            # Shift the targets left (the last position predicts nothing) instead of slicing
            # logits[:, :-1]: the slice's backward would allocate and copy a second (B, S, V) gradient.
            targets = batch["tokens"][:, 1:].masked_fill(~batch["target_mask"][:, 1:], -100)
            logits, targets = outputs["logits"].flatten(0, 1), F.pad(targets, (0, 1), value=-100).flatten()
        else:
            return {}
        total = F.cross_entropy(logits.float(), targets, ignore_index=-100, label_smoothing=self.label_smoothing,
                                reduction="sum")
        count = (targets != -100).sum()
        if self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Normalise by the global token count; DDP then averages gradients over ranks, so
            # world_size * sum_local / global_count makes the result equal the single-process mean.
            global_count = count.detach().clone()
            dist.all_reduce(global_count)
            return {"caption_loss": total * dist.get_world_size() / global_count.clamp(min=1)}
        return {"caption_loss": total / count.clamp(min=1)}
