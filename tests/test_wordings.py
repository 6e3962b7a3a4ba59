"""Questions in other wordings (mmstory/data/wordings.py): training never sees a held-out wording, slots are
carried over, and bad files are named."""
import random
from pathlib import Path

import pytest

from mmstory.data.wordings import Wordings

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = [{"question": "is this in the {category} category?",
            "train": ["does this belong to {category}?", "is it in the {category} group?"],
            "heldout": ["would you file this under {category}?"]},
           {"question": "what is shown?", "train": ["what is this?"], "heldout": ["what's in this picture?"]}]


def _plain(text: str) -> str:
    return text.lower().rstrip(" ?.")


def test_reword_uses_only_train_wordings_and_keeps_the_slot():
    w = Wordings(ENTRIES)
    rng = random.Random(0)
    seen = {_plain(w.reword("Is this in the food & drink category?", rng)) for _ in range(200)}
    assert seen == {"does this belong to food & drink", "is it in the food & drink group"}
    held = {_plain(w.heldout("is this in the food & drink category?", rng)) for _ in range(20)}
    assert held == {"would you file this under food & drink"}
    assert w.reword("how many legs?", rng) == "how many legs?"  # no pattern: unchanged
    assert w.heldout("how many legs?", rng) is None


def test_keep_probability_and_casual_variants():
    w = Wordings(ENTRIES)
    rng = random.Random(1)
    kept = sum(w.reword("what is shown?", rng, keep=0.25) == "what is shown?" for _ in range(4000)) / 4000
    assert 0.22 < kept < 0.28
    forms = {w.reword("what is shown?", rng) for _ in range(400)}
    assert {"what is this?", "What is this?", "what is this", "what is this ?"} <= forms


def test_bundled_wordings_hold_out_other_phrasings_for_every_pattern():
    w = Wordings.load(ROOT / "data_manifests/emoji/wordings.yaml")
    assert w.patterns and all(p.train and p.heldout for p in w.patterns)
    for p in w.patterns:
        assert not {_plain(t) for t in p.train} & {_plain(t) for t in p.heldout}, p.question


@pytest.mark.parametrize("entries, message", [
    ([{"question": "is it {x}?", "train": ["is it red?"]}], r"exactly the slots \['x'\]"),
    ([{"question": "what?", "train": ["a?"], "heldout": ["a?"]}], "both trained on and held out"),
    ([{"question": "what?", "other": ["a?"]}], "may have only"),
    ([], "non-empty list"),
])
def test_bad_entries_are_named(entries, message):
    with pytest.raises(ValueError, match=message):
        Wordings(entries, source="w.yaml")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.loader.wordings: file not found: .*nope.yaml"):
        Wordings.load(tmp_path / "nope.yaml")
