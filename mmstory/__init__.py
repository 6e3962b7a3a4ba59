"""mmstory: image-text-audio models with shared encoders, pluggable fusion and one shared decoder.

    model = mmstory.load("runs/emoji_tiny/model")      # a MultimodalModel (tensors in, tensors out)
    mmstory.caption(model, ["cat.png"])                 # raw inputs: mmstory/inference.py
"""
from mmstory.config import ModelConfig
from mmstory.inference import (answer, caption, embed_audio, embed_images, embed_texts, retrieve,
                               zero_shot_classify)
from mmstory.model import MultimodalModel, build_model, load

__version__ = "0.1.0"
__all__ = ["ModelConfig", "MultimodalModel", "build_model", "load", "caption", "answer", "embed_images",
           "embed_audio", "embed_texts", "retrieve", "zero_shot_classify", "__version__"]
