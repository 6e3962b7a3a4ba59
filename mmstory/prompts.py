"""The decoder's tasks and their prompts: one contract for the data, the model, the losses and inference.

Every generative task shares one decoder; a task is told apart by the prompt its sequence starts with:

    tokens       [bos] + encode(prompt) + encode(" " + target) + [eos]        (``decoder_sequence``)
    prompt       "caption:"  |  "caption zh:"  |  "question: {question} answer:" with the question filled in
    target_mask  True at the target tokens and eos: the positions the caption loss scores
    prompt_filled_mask  True at the tokens filled into the prompt (the question), which the caption loss's
                 ``prompt_weight`` scores too; the template's own words ("question:", "answer:") never are

``Prompts`` is part of ``ModelConfig``, so a model saves the prompts it was trained with and ``caption``,
``answer`` and ``mmstory eval`` ask it the same way. This module imports nothing from mmstory: the data
pipeline, the model and inference all read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

TASKS = ("caption", "caption_zh", "qa")  # the decoder tasks a training sample can be drawn for
QUESTION = "{question}"


class _Tokenizer(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...


@dataclass
class Prompts:
    """The prompt of each decoder task. ``qa`` holds ``{question}`` once, where the question goes."""
    caption: str = "caption:"
    caption_zh: str = "caption zh:"
    qa: str = "question: {question} answer:"

    def __post_init__(self):
        for task in TASKS:
            template = getattr(self, task)
            if not isinstance(template, str) or not template.strip():
                raise ValueError(f"model.prompts.{task} must be a non-empty string, got {template!r}")
            expected = 1 if task == "qa" else 0
            if template.count(QUESTION) != expected or template.replace(QUESTION, "").count("{"):
                where = "exactly one {question} and no other {...}" if expected else "no {...} placeholder"
                raise ValueError(f"model.prompts.{task} must hold {where}, got {template!r}")

    def fill(self, task: str, question: str = "") -> tuple[str, tuple[str, str]]:
        """The prompt of ``task`` with ``question`` filled in, and what was filled in as (the prompt text
        before the question without its trailing space, the prompt text up to the question's end); ("", "")
        for a prompt with nothing to fill ("caption:"). ``filled_span`` turns that into token positions."""
        if task not in TASKS:
            raise ValueError(f"unknown decoder task {task!r}; valid tasks: {', '.join(TASKS)}")
        template = getattr(self, task)
        if QUESTION not in template:
            return template, ("", "")
        before = template.split(QUESTION)[0]
        return template.replace(QUESTION, question), (before.rstrip(), before + question)

    def question(self, question: str) -> str:
        """The QA prompt for ``question`` (what the decoder continues with the answer)."""
        return self.fill("qa", question)[0]


def decoder_sequence(tokenizer: _Tokenizer, prompt: str, target: str, max_tokens: int) -> tuple[list[int], int]:
    """``[bos] + encode(prompt) + encode(" " + target) + [eos]`` cut to ``max_tokens`` (the target is cut
    first, keeping eos last). Returns the ids and the number of prompt positions (bos included)."""
    head = [tokenizer.bos_id] + tokenizer.encode(prompt)
    body = tokenizer.encode(" " + target)
    head = head[: max(1, max_tokens - 2)]          # keep room for one target token and eos
    body = body[: max(0, max_tokens - len(head) - 1)]
    return head + body + [tokenizer.eos_id], len(head)


def filled_span(tokenizer: _Tokenizer, prompt: str, filled: tuple[str, str]) -> tuple[int, int]:
    """Token positions [start, end) of the filled-in part of ``prompt`` (see ``Prompts.fill``) within
    ``[bos] + encode(prompt)``: the tokens of ``filled[1]`` not already in those of ``filled[0]``. Empty
    when nothing was filled in, or when the tokenizer merges across the boundaries (then it cannot be
    told apart from the template, and scoring nothing is safer than scoring template words)."""
    before, upto = filled
    if not upto:
        return 0, 0
    ids, head, full = tokenizer.encode(prompt), tokenizer.encode(before), tokenizer.encode(upto)
    if ids[:len(full)] != full or full[:len(head)] != head:
        return 0, 0
    return 1 + len(head), 1 + len(full)


def prompt_mask(batch: dict) -> torch.Tensor:
    """(B, S) True at the prompt tokens the caption loss's ``prompt_weight`` scores: those filled in from
    the sample (a QA sample's question: ``prompt_filled_mask``, which the data pipeline writes), never the
    template's own words ("question:", "answer:", "caption:"). Scoring those taught the decoder to write
    "answer" into captions (experiments/README.md). A batch without ``prompt_filled_mask`` (built by hand)
    scores every prompt token after BOS."""
    if "prompt_filled_mask" in batch:
        return batch["prompt_filled_mask"]
    mask = batch["tokens_mask"] & ~batch["target_mask"]
    mask[:, 0] = False  # nothing predicts BOS
    return mask


def scored_positions(batch: dict, *, with_prompt: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Which next tokens the caption loss scores: (B, S - 1) ``scored`` (position t predicts token t + 1) and
    ``is_prompt`` (B, S - 1), True where that token is a scored prompt token (all False unless
    ``with_prompt``). The model's fast path and the loss's full-logits path both read this."""
    target = batch["target_mask"][:, 1:]
    if not with_prompt:
        return target, torch.zeros_like(target)
    prompt = prompt_mask(batch)[:, 1:]
    return target | prompt, prompt
