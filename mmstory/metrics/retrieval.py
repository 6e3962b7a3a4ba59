"""Retrieval recall, zero-shot classification accuracy, precision/recall/F1."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def retrieval_recall(sim: Tensor, positives: Sequence[Sequence[int]] | Sequence[int] | Tensor,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K for query->gallery retrieval.

    Args:
        sim: [Nq, Ng] similarity (higher = more similar).
        positives: for each query, its positive gallery index (int) or indices (list).
            image->text: each image has several captions -> list of caption indices;
            text->image: each caption has one image -> an int (or a [Nq] LongTensor).
        ks: cut-offs.
    Returns:
        {"R@1": .., "R@5": .., "R@10": ..} as fractions in [0, 1]. A query counts as
        hit at K if its best-ranked positive is in the top K. Ties are broken
        pessimistically: rank = number of gallery items scoring strictly higher
        than the best positive plus the number of *negatives* tying with it, so
        a constant similarity cannot score well.
    """
    if sim.dim() != 2:
        raise ValueError(f"sim must be [Nq, Ng], got shape {tuple(sim.shape)}")
    nq, ng = sim.shape
    if ng == 0:
        raise ValueError("empty gallery: sim has 0 columns (Ng == 0)")
    if nq == 0:
        raise ValueError("no queries: sim has 0 rows (Nq == 0)")
    if isinstance(positives, Tensor):
        positives = positives.tolist()
    if len(positives) != nq:
        raise ValueError(f"positives has {len(positives)} entries but sim has {nq} queries")
    pos_mask = torch.zeros(nq, ng, dtype=torch.bool)
    for q, p in enumerate(positives):
        idx = [p] if isinstance(p, int) else list(p)
        if len(idx) == 0:
            raise ValueError(f"query {q} has no positive gallery index")
        for i in idx:
            if not 0 <= int(i) < ng:
                raise ValueError(f"positive index {i} of query {q} is outside gallery of size {ng}")
            pos_mask[q, int(i)] = True
    sim = sim.detach().float().cpu()
    best_pos = sim.masked_fill(~pos_mask, float("-inf")).max(dim=1).values  # [Nq]
    higher = (sim > best_pos[:, None]).sum(dim=1)
    neg_ties = ((sim == best_pos[:, None]) & ~pos_mask).sum(dim=1)
    rank = higher + neg_ties  # 0-based rank of the best positive
    return {f"R@{k}": (rank < k).float().mean().item() for k in ks}


def zero_shot_accuracy(logits: Tensor, labels: Tensor, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy of class logits.

    Args:
        logits: [N, C] scores; labels: [N] int class ids.
    Returns:
        {"top1": .., "top5": ..} fractions. Ties at the k-th place are broken
        pessimistically (a label tying with a wrong class at the boundary is counted
        as a miss: rank = #classes strictly higher + #other classes tying).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, C], got shape {tuple(logits.shape)}")
    n, c = logits.shape
    if labels.shape != (n,):
        raise ValueError(f"labels must be [{n}], got shape {tuple(labels.shape)}")
    if n == 0 or c == 0:
        raise ValueError(f"empty logits of shape {tuple(logits.shape)}")
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels must be in [0, {c}), got range [{labels.min().item()}, {labels.max().item()}]")
    out = {}
    for k in topk:
        res = retrieval_recall(logits, labels.long().tolist(), ks=(k,))
        out[f"top{k}"] = res[f"R@{k}"]
    return out


def precision_recall_f1(pred: Tensor, target: Tensor, num_classes: int,
                        average: str = "macro") -> dict[str, float]:
    """Precision, recall, F1 for single-label classification.

    Args:
        pred, target: [N] int class ids in [0, num_classes).
        average: "macro" (unweighted mean over classes; a class with no predictions
            or no targets gets 0 for that quantity, as sklearn's zero_division=0)
            or "micro" (global counts; equals accuracy for single-label data).
    """
    if pred.shape != target.shape or pred.dim() != 1:
        raise ValueError(f"pred and target must both be [N], got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.numel() == 0:
        raise ValueError("precision_recall_f1 got no samples")
    for name, t in (("pred", pred), ("target", target)):
        if t.min() < 0 or t.max() >= num_classes:
            raise ValueError(f"{name} has class ids outside [0, {num_classes})")
    pred, target = pred.long().cpu(), target.long().cpu()
    tp = torch.bincount(target[pred == target], minlength=num_classes).double()
    pred_count = torch.bincount(pred, minlength=num_classes).double()
    true_count = torch.bincount(target, minlength=num_classes).double()
    fp, fn = pred_count - tp, true_count - tp

    def safe_div(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(b > 0, a / b.clamp(min=1e-12), torch.zeros_like(a))

    if average == "micro":
        p = safe_div(tp.sum(), tp.sum() + fp.sum())
        r = safe_div(tp.sum(), tp.sum() + fn.sum())
        f = safe_div(2 * p * r, p + r)
        return {"precision": p.item(), "recall": r.item(), "f1": f.item()}
    if average == "macro":
        p = safe_div(tp, tp + fp)
        r = safe_div(tp, tp + fn)
        f = safe_div(2 * p * r, p + r)
        return {"precision": p.mean().item(), "recall": r.mean().item(), "f1": f.mean().item()}
    raise ValueError(f"average must be 'macro' or 'micro', got {average!r}")
