"""Questions as people ask them: a question is asked as the nearest question the model was trained on.

A model learns the questions of its training data (a dataset's templated questions and the everyday rewordings
of ``data.loader.wordings``) and reads other wordings less well: "which emoji is this?" reads like "which
category is this?" to a decoder whose text side was trained from scratch on a few dozen wordings. The bank keeps
every distinct training question with a pretrained sentence encoder's embedding of it (all-MiniLM-L6-v2 from its
pip package: a model that knows *kind* means *type*). A question is replaced by the dataset wording of its
nearest bank entry (cosine of mean-pooled embeddings) when

- that entry asks the same kind of question: both are yes/no questions (they start with an auxiliary verb, "is",
  "does", "can"..., and ask no wh-question inside, as "can you tell me what this shows?" does) or neither is;
- the entry's slot values (the ``{category}``, ``{thing}`` ... of its wordings pattern) occur in the question as
  words, so "is this a dog?" is never asked as "is this an animal?";
- and the similarity is at least ``threshold``.

Any other question is asked as it is. It is a nearest-neighbour memory over questions, as the retrieval datastore
is over captions: built from training data only (``mmstory.datastore.build_question_bank``) and saved with the
model (``question_bank.json`` + ``question_bank.safetensors``); the sentence encoder is named, not saved (it loads
from its package). Bundled data, measured: 94-100 % of held-out wordings map to the question they reword
(experiments/README.md).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

AUXILIARIES = frozenset("is are am was were does do did can could would will has have had should shall may might "
                        "must".split())
WH_WORDS = frozenset("what which who whom whose where when why how".split())
FILES = ("question_bank.json", "question_bank.safetensors")


def normalise(question: str) -> str:
    """Lower case, single spaces, no final punctuation: the form questions are compared in."""
    return " ".join(question.lower().split()).rstrip(" ?.!")


def asks_yes_no(question: str) -> bool:
    """Starts with an auxiliary verb and asks no wh-question inside ("can you tell me what this shows?" asks
    what, not whether)."""
    words = re.findall(r"[a-z]+", normalise(question))
    return bool(words) and words[0] in AUXILIARIES and not WH_WORDS.intersection(words)


def names(question: str, value: str) -> bool:
    """Whether ``value`` (a slot value: "food & drink", "an animal") occurs in ``question`` as whole words."""
    return re.search(rf"(?<![\w]){re.escape(normalise(value))}(?![\w])", normalise(question)) is not None


class QuestionBank:
    """``entries``: (text, canonical, slot values or None) -- a training question (or a train rewording of one),
    the dataset wording to ask instead, and the values of its pattern's slots (None: not known; such a yes/no
    entry is only matched exactly, since what it asks about is not known)."""

    def __init__(self, entries: Sequence[tuple[str, str, Sequence[str] | None]], *, encoder: str,
                 threshold: float = 0.5, embeddings: torch.Tensor | None = None):
        if not entries:
            raise ValueError("question bank: no training questions to build it from")
        self.texts = [normalise(t) for t, _, _ in entries]
        self.canonical = [c for _, c, _ in entries]
        self.slots = [None if s is None else tuple(s) for _, _, s in entries]
        self.encoder_path, self.threshold = encoder, float(threshold)
        self.exact = {}
        for t, c in zip(self.texts, self.canonical):
            self.exact.setdefault(t, c)
        self._encoder = None
        self.embeddings = embeddings if embeddings is not None else self.embed(self.texts)
        self.yes_no = torch.tensor([asks_yes_no(t) for t in self.texts])
        # a yes/no entry whose slots are unknown cannot be checked against the question: exact matches only
        self.fuzzy = torch.tensor([not (y and s is None) for y, s in zip(self.yes_no.tolist(), self.slots)])

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def encoder(self):
        if self._encoder is None:
            from mmstory.encoders import ENCODERS

            self._encoder = ENCODERS.build("hf_text", {"path": self.encoder_path}).eval()
        return self._encoder

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """(N, D) L2-normalised sentence embeddings of ``texts`` (normalised first), in float32 on the CPU."""
        out = []
        for i in range(0, len(texts), batch_size):
            ids, mask = self.encoder.tokenizer.batch([normalise(t) for t in texts[i:i + batch_size]], max_len=64)
            out.append(F.normalize(self.encoder(ids, mask).pooled.float(), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 0)

    def lookup(self, questions: Sequence[str]) -> list[tuple[str, float]]:
        """Per question: (the question to ask, similarity to the bank entry it was matched to; 1.0 exact, 0.0 when
        it is asked as it is)."""
        result: list[tuple[str, float] | None] = [None] * len(questions)
        todo = []
        for i, q in enumerate(questions):
            hit = self.exact.get(normalise(q))
            if hit is not None:
                result[i] = (hit, 1.0)
            else:
                todo.append(i)
        if todo:
            sims = self.embed([questions[i] for i in todo]) @ self.embeddings.T  # (Q, N)
            for row, i in zip(sims, todo):
                q = questions[i]
                allowed = self.fuzzy & (self.yes_no == asks_yes_no(q))
                allowed &= torch.tensor([s is None or all(names(q, v) for v in s) for s in self.slots])
                row = row.masked_fill(~allowed, -2.0)
                best = int(row.argmax())
                score = float(row[best])
                result[i] = (self.canonical[best], score) if score >= self.threshold else (q, 0.0)
        return result  # type: ignore[return-value]

    def ask_as(self, questions: Sequence[str]) -> list[str]:
        """The question to ask the model for each of ``questions``."""
        return [q for q, _ in self.lookup(questions)]

    # ---------------------------------------------------------------- save / load
    def save(self, folder: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        meta = {"encoder": self.encoder_path, "threshold": self.threshold,
                "entries": [[t, c, None if s is None else list(s)]
                            for t, c, s in zip(self.texts, self.canonical, self.slots)]}
        (folder / FILES[0]).write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
        save_file({"embeddings": self.embeddings.contiguous()}, str(folder / FILES[1]))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "QuestionBank":
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / FILES[0]).read_text(encoding="utf-8"))
        embeddings = load_file(str(folder / FILES[1]))["embeddings"]
        if embeddings.shape[0] != len(meta["entries"]):
            raise ValueError(f"{folder / FILES[1]}: {embeddings.shape[0]} embeddings for {len(meta['entries'])} "
                             f"questions in {FILES[0]}")
        return cls([tuple(e) for e in meta["entries"]], encoder=meta["encoder"], threshold=meta["threshold"],
                   embeddings=embeddings)
