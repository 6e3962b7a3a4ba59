"""What every encoder returns, and the error raised when pretrained weights cannot be loaded."""
from __future__ import annotations

from typing import NamedTuple

import torch

# Normalisation used by encoders trained from scratch here (OpenAI CLIP's; timm/open_clip towers
# report their own).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class EncoderOutput(NamedTuple):
    tokens: torch.Tensor  # (B, N, width) token features
    mask: torch.Tensor    # (B, N) bool, True = real token
    pooled: torch.Tensor  # (B, pooled_width) one vector per input


class PretrainedLoadError(RuntimeError):
    """Pretrained weights were asked for but could not be loaded (offline, missing file, mismatch)."""


def pretrained_error(library: str, model: str, source: object, cause: BaseException) -> PretrainedLoadError:
    return PretrainedLoadError(
        f"could not load pretrained weights for {library} model '{model}' from {source!r}: "
        f"{type(cause).__name__}: {cause}. Hub downloads need network access; pass a local file/folder "
        f"as pretrained=..., or pretrained=False to start from random weights.")


def full_mask(x: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, N) all-True mask (image encoders have no padding)."""
    return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
