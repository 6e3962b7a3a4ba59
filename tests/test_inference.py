"""Inference API (mmstory/inference.py), evaluation and report (mmstory/evaluate.py) and their commands,
on a tiny untrained model saved and loaded like a real checkpoint."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image

import mmstory
from conftest import tiny_config
from mmstory import inference
from mmstory.cli import main
from mmstory.config import DataConfig
from mmstory.evaluate import EVAL_TASKS, _md, evaluate, summary, write_report
from mmstory.generation import DecodeOptions
from mmstory.model import build_model

ROOT = Path(__file__).resolve().parents[1]
DECODE = dict(max_new_tokens=6)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    cfg = tiny_config()
    cfg.decoder.max_len = 96  # room for the emoji QA prompts with the byte tokenizer
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt")
    build_model(cfg).save(folder)
    return str(folder)


@pytest.fixture(scope="module")
def model(checkpoint):
    return mmstory.load(checkpoint)


def _image(seed: int, size=(40, 48)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[0], size[1], 3) * 255).astype(np.uint8))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _wave(seed: int, seconds: float = 0.5, rate: int = 16000) -> np.ndarray:
    return (np.random.RandomState(seed).randn(int(seconds * rate)) * 0.1).astype(np.float32)


def _wav_file(path: Path, wave: np.ndarray, rate: int = 16000) -> Path:
    sf.write(path, wave, rate, format="WAV", subtype="FLOAT")  # lossless, so file == array
    return path


# ---------------------------------------------------------------------------------------------- inference
def test_caption_same_for_pil_path_and_tensors(model, tmp_path):
    img = _image(0)
    path = tmp_path / "a.png"
    path.write_bytes(_png(img))
    normalised = inference.image_transform(model)(img, None)  # (3, 32, 32)
    raw = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # uint8 (3, H, W)
    from_pil = mmstory.caption(model, img, **DECODE)
    assert len(from_pil) == 1
    assert mmstory.caption(model, str(path), **DECODE) == from_pil
    assert mmstory.caption(model, path, **DECODE) == from_pil
    assert mmstory.caption(model, normalised, **DECODE) == from_pil
    assert mmstory.caption(model, raw, **DECODE) == from_pil
    # batched, in chunks of one, equals one by one
    other = _image(1)
    assert mmstory.caption(model, [img, other], batch_size=1, **DECODE) == from_pil + mmstory.caption(model, other, **DECODE)


def test_answer_with_image_audio_and_both(model, tmp_path):
    img, wave = _image(0), _wave(0)
    ans = mmstory.answer(model, image=img, question="what is shown?", **DECODE)
    assert isinstance(ans, str)
    expected = model.generate({"image": inference.prepare_images(model, img)}, "question: what is shown? answer:",
                              **DECODE)[0].strip()
    assert ans == expected
    from_array = mmstory.answer(model, audio=wave, question="what is said?", **DECODE)
    assert isinstance(from_array, str)
    assert mmstory.answer(model, audio=_wav_file(tmp_path / "a.wav", wave), question="what is said?", **DECODE) == from_array
    # a clip at another rate is resampled to the encoder's
    assert isinstance(mmstory.answer(model, audio=_wave(0, rate=8000), sample_rate=8000, question="what?", **DECODE), str)
    both = mmstory.answer(model, image=img, audio=wave, question=["what is shown?", "which category is this?"], **DECODE)
    assert isinstance(both, list) and len(both) == 2


def test_retrieve_ranking_is_sorted_cosine_similarity(model):
    images = [_image(i) for i in range(5)]
    texts = ["a cat", "a red heart", "sun", "two birds", "a tree", "keycap: 0"]
    sim = mmstory.embed_images(model, images) @ mmstory.embed_texts(model, texts).T  # (5, 6)
    for i, img in enumerate(images):
        matches = mmstory.retrieve(model, img, texts, k=3)
        assert [m.index for m in matches] == sim[i].argsort(descending=True)[:3].tolist()
        assert [m.item for m in matches] == [texts[m.index] for m in matches]
        assert matches[0].score == pytest.approx(sim[i].max().item(), abs=1e-5)
    # text -> image, several queries at once
    per_query = mmstory.retrieve(model, texts[:2], images, k=10)
    assert [[m.index for m in ms] for ms in per_query] == sim[:, :2].T.argsort(dim=1, descending=True).tolist()
    # a known answer: an image is its own nearest neighbour, with cosine 1
    best = mmstory.retrieve(model, images[3], images, k=1, gallery_modality="image")[0]
    assert best.index == 3 and best.score == pytest.approx(1.0, abs=1e-5)


def test_audio_text_retrieval(model):
    waves = [_wave(i, seconds=0.3 + 0.1 * i) for i in range(3)]
    sim = mmstory.embed_audio(model, waves) @ mmstory.embed_texts(model, ["a", "bb", "ccc"]).T
    got = mmstory.retrieve(model, ["a", "bb", "ccc"], waves, k=3, gallery_modality="audio")
    assert [[m.index for m in ms] for ms in got] == sim.T.argsort(dim=1, descending=True).tolist()


def test_zero_shot_is_argmax_over_averaged_template_embeddings(model):
    images = [_image(i) for i in range(4)]
    classes = ["cat", "red heart", "sun"]
    templates = ("an emoji of a {}.", "{}", "a photo of {}")
    out = mmstory.zero_shot_classify(model, images, classes, templates)
    per_template = torch.stack([F.normalize(mmstory.embed_texts(model, [t.format(c) for c in classes]), dim=-1)
                                for t in templates])  # (T, C, E)
    reference = F.normalize(per_template.mean(0), dim=-1)
    expected = mmstory.embed_images(model, images) @ reference.T
    torch.testing.assert_close(out.scores, expected, atol=1e-5, rtol=1e-5)
    assert out.indices.tolist() == expected.argmax(1).tolist()
    assert out.labels == [classes[i] for i in expected.argmax(1).tolist()]


def test_clear_errors(model, tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        mmstory.caption(model, str(missing))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="broken.png"):
        mmstory.caption(model, bad)
    with pytest.raises(FileNotFoundError, match="gone.wav"):
        mmstory.answer(model, audio=str(tmp_path / "gone.wav"), question="what?")
    with pytest.raises(ValueError, match="empty gallery"):
        mmstory.retrieve(model, "a cat", [], k=3)
    with pytest.raises(ValueError, match="normalised"):
        mmstory.caption(model, torch.zeros(3, 17, 17))  # a float tensor must already be model input
    torch.manual_seed(0)
    no_audio = build_model(tiny_config(audio=False))
    with pytest.raises(ValueError, match="no audio encoder"):
        mmstory.answer(no_audio, audio=_wave(0), question="what?")


# ---------------------------------------------------------------------------------------------- evaluation
def _write_shards(folder: Path) -> tuple[str, str, list[Image.Image]]:
    """Five image samples and three audio samples in the bundled emoji schema."""
    import webdataset as wds

    labels = ["cat face", "red heart", "sun", "tree", "cat face"]
    images = [_image(10 + i, size=(64, 64)) for i in range(len(labels))]
    image_tar, audio_tar = str(folder / "img-000000.tar"), str(folder / "aud-000000.tar")

    def meta(label: str, group: str) -> dict:
        return {"captions": [label, f"an emoji of a {label}"], "captions_zh": [label],
                "qa": [{"question": "what is shown?", "answers": [label], "type": "what"},
                       {"question": f"is this in the {group} category?", "answers": ["yes"], "type": "yesno"}],
                "labels": {"label": label, "group": group, "subgroup": group}, "concept": label, "style": "noto"}

    with wds.TarWriter(image_tar) as w:
        for i, (label, img) in enumerate(zip(labels, images)):
            w.write({"__key__": f"s{i:03d}", "png": _png(img), "json": json.dumps(meta(label, "things")).encode()})
    with wds.TarWriter(audio_tar) as w:
        for i, label in enumerate(labels[:3]):
            buf = io.BytesIO()
            sf.write(buf, _wave(20 + i), 16000, format="FLAC")
            w.write({"__key__": f"a{i:03d}", "flac": buf.getvalue(),
                     "json": json.dumps(meta(label, "sounds")).encode()})
    return image_tar, audio_tar, images


def test_evaluate_tiny_shards_and_report(model, tmp_path):
    image_tar, audio_tar, images = _write_shards(tmp_path)
    res = evaluate(model, [image_tar], decode=DecodeOptions(**DECODE), batch_size=2, data=DataConfig(workers=0),
                   progress=False)
    assert res["num_samples"] == 5 and res["modalities"] == ["image"]
    m = res["metrics"]
    assert set(m) == set(EVAL_TASKS) | {"image_dependence", "baselines"}
    assert set(m["caption"]) >= {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert m["qa"]["num_questions"] == 10 and set(m["qa"]["per_type"]) == {"what", "yesno"}
    assert set(m["retrieval"]["image_to_text"]) == {"R@1", "R@5", "R@10"}
    assert m["retrieval"]["num_texts"] == 8  # the two "cat face" samples share their 2 captions: 8 distinct texts
    assert m["retrieval"]["image_to_text"]["R@10"] == 1.0  # every positive is in the top 10 of 8
    assert m["zeroshot"]["num_classes"] == 4 and 0.0 <= m["zeroshot"]["top1"] <= m["zeroshot"]["top5"] == 1.0
    # inference equals evaluation: the same file through model.caption / model.answer gives the same text
    first = res["predictions"][0]
    assert first["caption"] == mmstory.caption(model, images[0], **DECODE)[0]
    assert first["qa"][0]["prediction"] == mmstory.answer(model, image=images[0], question="what is shown?", **DECODE)
    # zero-shot predictions agree with the API over the split's labels
    classes = sorted({p["label"] for p in res["predictions"]})
    api = mmstory.zero_shot_classify(model, images, classes)
    assert [p["zeroshot"] for p in res["predictions"]] == api.labels
    assert all(isinstance(v, float) for v in summary(res).values())

    report = write_report(res, tmp_path / "report", images=4)
    assert report.read_text().count("images/") == 4
    assert f"what is shown? → **{_md(first['qa'][0]['prediction'])}** /" in report.read_text()
    # questions that were not asked (captions only, as in the report's fit on training images) are not listed
    captions_only = evaluate(model, [image_tar], tasks=("caption",), decode=DecodeOptions(**DECODE),
                             data=DataConfig(workers=0), meteor=False, progress=False, diagnostics=False)
    assert "→" not in write_report(captions_only, tmp_path / "captions_only").read_text()
    assert (tmp_path / "report" / "grid.png").is_file()
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["metrics"]["qa"]["overall"] == m["qa"]["overall"]
    assert len((tmp_path / "report" / "predictions.jsonl").read_text().splitlines()) == 5

    audio = evaluate(model, audio_tar, tasks=("caption", "retrieval"), decode=DecodeOptions(**DECODE),
                     data=DataConfig(workers=0), meteor=False, progress=False)
    assert audio["modalities"] == ["audio"]
    assert set(audio["metrics"]) == {"caption", "retrieval", "image_dependence", "baselines"}
    assert set(audio["metrics"]["retrieval"]) >= {"audio_to_text", "text_to_audio"}
    write_report(audio, tmp_path / "audio_report")
    assert (tmp_path / "audio_report" / "report.md").is_file()


def test_evaluate_bundled_val_novel(model, tmp_path):
    from mmstory.data.manifest import load_manifest

    manifest = load_manifest(ROOT / "data_manifests" / "emoji.json")
    split = manifest.split("val_novel")
    if not all(Path(u).is_file() for u in split.urls):
        pytest.skip("bundled emoji shards not present")
    res = evaluate(model, split, max_samples=16, batch_size=8, decode=DecodeOptions(max_new_tokens=4),
                   data=DataConfig(workers=0), meteor=False, progress=False)
    assert res["num_samples"] == 16 and res["split"] == "val_novel"
    assert set(res["metrics"]) == set(EVAL_TASKS) | {"image_dependence", "baselines"}
    assert {"overall", "per_type"} <= set(res["metrics"]["qa"])
    assert {"top1", "top5"} <= set(res["metrics"]["zeroshot"])
    write_report(res, tmp_path)
    assert (tmp_path / "grid.png").is_file()


# ---------------------------------------------------------------------------------------------- commands
def test_commands(checkpoint, model, tmp_path, capsys):
    image_tar, _, images = _write_shards(tmp_path)
    folder = tmp_path / "gallery"
    folder.mkdir()
    for i, img in enumerate(images[:3]):
        (folder / f"{i}.png").write_bytes(_png(img))
    first = str(folder / "0.png")

    assert main(["caption", first, str(folder / "1.png"), "--checkpoint", checkpoint, "--max-new-tokens", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{first}\t{mmstory.caption(model, images[0], **DECODE)[0]}" and len(lines) == 2

    assert main(["ask", first, "what is shown?", "--checkpoint", checkpoint, "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == mmstory.answer(model, image=images[0], question="what is shown?", **DECODE)

    assert main(["retrieve", "--checkpoint", checkpoint, "--query", "a cat", "--images", str(folder), "-k", "3"]) == 0
    ranked = [line.split("\t")[2] for line in capsys.readouterr().out.splitlines()]
    assert ranked == [m.item for m in mmstory.retrieve(model, "a cat", sorted(str(p) for p in folder.iterdir()), k=3)]

    texts = tmp_path / "texts.txt"
    texts.write_text("a cat\na red heart\nthe sun\n")
    assert main(["retrieve", "--checkpoint", checkpoint, "--query-image", first, "--texts", str(texts)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3

    out = tmp_path / "eval"
    assert main(["eval", checkpoint, "--data", image_tar, "--out", str(out), "--max-samples", "3", "--workers", "0",
                 "--max-new-tokens", "4", "--beams", "2", "--tasks", "caption,qa,zeroshot", "--quiet"]) == 0
    assert json.loads((out / "metrics.json").read_text())["data"]["num_samples"] == 3
    assert (out / "data" / "report.md").is_file()

    capsys.readouterr()
    assert main(["caption", str(tmp_path / "missing.png"), "--checkpoint", checkpoint]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing.png'}: no such file\n"


def test_eval_command_puts_baselines_beside_the_model(checkpoint, tmp_path, capsys):
    """mmstory eval on a manifest: nearest-neighbour baselines from --reference and the image-dependence
    diagnostics beside the model's numbers, on screen and in metrics.json; a reference split the manifest lacks
    is named."""
    manifest = str(ROOT / "data_manifests/emoji.json")
    out = tmp_path / "eval"
    assert main(["eval", checkpoint, "--data", manifest, "--split", "val_style", "--reference", "val_style",
                 "--out", str(out), "--max-samples", "6", "--workers", "0", "--max-new-tokens", "4",
                 "--tasks", "caption", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| caption CIDEr |" in printed and "pixel NN" in printed
    metrics = json.loads((out / "metrics.json").read_text())["val_style"]["metrics"]
    # the reference is the evaluated split itself: each image's nearest neighbour is itself, so the pixel
    # baseline names every label it can
    assert metrics["baselines"]["pixel_nn"]["caption"]["label_accuracy"] == 1.0
    assert "caption_loss_shuffled" in metrics["image_dependence"]
    assert main(["eval", checkpoint, "--data", manifest, "--split", "val_style", "--reference", "nope", "--quiet"]) == 2
    assert "no split 'nope'" in capsys.readouterr().err


def test_answer_fuses_the_question_as_the_model_was_trained(tmp_path, monkeypatch):
    """A model trained with data.loader.fuse_question records it in its config; answer() and evaluate()
    then fuse the question by default, and an explicit argument still wins."""
    cfg = tiny_config()
    cfg.fuse_question = True
    build_model(cfg).save(tmp_path / "fused")
    fused = mmstory.load(tmp_path / "fused")
    assert fused.config.fuse_question is True
    seen = []
    real = inference.generate_text

    def spy(model, inputs, prompts, **kw):
        seen.append(kw.get("fuse_question"))
        return real(model, inputs, prompts, **kw)

    monkeypatch.setattr(inference, "generate_text", spy)
    mmstory.answer(fused, image=_image(0), question="is this red?", **DECODE)
    mmstory.answer(fused, image=_image(0), question="is this red?", fuse_question=False, **DECODE)
    assert seen == [["is this red?"], None]
    assert inference.fuses_question(build_model(tiny_config())) is False
