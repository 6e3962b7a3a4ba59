"""Encoders by name. Every encoder subclasses ``Encoder`` (base.py: the contract): ``forward(x, mask=None)``
returns ``EncoderOutput(tokens (B, N, D), mask (B, N) bool, pooled (B, D'))``; it states ``modality`` (the input
it reads: image, text or audio), ``width`` (D), ``pooled_width`` (D'), what it dictates to its data
(``preprocess``, ``tokenizer``, ``max_len``, ``max_seconds``), how it is saved (``checkpoint_args``) and
implements ``set_grad_checkpointing``.
To add one: write its file, add one line here; the registry-parametrized tests then cover it."""
from mmstory.encoders.audio import AudioTransformerEncoder
from mmstory.encoders.base import Encoder, EncoderOutput, PretrainedLoadError
from mmstory.encoders.hf_text import HFTextEncoder
from mmstory.encoders.open_clip_towers import OpenCLIPTextEncoder, OpenCLIPVisualEncoder
from mmstory.encoders.text_transformer import TextTransformerEncoder
from mmstory.encoders.timm_image import TimmCNNEncoder, TimmViTEncoder
from mmstory.encoders.torchvision_image import TorchvisionResNetEncoder
from mmstory.encoders.vit import ViTEncoder
from mmstory.registry import Registry

ENCODERS = Registry("encoder", {
    "vit": ViTEncoder,                            # image, from scratch
    "timm_cnn": TimmCNNEncoder,                   # image, timm CNNs by name
    "timm_vit": TimmViTEncoder,                   # image, timm ViTs by name
    "torchvision_resnet": TorchvisionResNetEncoder,  # image
    "open_clip_visual": OpenCLIPVisualEncoder,    # image, open_clip visual tower
    "text_transformer": TextTransformerEncoder,   # text, from scratch
    "hf_text": HFTextEncoder,                     # text, transformers models
    "open_clip_text": OpenCLIPTextEncoder,        # text, open_clip text tower
    "audio_transformer": AudioTransformerEncoder,  # audio, log-mel + Transformer
})

__all__ = ["ENCODERS", "Encoder", "EncoderOutput", "PretrainedLoadError"]
