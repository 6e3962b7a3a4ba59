"""CLIP-style symmetric InfoNCE between pairs of embedded modalities, correct under torch.distributed."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for our rows (all_reduce, which gloo and
    NCCL both support) and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        padded = F.pad(x, (0, 0, 0, max(sizes) - x.shape[0])).contiguous()
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather (B_r, E) features from every rank, keeping the autograd graph. Ranks may hold different
    batch sizes (a short last batch, a dropped bad sample): rows are padded to the largest and trimmed.
    Returns (sum B_r, E) and this rank's row offset."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    sizes = [int(s) for s in sizes]
    return _GatherWithGrad.apply(x, sizes), sum(sizes[:dist.get_rank()])


class ContrastiveLoss(nn.Module):
    """For each pair (a, b) in ``pairs`` whose embeddings are in the outputs:
    mean of CE(s * a @ b_all.T) and CE(s * b @ a_all.T) with s = exp(logit_scale) clamped to
    ``max_logit_scale``. Under DDP each rank scores its own rows against the global batch (labels
    offset by rank), so the summed gradients equal those of the global-batch loss.

    ``detach`` maps a pair's name ``"<a>_<b>"`` to the side that is a fixed target for that pair: its
    embedding is detached there, so the pair trains only the other side's encoder (ImageBind's recipe:
    audio is aligned to a text space that image-text pairs train, and the text tower gets no gradient
    from audio it cannot yet hear). The temperature is still learned from every pair.
    Returns ``{"contrastive_<a>_<b>_loss": ...}`` per pair present."""

    def __init__(self, *, pairs: list[list[str]] = (("image", "text"), ("audio", "text")),
                 init_temperature: float = 0.07, max_logit_scale: float = 100.0, label_smoothing: float = 0.0,
                 learn_temperature: bool = True, detach: dict[str, str] | None = None):
        super().__init__()
        self.pairs = [tuple(p) for p in pairs]
        bad = [p for p in self.pairs if len(p) != 2]
        if bad:
            raise ValueError(f"contrastive pairs must name two modalities each; got {bad}")
        self.detach = dict(detach or {})
        names = {f"{a}_{b}": (a, b) for a, b in self.pairs}
        for key, side in self.detach.items():
            if key not in names:
                raise ValueError(f"contrastive detach: '{key}' is not a pair; pairs: {sorted(names)}")
            if side not in names[key]:
                raise ValueError(f"contrastive detach: '{key}': '{side}' is not one of its sides {list(names[key])}")
        # shape (1,), not a scalar: FSDP2 cannot shard 0-d parameters
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)),
                                        requires_grad=learn_temperature)
        self.max_log = math.log(max_logit_scale)
        self.label_smoothing = label_smoothing

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.max_log).exp()

    def pair_loss(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b: (B, E) L2-normalised embeddings of matching rows."""
        s = self.scale()
        if self.training:  # in eval mode stay local: evaluation may run on one rank only
            all_a, offset = gather_with_grad(a)
            all_b, _ = gather_with_grad(b)
        else:
            all_a, all_b, offset = a, b, 0
        labels = torch.arange(a.shape[0], device=a.device) + offset
        logits_a = s * a @ all_b.T  # (B, world_B)
        logits_b = s * b @ all_a.T
        return (F.cross_entropy(logits_a, labels, label_smoothing=self.label_smoothing)
                + F.cross_entropy(logits_b, labels, label_smoothing=self.label_smoothing)) / 2

    def forward(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        embeds = outputs.get("embeds", {})
        out = {}
        for a, b in self.pairs:
            if a in embeds and b in embeds:
                fixed = self.detach.get(f"{a}_{b}")
                ea, eb = embeds[a], embeds[b]
                out[f"contrastive_{a}_{b}_loss"] = self.pair_loss(ea.detach() if fixed == a else ea,
                                                                   eb.detach() if fixed == b else eb)
        return out
