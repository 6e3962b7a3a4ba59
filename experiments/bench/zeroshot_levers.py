"""Which change to the contrastive side names *unseen* concepts better, measured on the training split only: a
share of the training concepts (both art styles of each) is held out as a dev set, the contrastive heads are
trained on the rest, and each arm is scored by zero-shot top-1 on the held-out concepts -- so arms are chosen
without looking at val_novel, which is the split issue 16's target is measured on.

What runs here is the image-text contrastive path of ``experiments/emoji_pretrained.yaml`` and nothing else:
the frozen ImageNet EfficientNet-Lite0 at 96 px (pooled features computed once, as the training feature cache
does), MiniLM-L6 from its pip package (frozen or tuned), linear projections to a 128-wide embedding, the
project's ``ContrastiveLoss`` (learned temperature) on a random caption per image, AdamW (weight decay 0.05, lr
1e-3, MiniLM x0.1) under the trainer's ``Schedule`` (50 warm-up steps, cosine to 5 %), bf16 autocast. Zero-shot
uses the report's templates (``DEFAULT_TEMPLATES``). A whole training run (decoder, audio, report) takes ~9
minutes per arm and can only be judged on val_novel; an arm here takes 1-5 minutes on 2 CPU cores. Each dev fold
holds ~380 images, so one image is 0.26 points and the binomial standard error of a score near 0.23 is ~2.2
points: read differences under ~3 points as noise.

    python experiments/bench/zeroshot_levers.py [--arms tuned frozen ...] [--folds 0 1]
        [--out experiments/bench/zeroshot_levers_results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from mmstory.encoders import ENCODERS  # noqa: E402
from mmstory.inference import DEFAULT_TEMPLATES  # noqa: E402
from mmstory.losses.contrastive import ContrastiveLoss  # noqa: E402
from mmstory.schedule import Schedule  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tower_neighbours import frozen_tower, pooled_features, shard_images  # noqa: E402

# each arm changes one thing against "tuned" (emoji_pretrained.yaml's contrastive path)
BASE = {"text": "tuned", "lr_mult": 0.1, "batch": 64, "steps": 400, "head": "linear"}
ARMS = {
    "tuned": {},
    "frozen": {"text": "frozen"},                      # LiT with both towers locked: only the projections learn
    "embeddings_frozen": {"text": "embeddings_frozen"},  # unseen words keep the vectors seen words are tuned around
    "lr_x0.03": {"lr_mult": 0.03},
    "mlp_image_head": {"head": "mlp"},                 # 1280 -> 512 -> 128 with GELU instead of one linear map
    "batch_256": {"batch": 256, "steps": 200},         # 4x the negatives, 2x the samples seen
}


def read_split(manifest: str, split: str, size: int = 96) -> dict:
    """The frozen tower's pooled features, captions, labels and concepts of one split."""
    images, metas = shard_images(manifest, split)
    return {"pooled": pooled_features(frozen_tower(size), images), "captions": [m["captions"] for m in metas],
            "label": [m["labels"]["label"] for m in metas], "concept": [m["concept"] for m in metas]}


class Heads(nn.Module):
    """The arm's trainable part: MiniLM (frozen or tuned) and the two projections."""

    def __init__(self, arm: dict, image_width: int, embed_dim: int = 128):
        super().__init__()
        self.text = ENCODERS.build("hf_text", {"path": "package:all_minilm_l6_v2"})
        if arm["text"] == "frozen":
            self.text.requires_grad_(False)
        elif arm["text"] == "embeddings_frozen":
            self.text.model.embeddings.requires_grad_(False)
        self.text_proj = nn.Linear(self.text.pooled_width, embed_dim, bias=False)
        self.image_proj = (nn.Linear(image_width, embed_dim, bias=False) if arm["head"] == "linear" else
                           nn.Sequential(nn.Linear(image_width, 512), nn.GELU(), nn.Linear(512, embed_dim, bias=False)))
        self.loss = ContrastiveLoss(pairs=[["image", "text"]])

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        ids, mask = self.text.tokenizer.batch(texts, max_len=64)
        return F.normalize(self.text_proj(self.text(ids, mask).pooled).float(), dim=-1)

    def embed_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(pooled).float(), dim=-1)


@torch.no_grad()
def zero_shot(heads: Heads, data: dict, rows: list[int]) -> float:
    """Top-1 over the distinct labels of ``rows`` (as the report's zero-shot over a split's labels)."""
    heads.eval()
    labels = [data["label"][i] for i in rows]
    classes = sorted(set(labels))
    texts = [t.format(c) for c in classes for t in DEFAULT_TEMPLATES]
    classes_emb = F.normalize(heads.embed_text(texts).view(len(classes), len(DEFAULT_TEMPLATES), -1).mean(1), dim=-1)
    images = heads.embed_image(data["pooled"][rows])
    right = (images @ classes_emb.T).argmax(1) == torch.tensor([classes.index(label) for label in labels])
    heads.train()
    return right.float().mean().item()


def run_arm(name: str, data: dict, fold: int, seed: int = 0, dev_share: float = 0.15, **overrides) -> dict:
    arm = {**BASE, **ARMS[name], **overrides}
    concepts = sorted(set(data["concept"]))
    dev = set(random.Random(1234 + fold).sample(concepts, int(dev_share * len(concepts))))
    train_rows = [i for i, c in enumerate(data["concept"]) if c not in dev]
    dev_rows = [i for i, c in enumerate(data["concept"]) if c in dev]
    torch.manual_seed(seed)
    rng = random.Random(seed)
    heads = Heads(arm, image_width=data["pooled"].shape[1]).train()
    tuned = [p for p in heads.text.parameters() if p.requires_grad]
    rest = [p for n, p in heads.named_parameters() if p.requires_grad and not n.startswith("text.")]
    groups = [{"params": rest, "lr": 1e-3}] + ([{"params": tuned, "lr": 1e-3 * arm["lr_mult"]}] if tuned else [])
    opt = torch.optim.AdamW(groups, weight_decay=0.05)
    base_lr = [g["lr"] for g in opt.param_groups]
    schedule = Schedule(warmup_steps=50, min_lr_ratio=0.05, total=arm["steps"])  # the trainer's defaults
    order: list[int] = []
    start, curve = time.perf_counter(), []
    for step in range(arm["steps"]):
        for group, lr in zip(opt.param_groups, base_lr):
            group["lr"] = lr * schedule.factor(step)
        if len(order) < arm["batch"]:  # epochs of shuffled training rows
            order += rng.sample(train_rows, len(train_rows))
        rows, order = order[:arm["batch"]], order[arm["batch"]:]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            embeds = {"image": heads.embed_image(data["pooled"][rows]),
                      "text": heads.embed_text([rng.choice(data["captions"][i]) for i in rows])}
        loss = heads.loss({"embeds": embeds}, {})["contrastive_image_text_loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in heads.parameters() if p.requires_grad], 1.0)
        opt.step()
        if (step + 1) % 100 == 0:
            curve.append({"step": step + 1, "loss": round(loss.item(), 4),
                          "dev_zero_shot": round(zero_shot(heads, data, dev_rows), 4)})
    seconds = time.perf_counter() - start
    return {"arm": name, **arm, "fold": fold, "seed": seed,
            "train_images": len(train_rows), "dev_images": len(dev_rows),
            "dev_classes": len({data["label"][i] for i in dev_rows}),
            "dev_zero_shot": zero_shot(heads, data, dev_rows),
            "train_zero_shot": zero_shot(heads, data, train_rows[:400]),  # the fit, 400 training images
            "logit_scale": round(heads.loss.scale().item(), 2), "seconds": round(seconds, 1), "curve": curve}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", default="data_manifests/emoji.json")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    data = read_split(args.manifest, "train")
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    rows = []
    for fold in args.folds:
        for name in args.arms:
            row = run_arm(name, data, fold)
            rows.append(row)
            print(f"fold {fold} {name:>18}  dev zero-shot {row['dev_zero_shot']:.3f} ({row['dev_classes']} classes)  "
                  f"fit {row['train_zero_shot']:.3f}  {row['seconds']:.0f} s", flush=True)
            if args.out:  # after every arm: a long run loses nothing on a crash
                Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print("\n| arm | " + " | ".join(f"fold {f}" for f in args.folds) + " | mean |")
    print("| --- |" + " --- |" * (len(args.folds) + 1))
    for name in args.arms:
        scores = [r["dev_zero_shot"] for r in rows if r["arm"] == name]
        print(f"| {name} | " + " | ".join(f"{s:.3f}" for s in scores) + f" | {sum(scores) / len(scores):.3f} |")


if __name__ == "__main__":
    main()
