"""The encoder contract (``Encoder``), what every encoder returns, and the error raised when pretrained
weights cannot be loaded."""
from __future__ import annotations

from abc import ABC, abstractmethod
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from mmstory.layers import MLP
    from mmstory.tokenizer import Tokenizer

# Normalisation used by encoders trained from scratch here (OpenAI CLIP's; timm/open_clip towers
# report their own).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Constructor arguments the model build fills in when the config leaves them out (``Registry.build``):
# vocab_size from the model's tokenizer, base_dir from the folder being loaded. A saved model gives both
# back itself, so ``Encoder.checkpoint_args`` does not write them into its config.
INJECTED_ARGS = ("vocab_size", "base_dir")


class EncoderOutput(NamedTuple):
    tokens: torch.Tensor  # (B, N, width) token features
    mask: torch.Tensor    # (B, N) bool, True = real token
    pooled: torch.Tensor  # (B, pooled_width) one vector per input


class Encoder(nn.Module, ABC):
    """One modality's input -> token features and a pooled vector: the one interface the model, the trainer
    and the data loader use. Every registered encoder (``mmstory/encoders/__init__.py``) subclasses it.

    Every encoder sets:
        modality      "image", "text" or "audio": the input it reads (a class attribute)
        width         D, the width of its token features
        pooled_width  D', the width of its pooled vector

    Defaults that callers read directly (None / empty: not this kind of encoder):
        preprocess    what the encoder dictates to its data. Image: {"image_size", "mean", "std"} (resize and
                      centre-crop to image_size, normalise by mean/std per channel); audio: {"sample_rate"};
                      text: nothing
        tokenizer     a text encoder's own tokenizer (open_clip, transformers); None: it reads the model's
        max_len       a text encoder's longest input, in tokens
        max_seconds   an audio encoder's longest clip, in seconds
        args          the keyword arguments it was built with, as configured (recorded by ``__new__``); the
                      library towers replace it by the selection their ``checkpoint_args`` saves

    Methods:
        forward(x, mask=None) -> EncoderOutput   abstract; shapes below
        set_grad_checkpointing(enable=True)      abstract: recompute activations in backward instead of keeping them
        checkpoint_args(folder, key) -> dict     the arguments that rebuild the architecture from a saved model
        resizable_mlps() -> list[MLP]            MLPs whose hidden width the ``mlp_ratio`` argument sets (pruning)
    """

    modality: str
    width: int
    pooled_width: int
    preprocess: Mapping[str, Any] = MappingProxyType({})
    tokenizer: Tokenizer | None = None
    max_len: int | None = None
    max_seconds: float | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Encoder:
        # Recorded before the constructor runs, so every encoder knows how it was configured without each
        # constructor listing its arguments again. (Set through __dict__: nn.Module is not initialised yet.)
        self = super().__new__(cls)
        self.__dict__["args"] = dict(kwargs)
        return self

    @abstractmethod
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> EncoderOutput:
        """x: image (B, 3, S, S) float, normalised as ``preprocess`` says; text ids (B, L) long; audio waveform
        (B, T) float at ``preprocess["sample_rate"]``. mask: (B, L) / (B, T) bool, True = real token / sample;
        None: all real (a text encoder with its own tokenizer may read the padding off the ids). Images take none.
        Returns tokens (B, N, width), mask (B, N) bool, pooled (B, pooled_width)."""

    @abstractmethod
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory in training: keep only block inputs and recompute the rest in backward.
        Outputs and gradients stay the same."""

    def checkpoint_args(self, folder, key: str | None = None) -> dict:
        """The constructor arguments that rebuild this architecture (written to a saved model's config.yaml);
        the weights then come from the saved file. ``folder``: where the model is being saved, for encoders
        that save files of their own there (a tokenizer); ``key``: the model's name for this encoder (``text``,
        ``question``...), so that two encoders of one model save their files apart. Default: the arguments as
        configured, less the ones the model build injects (``INJECTED_ARGS``)."""
        return {k: v for k, v in self.args.items() if k not in INJECTED_ARGS}

    def resizable_mlps(self) -> list[MLP]:
        """The MLPs whose hidden width the encoder's ``mlp_ratio`` argument sets: structured pruning narrows
        them and records the new ratio in ``args``. Empty for encoders without such an argument."""
        return []


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
