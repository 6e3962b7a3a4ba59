"""How well a frozen image tower's nearest training image names the concept, measured on the training split only,
for a choice of input size and cut (``feature_stage``) -- the choice the main job's retrieval and the distilled
student's tower depend on, made without looking at a validation split.

Every bundled training concept is there in two art styles (Noto, Twemoji). Each training image with a twin is a
query; the gallery is every other training image, so the twin is the one right answer and the same-style images of
other concepts are the distractors, as for a val_style image against the datastore. Keys are the tower's
L2-normalised pooled features (``RetrievalMemory.key`` without a colour layout), inputs the evaluation transforms
(``ImageTransform``: bicubic resize, the tower's normalisation).

    python experiments/bench/tower_neighbours.py [--sizes 96 128 160] [--stages full 3]
        [--out experiments/bench/tower_neighbours_results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from mmstory.data.manifest import load_manifest  # noqa: E402
from mmstory.data.shards import iter_tar  # noqa: E402
from mmstory.data.stats import SilentStats  # noqa: E402
from mmstory.data.transforms import IMAGE_EXTS, ImageTransform, decode_image  # noqa: E402
from mmstory.encoders import ENCODERS  # noqa: E402


def shard_images(manifest: str, split: str) -> tuple[list, list[dict]]:
    """The decoded images of a split and each one's json metadata (also read by zeroshot_levers.py)."""
    images, metas = [], []
    for shard in load_manifest(manifest).split(split).shards:
        for raw in iter_tar(shard.url, SilentStats()):
            ext = next((e for e in IMAGE_EXTS if e in raw), None)
            if ext is None:
                continue
            images.append(decode_image(raw[ext]))
            metas.append(json.loads(raw["json"]))
    return images, metas


def frozen_tower(size: int, stage: int | None = None) -> nn.Module:
    """The pip package's ImageNet EfficientNet-Lite0 at ``size`` px, whole or cut after ``stage``, in eval mode."""
    args = {"model_name": "tf_efficientnet_lite0", "pretrained": "package:efficientnet_lite0", "image_size": size}
    if stage is not None:
        args["feature_stage"] = stage
    return ENCODERS.build("timm_cnn", args).eval()


@torch.no_grad()
def pooled_features(tower: nn.Module, images: list, batch: int = 128) -> torch.Tensor:
    """(N, width) float pooled features of ``images`` through the evaluation transforms of ``tower``."""
    pre = tower.preprocess
    transform = ImageTransform(size=pre["image_size"], train=False, mean=pre["mean"], std=pre["std"])
    rng = random.Random(0)
    return torch.cat([tower(torch.stack([transform(im, rng) for im in images[i:i + batch]])).pooled.float()
                      for i in range(0, len(images), batch)])


def twin_accuracy(images, labels, size: int, stage: int | None) -> dict:
    tower = frozen_tower(size, stage)
    start = time.perf_counter()
    keys = F.normalize(pooled_features(tower, images), dim=-1)
    seconds = time.perf_counter() - start
    count = Counter(labels)
    queries = [i for i, label in enumerate(labels) if count[label] == 2]
    sim = keys[queries] @ keys.T
    sim[torch.arange(len(queries)), torch.tensor(queries)] = -2.0  # not itself
    nearest = sim.argmax(1).tolist()
    right = sum(labels[j] == labels[i] for i, j in zip(queries, nearest))
    return {"image_size": size, "feature_stage": stage or "full", "params": sum(p.numel() for p in tower.parameters()),
            "queries": len(queries), "twin_is_nearest": right / len(queries), "encode_seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", default="data_manifests/emoji.json")
    ap.add_argument("--split", default="train")
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 160])
    ap.add_argument("--stages", nargs="+", default=["full", "3"], help="full, or a feature_stage to cut the tower at")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    images, metas = shard_images(args.manifest, args.split)
    labels = [m["labels"]["label"] for m in metas]
    rows = []
    for stage in args.stages:
        for size in args.sizes:
            row = twin_accuracy(images, labels, size, None if stage == "full" else int(stage))
            rows.append(row)
            print(f"{row['feature_stage']!s:>5} {size:4d} px  {row['params'] / 1e6:.2f} M params  "
                  f"twin nearest {row['twin_is_nearest']:.3f} of {row['queries']}  encode {row['encode_seconds']} s",
                  flush=True)
    if args.out:
        meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
