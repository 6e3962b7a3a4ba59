"""Decoded samples -> one padded batch: the batch format every model, loss and evaluation reads.

Batch format (B samples, L text tokens, S decoder tokens, T audio samples):
    __key__      list[str]
    image        float (B, 3, H, W)    normalised; absent when no sample has an image
    image_mask   bool (B,)             only when some samples of the batch lack an image
    audio        float (B, T)          absent when no sample has audio
    audio_mask   bool (B, T)           True = real waveform sample (False = padding / no audio)
    text_ids     long (B, L)           one caption per sample, text tokenizer, [bos] .. [eos]
    text_mask    bool (B, L)
    question_ids, question_mask        (B, L), only with cfg.fuse_question ("" for non-QA samples); question tokenizer
    tokens       long (B, S)           [bos] prompt " target" [eos], right-padded with pad_id
    tokens_mask  bool (B, S)
    target_mask  bool (B, S)           True exactly at the target tokens and the final eos
    prompt_filled_mask bool (B, S)     True at the prompt tokens filled in from the sample (a QA
                                       sample's question), not the template's words
    task, prompt list[str]; references list[list[str]]; meta list[dict]

The decoder sequence's layout (``decoder_sequence``, ``filled_span``) is mmstory/prompts.py's.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from mmstory.prompts import decoder_sequence, filled_span
from mmstory.tokenizer import Tokenizer, pad_sequences


def collate(samples: Sequence[dict], tokenizer: Tokenizer, text_tokenizer: Tokenizer | None = None, *,
            max_text_len: int = 32, max_tokens: int = 48, fuse_question: bool = False,
            question_tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """Decoded samples (see ``SampleDecoder``) -> one padded batch (format in the module docstring).
    ``question_tokenizer``: the fused question's (a model's question encoder may have its own; default: the
    text tokenizer's)."""
    text_tokenizer = text_tokenizer or tokenizer
    question_tokenizer = question_tokenizer or text_tokenizer
    batch: dict[str, Any] = {"__key__": [s["__key__"] for s in samples]}
    with_image = [("image" in s) for s in samples]
    if any(with_image):
        ref = next(s["image"] for s in samples if "image" in s)
        batch["image"] = torch.stack([s.get("image", torch.zeros_like(ref)) for s in samples])  # (B, 3, H, W)
        if not all(with_image):
            batch["image_mask"] = torch.tensor(with_image)  # (B,)
    if any("audio" in s for s in samples):
        ref = next(s["audio"] for s in samples if "audio" in s)
        batch["audio"] = torch.stack([s.get("audio", torch.zeros_like(ref)) for s in samples])  # (B, T)
        batch["audio_mask"] = torch.stack([s.get("audio_mask", torch.zeros(ref.shape, dtype=torch.bool))
                                           for s in samples])  # (B, T)
    batch["text_ids"], batch["text_mask"] = text_tokenizer.batch([s["caption"] for s in samples],
                                                                 max_len=max_text_len)  # (B, L)
    if fuse_question:
        batch["question_ids"], batch["question_mask"] = question_tokenizer.batch(
            [s.get("question", "") for s in samples], max_len=max_text_len)
    seqs, heads = zip(*(decoder_sequence(tokenizer, s["prompt"], s["target"], max_tokens) for s in samples))
    tokens, tokens_mask = pad_sequences(seqs, tokenizer.pad_id)  # (B, S)
    positions = torch.arange(tokens.shape[1])
    target_mask = (positions[None, :] >= torch.tensor(heads)[:, None]) & tokens_mask
    spans = torch.tensor([filled_span(tokenizer, s["prompt"], s.get("prompt_filled", ("", ""))) for s in samples])
    filled_mask = ((positions[None, :] >= spans[:, :1]) & (positions[None, :] < spans[:, 1:])
                   & ~target_mask & tokens_mask)  # a prompt cut by max_tokens keeps what is left
    batch.update(tokens=tokens, tokens_mask=tokens_mask, target_mask=target_mask, prompt_filled_mask=filled_mask,
                 task=[s["task"] for s in samples], prompt=[s["prompt"] for s in samples],
                 references=[list(s["references"]) for s in samples], meta=[s["meta"] for s in samples])
    return batch
