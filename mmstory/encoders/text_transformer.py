"""A bidirectional Transformer text encoder built from the shared layers (trained from scratch)."""
from __future__ import annotations

import torch
import torch.nn as nn

from mmstory.encoders.base import Encoder, EncoderOutput
from mmstory.layers import MLP, Transformer, init_weights


class TextTransformerEncoder(Encoder):
    """Token + learned position embeddings, Transformer with key padding.

    Input ids (B, L) that start with BOS, mask (B, L). The BOS position acts as the class token:
    pooled = its output (B, width). Uses the model's tokenizer (``vocab_size`` is injected).
    """

    modality = "text"

    def __init__(self, *, vocab_size: int, width: int = 256, depth: int = 4, heads: int = 4,
                 max_len: int = 64, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.width = self.pooled_width = width
        self.max_len = max_len
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.zeros(1, max_len, width))
        self.transformer = Transformer(width, depth, heads, mlp_ratio=mlp_ratio, dropout=dropout)
        init_weights(self)
        nn.init.normal_(self.pos, std=0.01)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> EncoderOutput:
        if ids.shape[1] > self.max_len:
            raise ValueError(f"text of {ids.shape[1]} tokens exceeds the encoder's max_len {self.max_len}")
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        x = self.tok(ids) + self.pos[:, : ids.shape[1]]
        x = self.transformer(x, mask)
        return EncoderOutput(x, mask, x[:, 0])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def resizable_mlps(self) -> list[MLP]:
        return [m for m in self.transformer.modules() if isinstance(m, MLP)]
