"""open_clip towers by open_clip model name: the visual tower (ViT) and the text tower."""
from __future__ import annotations

import torch
import torch.nn as nn

from mmstory.encoders.base import Encoder, EncoderOutput, full_mask, pretrained_error


def create_open_clip(model_name: str, pretrained: str | None) -> nn.Module:
    """``pretrained``: None (random), an open_clip tag such as 'laion2b_s34b_b79k' (downloaded), or a
    local checkpoint file. ``force_custom_text`` gives the text tower as its own module with token
    outputs; open_clip converts standard CLIP checkpoints to that layout when loading."""
    import open_clip

    if model_name not in open_clip.list_models():
        raise ValueError(f"open_clip has no model '{model_name}' (see open_clip.list_models())")
    try:
        return open_clip.create_model(model_name, pretrained=pretrained or None, force_custom_text=True,
                                      require_pretrained=bool(pretrained))
    except Exception as e:
        if not pretrained:
            raise
        raise pretrained_error("open_clip", model_name, pretrained, e) from e


class OpenCLIPVisualEncoder(Encoder):
    """open_clip ViT visual tower. tokens: patch tokens after ln_post (B, N, width); pooled: the tower's
    projected embedding (B, embed_dim)."""

    modality = "image"

    def __init__(self, *, model_name: str = "ViT-B-32", pretrained: str | None = None):
        super().__init__()
        self.args = {"model_name": model_name}
        clip = create_open_clip(model_name, pretrained)
        self.visual = clip.visual
        if not hasattr(self.visual, "output_tokens") or not hasattr(self.visual, "transformer"):
            raise ValueError(f"open_clip model '{model_name}' has no ViT visual tower with token outputs")
        self.visual.output_tokens = True
        self.width = self.visual.transformer.width
        self.pooled_width = self.visual.output_dim
        size = self.visual.image_size
        self.preprocess = {"image_size": size[0] if isinstance(size, (tuple, list)) else size,
                           "mean": tuple(getattr(self.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)),
                           "std": tuple(getattr(self.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))}

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> EncoderOutput:
        pooled, tokens = self.visual(x)
        return EncoderOutput(tokens, full_mask(tokens), pooled)

    def checkpoint_args(self, folder, key: str | None = None) -> dict:
        return {**self.args, "pretrained": None}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)  # open_clip's: checkpoints each residual block


class OpenCLIPTextEncoder(Encoder):
    """open_clip text tower (causal Transformer) with its own CLIP tokenizer. tokens (B, L, width),
    mask from the ids (open_clip pads with 0), pooled: the projected EOT embedding (B, embed_dim)."""

    modality = "text"

    def __init__(self, *, model_name: str = "ViT-B-32", pretrained: str | None = None):
        super().__init__()
        from mmstory.tokenizer import OpenCLIPTokenizer

        self.args = {"model_name": model_name}
        clip = create_open_clip(model_name, pretrained)
        self.text = clip.text
        self.text.output_tokens = True
        self.width = self.text.width
        self.pooled_width = self.text.output_dim
        self.tokenizer = OpenCLIPTokenizer()
        self.max_len = self.text.context_length

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> EncoderOutput:
        if ids.shape[1] > self.max_len:
            raise ValueError(f"text of {ids.shape[1]} tokens exceeds open_clip's context length {self.max_len}")
        if mask is None:
            mask = ids != self.tokenizer.pad_id
        # open_clip's causal mask is fixed at the context length: pad to it and cut the tokens back.
        # Causal attention means padding (after the real tokens) never reaches them.
        L = ids.shape[1]
        full = nn.functional.pad(ids, (0, self.max_len - L), value=self.tokenizer.pad_id)
        pooled, tokens = self.text(full)
        return EncoderOutput(tokens[:, :L], mask, pooled)

    def checkpoint_args(self, folder, key: str | None = None) -> dict:
        return {**self.args, "pretrained": None}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.text.set_grad_checkpointing(enable)  # open_clip's: checkpoints each residual block
