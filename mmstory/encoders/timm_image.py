"""timm image encoders: CNNs (final feature map as tokens) and ViTs (prefix + patch tokens)."""
from __future__ import annotations

import torch
import torch.nn as nn

from mmstory.encoders.base import Encoder, EncoderOutput, full_mask, pretrained_error
from mmstory.encoders.package_weights import is_package_source, load_package_weights


def create_timm(model_name: str, pretrained: bool | str, **kwargs) -> nn.Module:
    """``pretrained``: False (random), True (timm's hub weights), ``"package:<source>"`` (weights inside an
    installed pip package: ``package_weights.py``) or a local checkpoint file, which goes through timm's own
    pretrained loader (it adapts the classifier and input channels as for hub weights)."""
    import timm

    if is_package_source(pretrained):
        model = create_timm(model_name, False, **kwargs)
        load_package_weights(model, pretrained, model_name)
        return model
    try:
        if isinstance(pretrained, str):
            return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay={"file": pretrained},
                                     num_classes=0, **kwargs)
        return timm.create_model(model_name, pretrained=bool(pretrained), num_classes=0, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"timm has no model '{model_name}' (see timm.list_models())") from e
        raise pretrained_error("timm", model_name, pretrained, e) from e
    except Exception as e:  # hub/network/file errors come in many types
        if not pretrained:
            raise
        raise pretrained_error("timm", model_name, pretrained, e) from e


def _timm_preprocess(model: nn.Module) -> dict:
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    return {"image_size": cfg["input_size"][-1], "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}


class TimmCNNEncoder(Encoder):
    """Any timm CNN by name (resnet*, convnext*, efficientnet*, ...). tokens: the final feature map
    (B, H'*W', C); pooled: timm's own head pooling without the classifier (B, C).

    ``feature_stage``: keep the network only up to that feature stage (an index into timm's ``feature_info``;
    the later stages and the head are removed with timm's ``prune_intermediate_layers``): tokens are that
    stage's map, pooled its spatial mean. A smaller tower from the same pretrained weights (e.g. for a
    distilled student: EfficientNet-Lite0 up to stage 3 keeps 0.70 M of its 3.37 M parameters)."""

    modality = "image"

    def __init__(self, *, model_name: str = "resnet18", pretrained: bool | str = False, image_size: int | None = None,
                 feature_stage: int | None = None):
        super().__init__()
        self.args = {"model_name": model_name, "image_size": image_size}
        self.model = create_timm(model_name, pretrained)
        self.width = self.pooled_width = self.model.num_features
        self.preprocess = _timm_preprocess(self.model)
        if image_size:
            self.preprocess["image_size"] = image_size
        self.feature_stage = feature_stage
        if feature_stage is not None:
            stages = len(self.model.feature_info)
            if not 0 <= feature_stage < stages:
                raise ValueError(f"feature_stage {feature_stage}: {model_name} has feature stages 0..{stages - 1}")
            self.args["feature_stage"] = feature_stage
            self.model.prune_intermediate_layers(indices=[feature_stage], prune_head=True, prune_norm=True)
            self.width = self.pooled_width = self.model.feature_info[feature_stage]["num_chs"]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> EncoderOutput:
        if self.feature_stage is None:
            fmap = self.model.forward_features(x)  # (B, C, H', W')
            pooled = self.model.forward_head(fmap, pre_logits=True)
        else:
            fmap = self.model.forward_intermediates(x, indices=[self.feature_stage], intermediates_only=True)[0]
            pooled = fmap.mean((2, 3))
        tokens = fmap.flatten(2).transpose(1, 2)
        return EncoderOutput(tokens, full_mask(tokens), pooled)

    def checkpoint_args(self, folder, key: str | None = None) -> dict:
        return {**self.args, "pretrained": False}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # timm's: checkpoints each block (also in ``forward_intermediates``, the feature_stage path). Its
        # recomputation runs BatchNorm again, which updates the running statistics a second time per step.
        self.model.set_grad_checkpointing(enable)


class TimmViTEncoder(Encoder):
    """Any timm ViT by name (vit_*, deit_*, eva*, ...). tokens: prefix (class/register) + patch tokens
    after the final norm (B, N, D); pooled: the model's own pooling (class token or average)."""

    modality = "image"

    def __init__(self, *, model_name: str = "vit_tiny_patch16_224", pretrained: bool | str = False,
                 image_size: int | None = None):
        super().__init__()
        self.args = {"model_name": model_name, "image_size": image_size}
        kwargs = {"img_size": image_size} if image_size else {}
        self.model = create_timm(model_name, pretrained, **kwargs)
        self.width = self.pooled_width = self.model.num_features
        self.preprocess = _timm_preprocess(self.model)
        if image_size:
            self.preprocess["image_size"] = image_size

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> EncoderOutput:
        tokens = self.model.forward_features(x)  # (B, N, D)
        pooled = self.model.forward_head(tokens, pre_logits=True)
        return EncoderOutput(tokens, full_mask(tokens), pooled)

    def checkpoint_args(self, folder, key: str | None = None) -> dict:
        return {**self.args, "pretrained": False}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)  # timm's: checkpoints each block
