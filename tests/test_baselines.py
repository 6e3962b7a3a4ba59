"""The baselines beside every evaluation (mmstory/baselines.py, evaluate(reference=...)): each number equals a
direct computation on a small fixture."""
from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from mmstory.baselines import (LabelMatcher, Reference, chance_recall, distinct_fraction, nn_answers, nn_captions,
                               nn_classes, nn_text_scores, normalize_text, pixel_features)
from mmstory.config import DataConfig
from mmstory.evaluate import evaluate, reference_bank
from mmstory.generation import DecodeOptions
from mmstory.metrics import caption_scores, retrieval_recall, vqa_accuracy
from mmstory.model import build_model


def test_label_matcher_takes_the_longest_whole_phrase():
    m = LabelMatcher(["cat", "cat face", "keycap: 1", "keycap: 10", "red heart", "heart"])
    assert m("an emoji of a cat face") == "cat face"
    assert m("a cat, in the animals category") == "cat"
    assert m("keycap: 10") == "keycap: 10" and m("an emoji of a keycap: 1") == "keycap: 1"
    assert m("Red Heart!") == "red heart"
    assert m("concatenation") is None  # words, not substrings
    assert m.accuracy(["cat face", "a cat", "dog"], ["cat", "cat", "dog"]) == pytest.approx(1 / 3)
    assert distinct_fraction(["A cat", "a  cat", "dog", "cow"]) == 0.75


def test_pixel_features_equal_a_direct_computation():
    rng = np.random.RandomState(0)
    pixels = rng.randint(0, 256, (3, 64, 64, 3)).astype(np.uint8)
    normalised = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    got = pixel_features(normalised, (0.5,) * 3, (0.5,) * 3)
    x = pixels.astype(np.float64) / 255
    x = x.reshape(3, 32, 2, 32, 2, 3).mean(axis=(2, 4)).transpose(0, 3, 1, 2).reshape(3, -1)  # 2x2 area mean, CHW
    x = x - x.mean(axis=1, keepdims=True)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(got.numpy(), x, atol=1e-5)


def _reference() -> Reference:
    feats = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]]), dim=1)
    return Reference(
        name="ref", features={"pixel_nn": feats},
        captions=[["a cat", "cat"], ["a dog"], ["a sun"], ["a cat and a dog"]],
        labels=["cat", "dog", "sun", None],
        qa=[[{"question": "What is shown?", "answers": ["cat"], "type": "what"},
             {"question": "is this an animal?", "answers": ["yes"], "type": "yesno"}],
            [{"question": "what is shown?", "answers": ["dog"], "type": "what"}],
            [{"question": "is this an animal?", "answers": ["no"], "type": "yesno"}], []])


def test_nearest_neighbour_transfer_equals_a_direct_computation():
    ref = _reference()
    query = torch.nn.functional.normalize(torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 1.0], [0.6, 0.7, 0.0]]), dim=1)
    sim = query @ ref.features["pixel_nn"].T
    direct = np.argmax(sim.numpy(), axis=1)
    assert direct.tolist() == [0, 2, 3]
    assert nn_captions(ref, sim) == [ref.captions[j][0] for j in direct]
    # answers: the most similar reference sample asked the same question (case and "?" ignored), else majority
    got = nn_answers(ref, sim, [(0, "what is shown", "what"), (1, "what is shown?", "what"),
                                (1, "Is this an animal?", "yesno"), (2, "is this red?", "yesno")])
    assert got[0] == "cat"        # rows 0 and 1 were asked; row 0 is nearer
    assert got[1] == "dog"        # query 1: row 1 (sim 0.2) beats row 0 (sim 0)
    assert got[2] == "no"         # rows 0 and 2 were asked; row 2 is nearer
    assert got[3] == Counter(["yes", "no"]).most_common(1)[0][0] == ref.majority_answer["yesno"]
    # text scores: the best similarity among the reference samples carrying the text, -inf for unknown texts
    scores = nn_text_scores(ref, sim, ["cat", "A dog", "a cow"])
    assert scores[:, 0].tolist() == pytest.approx(sim[:, 0].tolist())
    assert scores[:, 1].tolist() == pytest.approx(sim[:, 1].tolist())
    assert torch.isinf(scores[:, 2]).all()
    # zero-shot restricted to the split's classes
    assert nn_classes(ref, sim, ["dog", "sun"]) == ["dog", "sun", "dog"]
    assert nn_classes(ref, sim, ["cow"]) == [None] * 3
    assert chance_recall([[0, 1], [2]], 10) == pytest.approx(0.15)


def _glyph(kind: int, seed: int) -> np.ndarray:
    """A 64x64 image: a coloured square whose position says its class, plus a little noise."""
    rng = np.random.RandomState(seed)
    img = np.full((64, 64, 3), 255, np.uint8)
    y, x = divmod(kind, 2)
    img[8 + 28 * y: 28 + 28 * y, 8 + 28 * x: 28 + 28 * x] = [(200, 30, 30), (30, 160, 30), (30, 30, 200), (10, 10, 10)][kind]
    return np.clip(img.astype(int) + rng.randint(-20, 21, img.shape), 0, 255).astype(np.uint8)


LABELS = ["red square", "green square", "blue square", "black square"]


def _write(path, rows: list[tuple[str, np.ndarray, str]]) -> str:
    import webdataset as wds

    with wds.TarWriter(str(path)) as w:
        for key, img, label in rows:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            meta = {"captions": [label, f"an emoji of a {label}"], "labels": {"label": label},
                    "qa": [{"question": "what is shown?", "answers": [label], "type": "what"},
                           {"question": "is this red?", "answers": ["yes" if "red" in label else "no"],
                            "type": "yesno"}]}
            w.write({"__key__": key, "png": buf.getvalue(), "json": json.dumps(meta).encode()})
    return str(path)


def test_evaluate_baselines_equal_a_direct_computation(tmp_path):
    """evaluate(reference=...)'s pixel-NN caption, VQA and retrieval numbers equal the same baseline computed
    here from the PNG pixels with numpy."""
    train = [(f"t{i}", _glyph(i % 4, i), LABELS[i % 4]) for i in range(12)]
    val = [(f"v{i}", _glyph((i * 3) % 4, 100 + i), LABELS[(i * 3) % 4]) for i in range(6)]
    train_tar, val_tar = _write(tmp_path / "train.tar", train), _write(tmp_path / "val.tar", val)
    cfg = tiny_config(audio=False)
    cfg.encoders["image"].args["image_size"] = 64
    cfg.decoder.max_len = 64
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    data = DataConfig(workers=0)
    ref = reference_bank(model, [train_tar], data=data, batch_size=5, progress=False)
    res = evaluate(model, [val_tar], decode=DecodeOptions(max_new_tokens=3), batch_size=4, data=data, meteor=False,
                   reference=ref, progress=False)
    got = res["metrics"]["baselines"]["pixel_nn"]

    def feats(rows):
        x = np.stack([img for _, img, _ in rows]).astype(np.float64) / 255
        x = x.reshape(len(rows), 32, 2, 32, 2, 3).mean(axis=(2, 4)).transpose(0, 3, 1, 2).reshape(len(rows), -1)
        x = x - x.mean(axis=1, keepdims=True)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    sim = feats(val) @ feats(train).T
    nearest = sim.argmax(axis=1)
    captions = {key: train[j][2] for (key, _, _), j in zip(val, nearest)}
    references = {key: [label, f"an emoji of a {label}"] for key, _, label in val}
    assert got["caption"]["CIDEr"] == pytest.approx(caption_scores(captions, references, meteor=False)["CIDEr"])
    assert got["caption"]["label_accuracy"] == pytest.approx(np.mean([captions[k] == lab for k, _, lab in val]))
    answers, truth = [], []
    for (key, _, label), j in zip(val, nearest):
        answers += [train[j][2], "yes" if "red" in train[j][2] else "no"]
        truth += [[label], ["yes" if "red" in label else "no"]]
    assert got["qa"]["overall"] == pytest.approx(vqa_accuracy(answers, truth)["overall"])
    # the gallery: each distinct caption once, a positive of every sample that carries it
    texts = list(dict.fromkeys(t for _, _, label in val for t in (label, f"an emoji of a {label}")))
    text_sim = np.stack([[max(sim[q, j] for j in range(len(train)) if train[j][2] in t) for t in texts]
                         for q in range(len(val))])
    want = retrieval_recall(torch.tensor(text_sim), [[texts.index(label), texts.index(f"an emoji of a {label}")]
                                                     for _, _, label in val])
    assert got["retrieval"]["image_to_text"] == pytest.approx(want)
    assert got["zeroshot"]["top1"] == pytest.approx(got["caption"]["label_accuracy"])
    # the majority and chance baselines
    majority = Counter(label for _, _, label in train).most_common(1)[0][0]
    assert res["metrics"]["baselines"]["majority"]["caption"]["label_accuracy"] == pytest.approx(
        np.mean([lab == majority for _, _, lab in val]))
    assert res["metrics"]["baselines"]["chance"]["zeroshot_top1"] == pytest.approx(1 / len({lab for *_, lab in val}))
    assert normalize_text(" What IS  shown? ") == "what is shown"


def test_retrieval_counts_a_caption_two_samples_share_as_a_positive_of_both(tmp_path):
    """One concept in two art styles carries the same captions twice. Each distinct caption is one gallery entry
    and a positive of both samples (``text_gallery``), so a split with every sample twice scores the image->text
    recall, the text->image R@1 and the chance R@1 of the split once; listed once per sample, the twin's copy of
    a caption would tie with the positive and rank it second."""
    from mmstory.evaluate import text_gallery

    texts, positives = text_gallery([{"references": ["a", "b"]}, {"references": ["c"]}, {"references": ["b", "a"]}])
    assert texts == ["a", "b", "c"] and positives == [[0, 1], [2], [0, 1]]
    rows = [(f"t{i}", _glyph(i % 4, i), LABELS[i % 4]) for i in range(6)]
    once = _write(tmp_path / "once.tar", rows)
    cfg = tiny_config(audio=False)
    cfg.encoders["image"].args["image_size"] = 64
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    data = DataConfig(workers=0)
    got = [evaluate(model, shards, tasks=("retrieval",), batch_size=4, data=data, progress=False)["metrics"]
           for shards in ([once], [once, once])]
    once_r, twice_r = got[0]["retrieval"], got[1]["retrieval"]
    assert twice_r["num_samples"] == 12 and twice_r["num_texts"] == once_r["num_texts"] == 8
    assert twice_r["image_to_text"] == once_r["image_to_text"]
    # (text->image ranks twice the images: R@1 is unchanged, a deeper cut-off counts the doubled negatives)
    assert twice_r["text_to_image"]["R@1"] == once_r["text_to_image"]["R@1"]
    chance = [g["baselines"]["chance"]["retrieval_R@1"] for g in got]
    assert chance[1] == pytest.approx(chance[0]) == pytest.approx(2 / 8)
