"""Fusion modules by name. A fusion takes ``{modality: (tokens (B, N, D), mask (B, N))}`` for any subset
of its configured modalities and returns ``{"tokens": (B, M, D), "mask": (B, M), ...}`` for the decoder.
To add one: write its file, add one line here."""
from mmstory.fusion.concat import ConcatFusion
from mmstory.fusion.cross_attention import CrossAttentionFusion
from mmstory.fusion.weighted import WeightedFusion
from mmstory.registry import Registry

FUSIONS = Registry("fusion", {
    "concat": ConcatFusion,
    "weighted": WeightedFusion,
    "cross_attention": CrossAttentionFusion,
})

__all__ = ["FUSIONS"]
