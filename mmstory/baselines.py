"""Baselines every evaluation stands next to, and the helpers that score captions by the label they name.

A quality number means little alone: a CIDEr of 0.12 looks like progress until copying the label of the
nearest training image in raw pixels scores 1.1. So ``evaluate`` reports, beside the model:

- **nearest-neighbour label transfer** from a reference (training) split, as captioning papers report it
  (Devlin et al. 2015, "Exploring nearest neighbor approaches for image captioning"): each query takes the
  first caption of its most similar reference image; a question is answered as the most similar reference
  image that was asked the same question answered it (else the majority answer of its type); an image->text
  ranking scores a text by its best-matching reference image among those that carry that text; zero-shot
  takes the nearest reference image whose label is one of the split's classes. Two similarities:
  ``pixel_nn``: raw pixels, 32x32 (area-averaged), mean-centred per image, cosine; ``embedding_nn``: the
  model's own contrastive image embedding. For audio samples (against a reference of training clips) the raw
  input is the log-mel (``logmel_nn``: resampled to 16 frames, mean-centred per clip, cosine).
- **majority**: the most common training answer of each question type, the most common training caption.
- **chance**: R@1 of a random ranking, 1 / classes for zero-shot.

``names_label`` decides whether a caption names a label: the longest known label that occurs in the caption
as a whole phrase must be that label ("cat" is not named by "cat face", and "keycap: 1" is not by
"keycap: 10"). It is the fit and accuracy measure of captions on labelled data.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

PIXEL_SIZE = 32  # the pixel baseline's resolution
LOGMEL_FRAMES = 16  # the log-mel baseline's length in frames


# ---------------------------------------------------------------------------------------------- text keys
def normalize_text(text: str) -> str:
    """Lower case, single spaces, no trailing punctuation: how questions and captions are matched."""
    return " ".join(text.lower().split()).rstrip(" ?.!")


def _words(text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"\w+|[^\w\s]", text.lower()))


class LabelMatcher:
    """Finds which of a set of labels a caption names: the longest label occurring in it as a whole
    phrase (word and punctuation tokens), the first such occurrence on ties."""

    def __init__(self, labels: Iterable[str]):
        self.by_words = {_words(label): label for label in labels if label and _words(label)}
        self.longest = max((len(w) for w in self.by_words), default=0)

    def __call__(self, caption: str) -> str | None:
        words = _words(caption)
        for n in range(min(self.longest, len(words)), 0, -1):
            for start in range(len(words) - n + 1):
                found = self.by_words.get(words[start:start + n])
                if found is not None:
                    return found
        return None

    def accuracy(self, captions: Sequence[str], labels: Sequence[str]) -> float:
        """Fraction of captions that name their label."""
        if not captions:
            raise ValueError("no captions to score")
        return sum(self(c) == label for c, label in zip(captions, labels)) / len(captions)


def distinct_fraction(captions: Sequence[str]) -> float:
    """Distinct captions / captions (after normalising case and spaces)."""
    if not captions:
        raise ValueError("no captions")
    return len({normalize_text(c) for c in captions}) / len(captions)


# ---------------------------------------------------------------------------------------------- features
def pixel_features(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], size: int = PIXEL_SIZE
                   ) -> torch.Tensor:
    """Normalised model inputs (N, 3, H, W) -> the pixel baseline's features (N, 3 * size * size): back to
    [0, 1], area-averaged to size x size (32 for the baseline), mean-centred per image, L2-normalised (so a dot
    product is the cosine)."""
    x = images.float() * torch.tensor(std, device=images.device).view(1, 3, 1, 1) \
        + torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    x = F.adaptive_avg_pool2d(x, size).flatten(1)
    return F.normalize(x - x.mean(dim=1, keepdim=True), dim=1)


def logmel_features(wave: torch.Tensor, mask: torch.Tensor | None, logmel, frames: int = LOGMEL_FRAMES
                    ) -> torch.Tensor:
    """Waveforms (N, T) with their sample mask -> the log-mel baseline's features (N, n_mels * frames), the
    audio counterpart of ``pixel_features``: the clip's log-mel (``logmel``, e.g. the audio encoder's front end)
    over its real samples only, resampled in time to ``frames`` frames (so a long and a short saying of the same
    word line up), mean-centred per clip, L2-normalised."""
    mel = logmel(wave.float() if mask is None else wave.float() * mask)  # (N, F, n_mels)
    lengths = torch.full((wave.shape[0],), wave.shape[1]) if mask is None else mask.sum(1).cpu()
    counts = logmel.frames(lengths)
    rows = []
    for m, c in zip(mel, counts.clamp(min=1, max=mel.shape[1]).tolist()):
        m = F.interpolate(m[:c].T[None], size=frames, mode="linear", align_corners=False)[0]  # (n_mels, frames)
        rows.append((m - m.mean()).flatten())
    return F.normalize(torch.stack(rows), dim=1)


# ---------------------------------------------------------------------------------------------- reference
@dataclass
class Reference:
    """What the baselines know of a reference (training) split: per sample its features, captions, label
    and question/answer pairs. Built by ``mmstory.evaluate.reference_bank``."""

    name: str
    features: dict[str, torch.Tensor]          # "pixel_nn" or "logmel_nn", "embedding_nn" -> (N, D), L2-normalised
    captions: list[list[str]]                  # (N,) reference captions of each sample
    labels: list[str | None]                   # (N,)
    qa: list[list[dict]]                       # (N,) [{question, answers, type}]
    modality: str = "image"                    # the reference samples' modality (image: pixel_nn; audio: logmel_nn)
    by_question: dict[str, list[tuple[int, str]]] = field(init=False)  # question -> [(sample, answer)]
    majority_answer: dict[str, str] = field(init=False)                # question type -> answer
    majority_caption: str | None = field(init=False)

    def __post_init__(self):
        self.by_question = defaultdict(list)
        by_type: dict[str, Counter] = defaultdict(Counter)
        for i, items in enumerate(self.qa):
            for q in items:
                answer = Counter(q["answers"]).most_common(1)[0][0]
                self.by_question[normalize_text(q["question"])].append((i, answer))
                by_type[q["type"]][answer] += 1
        self.majority_answer = {t: c.most_common(1)[0][0] for t, c in by_type.items()}
        firsts = Counter(c[0] for c in self.captions if c)
        self.majority_caption = firsts.most_common(1)[0][0] if firsts else None

    def __len__(self) -> int:
        return len(self.captions)

    def known_labels(self) -> set[str]:
        return {label for label in self.labels if label}


def nearest(query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(Q, D) x (N, D) L2-normalised -> (Q, N) cosine similarities."""
    return query.float() @ bank.float().T


def nn_captions(ref: Reference, sim: torch.Tensor) -> list[str]:
    """The first caption of each query's most similar reference sample (that has captions)."""
    has = torch.tensor([bool(c) for c in ref.captions])
    best = sim.masked_fill(~has[None, :], float("-inf")).argmax(dim=1).tolist()
    return [ref.captions[j][0] for j in best]


def nn_answers(ref: Reference, sim: torch.Tensor, questions: Sequence[tuple[int, str, str]]) -> list[str]:
    """Answers for ``(query row, question, type)`` triples: the answer of the most similar reference sample
    asked the same (normalised) question, else the majority answer of the type (else "")."""
    out = []
    for row, question, qtype in questions:
        asked = ref.by_question.get(normalize_text(question))
        if asked:
            idx = torch.tensor([i for i, _ in asked])
            out.append(asked[int(sim[row, idx].argmax())][1])
        else:
            out.append(ref.majority_answer.get(qtype, ""))
    return out


def nn_text_scores(ref: Reference, sim: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """(Q, T) scores of candidate texts for image->text ranking: a text's score for a query is the similarity
    of the most similar reference sample that carries that text as a caption; -inf where none does (those
    rank last: ``retrieval_recall`` breaks ties against the positives)."""
    carriers: dict[str, list[int]] = defaultdict(list)
    for i, caps in enumerate(ref.captions):
        for c in {normalize_text(c) for c in caps}:
            carriers[c].append(i)
    out = torch.full((sim.shape[0], len(texts)), float("-inf"))
    for t, text in enumerate(texts):
        idx = carriers.get(normalize_text(text))
        if idx:
            out[:, t] = sim[:, idx].max(dim=1).values
    return out


def nn_classes(ref: Reference, sim: torch.Tensor, classes: Sequence[str]) -> list[str | None]:
    """Zero-shot by transfer: the label of the most similar reference sample whose label is one of
    ``classes`` (None when no reference sample has any of them)."""
    allowed = set(classes)
    ok = torch.tensor([label in allowed for label in ref.labels])
    if not ok.any():
        return [None] * sim.shape[0]
    best = sim.masked_fill(~ok[None, :], float("-inf")).argmax(dim=1).tolist()
    return [ref.labels[j] for j in best]


def chance_recall(positives: Sequence[Sequence[int]], num_texts: int) -> float:
    """Expected R@1 of a uniformly random ranking: mean over queries of (#positives / #texts)."""
    return sum(len(p) for p in positives) / (len(positives) * num_texts)
