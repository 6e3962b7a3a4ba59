"""Tests for mmstory.metrics (run with PYTHONPATH=<repo root>)."""
import math
import shutil

import pytest
import torch

from mmstory.metrics import (caption_scores, char_tokenize, coco_tokenize, precision_recall_f1,
                             retrieval_recall, vqa_accuracy, zero_shot_accuracy)
from mmstory.metrics.captioning import java_ptb_tokenize, meteor_scorer, score_tokenized
from mmstory.metrics.ptb_tokenize import tokenize_batch
from mmstory.metrics.vqa import normalize_answer, question_accuracy

HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="java not on PATH")

CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs don't like the cat's toy; they can't, won't, cannot play!",
    "She said \"hello\" to the kids' teacher -- and left...",
    "A well-known 3.5-year-old boy (aged 3) eats 1,000 apples at 10:30 for $5.50 and 50% off.",
    "Mr. Smith and Dr. Jones met in the U.S. at St. Louis, e.g. near the Inc. office.",
    "I'm gonna go; we'll see. They're here, we've won, I'd stay.",
    "A [red] {blue} bus & a cat &amp; 1/2 ½ £5 €3 … end.",
    "一只猫坐在桌子上。 A cat 坐在 table，很好！",
    "It's 5 p.m. now. Another sentence.",
    "a man who's 6' tall and 3'' wide, isn't he?",
    "A B-52 flies over N.Y.C. at 5:00pm--fast!",
    "Hi!!! What?? Ok... ok.. ...ok",
    "“Smart quotes” and ‘single’ and it’s and don’t",
    "A 2-year-old and a 1990s car, 1980's style, '90s music",
    "rock'n'roll at 5 o'clock, y'all ma'am",
    "The boy is ill. There is no. A ship like noah's ark.",
    "A plate with pizza on it, and a fork.",
    "A group of people standing around a table with food on it .",
    "there are 2 dogs and 3 cats playing in the yard",
    "A \"STOP\" sign on a street corner.",
    "A red double-decker bus driving down a street.",
    "The man is wearing a t-shirt and jeans.",
    "A black & white photo of a cat.",
    "A dog -- maybe a lab -- runs.",
    "My family's trip to the zoo was fun: we saw lions, tigers, and bears.",
    "\"What a great day!\" she said.",
    "He couldn't believe it wasn't raining.",
    "At 3:45 p.m., the party started.",
    "I bought 2.5 lbs of apples for $3.99.",
    "Our team won 3-2!",
    "The cake (chocolate) was delicious.",
    "Grandma's 80th birthday party.",
    "A car that is No.1 and #1 and 100% and 5$ and 3pm",
    "dogs,cats and a:b and x;y and 3,4 and a,b.",
    "The cat sat.The dog ran.",
    "i.e. this and U.K. and A. Smith and the letter B. Then.",
    "5x5 3D 4k 10km 5:00 5:00:00 12.5kg 1.5.",
    "'Tis a dog's 'toy' I'd we'll they're we've.",
    "CANNOT Cannot gonna Gonna wanna gotta lemme",
    "this/that 1/2 a / b 24/7",
]


# ---------------------------------------------------------------- tokeniser
@needs_java
def test_python_tokenizer_matches_java_ptb():
    java = java_ptb_tokenize({i: [c] for i, c in enumerate(CAPTIONS)})
    py = tokenize_batch(CAPTIONS)
    diffs = [(c, java[i][0], py[i]) for i, c in enumerate(CAPTIONS) if java[i][0] != py[i]]
    assert not diffs, "\n".join(f"IN {c!r}\n  java {j!r}\n  py   {p!r}" for c, j, p in diffs)


def test_python_tokenizer_known_outputs():
    # Java outputs recorded from stanford-corenlp-3.4.1 via pycocoevalcap.
    assert coco_tokenize("Two dogs don't like the cat's toy; they can't play!") == \
        "two dogs do n't like the cat 's toy they ca n't play"
    # "(" -> "-lrb-" survives: pycocoevalcap's list has upper-case "-LRB-".
    assert coco_tokenize("A boy (aged 3).") == "a boy -lrb- aged 3 -rrb-"
    assert coco_tokenize("Mr. Smith in the U.S.") == "mr. smith in the u.s."
    assert coco_tokenize("一只猫坐在桌子上。") == "一只猫坐在桌子上 。"


def test_char_tokenize_chinese():
    assert char_tokenize("一只猫坐在桌子上。") == "一 只 猫 坐 在 桌 子 上"
    assert char_tokenize("一只 cat，很好！") == "一 只 cat 很 好"


# ---------------------------------------------------------------- captioning
PREDS = {1: "A man riding a wave on a surfboard.", 2: "Two dogs playing in the grass.",
         3: "A plate of food with a fork.", "x": "a cat don't sit (on) the mat!"}
REFS = {1: ["A man riding a wave on top of a surfboard.", "A surfer rides a big wave.", "Man surfing."],
        2: ["Two dogs play on the grass.", "Dogs running in a field.", "Two puppies in grass."],
        3: ["A plate with pizza on it, and a fork.", "Food on a plate next to a fork."],
        "x": ["The cat doesn't sit on the mat.", "A cat on a mat."]}


@needs_java
def test_caption_scores_equal_cocoevalcap_pipeline():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    res = tok.tokenize({k: [{"caption": PREDS[k]}] for k in REFS})
    ref = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for i in range(4):
        ref[f"Bleu_{i + 1}"] = bleu[i]
    m = Meteor()
    ref["METEOR"] = m.compute_score(gts, res)[0]
    m.meteor_p.stdin.close(); m.meteor_p.stdout.close(); m.meteor_p.stderr.close()
    m.meteor_p.kill(); m.meteor_p.wait()
    ref["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    ref["CIDEr"] = Cider().compute_score(gts, res)[0]
    ours = caption_scores(PREDS, REFS)
    for k, v in ref.items():
        assert ours[k] == pytest.approx(v, abs=1e-9), k
    # Pure-Python tokeniser gives the same numbers (METEOR aside).
    py = caption_scores(PREDS, REFS, use_java=False, meteor=False)
    for k in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert py[k] == pytest.approx(ref[k], abs=1e-9), k
    assert py["METEOR"] is None


@needs_java
def test_meteor_process_is_closed():
    with meteor_scorer() as m:
        proc = m.meteor_p
        s, _ = m.compute_score({1: ["a cat on a mat"]}, {1: ["a cat on the mat"]})
        assert 0 < s <= 1
    assert proc.poll() is not None


def test_hand_computed_bleu1_rouge_l():
    # hyp "the cat sat" (3 tokens) vs ref "the cat sat on the mat" (6 tokens):
    # BLEU-1: precision 3/3, brevity penalty exp(1 - 6/3) = e^-1.
    # ROUGE-L: LCS 3, P = 1, R = 0.5, F = (1 + 1.2^2) P R / (R + 1.2^2 P) = 1.22 / 1.94.
    out = score_tokenized({0: ["the cat sat on the mat"]}, {0: ["the cat sat"]}, meteor=False)
    assert out["Bleu_1"] == pytest.approx(math.exp(-1), abs=1e-6)  # pycocoevalcap adds tiny=1e-15 terms
    assert out["ROUGE_L"] == pytest.approx((1 + 1.44) * 0.5 / (0.5 + 1.44), abs=1e-12)


def test_caption_scores_without_java_warns(monkeypatch):
    import mmstory.metrics.captioning as cap
    monkeypatch.setattr(cap, "java_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="METEOR"):
        out = cap.caption_scores(PREDS, REFS)
    assert out["METEOR"] is None and out["CIDEr"] > 0


def test_caption_scores_key_errors():
    with pytest.raises(KeyError, match="'missing'"):
        caption_scores({"missing": "a cat"}, {1: ["a cat"]}, use_java=False, meteor=False)
    with pytest.raises(ValueError, match="references\\[1\\]"):
        caption_scores({1: "a cat"}, {1: []}, use_java=False, meteor=False)


def test_caption_scores_chinese_chars():
    out = caption_scores({0: "一只猫坐在桌子上。"}, {0: ["一只猫坐在桌子上。", "猫在桌上。"]},
                         tokenize="chars", meteor=False)
    assert out["Bleu_4"] == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------- VQA
def test_vqa_two_of_ten_is_0_6():
    # 10 leave-one-out subsets: 2 drop a matching human -> 1 match -> 1/3;
    # 8 keep both -> 2 matches -> 2/3.  (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    answers = ["2", "2"] + ["3"] * 8
    assert question_accuracy("2", answers) == pytest.approx(0.6, abs=1e-12)
    assert question_accuracy("two", answers) == pytest.approx(0.6, abs=1e-12)  # number word


def test_vqa_three_and_four_of_ten():
    # 3 agree: 3 subsets with 2 matches (2/3), 7 with 3 (1): (2 + 7) / 10 = 0.9
    assert question_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    assert question_accuracy("red", ["red"] * 4 + ["blue"] * 6) == pytest.approx(1.0)
    assert question_accuracy("green", ["red"] * 4 + ["blue"] * 6) == 0.0


def test_vqa_normalisation():
    assert normalize_answer("The Dog.") == "dog"
    assert normalize_answer("dont") == "don't"
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("yes!") == "yes"
    assert normalize_answer("3.5") == "3.5"


def test_vqa_single_reference_and_types():
    out = vqa_accuracy(["A dog", "cat", "two"], [["dog"], ["cow"], ["2", "2", "2", "1"]],
                       answer_types=["other", "other", "number"])
    assert out["per_question"] == [1.0, 0.0, pytest.approx(0.75)]  # drop a "2" (x3): 2/3; drop "1": 1 -> 0.75
    assert out["per_answer_type"]["other"] == 0.5
    assert out["overall"] == pytest.approx((1 + 0 + 0.75) / 3)


def test_vqa_errors():
    with pytest.raises(ValueError, match="answers\\[0\\]"):
        vqa_accuracy(["x"], [[]])
    with pytest.raises(ValueError, match="2 predictions"):
        vqa_accuracy(["x", "y"], [["x"]])


# ---------------------------------------------------------------- retrieval
def test_retrieval_text_to_image():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.1], [0.5, 0.6, 0.4]])
    # q0 positive 0 rank 0; q1 positive 1 rank 1; q2 positive 2 rank 2
    out = retrieval_recall(sim, [0, 1, 2], ks=(1, 2, 3))
    assert out == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3), "R@3": 1.0}


def test_retrieval_image_to_text_multiple_positives():
    sim = torch.tensor([[0.1, 0.2, 0.9, 0.3], [0.9, 0.1, 0.8, 0.2]])
    # image0 captions {0,1}: best positive 0.2 has 2 higher -> rank 2
    # image1 captions {2,3}: best positive 0.8 has 1 higher -> rank 1
    out = retrieval_recall(sim, [[0, 1], [2, 3]], ks=(1, 2, 3))
    assert out == {"R@1": 0.0, "R@2": 0.5, "R@3": 1.0}


def test_retrieval_ties_are_pessimistic():
    sim = torch.ones(2, 5)
    out = retrieval_recall(sim, [0, 3])
    assert out["R@1"] == 0.0 and out["R@5"] == 1.0  # 4 tied negatives -> rank 4


def test_retrieval_errors():
    with pytest.raises(ValueError, match="empty gallery"):
        retrieval_recall(torch.zeros(3, 0), [0, 0, 0])
    with pytest.raises(ValueError, match="outside gallery"):
        retrieval_recall(torch.zeros(1, 2), [5])
    with pytest.raises(ValueError, match="query 0 has no positive"):
        retrieval_recall(torch.zeros(1, 2), [[]])


def test_zero_shot_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    out = zero_shot_accuracy(logits, labels, topk=(1, 2))
    assert out == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(2 / 3)}


def test_precision_recall_f1():
    pred = torch.tensor([0, 0, 1, 1, 2])
    target = torch.tensor([0, 1, 1, 1, 0])
    # class0: tp1 fp1 fn1 -> P .5 R .5 F .5 ; class1: tp2 fp0 fn1 -> P 1 R 2/3 F .8 ; class2: tp0 fp1 fn0 -> 0,0,0
    m = precision_recall_f1(pred, target, 3, "macro")
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx((0.5 + 2 / 3) / 3)
    assert m["f1"] == pytest.approx((0.5 + 0.8) / 3)
    u = precision_recall_f1(pred, target, 3, "micro")
    assert u["precision"] == u["recall"] == u["f1"] == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="average"):
        precision_recall_f1(pred, target, 3, "weighted")
