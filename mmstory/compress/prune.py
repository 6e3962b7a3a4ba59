"""Magnitude pruning of a model's linear layers, two kinds (``TrainConfig.prune``, then a short fine-tune):

- ``unstructured``: the smallest-magnitude weights of the linear layers (one global threshold over the
  layers pruned) are set to zero and kept at zero through the fine-tune (``PruneMasks``). The matrices keep
  their shape and the dense CPU kernels do the same work: this buys **sparsity** (a smaller file once
  compressed, a model ready for sparse kernels), **not speed**.
- ``structured``: the MLP hidden channels with the smallest ||fc row|| * ||proj column|| are removed from
  every Transformer MLP whose width the config can express (the decoder; text and audio encoders built by
  mmstory), the same fraction per layer, so ``mlp_ratio`` shrinks. The matrices are smaller, so this buys
  **speed** on a CPU, in proportion to the MLPs' share of the work.

Attention heads are left whole: every attention layer here projects back to the model width from
``heads * head_dim = dim``, so removing heads would need a separate inner width in every attention layer and
its config; the MLPs hold two thirds of an encoder block's weights.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn

from mmstory.layers import MLP


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers unstructured pruning may zero: every trainable ``nn.Linear`` but the vocabulary head
    (tied to the token embedding) -- a frozen tower is not fine-tuned, so it is left as loaded."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.weight.requires_grad and not name.endswith("lm_head")}


class PruneMasks:
    """Bool masks (True = kept) on named parameters; ``apply`` zeroes the pruned entries (after each optimizer
    step of a fine-tune, so neither the gradient nor weight decay revives them)."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = masks

    @classmethod
    def magnitude(cls, model: nn.Module, amount: float) -> "PruneMasks":
        """Zero the fraction ``amount`` of the prunable linear weights with the smallest |w|, one threshold
        for all of them (global magnitude pruning: layers with many small weights lose more)."""
        layers = prunable_linears(model)
        if not layers:
            raise ValueError("prune: the model has no trainable linear layer to prune")
        weights = torch.cat([m.weight.detach().abs().flatten().float() for m in layers.values()])
        k = int(amount * weights.numel())
        threshold = weights.kthvalue(k).values if k > 0 else weights.new_tensor(-1.0)
        return cls({f"{name}.weight": m.weight.detach().abs().float() > threshold for name, m in layers.items()})

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero the pruned entries in place (called after every optimizer step: a lookup per mask and an
        in-place multiply by the bool mask, no copies)."""
        for name, mask in self.masks.items():
            model.get_parameter(name).mul_(mask)

    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return 1.0 - sum(int(m.sum()) for m in self.masks.values()) / max(total, 1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: mask.to(torch.uint8).contiguous().cpu() for name, mask in self.masks.items()}


def model_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros among the prunable linear weights."""
    layers = prunable_linears(model).values()
    total = sum(m.weight.numel() for m in layers)
    return sum(int((m.weight == 0).sum()) for m in layers) / max(total, 1)


# ------------------------------------------------------------------------------------------ structured
def _mlp_owners(model: nn.Module) -> dict[str, list[MLP]]:
    """The MLPs whose width a config key sets: {"decoder": [...], "encoders.text": [...], ...}."""
    owners = {"decoder": [m for m in model.decoder.modules() if isinstance(m, MLP)]}
    for modality, enc in model.encoders.items():
        owners[f"encoders.{modality}"] = enc.resizable_mlps()  # mmstory's own towers: mlp_ratio in their args
    return {k: v for k, v in owners.items() if v}


@torch.no_grad()
def _shrink(mlp: MLP, keep: int) -> None:
    fc, proj = mlp.fc, mlp.proj
    score = fc.weight.float().norm(dim=1) * proj.weight.float().norm(dim=0)  # a channel's in- and out-weights
    index = score.topk(keep).indices.sort().values
    new_fc = nn.Linear(fc.in_features, keep, bias=fc.bias is not None).to(fc.weight.device, fc.weight.dtype)
    new_fc.weight.copy_(fc.weight[index])
    if fc.bias is not None:
        new_fc.bias.copy_(fc.bias[index])
    new_proj = nn.Linear(keep, proj.out_features, bias=proj.bias is not None).to(proj.weight.device, proj.weight.dtype)
    new_proj.weight.copy_(proj.weight[:, index])
    if proj.bias is not None:
        new_proj.bias.copy_(proj.bias)
    mlp.fc, mlp.proj = new_fc, new_proj


def ratio_for(width: int, hidden: int) -> float:
    """An ``mlp_ratio`` with int(width * ratio) == hidden (what the layers compute from it)."""
    ratio = hidden / width
    while int(width * ratio) < hidden:
        ratio = float(torch.nextafter(torch.tensor(ratio, dtype=torch.float64), torch.tensor(2.0 * ratio + 1)))
    return ratio


def prune_mlp_channels(model: nn.Module, amount: float) -> dict[str, int]:
    """Remove the fraction ``amount`` of hidden channels of every configurable MLP (the same in each layer) and
    write the new ``mlp_ratio`` into ``model.config`` and the owner's ``args`` (which the saved config is written
    from), so the saved model rebuilds at its new size. Returns
    {owner: hidden channels kept}."""
    if model.config is None:
        raise ValueError("structured pruning needs the model's config (to record the new MLP widths)")
    kept = {}
    for owner, mlps in _mlp_owners(model).items():
        hidden = mlps[0].fc.out_features
        keep = max(1, round(hidden * (1.0 - amount)))
        for mlp in mlps:
            _shrink(mlp, keep)
        width = mlps[0].fc.in_features
        if owner == "decoder":
            model.config.decoder.mlp_ratio = ratio_for(width, keep)
            model.decoder.args["mlp_ratio"] = model.config.decoder.mlp_ratio
        else:
            modality = owner.split(".")[1]
            model.config.encoders[modality].args["mlp_ratio"] = ratio_for(width, keep)
            model.encoders[modality].args["mlp_ratio"] = model.config.encoders[modality].args["mlp_ratio"]
        kept[owner] = keep
    return kept


# ------------------------------------------------------------------------------------------ in training
MASKS_FILE = "prune_masks.safetensors"


def prune(model: nn.Module, kind: str, amount: float, log=print) -> PruneMasks | None:
    """Prune ``model`` in place (``TrainConfig.prune``); returns the masks a fine-tune keeps applying
    (unstructured), or None (structured: the pruned channels are gone)."""
    if kind == "unstructured":
        masks = PruneMasks.magnitude(model, amount)
        masks.apply(model)
        log(f"pruned (unstructured): {masks.sparsity():.1%} of {len(masks.masks)} linear layers' weights set to zero")
        return masks
    if kind == "structured":
        before = sum(p.numel() for p in model.parameters())
        model.config = copy.deepcopy(model.config)  # the run's own config stays as written
        kept = prune_mlp_channels(model, amount)
        after = sum(p.numel() for p in model.parameters())
        log(f"pruned (structured): MLP hidden channels kept {kept}; parameters {before:,} -> {after:,}")
        return None
    raise ValueError(f"prune: unknown kind {kind!r} (unstructured, structured)")


def save_masks(masks: PruneMasks, folder) -> None:
    """The masks beside a saved model (``prune_masks.safetensors``, uint8, 1 = kept): a later fine-tune or a
    sparse kernel reads which weights were pruned."""
    from safetensors.torch import save_file

    save_file(masks.state_dict(), str(Path(folder) / MASKS_FILE))


def load_masks(folder) -> PruneMasks:
    from safetensors.torch import load_file

    return PruneMasks({k: v.bool() for k, v in load_file(str(Path(folder) / MASKS_FILE)).items()})
