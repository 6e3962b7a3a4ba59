"""mmstory: image-text-audio models with shared encoders, pluggable fusion and one shared decoder."""
from mmstory.config import ModelConfig
from mmstory.model import MultimodalModel, build_model, load

__version__ = "0.1.0"
__all__ = ["ModelConfig", "MultimodalModel", "build_model", "load", "__version__"]
