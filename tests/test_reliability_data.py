"""Bad data never runs, hangs or silently changes a result (issue 20): pipe: shards, splits that yield
nothing, shards shorter than their manifest, 16-bit PNGs, NaN and very short audio, samples missing a part."""
from __future__ import annotations

import io
import json
import threading
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import webdataset as wds
from PIL import Image

import mmstory
from mmstory.data.manifest import ManifestError, load_manifest, verify
from mmstory.data.loader import EmptySplitError, build_loader, build_mixed_loader
from test_data_pipeline import TOK, cfg, flac_bytes, png_bytes, write_shards


def manifest_for(folder: Path, splits: dict[str, list], name="m") -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"format_version": 1, "name": name,
                                "splits": {k: {"shards": v} for k, v in splits.items()}}))
    return path


def drain(loader, seconds: float = 60.0) -> list:
    """Iterate in a thread with a deadline, so a hang fails the test instead of stalling the suite."""
    out: dict = {}

    def run():
        try:
            out["batches"] = list(loader)
        except BaseException as e:  # handed to the test thread
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"iteration did not end within {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["batches"]


# ------------------------------------------------------------------------------------------------ pipe:
def test_a_manifest_cannot_run_a_shell_command(tmp_path, monkeypatch):
    monkeypatch.delenv("MMSTORY_ALLOW_PIPE", raising=False)
    good = write_shards(tmp_path, 1, 4)[0]
    pwned = tmp_path / "pwned"
    path = manifest_for(tmp_path, {"train": [f"pipe:touch {pwned}; cat {good}"]})
    with pytest.raises(ManifestError, match=r"split 'train': shard 'pipe:touch .*' would run a shell command; .*"
                                            r"mmstory --allow-pipe"):
        load_manifest(path)
    # shard lists handed to the loader directly, and the verifier's reader, refuse too
    with pytest.raises(ManifestError, match="would run a shell command"):
        build_loader([f"pipe:touch {pwned}; cat {good}"], cfg(), tokenizer=TOK)
    from mmstory.data.manifest import ShardInfo, verify_shard

    for decode in (True, False):
        res = verify_shard(ShardInfo(f"pipe:touch {pwned}; cat {good}"), decode=decode)
        assert res["samples"] == 0 and "would run a shell command" in " ".join(res["errors"])
    from mmstory.cli import main

    assert main(["data", "verify", str(path), "--no-decode", "--quiet"]) != 0
    assert not pwned.exists()
    # the user's explicit opt-in: the same manifest reads through the shell, in worker processes too
    monkeypatch.setenv("MMSTORY_ALLOW_PIPE", "1")
    m = load_manifest(path)
    assert sum(len(b["__key__"]) for b in drain(build_loader(m.split("train"), cfg(workers=2), tokenizer=TOK))) == 4
    assert pwned.exists()


@pytest.mark.parametrize("url", ["PIPE:touch {p}; cat {g}", " pipe:;touch {p}; cat {g}", "pi\tpe:touch {p}; cat {g}",
                                 "\x00pipe:;touch {p}; cat {g}"])
def test_pipe_urls_are_refused_however_they_are_spelt(tmp_path, monkeypatch, url):
    """gopen finds the scheme with urllib, which lower-cases it and drops leading blanks, control characters,
    tabs and newlines: each of these would reach gopen_pipe (and, under python -O, a shell)."""
    from mmstory.data.manifest import _open_stream
    from mmstory.data.shards import check_url, iter_tar
    from mmstory.data.stats import WorkerStats

    monkeypatch.delenv("MMSTORY_ALLOW_PIPE", raising=False)
    pwned = tmp_path / "pwned"
    url = url.format(p=pwned, g=write_shards(tmp_path, 1, 2)[0])
    for refuse in (check_url, _open_stream, lambda u: list(iter_tar(u, WorkerStats(None, 0, 0))),
                   lambda u: build_loader([u], cfg(), tokenizer=TOK)):
        with pytest.raises(ManifestError, match="would run a shell command; pipe: shards run only when you allow"):
            refuse(url)
    assert not pwned.exists()


def test_schemes_that_run_no_shell_are_allowed(tmp_path, monkeypatch):
    from mmstory.data.shards import check_url

    monkeypatch.delenv("MMSTORY_ALLOW_PIPE", raising=False)
    for url in ("/data/a.tar", "rel/a.tar", "file:///data/a.tar", "http://host/a.tar", "https://host/a.tar",
                "gs://bucket/a.tar", "hf://datasets/x/a.tar", "/data/pipe:a.tar"):
        check_url(url)  # gopen opens these itself or runs curl/gsutil with the URL as one argument
    with pytest.raises(ManifestError, match="standard input"):
        check_url("-")


# ------------------------------------------------------------------------------------------------ empty splits
@pytest.mark.parametrize("resampled", [False, True])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_split_with_no_readable_shard_stops_naming_it(tmp_path, resampled, workers):
    """It used to loop over empty epochs forever; now the first pass raises, naming the split."""
    (tmp_path / "a.tar").write_bytes(b"not a tar file at all" * 50)
    (tmp_path / "b.tar").write_bytes(b"")
    path = manifest_for(tmp_path, {"train": ["a.tar", "b.tar"]})
    split = load_manifest(path).split("train")
    loader = build_loader(split, cfg(workers=workers, resampled=resampled), tokenizer=TOK)
    with pytest.raises(EmptySplitError, match=r"split 'train' \(2 shards\) gave no samples: bad data: .*_shard=\d+"
                                              r".*mmstory data verify .*m\.json --split train") as e:
        drain(loader)
    assert "Traceback" not in str(e.value) and "\n" not in str(e.value)
    # the trainer's mixed loader: one broken source stops the run, named, though the other one reads
    good = write_shards(tmp_path, 1, 8)
    mixed = build_mixed_loader({"image": good, "audio": split}, {"image": 1.0, "audio": 1.0},
                               cfg(workers=workers, resampled=resampled), tokenizer=TOK)
    with pytest.raises(EmptySplitError, match="split 'train'"):
        drain(mixed) if not resampled else drain(x for _, x in zip(range(200), mixed))
    # a source given as a shard list is named by its key in the mix
    mixed = build_mixed_loader({"image": good, "audio": split.urls}, {"image": 1.0, "audio": 1.0},
                               cfg(workers=workers, resampled=resampled), tokenizer=TOK, name="train")
    with pytest.raises(EmptySplitError, match="split 'train/audio' \\(2 shards\\)"):
        drain(mixed) if not resampled else drain(x for _, x in zip(range(200), mixed))


# ------------------------------------------------------------------------------------------------ counts
def test_a_shard_shorter_than_its_manifest_is_counted(tmp_path):
    urls = write_shards(tmp_path, 2, 6)
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"format_version": 1, "splits": {"val": {"shards": [
        {"path": urls[0], "samples": 6}, {"path": urls[1], "samples": 9}]}}}))
    loader = build_loader(load_manifest(path).split("val"), cfg(workers=2), tokenizer=TOK, train=False)
    batches = drain(loader)
    assert sum(len(b["__key__"]) for b in batches) == 12
    assert loader.stats["bad/short_shard"] == 1 and loader.stats["missing_samples"] == 3
    assert "3 samples the manifest counts were not in their shards" in loader.report(print_fn=lambda s: None)
    # one shard read by two workers (each takes every other sample): counted once, by the worker at offset 0
    loader = build_loader([SimpleNamespace(url=urls[1], samples=9)], cfg(workers=2), tokenizer=TOK, train=False)
    assert sum(len(b["__key__"]) for b in drain(loader)) == 6
    assert loader.stats["bad/short_shard"] == 1 and loader.stats["missing_samples"] == 3


def test_check_shards_names_every_bad_shard(tmp_path):
    from mmstory.data.manifest import check_shards

    urls = write_shards(tmp_path, 3, 2)
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"format_version": 1, "splits": {"train": {"shards": [
        {"path": urls[0], "bytes": 10}, {"path": urls[1]}, {"path": str(tmp_path / "gone.tar")}]}}}))
    with pytest.raises(ManifestError, match=r"m\.json: split 'train': 2 of 3 shards are not as the manifest says: "
                                            r"shard .*img-000000.tar: size mismatch .*; shard .*gone.tar: file is "
                                            r"missing \(mmstory data verify .*m\.json --split train reads every"):
        check_shards(load_manifest(path).split("train"))
    path.write_text(json.dumps({"format_version": 1, "splits": {"train": {"shards": [f"gone-{i}.tar" for i in range(25)]}}}))
    with pytest.raises(ManifestError, match=r"25 of 25 shards .*gone-19.tar: file is missing; and 5 more shards \("):
        check_shards(load_manifest(path).split("train"))


def test_evaluation_results_report_what_was_skipped(tmp_path):
    """A truncated shard and an undecodable sample are in evaluate()'s results and the report it writes."""
    from conftest import tiny_config
    from mmstory.evaluate import evaluate, write_report
    from mmstory.model import build_model

    urls = write_shards(tmp_path, 1, 6)
    with wds.TarWriter(str(tmp_path / "bad.tar")) as w:
        w.write({"__key__": "broken", "png": b"\x89PNG not really", "json": {"captions": ["x"]}})
        w.write({"__key__": "fine", "png": png_bytes((9, 9, 9, 255)), "json": {"captions": ["a dot"]}})
    data = Path(urls[0]).read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    model = build_model(tiny_config(audio=False))
    res = evaluate(model, [str(tmp_path / "bad.tar"), str(tmp_path / "cut.tar")], tasks=("caption",),
                   decode=__import__("mmstory.generation", fromlist=["DecodeOptions"]).DecodeOptions(max_new_tokens=2),
                   data=cfg(), progress=False, diagnostics=False, meteor=False)
    assert res["data"]["skipped"] == {"bad_image": 1, "truncated_shard": 1}
    assert res["data"]["samples_read"] == res["num_samples"] >= 1
    write_report(res, tmp_path / "report")
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["data"]["skipped"]["bad_image"] == 1
    assert "**Data skipped while reading**" in (tmp_path / "report" / "report.md").read_text()


# ------------------------------------------------------------------------------------------------ images
def gradient_png16(tmp_path: Path) -> tuple[Path, np.ndarray]:
    values = np.tile(np.linspace(0, 65535, 32).round().astype(np.uint16), (8, 1))  # (8, 32) dark -> bright
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)  # a 16-bit greyscale PNG
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    return path, (values / 257.0).round().astype(np.uint8)


def test_a_16bit_greyscale_png_decodes_to_its_8bit_gradient(tmp_path):
    from mmstory.data.converters import load_image
    from mmstory.data.transforms import decode_image
    from mmstory.inference import to_pil

    path, want = gradient_png16(tmp_path)
    for img in (decode_image(path.read_bytes()), to_pil(path), to_pil(Image.open(path))):
        got = np.asarray(img)
        assert img.mode == "RGB" and np.abs(got[..., 0].astype(int) - want).max() <= 1
        assert (got[..., 0] == got[..., 1]).all() and got.mean() < 200  # grey, not all white
    ext, data = load_image(path, resize=4)  # re-encoded by a converter
    small = np.asarray(decode_image(data))
    assert ext == "png" and small[..., 0].min() < 60 and small[..., 0].max() > 190


def test_a_float_image_decodes_by_its_range_not_clipped(tmp_path):
    """PIL's "F" mode (float TIFF): 0-1 maps to black-white, as float pixels do in inference."""
    from mmstory.data.converters import load_image
    from mmstory.data.transforms import decode_image
    from mmstory.inference import to_pil

    values = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (8, 1))
    path = tmp_path / "float.tif"
    Image.fromarray(values, "F").save(path)
    want = (values * 255).round()
    for img in (decode_image(path.read_bytes()), to_pil(path), to_pil(Image.fromarray(values, "F")),
                decode_image(load_image(path)[1])):
        assert img.mode == "RGB" and np.abs(np.asarray(img)[..., 0] - want).max() <= 1


# ------------------------------------------------------------------------------------------------ audio
def wav_bytes(wave: np.ndarray, sr: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave.astype(np.float32), sr, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def _nan_wave():
    wave = np.sin(np.linspace(0, 100, 8000))
    wave[100] = np.nan
    return wave


@pytest.mark.parametrize("name, wave, file_error, wave_error", [
    ("nan", _nan_wave(), "ValueError: 1 of 8000 samples are not finite", "not finite"),
    ("empty", np.zeros(0), "ValueError: empty audio", "non-empty 1-D array"),
])
def test_bad_audio_is_a_bad_sample_and_a_user_error_naming_the_file(tmp_path, name, wave, file_error, wave_error):
    """NaN and empty audio: a UserError naming the file (files) or the problem (waveforms) in inference, a
    problem found by verify's check_sample, and a bad_audio sample counted and skipped by the loader."""
    from mmstory.data.manifest import check_sample
    from mmstory.errors import UserError
    from mmstory.inference import load_waveform

    clip = tmp_path / f"{name}.wav"
    clip.write_bytes(wav_bytes(wave))
    reason = file_error.split(": ", 1)[1]
    with pytest.raises(UserError, match=rf"cannot read audio {clip}: {file_error}"):
        load_waveform(str(clip), 16000)
    with pytest.raises(UserError, match=wave_error):
        load_waveform(torch.tensor(wave, dtype=torch.float32), 16000)
    assert reason in check_sample({"wav": clip.read_bytes(), "json": b'{"captions": ["x"]}'})
    with wds.TarWriter(str(tmp_path / "a.tar")) as w:
        w.write({"__key__": name, "wav": clip.read_bytes(), "json": {"captions": ["a beep"]}})
        w.write({"__key__": "ok", "flac": flac_bytes(0.5), "json": {"captions": ["a tone"]}})
    loader = build_loader([str(tmp_path / "a.tar")], cfg(), tokenizer=TOK, train=False)
    with pytest.warns(RuntimeWarning, match=f"skipping bad_audio: shard .*a.tar key {name}: .*{reason}"):
        batches = drain(loader)
    assert [k for b in batches for k in b["__key__"]] == ["ok"] and loader.stats["bad/bad_audio"] == 1


@pytest.mark.parametrize("n", [1, 100, 200, 201, 400])
def test_the_mel_front_end_takes_clips_of_any_length(n):
    from mmstory.encoders.audio import AudioTransformerEncoder

    enc = AudioTransformerEncoder(width=32, depth=1, heads=2, n_mels=16, max_seconds=1.0).eval()
    with torch.no_grad():
        out = enc(torch.randn(2, n) * 0.1)
    assert torch.isfinite(out.tokens).all() and out.mask[:, 0].all() and out.mask[:, 1].all()


# ------------------------------------------------------------------------------------------------ verify
def test_verify_flags_samples_missing_their_json_or_their_image(tmp_path):
    with wds.TarWriter(str(tmp_path / "a.tar")) as w:
        w.write({"__key__": "whole", "png": png_bytes((1, 2, 3, 255)), "json": {"captions": ["x"]}})
        w.write({"__key__": "nojson", "png": png_bytes((1, 2, 3, 255))})
        w.write({"__key__": "nopng", "json": {"captions": ["x"]}})
        w.write({"__key__": "audio", "flac": flac_bytes(0.2), "json": {"captions": ["x"]}})
    path = manifest_for(tmp_path, {"train": ["a.tar"]})
    for decode in (True, False):
        report = verify(load_manifest(path), decode=decode, progress=False)
        bad = {b["key"]: b["reason"] for b in report["bad_samples"]}
        assert not report["ok"] and set(bad) == {"nojson", "nopng"}
        assert bad["nojson"].startswith("no json or text file") and bad["nopng"].startswith("no image or audio file")


def test_answer_refuses_an_empty_question(tiny_model):
    from mmstory.errors import UserError

    image = np.zeros((16, 16, 3), dtype=np.uint8)
    for question in ("", "   ", ["what is it?", " "]):
        with pytest.raises(UserError, match="the question is empty"):
            mmstory.answer(tiny_model, image=image, question=question)
