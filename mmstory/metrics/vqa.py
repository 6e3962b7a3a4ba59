"""VQA accuracy as the official VQA evaluation (``vqaEval.py``, VQA v1/v2) computes it.

Per question with n >= 2 human answers (VQA has n = 10):
    acc = mean over the n leave-one-out subsets of min(#matches in subset / 3, 1)
(the official "average over the 10 choose 9 subsets"). With n == 1 reference the
formula is meaningless (the subset is empty), so we use exact match after
normalisation. Official quirk kept by default: answers and prediction are only
normalised when the human answers disagree (``len(set(answers)) > 1``);
``normalize="always"`` normalises every question instead.
Scores are fractions in [0, 1] (the official script prints 100x, rounded to 2 dp).
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence

# Tables copied from the official vqaEval.py.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've",
    "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
              "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ["a", "an", "the"]
# "(?!<=\d)" is a typo for a look-behind in the official code; kept verbatim for identical output.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
         ">", "<", "@", "`", ",", "?", "!"]


def process_punctuation(in_text: str) -> str:
    """Official ``processPunctuation``: drop or space-out punctuation, strip non-decimal periods."""
    out_text = in_text
    for p in PUNCT:
        if (p + " " in in_text or " " + p in in_text) or (re.search(COMMA_STRIP, in_text) is not None):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    # The official call passes re.UNICODE as the *count* argument (= 32); kept for fidelity.
    return PERIOD_STRIP.sub("", out_text, re.UNICODE)


def process_digit_article(in_text: str) -> str:
    """Official ``processDigitArticle``: lower-case, number words -> digits, drop articles, fix contractions."""
    words = [MANUAL_MAP.get(w, w) for w in in_text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(ans: str) -> str:
    """Full official normalisation of one answer string."""
    ans = ans.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(ans))


def question_accuracy(prediction: str, answers: Sequence[str], normalize: str = "official") -> float:
    """Accuracy of one prediction against its human answers (see module docstring)."""
    if len(answers) == 0:
        raise ValueError("question has no reference answers")
    clean = lambda s: s.replace("\n", " ").replace("\t", " ").strip()
    pred, gts = clean(prediction), [clean(a) for a in answers]
    if len(gts) == 1:
        return float(normalize_answer(pred) == normalize_answer(gts[0]))
    if normalize == "always" or (normalize == "official" and len(set(gts)) > 1):
        pred, gts = normalize_answer(pred), [normalize_answer(a) for a in gts]
    elif normalize not in ("official", "always"):
        raise ValueError(f"normalize must be 'official' or 'always', got {normalize!r}")
    accs = []
    for i in range(len(gts)):  # leave human i out, count matches among the others
        matches = sum(1 for j, a in enumerate(gts) if j != i and a == pred)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]],
                 answer_types: Sequence[str] | None = None, normalize: str = "official") -> dict:
    """VQA accuracy over Q questions.

    Args:
        predictions: Q predicted answer strings.
        answers: Q lists of human answers (10 each for VQA v2).
        answer_types: optional Q type labels ("yes/no", "number", "other").
    Returns:
        ``{"overall": float, "per_question": list[float] (Q), "per_answer_type": {type: float}}``
        (``per_answer_type`` only when ``answer_types`` is given).
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if answer_types is not None and len(answer_types) != len(predictions):
        raise ValueError(f"{len(answer_types)} answer_types for {len(predictions)} predictions")
    if len(predictions) == 0:
        raise ValueError("vqa_accuracy got no predictions")
    per_q = []
    for i, (p, a) in enumerate(zip(predictions, answers)):
        if isinstance(a, str) or len(a) == 0:
            raise ValueError(f"answers[{i}] must be a non-empty list of strings, got {a!r}")
        per_q.append(question_accuracy(p, a, normalize))
    out: dict = {"overall": sum(per_q) / len(per_q), "per_question": per_q}
    if answer_types is not None:
        groups: dict[str, list[float]] = defaultdict(list)
        for t, s in zip(answer_types, per_q):
            groups[t].append(s)
        out["per_answer_type"] = {t: sum(v) / len(v) for t, v in groups.items()}
    return out
