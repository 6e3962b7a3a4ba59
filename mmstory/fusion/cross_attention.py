"""Cross-attention fusion: learned latent queries (plus the question's tokens, when present) attend to
the tokens of every present modality through a small stack of CrossBlocks."""
from __future__ import annotations

import torch
import torch.nn as nn

from mmstory.fusion.common import Features, ModalityEmbedding
from mmstory.layers import CrossBlock, init_weights, key_padding_mask, unless_all_true


class CrossAttentionFusion(nn.Module):
    """Output: tokens (B, num_latents [+ L_question], D) and their mask. Memory masks are respected in
    cross-attention and query masks in self-attention, so padding never leaks in."""

    def __init__(self, *, dim: int, modalities: list[str] = ("image", "audio", "question"), num_latents: int = 16,
                 depth: int = 2, heads: int = 4, query_modalities: list[str] = ("question",)):
        super().__init__()
        self.modality = ModalityEmbedding(dim, modalities)
        self.query_modalities = list(query_modalities)
        self.latents = nn.Parameter(torch.randn(1, num_latents, dim) * 0.02)
        self.blocks = nn.ModuleList(CrossBlock(dim, heads) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        init_weights(self.blocks)

    def forward(self, inputs: Features) -> dict[str, torch.Tensor]:
        names = self.modality.ordered(inputs)
        memory = torch.cat([self.modality(m, inputs[m][0]) for m in names], dim=1)
        memory_mask = torch.cat([inputs[m][1] for m in names], dim=1)
        B = memory.shape[0]
        queries = [self.latents.expand(B, -1, -1)]
        masks = [memory_mask.new_ones(B, self.latents.shape[1])]
        for m in names:
            if m in self.query_modalities:
                queries.append(self.modality(m, inputs[m][0]))
                masks.append(inputs[m][1])
        x, mask = torch.cat(queries, dim=1), torch.cat(masks, dim=1)
        attn_mask, memory_mask = key_padding_mask(mask), unless_all_true(memory_mask)  # once, not per layer
        for block in self.blocks:
            x = block(x, memory, memory_mask=memory_mask, attn_mask=attn_mask)
        return {"tokens": self.ln(x), "mask": mask}
