"""Questions as people ask them: other wordings of a dataset's templated questions.

Datasets built from templates ask every question of a type the same way ("which category is this?"); a
user types "What kind of emoji is it?". A wordings file lists, for each question pattern of the dataset,
wordings to train with and held-out wordings that only evaluation asks (so the reported accuracy on them is
on phrasings the model never saw)::

    - question: "is this in the {category} category?"   # the dataset's wording; {slots} match any text
      train: ["does this belong to the {category} category?", "is it in {category}?"]
      heldout: ["is this from the {category} category?"]

Patterns are tried in file order, the first match wins. Every reworded question also gets the case and
punctuation people use (a capital first letter or not, the question mark dropped or spaced). Training
(``data.loader.wordings``) rewords a matching question with probability ``data.loader.reword_prob`` (the
dataset's own wording stays one of the choices); ``evaluate(..., wordings=...)`` asks each question a second
time in a held-out wording.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class _Pattern:
    question: str
    regex: re.Pattern
    slots: tuple[str, ...]
    train: tuple[str, ...]
    heldout: tuple[str, ...]


def _compile(question: str) -> tuple[re.Pattern, tuple[str, ...]]:
    parts = re.split(r"\{(\w+)\}", question.strip().lower())
    slots = tuple(parts[1::2])
    body = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>.+?)" for i, p in enumerate(parts))
    return re.compile(f"^{body}$"), slots


class Wordings:
    """Rewords questions that match one of the file's patterns; others are returned unchanged."""

    def __init__(self, entries: list[dict], *, source: str = "wordings"):
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{source}: expected a non-empty list of {{question, train, heldout}} entries")
        self.source = source
        self.patterns: list[_Pattern] = []
        for n, e in enumerate(entries):
            where = f"{source} entry {n}"
            if not isinstance(e, dict) or set(e) - {"question", *SPLITS} or "question" not in e:
                raise ValueError(f"{where}: needs 'question' and may have only {list(SPLITS)}; got {e!r}")
            regex, slots = _compile(e["question"])
            lists = {}
            for split in SPLITS:
                items = e.get(split, [])
                if not isinstance(items, list) or not all(isinstance(t, str) and t.strip() for t in items):
                    raise ValueError(f"{where}: '{split}' must be a list of non-empty strings")
                for t in items:
                    used = set(re.findall(r"\{(\w+)\}", t))
                    if used != set(slots):
                        raise ValueError(f"{where}: wording {t!r} must use exactly the slots {sorted(slots)} "
                                         f"of {e['question']!r}")
                lists[split] = tuple(items)
            overlap = set(lists["train"]) & set(lists["heldout"])
            if overlap:
                raise ValueError(f"{where}: wordings both trained on and held out: {sorted(overlap)}")
            self.patterns.append(_Pattern(e["question"], regex, slots, lists["train"], lists["heldout"]))

    @classmethod
    def load(cls, path: str | Path) -> "Wordings":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"data.loader.wordings: file not found: {path} (relative paths are read from "
                                    f"the working directory, {Path.cwd()})")
        return cls(yaml.safe_load(path.read_text(encoding="utf-8")), source=str(path))

    def match(self, question: str) -> tuple[_Pattern, dict[str, str]] | None:
        text = " ".join(question.strip().lower().split())
        for p in self.patterns:
            m = p.regex.match(text)
            if m:
                return p, m.groupdict()
        return None

    def reword(self, question: str, rng: random.Random, split: str = "train", *, keep: float = 0.0) -> str:
        """``question`` in a random ``split`` wording (with case/punctuation variation), or unchanged if no
        pattern matches. ``keep``: the probability of keeping the dataset's wording (training only)."""
        if split not in SPLITS:
            raise ValueError(f"wordings split must be one of {SPLITS}, got {split!r}")
        found = self.match(question)
        if found is None:
            return question
        pattern, slots = found
        choices = getattr(pattern, split)
        if not choices or rng.random() < keep:
            return question
        return casual(rng.choice(choices).format(**slots), rng)

    def heldout(self, question: str, rng: random.Random) -> str | None:
        """A held-out wording of ``question``, or None when no pattern with held-out wordings matches."""
        found = self.match(question)
        return self.reword(question, rng, "heldout") if found and found[0].heldout else None


def casual(text: str, rng: random.Random) -> str:
    """Case and punctuation as people type them: half the time a capital first letter; the final question
    mark or full stop kept (60%), dropped (30%) or spaced off (10%)."""
    if rng.random() < 0.5:
        text = text[:1].upper() + text[1:]
    end = text[-1:] if text[-1:] in "?." else ""
    r = rng.random()
    if end and r < 0.3:
        text = text[:-1]
    elif end and r < 0.4:
        text = text[:-1] + " " + end
    return text
