"""A frozen encoder costs nothing twice: its outputs per training sample, computed once and reused.

When an encoder is frozen (no gradients, eval mode: ``MultimodalModel.freeze``) and its input for a sample is
the same every epoch (no augmentation), its output for that sample never changes, so the trainer runs it once
per sample and reads the stored output in later epochs (LiT and ClipCap train on precomputed features of
their locked tower the same way). ``MultimodalModel.encode`` takes the outputs from ``batch["features"]``.
The retrieval datastore, built before training from the same images with the same transforms, fills the cache
as it goes (``build_datastore(cache=...)``), so the first epoch reads its images' features too.

Each stored row keeps a checksum of its input; an input that changes between epochs (augmentation left on)
raises instead of silently training on stale features.

A frozen question encoder (``encoders.question``) is cached by the question itself, its token ids: a sample's
question changes between epochs (other QA items, other wordings) but the bundled data asks a few thousand
distinct ones. Its rows keep only the real tokens and are padded again to each batch's width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmstory.encoders.base import EncoderOutput

# modality -> (batch key of the input, batch key of its mask)
_INPUTS = {"image": ("image", None), "audio": ("audio", "audio_mask"), "question": ("question_ids", "question_mask")}


class FeatureCache:
    """Per-sample outputs of frozen encoders, keyed by the sample's ``__key__`` (a question: by its token ids).

    ``max_gb`` bounds the memory: once full, further samples are encoded every time (and a note is printed once)."""

    def __init__(self, modalities: list[str], *, max_gb: float = 4.0):
        unknown = [m for m in modalities if m not in _INPUTS]
        if unknown:
            raise ValueError(f"feature cache: cannot cache {unknown}; cacheable modalities: {sorted(_INPUTS)}")
        self.modalities = list(modalities)
        self.rows: dict[str, dict[str, tuple[torch.Tensor, ...]]] = {m: {} for m in modalities}
        self.max_bytes, self.bytes, self.full_noted = max_gb * 2**30, 0, False
        self.hits = self.misses = 0

    def __call__(self, model, batch: dict) -> dict[str, EncoderOutput]:
        """The cached modalities' encoder outputs for ``batch`` (encoding only the samples not seen yet)."""
        out = {}
        for m in self.modalities:
            key, mask_key = _INPUTS[m]
            if key not in batch or (m == "image" and "image_mask" in batch):
                continue  # not in this batch, or some rows lack an image (their zeros would be cached)
            x, mask = batch[key], batch[mask_key] if mask_key else None
            keys = batch["__key__"] if m != "question" else \
                [tuple(row[:n].tolist()) for row, n in zip(x, mask.sum(1).tolist())]
            out[m] = self.encode(model, m, keys, x, mask)
        return out

    def encode(self, model, modality: str, keys: list, x: torch.Tensor, mask: torch.Tensor | None = None
               ) -> EncoderOutput:
        """``model.encoders[modality]`` on ``x`` (rows named by ``keys``), through the cache: also how another pass
        over the training images (the retrieval datastore's) fills it, so the frozen tower runs once per image."""
        encoder, store = model.encoders[modality], self.rows[modality]
        # (B,) checksums of the inputs; a question's key is its content already
        sums = x.flatten(1).float().sum(1).tolist() if modality != "question" else [0.0] * len(keys)
        todo = [i for i, k in enumerate(keys) if k not in store]
        fresh = {}
        if todo:
            index = torch.tensor(todo, device=x.device)
            with torch.no_grad():
                enc = encoder(x.index_select(0, index), None if mask is None else mask.index_select(0, index))
            for j, i in enumerate(todo):
                row = (enc.tokens[j], enc.mask[j], enc.pooled[j], sums[i])
                if modality == "question":  # its real tokens only, copied out of the batch
                    row = (row[0][:len(keys[i])].clone(), row[1][:len(keys[i])].clone(), row[2].clone(), row[3])
                fresh[keys[i]] = row
                size = sum(t.numel() * t.element_size() for t in row[:3])
                if self.bytes + size <= self.max_bytes:
                    store[keys[i]], self.bytes = row, self.bytes + size
                elif not self.full_noted:
                    self.full_noted = True
                    print(f"feature cache: {self.max_bytes / 2**30:.1f} GB full; further {modality} samples "
                          f"are encoded every time")
        rows = []
        for i, k in enumerate(keys):
            row = fresh.get(k) or store[k]
            if k not in fresh and not _same(row[3], sums[i]):
                raise RuntimeError(f"feature cache: the {modality} input of sample '{k}' changed between epochs "
                                   f"(augmentation on a cached frozen encoder?); set data.loader.augment: false "
                                   f"or cache_frozen: false")
            rows.append(row)
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if modality == "question":  # rows of real tokens: pad them to the batch's width again
            width = x.shape[1]
            rows = [(F.pad(t, (0, 0, 0, width - len(t))), F.pad(m.long(), (0, width - len(m))).bool(), p, s)
                    for t, m, p, s in rows]
        return EncoderOutput(*(torch.stack([r[n] for r in rows]) for n in range(3)))


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4 * max(1.0, abs(a), abs(b))
