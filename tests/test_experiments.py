"""``experiments/*.yaml``: each loads and builds its model; each public-dataset experiment (and the GPU
emoji config) trains 2 steps through ``mmstory train`` on a tiny fixture written in the dataset's real
format and converted as its manifest's ``build`` says; the fusion-ablation arms cannot drift apart."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from conftest import TINY_ENCODER_ARGS
from mmstory.config import ConfigError, load_config, load_yaml
from mmstory.data.converters import convert_audio_captions, convert_coco_captions, convert_vqa
from mmstory.data.manifest import load_manifest
from mmstory.encoders import PretrainedLoadError
from mmstory.model import build_model
from mmstory.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))
ABLATION = ["emoji_fusion_concat", "emoji_fusion_weighted", "emoji_fusion_cross_attention"]


def experiment(name: str) -> Path:
    return ROOT / "experiments" / f"{name}.yaml"


def header(path: Path) -> str:
    """The leading comment block of a config file."""
    lines = path.read_text().splitlines()
    return "\n".join(ln for ln in lines[: next(i for i, ln in enumerate(lines) if not ln.startswith("#"))])


def random_init_overrides(cfg: TrainConfig) -> list[str]:
    """Overrides that replace pretrained weights (hub downloads) by random initialisation."""
    out = [f"--model.encoders.{m}.args.pretrained=null" for m, c in cfg.model.encoders.items()
           if c.args.get("pretrained")]
    if cfg.model.decoder.pretrained:
        out.append("--model.decoder.pretrained=null")
    return out


# ------------------------------------------------------------------------------------------- load + build
def test_every_experiment_is_collected():
    names = {p.stem for p in EXPERIMENTS}
    assert {"emoji_tiny", "coco_captioning", "cc3m_coca_pretrain", "vqav2_finetune", "audiocaps_clotho",
            "emoji_vit_s_gpu", "emoji_tiny_image_only", *ABLATION} <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_loads_and_builds(path):
    assert header(path).count("\n") >= 2, f"{path.name}: needs a header comment (what, data, hardware, time)"
    cfg = load_config(TrainConfig, path)
    overrides = random_init_overrides(cfg)
    if overrides:
        # Offline (tests set HF_HUB_OFFLINE) the hub weights are unreachable: the error must be ours and
        # name the model; then the same architecture builds with random weights.
        names = [c.args.get("model_name", c.args.get("path", "")) for c in cfg.model.encoders.values()
                 if c.args.get("pretrained")]
        try:
            build_model(cfg.model)
        except PretrainedLoadError as e:
            assert any(n and f"'{n}'" in str(e) for n in names), str(e)
        cfg = load_config(TrainConfig, path, overrides)
    model = build_model(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert set(model.encoders) == set(cfg.model.encoders)

    manifest = ROOT / cfg.data.manifest
    splits = set(cfg.data.train.values()) | set(cfg.data.val)
    assert set(cfg.data.weights) == set(cfg.data.train), "data.weights must weigh exactly the data.train sources"
    if manifest.is_file():
        assert splits <= set(load_manifest(manifest).splits), (splits, manifest)
    else:  # built by the user into this folder: the header must say how
        assert "mmstory data build" in header(path) and str(manifest.parent.relative_to(ROOT)) in header(path)


def test_unknown_key_in_an_experiment_fails_naming_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(experiment("coco_captioning").read_text().replace("eval_every:", "eval_evry:"))
    with pytest.raises(ConfigError, match="unknown config key 'eval_evry'"):
        load_config(TrainConfig, bad)


def test_vit_s_gpu_config_is_what_it_says():
    cfg = load_config(TrainConfig, experiment("emoji_vit_s_gpu"))
    image = cfg.model.encoders["image"]
    assert image.name == "vit" and {k: image.args[k] for k in ("width", "depth", "heads", "patch_size", "image_size")} \
        == {"width": 384, "depth": 12, "heads": 6, "patch_size": 8, "image_size": 64}
    assert (cfg.precision, cfg.data.loader.batch_size, cfg.device) == ("bf16", 256, "cuda")
    tiny = load_config(TrainConfig, experiment("emoji_tiny"))
    assert cfg.model.decoder.dim > tiny.model.decoder.dim and cfg.model.decoder.depth > tiny.model.decoder.depth
    assert cfg.model.encoders["text"].args["width"] > tiny.model.encoders["text"].args["width"]


def test_fusion_ablation_arms_differ_only_in_the_fusion():
    """Full copies by design (no includes), so this test is what keeps them equal: each arm is
    emoji_tiny with another fusion (the question fused in every arm, as in the main job), and no fixed run name."""
    tiny = load_yaml(experiment("emoji_tiny"))
    arms = {name: load_yaml(experiment(name)) for name in ABLATION}
    fusions = {}
    for name, arm in arms.items():
        fusions[name] = arm["model"].pop("fusion")
        assert arm["data"]["loader"]["fuse_question"] is True, name
        assert "name" not in arm, f"{name}: leave the name out so the run is named after the file"
    assert arms["emoji_fusion_concat"] == arms["emoji_fusion_weighted"] == arms["emoji_fusion_cross_attention"]
    base = {k: v for k, v in tiny.items() if k != "name"}
    base["model"] = {k: v for k, v in base["model"].items() if k != "fusion"}
    assert arms["emoji_fusion_concat"] == base, "the ablation arms drifted from experiments/emoji_tiny.yaml"
    assert [f["name"] for f in fusions.values()] == ["concat", "weighted", "cross_attention"]
    assert fusions["emoji_fusion_concat"] == tiny["model"]["fusion"]


def test_image_only_arm_is_the_main_job_without_audio_data():
    tiny, arm = load_yaml(experiment("emoji_tiny")), load_yaml(experiment("emoji_tiny_image_only"))
    # the clips' retrieval and the media dropout it needs (a clip's answer goes on its retrieved caption alone) are
    # the audio side's: without clips the arm keeps the image recipe they were measured against
    for key in ("audio", "media_dropout"):
        tiny["model"]["retrieval"].pop(key)
    assert arm.pop("data") == {**tiny.pop("data"), "train": {"image": "train"}, "weights": {"image": 1.0},
                               "val": ["val_style", "val_novel"]}
    assert "name" not in arm and {k: v for k, v in tiny.items() if k != "name"} == arm


# ------------------------------------------------------------------------------------------- tiny runs
def tiny_overrides(path: Path, manifest: Path | str, out_dir: Path) -> list[str]:
    """Shrink any experiment to a seconds-long CPU run: 2 steps, batch 4, 32-wide components."""
    cfg = load_config(TrainConfig, path)
    over = [f"--data.manifest={manifest}", f"--out_dir={out_dir}", "--steps=2", "--final_eval=false",
            "--device=cpu", "--precision=fp32", "--threads=1", "--log_every=1", "--ckpt_every=2",
            "--eval_every=0", "--eval_batches=1", "--optim.warmup_steps=1",
            "--data.loader.batch_size=4", "--data.loader.workers=0", "--data.loader.shuffle_buffer=8",
            "--data.loader.pin_memory=false", "--data.loader.audio_seconds=1.0",
            "--model.dim=32", "--model.embed_dim=16", "--model.decoder.dim=32", "--model.decoder.depth=1",
            "--model.decoder.heads=2", *random_init_overrides(cfg)]
    for modality, comp in cfg.model.encoders.items():
        for key, value in TINY_ENCODER_ARGS[comp.name].items():
            if key not in ("max_len", "max_seconds"):  # keep the config's; inputs are short anyway
                over.append(f"--model.encoders.{modality}.args.{key}={value}")
    for key, value in {"heads": 2, "num_latents": 4, "depth": 1}.items():
        if key in cfg.model.fusion.args:
            over.append(f"--model.fusion.args.{key}={value}")
    return over


def run_train(path: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmstory.cli", "train", str(path), *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})


def assert_trained(res: subprocess.CompletedProcess, out_dir: Path, steps: int = 2) -> list[dict]:
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    rows = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "lr" in r]
    assert [r["step"] for r in train_rows] == list(range(1, steps + 1))
    assert all(np.isfinite(r["loss"]) for r in train_rows)
    assert any(k.startswith("val/") for r in rows for k in r), "no validation losses logged"
    assert (out_dir / "model" / "model.safetensors").is_file()
    return train_rows


def make_image(path: Path, seed: int, size=(40, 32)) -> None:
    """A small noisy JPEG (real COCO files are JPEGs; noise so crops differ)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def make_wav(path: Path, freq: float, rate: int = 16000, seconds: float = 1.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(rate * seconds)) / rate
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, subtype="PCM_16")


def write_csv(path: Path, header_row: list[str], rows: list[list]) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header_row)
        writer.writerows(rows)


def test_coco_captioning_tiny_run(tmp_path):
    """Karpathy dataset_coco.json + COCO image folders -> ``mmstory data build coco`` -> 2 steps."""
    images, entries = tmp_path / "coco", []
    for i, split in enumerate(["train", "train", "restval", "train", "val", "val", "test"]):
        sub = "val2014" if split in ("val", "test", "restval") else "train2014"
        name = f"COCO_{sub}_{i:012d}.jpg"
        make_image(images / sub / name, i)
        entries.append({"filepath": sub, "filename": name, "imgid": i, "cocoid": 1000 + i, "split": split,
                        "sentids": [5 * i + k for k in range(5)],
                        "sentences": [{"raw": f"A photo number {i} of thing {k}.", "tokens": [], "imgid": i,
                                       "sentid": 5 * i + k} for k in range(5)]})
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    res = convert_coco_captions(tmp_path / "dataset_coco.json", images, tmp_path / "coco_karpathy",
                                name="coco_karpathy", progress=False)
    real = load_manifest(ROOT / "data_manifests/coco_karpathy.json")
    assert set(load_manifest(res.manifest).splits) == set(real.splits)  # the build gives the real split names
    path, out = experiment("coco_captioning"), tmp_path / "run"
    assert_trained(run_train(path, tiny_overrides(path, res.manifest, out)), out)


def write_img2dataset_shard(folder: Path, shard: int, captions: list[str]) -> None:
    """What ``img2dataset --output_format webdataset`` writes: NNNNN.tar with {key}.jpg/.txt/.json per
    successful download, plus NNNNN_stats.json and NNNNN.parquet beside it (which are not shards)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
        for i, caption in enumerate(captions):
            key = f"{shard:05d}{i:04d}"
            buf = io.BytesIO()
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
            meta = {"url": f"http://example.com/{key}.jpg", "caption": caption, "key": key, "status": "success",
                    "error_message": None, "width": 48, "height": 32, "original_width": 480,
                    "original_height": 320, "exif": "{}", "sha256": "0" * 64}
            for ext, data in [("jpg", buf.getvalue()), ("txt", caption.encode()), ("json", json.dumps(meta).encode())]:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(captions), "successes": len(captions)}))
    (folder / f"{shard:05d}.parquet").write_bytes(b"PAR1")


def test_cc3m_coca_pretrain_tiny_run(tmp_path):
    """img2dataset webdataset output (no 'captions' in the json: the caption is the .txt) read through a
    copy of data_manifests/cc3m.json whose brace ranges are narrowed to the shards the fixture has."""
    write_img2dataset_shard(tmp_path / "cc3m/train", 0, [f"a drawing of object {i}" for i in range(6)])
    write_img2dataset_shard(tmp_path / "cc3m/val", 0, [f"a view of place {i}" for i in range(4)])
    raw = json.loads((ROOT / "data_manifests/cc3m.json").read_text())
    for split in raw["splits"].values():
        split["pattern"] = split["pattern"].split("{")[0] + "{00000..00000}.tar"
    manifest = tmp_path / "cc3m.json"
    manifest.write_text(json.dumps(raw))
    path, out = experiment("cc3m_coca_pretrain"), tmp_path / "run"
    rows = assert_trained(run_train(path, tiny_overrides(path, manifest, out)), out)
    assert all("contrastive_image_text_loss" in r and "caption_loss" in r for r in rows)


def test_vqav2_finetune_tiny_run(tmp_path):
    """VQA v2 questions + annotations JSON and COCO image folders -> ``mmstory data build vqa`` (train
    and val, merged into one manifest) -> 2 steps of QA with the question fused."""
    out_data = tmp_path / "vqav2"
    for subtype, ids in [("train2014", [1, 2, 3]), ("val2014", [7, 8])]:
        for image_id in ids:
            make_image(tmp_path / subtype / f"COCO_{subtype}_{image_id:012d}.jpg", image_id)
        questions = [{"image_id": i, "question": q, "question_id": i * 10 + k}
                     for i in ids for k, q in enumerate(["What color is it?", "Is it big?"])]
        annotations = [{"question_id": q["question_id"], "image_id": q["image_id"], "question_type": "what",
                        "answer_type": "other", "multiple_choice_answer": "red",
                        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": n + 1}
                                    for n, a in enumerate(["red"] * 7 + ["blue"] * 3)]} for q in questions]
        (tmp_path / f"q_{subtype}.json").write_text(json.dumps(
            {"data_subtype": subtype, "task_type": "Open-Ended", "data_type": "mscoco", "questions": questions}))
        (tmp_path / f"a_{subtype}.json").write_text(json.dumps({"annotations": annotations}))
        res = convert_vqa(tmp_path / f"q_{subtype}.json", tmp_path / f"a_{subtype}.json", tmp_path / subtype,
                          out_data, name="vqav2", progress=False)
    assert {"train", "val"} <= set(load_manifest(res.manifest).splits)
    path, out = experiment("vqav2_finetune"), tmp_path / "run"
    assert_trained(run_train(path, tiny_overrides(path, res.manifest, out)), out)


def test_audiocaps_clotho_tiny_run(tmp_path):
    """AudioCaps and Clotho captions CSVs + clip folders -> ``mmstory data build audio-csv`` into one
    folder with the split names the config's header gives -> 2 steps of audio captioning + retrieval."""
    path = experiment("audiocaps_clotho")
    cfg = load_config(TrainConfig, path)
    splits = [*cfg.data.train.values(), *cfg.data.val]
    for split in splits:
        assert f"--split {split} " in header(path), f"header build commands do not write split {split}"
    out_data = tmp_path / "audio_captions"
    for split in splits:
        clips = tmp_path / split
        if split.startswith("audiocaps"):
            rows = []
            for i in range(3):
                make_wav(clips / f"yt{split}{i}.wav", 300 + 100 * i)
                rows += [[10 * i + k, f"yt{split}{i}", 30, f"a machine hums at pitch {i} ({k})"] for k in range(2)]
            write_csv(tmp_path / f"{split}.csv", ["audiocap_id", "youtube_id", "start_time", "caption"], rows)
        else:  # Clotho: 44.1 kHz clips with spaces in the names, five captions each
            for i in range(3):
                make_wav(clips / f"rain on roof {i}.wav", 500 + 50 * i, rate=44100, seconds=1.5)
            write_csv(tmp_path / f"{split}.csv", ["file_name"] + [f"caption_{k}" for k in range(1, 6)],
                      [[f"rain on roof {i}.wav"] + [f"rain falls softly {i} {k}" for k in range(5)]
                       for i in range(3)])
        res = convert_audio_captions(clips, tmp_path / f"{split}.csv", out_data, split=split,
                                     name="audio_captions", progress=False)
        assert res.counts["written"] == 3
    assert set(load_manifest(res.manifest).splits) == set(splits)
    out = tmp_path / "run"
    rows = assert_trained(run_train(path, tiny_overrides(path, res.manifest, out)), out)
    assert all("contrastive_audio_text_loss" in r for r in rows)


@pytest.mark.parametrize("name", ["emoji_vit_s_gpu", "emoji_fusion_cross_attention"])
def test_emoji_experiment_tiny_run_on_cpu(tmp_path, name):
    """The GPU config (and the ablation's cross-attention arm, whose fused question is the new path) on
    the bundled emoji data, shrunk to 2 CPU steps."""
    path, out = experiment(name), tmp_path / "run"
    assert_trained(run_train(path, tiny_overrides(path, ROOT / "data_manifests/emoji.json", out)), out)
