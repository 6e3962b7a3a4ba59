"""The teacher side of distillation in the training loop (``TrainConfig.distill``); the losses themselves are in
``mmstory/losses/distill.py``.

The teacher is a saved model, loaded frozen in eval mode, run without gradients on each training batch. It must
share the student's decoder tokenizer (the soft targets are over the same vocabulary) and score the same
positions (both with or without prompt scoring). When the student's image tower is frozen and holds the same
weights as the teacher's (the main job's EfficientNet-Lite0 from its package), the student's cached image
features are handed to the teacher, so the tower runs once per image for both.
"""
from __future__ import annotations

import torch

from mmstory.config import ConfigError
from mmstory.losses.distill import distillation_terms


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k].cpu(), sb[k].cpu())
                                          for k in sa)


class Distiller:
    """The teacher side of distillation: ``teacher`` (the model saved at ``spec.teacher``, loaded by the trainer)
    runs on each batch without gradients, and ``add_terms`` adds its soft targets to the student's loss."""

    def __init__(self, spec, student, teacher: torch.nn.Module):
        self.spec = spec
        self.teacher = teacher.eval().requires_grad_(False)
        t_tok, s_tok = self.teacher.tokenizer, student.tokenizer
        if t_tok.vocab_size != s_tok.vocab_size or t_tok.encode("a caption: of 3 words") != s_tok.encode(
                "a caption: of 3 words"):
            raise ConfigError(f"config key 'distill.teacher': {spec.teacher} uses another decoder tokenizer than this "
                              f"model ({t_tok.vocab_size} vs {s_tok.vocab_size} tokens); soft targets need the same one")
        if self.teacher.prompt_scored != student.prompt_scored:
            raise ConfigError(f"config key 'distill.teacher': {spec.teacher} and this model score different positions "
                              f"(the caption loss's prompt_weight is set in one of them only)")
        s_img = student.encoders["image"] if "image" in student.encoders else None
        t_img = self.teacher.encoders["image"] if "image" in self.teacher.encoders else None
        self.share_image = (s_img is not None and t_img is not None and "encoders.image" in student.frozen
                            and _same_weights(s_img, t_img))
        contrastive = student.losses["contrastive"] if "contrastive" in student.losses else None
        self.pairs = contrastive.pairs if contrastive is not None else []
        t_con = self.teacher.losses["contrastive"] if "contrastive" in self.teacher.losses else None
        self.teacher_scale = t_con.scale().detach() if t_con is not None else torch.tensor(1.0 / 0.07)

    def add_terms(self, out: dict, batch: dict) -> None:
        """Add the distillation terms to ``out`` (the student's forward output) and to its ``loss``."""
        teacher_batch = {k: v for k, v in batch.items() if k != "features"}
        if self.share_image and "image" in batch.get("features", {}):
            teacher_batch["features"] = {"image": batch["features"]["image"]}
        with torch.no_grad():
            t_out = self.teacher(teacher_batch)
        # both similarity matrices at the teacher's temperature: the student learns the teacher's similarity
        # structure; its own learned temperature serves its own contrastive loss
        terms = distillation_terms(out, t_out, temperature=self.spec.temperature, pairs=self.pairs,
                                   student_scale=self.teacher_scale, teacher_scale=self.teacher_scale)
        weights = {"distill_caption_loss": self.spec.weight, "distill_embed_loss": self.spec.embed_weight}
        for name, value in terms.items():
            out[name] = value
            out["loss"] = out["loss"] + weights[name] * value
