"""Converters, shard writer, manifests and ``data verify`` on tiny fixtures in the real formats."""
from __future__ import annotations

import csv
import io
import json
import logging
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile
import webdataset as wds
from PIL import Image

from mmstory.data import cli
from mmstory.data.converters import (convert_audio_captions, convert_coco_captions, convert_image_folder,
                                     convert_vqa)
from mmstory.data.manifest import ManifestError, check_shards, load_manifest, verify, write_counts
from mmstory.data.writer import write_manifest, write_shards


# ---------------------------------------------------------------------------------------- fixtures

def make_image(path: Path, color: tuple[int, int, int], fmt: str = "PNG", size=(8, 6)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path.read_bytes()


def make_wav(path: Path, freq: float = 440.0, rate: int = 16000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(rate // 10) / rate
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, subtype="PCM_16")


def read_samples(manifest_path: Path, split: str) -> dict[str, dict]:
    urls = load_manifest(manifest_path).split(split).urls
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def sha_list(manifest_path: Path) -> list[str]:
    m = load_manifest(manifest_path)
    return [s.sha256 for split in m.splits.values() for s in split.shards]


# ---------------------------------------------------------------------------------------- converters

def test_image_folder_csv_merges_rows_and_keeps_bytes(tmp_path):
    images = tmp_path / "imgs"
    red = make_image(images / "red.png", (255, 0, 0))
    blue = make_image(images / "sub" / "blue.jpg", (0, 0, 255), "JPEG")
    write_csv(tmp_path / "caps.csv", ["image", "caption"],
              [["red.png", "a red square"], ["sub/blue.jpg", "a blue square"], ["red.png", "red"]])
    res = convert_image_folder(images, tmp_path / "caps.csv", tmp_path / "out", progress=False)
    samples = read_samples(res.manifest, "train")
    assert set(samples) == {"red", "sub_blue"}
    assert samples["red"]["png"] == red and samples["sub_blue"]["jpg"] == blue
    assert json.loads(samples["red"]["json"])["captions"] == ["a red square", "red"]
    assert res.counts["written"] == 2


def test_image_folder_jsonl_and_corrupt_image_skipped(tmp_path, caplog):
    images = tmp_path / "imgs"
    make_image(images / "a.png", (1, 2, 3))
    make_image(images / "b.png", (4, 5, 6))
    (images / "bad.png").write_bytes(make_image(images / "tmp.png", (9, 9, 9))[:40])  # truncated PNG
    lines = [{"image": "a.png", "caption": "first"}, {"file_name": "b.png", "captions": ["x", "y"]},
             {"image": "bad.png", "caption": "broken"}, {"image": "gone.png", "caption": "missing"}]
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    with caplog.at_level(logging.WARNING):
        res = convert_image_folder(images, tmp_path / "caps.jsonl", tmp_path / "out", split="val", progress=False)
    assert "bad.png" in caplog.text and "gone.png" in caplog.text
    assert res.counts["bad_image"] == 1 and res.counts["missing"] == 1 and res.counts["written"] == 2
    samples = read_samples(res.manifest, "val")
    assert json.loads(samples["b"]["json"])["captions"] == ["x", "y"] and set(samples) == {"a", "b"}


def test_image_folder_resize(tmp_path):
    make_image(tmp_path / "big.png", (10, 200, 30), size=(64, 32))
    write_csv(tmp_path / "caps.csv", ["file_name", "caption"], [["big.png", "green"]])
    res = convert_image_folder(tmp_path, tmp_path / "caps.csv", tmp_path / "out", resize=16, progress=False)
    sample = read_samples(res.manifest, "train")["big"]
    assert Image.open(io.BytesIO(sample["png"])).size == (32, 16)


def _karpathy_fixture(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "coco"
    blobs = {}
    entries = []
    for i, split in enumerate(["train", "restval", "val", "test"]):
        sub = "train2014" if split in ("train", "restval") else "val2014"
        fname = f"COCO_{sub}_{i:012d}.jpg"
        blobs[fname] = make_image(root / sub / fname, (i * 60, 10, 10), "JPEG")
        entries.append({"filepath": sub, "filename": fname, "imgid": i, "cocoid": i, "split": split,
                        "sentids": [2 * i, 2 * i + 1],
                        "sentences": [{"raw": f"caption {i} a ", "tokens": ["caption"], "imgid": i, "sentid": 2 * i},
                                      {"raw": f"caption {i} b", "tokens": ["caption"], "imgid": i, "sentid": 2 * i + 1}]})
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path, blobs


def test_karpathy_splits_restval_to_train_and_deterministic(tmp_path):
    ann, blobs = _karpathy_fixture(tmp_path)
    res = convert_coco_captions(ann, tmp_path / "coco", tmp_path / "out", max_samples=1, progress=False)
    m = load_manifest(res.manifest)
    assert set(m.splits) == {"train", "val", "test"}
    assert m.split("train").samples == 2 and len(m.split("train").shards) == 2  # restval joined, rolled at 1
    train = read_samples(res.manifest, "train")
    assert json.loads(train["COCO_train2014_000000000001"]["json"])["captions"] == ["caption 1 a", "caption 1 b"]
    assert train["COCO_train2014_000000000000"]["jpg"] == blobs["COCO_train2014_000000000000.jpg"]
    first = sha_list(res.manifest)
    res2 = convert_coco_captions(ann, tmp_path / "coco", tmp_path / "out2", max_samples=1, progress=False)
    assert sha_list(res2.manifest) == first  # byte-identical on a re-run


def test_coco_captions_format(tmp_path):
    root = tmp_path / "val2014"
    blob = make_image(root / "COCO_val2014_000000000042.jpg", (0, 128, 0), "JPEG")
    ann = {"images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "width": 8, "height": 6},
                      {"id": 7, "file_name": "COCO_val2014_000000000007.jpg"}],  # no captions: not a sample
           "annotations": [{"id": 1, "image_id": 42, "caption": "A green box."},
                           {"id": 2, "image_id": 42, "caption": "Green."}]}
    (tmp_path / "captions_val2014.json").write_text(json.dumps(ann))
    res = convert_coco_captions(tmp_path / "captions_val2014.json", root, tmp_path / "out", split="val",
                                progress=False)
    samples = read_samples(res.manifest, "val")
    assert list(samples) == ["COCO_val2014_000000000042"]
    meta = json.loads(samples["COCO_val2014_000000000042"]["json"])
    assert meta["captions"] == ["A green box.", "Green."] and meta["image_id"] == 42
    assert samples["COCO_val2014_000000000042"]["jpg"] == blob


def test_vqa_groups_questions_per_image_and_test_without_annotations(tmp_path):
    root = tmp_path / "val2014"
    for image_id in (1, 2):
        make_image(root / f"COCO_val2014_{image_id:012d}.jpg", (image_id * 50, 0, 0), "JPEG")
    questions = {"data_subtype": "val2014", "task_type": "Open-Ended", "data_type": "mscoco",
                 "questions": [{"image_id": 1, "question": "What color?", "question_id": 10},
                               {"image_id": 2, "question": "Is it red?", "question_id": 20},
                               {"image_id": 1, "question": "How many?", "question_id": 11}]}
    answers = [f"ans{k}" for k in range(10)]

    def ann(qid, image_id, atype):
        return {"question_id": qid, "image_id": image_id, "question_type": "what", "answer_type": atype,
                "multiple_choice_answer": "ans0",
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)]}

    annotations = {"annotations": [ann(10, 1, "other"), ann(11, 1, "number"), ann(20, 2, "yes/no")]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    res = convert_vqa(tmp_path / "q.json", tmp_path / "a.json", root, tmp_path / "out", progress=False)
    samples = read_samples(res.manifest, "val")  # split from data_subtype
    qa = json.loads(samples["COCO_val2014_000000000001"]["json"])["qa"]
    assert [q["question"] for q in qa] == ["What color?", "How many?"]
    assert qa[0]["answers"] == answers and qa[1]["type"] == "number"

    res = convert_vqa(tmp_path / "q.json", None, root, tmp_path / "out", split="test", progress=False)
    test = read_samples(res.manifest, "test")
    assert json.loads(test["COCO_val2014_000000000002"]["json"])["qa"][0]["answers"] == []
    assert set(load_manifest(res.manifest).splits) == {"val", "test"}  # second split merged in


def test_audiocaps_and_clotho(tmp_path):
    audio = tmp_path / "audio"
    make_wav(audio / "abc123.wav", 440)
    make_wav(audio / "555.wav", 660)  # found by audiocap_id
    write_csv(tmp_path / "audiocaps.csv", ["audiocap_id", "youtube_id", "start_time", "caption"],
              [[1, "abc123", 30, "a dog barks"], [2, "abc123", 30, "barking"], [555, "zzz", 0, "a tone"],
               [9, "missing1", 0, "gone"]])
    res = convert_audio_captions(audio, tmp_path / "audiocaps.csv", tmp_path / "ac", progress=False)
    samples = read_samples(res.manifest, "train")
    meta = json.loads(samples["abc123_30"]["json"])
    assert meta["captions"] == ["a dog barks", "barking"] and meta["audiocap_ids"] == [1, 2]
    wav, rate = soundfile.read(io.BytesIO(samples["zzz_0"]["wav"]))
    assert rate == 16000 and len(wav) == 1600
    assert res.counts["missing"] == 1

    make_wav(audio / "Rain on a roof.wav", 300)
    write_csv(tmp_path / "clotho.csv", ["file_name"] + [f"caption_{i}" for i in range(1, 6)],
              [["Rain on a roof.wav"] + [f"rain {i}" for i in range(1, 6)]])
    res = convert_audio_captions(audio, tmp_path / "clotho.csv", tmp_path / "clotho", split="val", progress=False)
    sample = read_samples(res.manifest, "val")["Rain_on_a_roof"]
    assert json.loads(sample["json"])["captions"] == [f"rain {i}" for i in range(1, 6)]
    assert sample["wav"] == (audio / "Rain on a roof.wav").read_bytes()


# ---------------------------------------------------------------------------------------- manifests

def _tiny_dataset(tmp_path: Path, n: int = 5, per_shard: int = 2) -> Path:
    samples = [{"__key__": f"s{i:03d}", "png": make_image(tmp_path / "src" / f"{i}.png", (i, i, i)),
                "json": {"captions": [f"gray {i}"]}} for i in range(n)]
    out = tmp_path / "ds"
    shards = write_shards(samples, out, "train", max_samples=per_shard)
    return write_manifest(out / "manifest.json", "tiny", {"train": shards}, {"png": {"description": "gray"}})


def test_load_manifest_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format_version": 1, "splitz": {}}))
    with pytest.raises(ValueError, match=r"bad\.json.*'splitz'"):
        load_manifest(bad)
    bad.write_text(json.dumps({"format_version": 1, "name": "x"}))
    with pytest.raises(ValueError, match=r"bad\.json.*missing required key 'splits'"):
        load_manifest(bad)
    m = load_manifest(_tiny_dataset(tmp_path))
    with pytest.raises(KeyError, match="valid splits: train"):
        m.split("validation")


def test_pattern_split_and_write_counts(tmp_path):
    path = _tiny_dataset(tmp_path)
    pattern = path.parent / "pattern.json"
    pattern.write_text(json.dumps({"format_version": 1, "name": "p", "build": "see test",
                                   "splits": {"train": {"samples": None, "pattern": "train-{000000..000002}.tar"},
                                              "later": {"samples": None, "pattern": "later-*.tar"}}}))
    m = load_manifest(pattern)
    assert [Path(u).name for u in m.split("train").urls] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert m.split("later").shards == []  # nothing built yet: an empty glob, reported by verify
    with pytest.raises(ManifestError, match="matched no files"):
        check_shards(m.split("later"))
    write_counts(m)
    assert json.loads(pattern.read_text())["splits"]["later"] == {"samples": None, "pattern": "later-*.tar"}
    filled = load_manifest(pattern)
    assert filled.split("train").samples == 5 and all(s.sha256 and s.bytes for s in filled.split("train").shards)
    assert sha_list(pattern) == sha_list(path)
    check_shards(filled.split("train"), sha256=True)


def test_check_shards_names_changed_shard(tmp_path):
    m = load_manifest(_tiny_dataset(tmp_path))
    shard = Path(m.split("train").shards[1].url)
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    check_shards(m.split("train"))  # the start-of-run check: sizes only, no checksums unless asked
    with pytest.raises(ManifestError, match=r"shard .*train-000001\.tar: sha256 mismatch \(expected \w+…, got \w+…\)"):
        check_shards(m.split("train"), sha256=True)
    shard.unlink()
    with pytest.raises(ManifestError, match=r"train-000001\.tar: file is missing"):
        check_shards(m.split("train"))


def test_verify_reports_truncated_tar_and_bad_sample(tmp_path):
    m = load_manifest(_tiny_dataset(tmp_path))
    assert verify(m, progress=False)["ok"]
    shard = Path(m.split("train").shards[0].url)
    shard.write_bytes(shard.read_bytes()[:1000])  # cut mid-way through the first sample
    # a decodable tar whose image is corrupt: rewrite shard 2 with a broken PNG, keeping the manifest's old sha
    third = Path(m.split("train").shards[2].url)
    with tarfile.open(third, "w") as tar:
        for name, data in [("s004.png", b"not a png"), ("s004.json", b'{"captions": ["x"]}')]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    report = verify(m, progress=False)
    assert not report["ok"]
    assert any("train-000000.tar" in e and ("unreadable" in e or "size mismatch" in e) for e in report["errors"])
    assert [(b["key"], b["reason"].split(":")[0]) for b in report["bad_samples"]] == [("s004", "png")]


def test_verify_counts_the_samples_the_loader_reads(tmp_path):
    """The verifier and the loader group a tar's files into samples with the same code (data/shards.py): on a
    shard cut anywhere, and on one with files that are no sample (a dot file in a folder, a name without a
    dot), they count the same samples."""
    from mmstory.data.manifest import ShardInfo, verify_shard
    from mmstory.data.shards import iter_tar
    from mmstory.data.stats import WorkerStats

    shard = Path(load_manifest(_tiny_dataset(tmp_path, n=4, per_shard=4)).split("train").urls[0])
    with tarfile.open(shard, "a") as tar:
        for name in ("d/._s004.png", "README"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    whole = shard.read_bytes()
    cut = tmp_path / "cut.tar"
    for end in range(len(whole), 0, -317):
        cut.write_bytes(whole[:end])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the loader's warning about the cut shard
            read = len(list(iter_tar(str(cut), WorkerStats(None, 0, 0))))
        assert verify_shard(ShardInfo(str(cut)), decode=False)["samples"] == read, end
        assert read == 4 or end < len(whole)


def test_cli_verify_summary_and_failure(tmp_path, capsys):
    path = _tiny_dataset(tmp_path)
    assert cli.main(["data", "verify", str(path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("verified 1 split, 3 shards, 5 samples, 0 bad, ")
    assert out.strip().endswith(": OK")
    Path(load_manifest(path).split("train").shards[0].url).unlink()
    assert cli.main(["verify", str(path), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "train-000000.tar: file is missing" in out and out.strip().endswith(": FAILED")
    assert cli.main(["verify", str(path), "--split", "nope", "--quiet"]) == 1
    assert "valid splits: train" in capsys.readouterr().err


def test_cli_build_image_folder(tmp_path, capsys):
    make_image(tmp_path / "imgs" / "a.png", (1, 1, 1))
    write_csv(tmp_path / "caps.csv", ["image", "caption"], [["a.png", "dark"]])
    rc = cli.main(["data", "build", "image-folder", str(tmp_path / "imgs"), str(tmp_path / "caps.csv"),
                   str(tmp_path / "out"), "--name", "mine", "--quiet"])
    assert rc == 0 and "train: 1 samples in 1 shard(s)" in capsys.readouterr().out
    assert load_manifest(tmp_path / "out" / "manifest.json").name == "mine"
    assert cli.main(["data", "verify", str(tmp_path / "out" / "manifest.json"), "--quiet"]) == 0
