"""The model sees its input: a tiny model fits a few dozen real training images to their exact labels in a
bounded number of steps, and its caption loss is clearly higher when each image is replaced by another."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from mmstory.config import TokenizerSpec
from mmstory.config import DataConfig
from mmstory.data.loader import build_loader, fit_to_encoders
from mmstory.evaluate import evaluate
from mmstory.generation import DecodeOptions
from mmstory.model import build_model

ROOT = Path(__file__).resolve().parents[1]
SHARD = ROOT / "data_manifests/emoji/train-000000.tar"
N_IMAGES, STEPS = 48, 400


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    """48 bundled training images of distinct concepts (spread over the shard), captioned with their label."""
    if not SHARD.is_file():
        pytest.skip("bundled emoji shards not present")
    import webdataset as wds

    samples: dict[str, dict] = {}
    with tarfile.open(SHARD) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    keys, labels = [], set()
    for key in sorted(samples)[::20]:
        label = json.loads(samples[key]["json"])["labels"]["label"]
        if label not in labels:
            keys.append(key)
            labels.add(label)
    keys = keys[:N_IMAGES]
    assert len(keys) == N_IMAGES
    path = tmp_path_factory.mktemp("fit") / "fit-000000.tar"
    with wds.TarWriter(str(path)) as w:
        for key in keys:
            label = json.loads(samples[key]["json"])["labels"]["label"]
            meta = {"captions": [label], "labels": {"label": label}}
            w.write({"__key__": key, "png": samples[key]["png"], "json": json.dumps(meta).encode()})
    return path


@pytest.fixture(scope="module")
def fitted(shard):
    """A tiny image + text model trained STEPS steps of batch 16 on the 48 images (captions only)."""
    cfg = tiny_config(audio=False)
    cfg.tokenizer = TokenizerSpec("bpe", str(ROOT / "data_manifests/emoji/tokenizer.json"))
    cfg.encoders["image"].args.update(width=64, heads=4)
    cfg.decoder.dim, cfg.decoder.heads = 64, 4
    cfg.dim, cfg.decoder.max_len = 64, 32
    torch.manual_seed(0)
    model = build_model(cfg)
    data, norm = fit_to_encoders(DataConfig(batch_size=16, workers=0, augment=False, tasks={"caption": 1.0},
                                            shuffle_buffer=48, max_tokens=32), model.encoders)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=STEPS, pct_start=0.1)
    step, epoch = 0, 0
    model.train()
    while step < STEPS:
        loader = build_loader([str(shard)], data, tokenizer=model.tokenizer, text_tokenizer=model.text_tokenizer,
                              train=True, epoch=epoch, **norm)
        for batch in loader:
            if step == STEPS:
                break
            loss = model(batch)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
        epoch += 1
    return model.eval()


def test_tiny_model_fits_its_training_images_to_their_exact_labels(fitted, shard):
    res = evaluate(fitted, [str(shard)], tasks=("caption",), decode=DecodeOptions(max_new_tokens=12),
                   data=DataConfig(workers=0), diagnostics=False, meteor=False, progress=False)
    preds = res["predictions"]
    assert len(preds) == N_IMAGES
    exact = sum(p["caption"] == p["label"] for p in preds) / len(preds)
    assert exact >= 0.95, [(p["label"], p["caption"]) for p in preds if p["caption"] != p["label"]]
    assert res["metrics"]["caption"]["label_accuracy"] >= 0.95


def test_caption_loss_is_clearly_higher_with_shuffled_images(fitted, shard):
    res = evaluate(fitted, [str(shard)], tasks=("caption",), decode=DecodeOptions(max_new_tokens=12), batch_size=16,
                   data=DataConfig(workers=0, tasks={"caption": 1.0}), meteor=False, progress=False)
    dep = res["metrics"]["image_dependence"]
    assert dep["caption_loss"] < 0.5
    assert dep["caption_loss_shuffled"] > dep["caption_loss"] + 2.0
    assert dep["label_accuracy_shuffled"] < 0.2 < 0.95 <= dep["label_accuracy"]
