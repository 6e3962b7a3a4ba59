"""Knowledge distillation from a trained teacher (``TrainConfig.distill``; Hinton et al. 2015 for the decoder,
similarity-matrix matching for the contrastive side, as in CLIP-KD's relation distillation).

- **Decoder**: at every scored position (the same tokens for both models: they share the tokenizer) the
  student's next-token distribution softened by temperature T is pulled towards the teacher's, KL(teacher ||
  student) * T^2 (the T^2 keeps the gradient scale independent of T). With a copy head a model's outputs are
  log-probabilities, not logits; dividing a log-probability by T and renormalising softens it the same way.
- **Embeddings**: student and teacher embeddings may differ in width, so the student matches the teacher's
  *similarities* instead: for each contrastive pair (image-text, audio-text) the row- and column-wise softmax
  of the teacher's similarity matrix (its own logit scale) is the target of the student's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher / T) || softmax(student / T)) * T^2; inputs (N, C) logits or
    log-probabilities."""
    if student.shape != teacher.shape:
        raise ValueError(f"distillation: student scores {tuple(student.shape)} and teacher scores "
                         f"{tuple(teacher.shape)} differ (the two models must share the tokenizer and losses)")
    if student.shape[0] == 0:
        return student.sum() * 0.0
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def similarity_kl(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], pairs: list[tuple[str, str]],
                  student_scale: torch.Tensor, teacher_scale: torch.Tensor) -> torch.Tensor | None:
    """Mean over the pairs present in both of the symmetric KL between the softmaxes of teacher and student
    similarity matrices (B, B); None when no pair is present."""
    terms = []
    for a, b in pairs:
        if a in student and b in student and a in teacher and b in teacher:
            s = student_scale * student[a].float() @ student[b].float().T
            t = teacher_scale * teacher[a].float() @ teacher[b].float().T
            terms.append((soft_kl(s, t, 1.0) + soft_kl(s.T, t.T, 1.0)) / 2)
    return torch.stack(terms).mean() if terms else None


def distillation_terms(student_out: dict, teacher_out: dict, *, temperature: float, pairs: list[tuple[str, str]],
                       student_scale: torch.Tensor, teacher_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"distill_caption_loss", "distill_embed_loss"} for the terms both outputs allow."""
    terms = {}
    if "target_logits" in student_out and "target_logits" in teacher_out:
        terms["distill_caption_loss"] = soft_kl(student_out["target_logits"], teacher_out["target_logits"],
                                                temperature)
    embed = similarity_kl(student_out["embeds"], teacher_out["embeds"], pairs, student_scale, teacher_scale)
    if embed is not None:
        terms["distill_embed_loss"] = embed
    return terms
