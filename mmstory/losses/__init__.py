"""Losses by name. A loss is ``forward(outputs: dict, batch: dict) -> {"<name>_loss": tensor}``, returning
no terms when its inputs are absent from the batch; the model sums weight * term from the config."""
from mmstory.losses.captioning import CaptionLoss
from mmstory.losses.contrastive import ContrastiveLoss
from mmstory.registry import Registry

LOSSES = Registry("loss", {
    "contrastive": ContrastiveLoss,
    "caption": CaptionLoss,
})

__all__ = ["LOSSES"]
