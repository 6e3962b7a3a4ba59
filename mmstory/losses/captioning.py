"""Autoregressive cross-entropy over the caption/answer tokens, optionally plus the prompt tokens."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mmstory.prompts import scored_positions


class CaptionLoss(nn.Module):
    """Cross-entropy of the next token where it is a target (caption/answer tokens and the final EOS);
    BOS and padding are ignored, prompt tokens too unless ``prompt_weight`` > 0 (``prompts.scored_positions``:
    only the tokens filled into the prompt, never the template's words). Reads either

    - ``target_logits`` (N, V), ``target_ids`` (N,) and, with prompt tokens, ``target_is_prompt`` (N,):
      the head already applied only at the scored positions (``MultimodalModel.forward``'s fast path), or
    - ``logits`` (B, S, V) at every position, with ``batch["tokens"]``, ``target_mask`` and ``tokens_mask``:
      position t predicts tokens[t + 1].

    Returns ``{"caption_loss": mean over target tokens}`` and, when ``prompt_weight`` > 0,
    ``{"caption_prompt_loss": prompt_weight * mean over prompt tokens}``: the model also learns to generate
    the prompt (for QA: the question) given the image, as open_clip's CoCa does by scoring every token.
    The two means are separate, so prompt tokens never dilute the answer's share of the loss. Means are
    over the global batch under torch.distributed."""

    def __init__(self, *, label_smoothing: float = 0.0, prompt_weight: float = 0.0):
        super().__init__()
        if prompt_weight < 0:
            raise ValueError(f"caption loss prompt_weight must be >= 0, got {prompt_weight}")
        self.label_smoothing = label_smoothing
        self.prompt_weight = prompt_weight

    def forward(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        if "target_logits" in outputs:
            logits, targets = outputs["target_logits"], outputs["target_ids"]
            is_prompt = outputs.get("target_is_prompt", torch.zeros_like(targets, dtype=torch.bool))
        elif "logits" in outputs:
            # Shift the targets left (the last position predicts nothing) instead of slicing
            # logits[:, :-1]: the slice's backward would allocate and copy a second (B, S, V) gradient.
            scored, prompt = scored_positions(batch, with_prompt=bool(self.prompt_weight))  # (B, S - 1)
            targets = batch["tokens"][:, 1:].masked_fill(~scored, -100)
            logits, targets = outputs["logits"].flatten(0, 1), F.pad(targets, (0, 1), value=-100).flatten()
            is_prompt = F.pad(prompt, (0, 1), value=False).flatten()
        else:
            return {}
        ce = F.cross_entropy(logits.float(), targets, ignore_index=-100, label_smoothing=self.label_smoothing,
                             reduction="none")
        scored = targets != -100
        out = {"caption_loss": self._mean(ce, scored & ~is_prompt)}
        if self.prompt_weight:
            out["caption_prompt_loss"] = self.prompt_weight * self._mean(ce, scored & is_prompt)
        return out

    def _mean(self, ce: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        total, count = torch.where(keep, ce, 0.0).sum(), keep.sum()  # no boolean indexing: no host sync
        if self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Normalise by the global token count; DDP then averages gradients over ranks, so
            # world_size * sum_local / global_count makes the result equal the single-process mean.
            global_count = count.detach().clone()
            dist.all_reduce(global_count)
            return total * dist.get_world_size() / global_count.clamp(min=1)
        return total / count.clamp(min=1)
