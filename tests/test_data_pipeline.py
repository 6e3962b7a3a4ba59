"""The webdataset pipeline on small shards written here: batch format, DDP/worker coverage, exact
resume, seeding, bad data, resampled and mixed streams."""
from __future__ import annotations

import io
import os
import warnings
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch
import webdataset as wds
from PIL import Image

from mmstory.config import DataConfig
from mmstory.data.collate import collate
from mmstory.data.loader import build_loader, build_mixed_loader
from mmstory.prompts import decoder_sequence
from mmstory.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
COLORS = ["red", "green", "blue", "yellow", "purple"]


def png_bytes(color: tuple[int, int, int, int], size=(24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, color).save(buf, format="PNG")
    return buf.getvalue()


def flac_bytes(seconds: float, sr: int = 8000) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(seconds * sr)) / sr
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr, format="FLAC")
    return buf.getvalue()


def write_shards(folder, n_shards: int, per_shard, *, prefix="img", audio=False) -> list[str]:
    """Shards of image samples (captions on all, QA on even ones) or audio samples (json captions)."""
    urls = []
    sizes = per_shard if isinstance(per_shard, list) else [per_shard] * n_shards
    for s, n in enumerate(sizes):
        path = os.path.join(folder, f"{prefix}-{s:06d}.tar")
        with wds.TarWriter(path) as w:
            for i in range(n):
                color = COLORS[(s + i) % len(COLORS)]
                meta = {"captions": [f"a {color} dot {s} {i}", f"{color} round thing"], "concept": color}
                sample = {"__key__": f"{prefix}{s:02d}_{i:03d}"}
                if audio:
                    sample["flac"] = flac_bytes(0.5 if i % 2 else 3.0)
                else:
                    rgba = ((s * 40) % 256, (i * 30) % 256, 100, 255 if i % 3 else 0)
                    sample["png"] = png_bytes(rgba)
                    if i % 2 == 0:
                        meta["qa"] = [{"question": "what color is it?", "answers": [color, color, "other"],
                                       "type": "color"}]
                sample["json"] = meta
                w.write(sample)
        urls.append(path)
    return urls


def cfg(**kw) -> DataConfig:
    base = dict(image_size=16, batch_size=4, workers=0, shuffle_buffer=8, audio_seconds=1.0)
    base.update(kw)
    return DataConfig(**base)


def keys(batches) -> list[str]:
    return [k for b in batches for k in b["__key__"]]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["__key__"] == y["__key__"]
        assert x["task"] == y["task"] and x["prompt"] == y["prompt"]
        for name in ("image", "audio", "tokens", "text_ids", "target_mask"):
            if name in x:
                assert torch.equal(x[name], y[name]), name


# ---------------------------------------------------------------------------------------------- format
def test_batch_format_and_masks(tmp_path):
    urls = write_shards(tmp_path, 2, 6)
    loader = build_loader(urls, cfg(fuse_question=True), tokenizer=TOK, train=True)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    b = batches[0]
    B = len(b["__key__"])
    assert b["image"].shape == (B, 3, 16, 16) and b["image"].dtype == torch.float32
    assert "audio" not in b and "image_mask" not in b
    for ids, mask in (("text_ids", "text_mask"), ("tokens", "tokens_mask"), ("question_ids", "question_mask")):
        assert b[ids].dtype == torch.long and b[mask].dtype == torch.bool and b[ids].shape == b[mask].shape
    assert b["target_mask"].shape == b["tokens"].shape and b["target_mask"].dtype == torch.bool
    assert b["tokens"].shape[1] <= 48 and b["text_ids"].shape[1] <= 32
    for i in range(B):
        task, prompt, meta = b["task"][i], b["prompt"][i], b["meta"][i]
        assert task in ("caption", "qa")
        if task == "qa":
            assert prompt == "question: what color is it? answer:"
            assert b["references"][i] == meta["qa"][0]["answers"]
            assert TOK.decode(b["question_ids"][i][b["question_mask"][i]]) == "what color is it?"
        else:
            assert prompt == "caption:" and b["references"][i] == meta["captions"]
            assert TOK.decode(b["question_ids"][i][b["question_mask"][i]]) == ""
        # decoder tokens: [bos] prompt " target" [eos]; the mask sum is the true length
        toks = b["tokens"][i][b["tokens_mask"][i]].tolist()
        assert toks[0] == TOK.bos_id and toks[-1] == TOK.eos_id
        assert b["tokens_mask"][i].sum() == len(toks)
        assert not b["tokens_mask"][i][len(toks):].any()
        assert (b["tokens"][i][len(toks):] == TOK.pad_id).all()
        head = 1 + len(TOK.encode(prompt))
        assert TOK.decode(toks[1:head]) == prompt
        # the scored prompt tokens are the question's, never the template's ("question:", "answer:", "caption:")
        filled = TOK.decode(b["tokens"][i][b["prompt_filled_mask"][i]].tolist())
        assert filled == (" what color is it?" if task == "qa" else "")
        # target_mask covers exactly the target tokens and the final eos
        target = b["tokens"][i][b["target_mask"][i]].tolist()
        assert b["target_mask"][i].nonzero().flatten().tolist() == list(range(head, len(toks)))
        assert target[-1] == TOK.eos_id and TOK.decode(target).strip() in b["references"][i]
        # contrastive caption: one of the sample's captions, [bos] .. [eos]
        text = b["text_ids"][i][b["text_mask"][i]].tolist()
        assert text[0] == TOK.bos_id and text[-1] == TOK.eos_id and TOK.decode(text) in meta["captions"]
    loader.report(print_fn=lambda s: None)
    assert loader.stats["samples"] == 12 and loader.stats["batches"] == 3


def test_eval_is_deterministic_first_caption_and_white_background(tmp_path):
    urls = write_shards(tmp_path, 1, 3)
    b = next(iter(build_loader(urls, cfg(tasks={"caption": 1.0}), tokenizer=TOK, train=False)))
    assert b["__key__"] == ["img00_000", "img00_001", "img00_002"]  # eval: file order, no shuffle
    texts = [TOK.decode(t[m]) for t, m in zip(b["text_ids"], b["text_mask"])]
    assert texts == [f"a {COLORS[i]} dot 0 {i}" for i in range(3)]
    # sample 0 is fully transparent: composited on white, so every normalised pixel is (1 - .5) / .5
    assert torch.allclose(b["image"][0], torch.ones(3, 16, 16), atol=1e-5)


def test_audio_samples(tmp_path):
    urls = write_shards(tmp_path, 1, 4, prefix="aud", audio=True)
    b = next(iter(build_loader(urls, cfg(), tokenizer=TOK, train=False)))
    T = 16000
    assert b["audio"].shape == (4, T) and b["audio"].dtype == torch.float32
    assert b["audio_mask"].dtype == torch.bool and "image" not in b
    # 3 s clips fill the 1 s window; 0.5 s clips at 8 kHz are resampled to 8000 samples at 16 kHz
    assert b["audio_mask"].sum(1).tolist() == [T, 8000, T, 8000]
    assert (b["audio"][1, 8000:] == 0).all()
    assert b["task"] == ["caption"] * 4 and b["prompt"] == ["caption:"] * 4


def test_collate_standalone():
    samples = [{"__key__": "a", "image": torch.zeros(3, 8, 8), "caption": "hi", "question": "", "task": "caption",
                "prompt": "caption:", "target": "a cat", "references": ["a cat"], "meta": {}},
               {"__key__": "b", "audio": torch.ones(10), "audio_mask": torch.ones(10, dtype=torch.bool),
                "caption": "", "question": "q?", "task": "qa", "prompt": "question: q? answer:",
                "target": "yes", "references": ["yes"], "meta": {}}]
    b = collate(samples, TOK, max_tokens=64)
    assert b["image_mask"].tolist() == [True, False] and b["audio_mask"].sum(1).tolist() == [0, 10]
    for i, s in enumerate(samples):
        ids, head = decoder_sequence(TOK, s["prompt"], s["target"], 64)
        assert b["tokens_mask"][i].sum() == len(ids) and b["target_mask"][i].sum() == len(ids) - head
        assert TOK.decode(b["tokens"][i][b["target_mask"][i]]) == " " + s["target"]
    ids, head = decoder_sequence(TOK, "caption:", "x" * 100, 20)  # cut: target first, eos kept
    assert len(ids) == 20 and ids[-1] == TOK.eos_id and head == 1 + len("caption:")


# ---------------------------------------------------------------------------------------------- sharding
def test_ranks_and_workers_cover_each_sample_once(tmp_path):
    urls = write_shards(tmp_path, 6, [5, 3, 4, 6, 2, 5])
    seen = Counter()
    for rank in range(2):
        loader = build_loader(urls, cfg(workers=2), tokenizer=TOK, rank=rank, world_size=2, epoch=3)
        batches = list(loader)
        assert len(batches) == len(loader)
        seen.update(keys(batches))
    expected = {f"img{s:02d}_{i:03d}" for s, n in enumerate([5, 3, 4, 6, 2, 5]) for i in range(n)}
    assert set(seen) == expected and set(seen.values()) == {1}


def test_resume_equals_tail_of_full_run(tmp_path):
    # uneven shards, so one worker runs out before the other and the resume plan must account for it
    urls = write_shards(tmp_path, 3, [9, 7, 14])
    c = cfg(workers=2, batch_size=3)
    full = list(build_loader(urls, c, tokenizer=TOK, epoch=1))
    assert len(full) == 11
    for k in (3, 8):
        resumed = list(build_loader(urls, c, tokenizer=TOK, epoch=1, skip_batches=k))
        assert_same_batches(resumed, full[k:])


def test_workers_share_shards_when_they_outnumber_them(tmp_path):
    """A rank with fewer shards than workers (3 shards, 8 workers): worker w reads shard w % 3, every
    k-th sample from offset w // 3, so no worker idles and each sample is read once."""
    from mmstory.data.loader import epoch_shards

    parts = [epoch_shards(["a", "b", "c"], seed=0, epoch=0, shuffle=False, rank=0, world_size=1, worker=w,
                          num_workers=8) for w in range(8)]
    assert parts == [[("a", 3, 0)], [("b", 3, 0)], [("c", 2, 0)], [("a", 3, 1)], [("b", 3, 1)],
                     [("c", 2, 1)], [("a", 3, 2)], [("b", 3, 2)]]
    assert epoch_shards(["a", "b", "c"], seed=0, epoch=0, shuffle=False, rank=0, world_size=1, worker=1,
                        num_workers=2) == [("b", 1, 0)]  # enough shards: whole shards, as before


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 5 workers on a 2-core CI machine
def test_more_workers_than_shards_cover_each_sample_once_and_resume(tmp_path):
    urls = write_shards(tmp_path, 2, [9, 7])
    c = cfg(workers=5, batch_size=2)
    loader = build_loader(urls, c, tokenizer=TOK, epoch=1)
    assert all(n > 0 for n in loader._batches_per_worker())  # no idle worker
    full = list(loader)
    assert len(full) == len(loader)
    seen = Counter(keys(full))
    assert set(seen) == {f"img{s:02d}_{i:03d}" for s, n in enumerate([9, 7]) for i in range(n)}
    assert set(seen.values()) == {1}
    for k in (3, 6):
        assert_same_batches(list(build_loader(urls, c, tokenizer=TOK, epoch=1, skip_batches=k)), full[k:])


def test_resume_resampled(tmp_path):
    urls = write_shards(tmp_path, 2, 5)
    c = cfg(workers=2, resampled=True)
    full = [b for _, b in zip(range(9), build_loader(urls, c, tokenizer=TOK))]
    resumed = [b for _, b in zip(range(4), build_loader(urls, c, tokenizer=TOK, skip_batches=5))]
    assert_same_batches(resumed, full[5:])


def test_seed_controls_order(tmp_path):
    urls = write_shards(tmp_path, 4, 6)
    run = lambda seed: list(build_loader(urls, cfg(workers=2, seed=seed), tokenizer=TOK))
    a, b, c = run(0), run(0), run(1)
    assert_same_batches(a, b)
    assert keys(a) != keys(c) and sorted(keys(a)) == sorted(keys(c))


def test_resampled_streams_past_one_epoch(tmp_path):
    urls = write_shards(tmp_path, 2, 5)
    loader = build_loader(urls, cfg(resampled=True, workers=2), tokenizer=TOK)
    with pytest.raises(TypeError):
        len(loader)
    got = keys(b for _, b in zip(range(8), loader))
    assert len(got) == 32 > 10 and max(Counter(got).values()) > 1


# ---------------------------------------------------------------------------------------------- bad data
def test_bad_data_is_skipped_with_warning_and_count(tmp_path):
    good = write_shards(tmp_path, 1, 4)
    bad = os.path.join(tmp_path, "bad-000000.tar")
    with wds.TarWriter(bad) as w:
        w.write({"__key__": "corrupt_img", "png": b"\x89PNG not really", "json": {"captions": ["x"]}})
        w.write({"__key__": "bad_audio", "flac": b"nope", "json": {"captions": ["x"]}})
        w.write({"__key__": "no_input", "json": {"captions": ["x"]}})
        w.write({"__key__": "no_text", "png": png_bytes((1, 2, 3, 255)), "json": {"labels": {}}})
        w.write({"__key__": "fine", "png": png_bytes((1, 2, 3, 255)), "txt": "an img2dataset caption"})
    truncated = write_shards(tmp_path, 1, 6, prefix="trunc")[0]
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    urls = good + [bad, truncated]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(build_loader(urls, cfg(), tokenizer=TOK, train=False))
    messages = [str(w.message) for w in caught]
    assert any("bad-000000.tar" in m and "corrupt_img" in m and "bad_image" in m for m in messages)
    assert any("trunc-000000.tar" in m and "truncated_shard" in m for m in messages)
    got = keys(batches)
    assert "fine" in got and not {"corrupt_img", "bad_audio", "no_input", "no_text"} & set(got)
    fine = [b for b in batches if "fine" in b["__key__"]][0]
    assert fine["references"][fine["__key__"].index("fine")] == ["an img2dataset caption"]

    # the same counts come back from worker processes
    loader = build_loader(urls, cfg(workers=2), tokenizer=TOK)
    n = len(keys(loader))
    stats = loader.stats
    assert stats["bad/bad_image"] == stats["bad/bad_audio"] == stats["bad/missing_input"] == 1
    assert stats["bad/missing_text"] == stats["bad/truncated_shard"] == 1
    assert stats["samples"] == n == 4 + 1 + sum(k.startswith("trunc") for k in got)
    assert "truncated_shard=1" in loader.report(print_fn=lambda s: None)


# ---------------------------------------------------------------------------------------------- mixing, manifest
def test_mixed_image_audio_stream(tmp_path):
    img = write_shards(tmp_path, 2, 6)
    aud = write_shards(tmp_path, 1, 8, prefix="aud", audio=True)
    c = cfg(workers=0)
    mixed = lambda skip=0: build_mixed_loader({"image": img, "audio": aud}, {"image": 3.0, "audio": 1.0}, c,
                                              tokenizer=TOK, skip_batches=skip)
    full = list(mixed())
    assert len(full) == len(mixed()) == 5
    assert all(("image" in b) != ("audio" in b) for b in full)
    assert sorted(keys(full)) == sorted([f"img{s:02d}_{i:03d}" for s in range(2) for i in range(6)]
                                        + [f"aud00_{i:03d}" for i in range(8)])
    assert_same_batches(list(mixed()), full)
    assert_same_batches(list(mixed(skip=2)), full[2:])


def test_manifest_split_input(tmp_path):
    manifest = pytest.importorskip("mmstory.data.manifest")
    urls = write_shards(tmp_path, 3, [4, 5, 3])
    split = manifest.SplitInfo("train", [manifest.ShardInfo(u, n) for u, n in zip(urls, [4, 5, 3])], 12)
    loader = build_loader(split, cfg(workers=2), tokenizer=TOK)
    batches = list(loader)
    assert len(loader) == len(batches) and len(keys(batches)) == 12


def test_mixer_weights_interleave_epochs_and_set_shares_when_resampled():
    """Epoch mode: every batch of each source once per epoch, so the share is the batch counts'
    whatever the weights. Resampled (unbounded) sources: the weights are the shares."""
    import math
    from itertools import islice

    from mmstory.data.loader import MixedLoader

    mixer = MixedLoader({"image": None, "audio": None}, {"image": 3.0, "audio": 1.0})
    epoch = list(mixer._choices({"image": 41, "audio": 20}))
    assert Counter(epoch) == {"image": 41, "audio": 20}
    assert Counter(epoch[:40])["image"] > 25  # interleaved by weight while both have batches
    draws = Counter(islice(mixer._choices({"image": math.inf, "audio": math.inf}), 4000))
    assert abs(draws["image"] / 4000 - 0.75) < 0.03


def test_subsample_keeps_a_fixed_spread_out_subset_chosen_by_key(tmp_path):
    """subsample N keeps the samples whose key hashes to 0 mod N: the same ones on every pass and with any
    number of workers (the fit sample and leave-one-out evaluations rely on it)."""
    from mmstory.data.loader import stable_seed

    urls = write_shards(tmp_path, 2, 40)
    everything = keys(build_loader(urls, cfg(workers=0), tokenizer=TOK, train=False))
    wanted = sorted(k for k in everything if stable_seed("subsample", k) % 4 == 0)
    first = keys(build_loader(urls, cfg(subsample=4, workers=0), tokenizer=TOK, train=False))
    again = keys(build_loader(urls, cfg(subsample=4, workers=2), tokenizer=TOK, train=False))
    assert sorted(first) == sorted(again) == wanted and 8 <= len(wanted) <= 32
    with pytest.raises(ValueError, match="subsample must be >= 1"):
        cfg(subsample=0)
