"""Time to quality: mmstory's main job vs open_clip CoCa of the same size, same shards, same wall time.

    python experiments/bench/time_to_quality.py                       # both, 10 CPU-minutes each
    python experiments/bench/time_to_quality.py --mmstory-run runs/emoji_tiny   # reuse a finished main job
    python experiments/bench/time_to_quality.py --seed 1                        # another seed, both models
    python experiments/bench/time_to_quality.py --minutes 0.2 --max-samples 16  # a smoke run

What is equal: the data (the main job's loader over the bundled ``train`` shards, image batches, same
batch size, augmentation, prompts and BPE vocabulary), the sizes (CoCa's ViT, text tower and multimodal
decoder get the main job's image size, patch, widths, depths and heads; its context length is the
decoder's), the optimiser (AdamW, the main job's lr / warmup / weight decay / clipping / loss weights;
CoCa's cosine runs over its wall-clock budget since its step count is not known in advance), the
precision (the main job's: bf16 autocast or fp32, ``auto`` resolved as the trainer does), the
wall-clock training budget, the threads, and the evaluation: both models go through
``mmstory.evaluate.evaluate`` on val_style and val_novel with greedy decoding, so every number comes from
the same code. CoCa gets only image batches (it has no audio tower); the main job spends a fifth of its
batches on audio (``experiments/emoji_tiny_image_only.yaml`` is the main job on the image shards alone), and
its image tower is a frozen pretrained EfficientNet with retrieval, so this compares recipes, not equal-cost
architectures.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))


# CoCa's image tower is a ViT. When the main job's image encoder is a ViT its shape is copied; when it is
# a CNN, CoCa gets a width 192 x 4 layer ViT with patch 8 at the main job's image size (the loader feeds both
# the same images). At 64 px that ViT's training step cost what the from-scratch ResNet-18's did (0.65 s vs
# 0.63 s per step on 2 cores); against the main job's frozen pretrained EfficientNet it is a from-scratch
# peer, not an equal-cost one.
EQUAL_COST_VIT = {"image_size": 64, "patch_size": 8, "width": 192, "depth": 4, "heads": 3}


def coca_for(cfg) -> nn.Module:
    """open_clip CoCa with the main job's shapes (via bench.py's mapping) and its BPE vocabulary."""
    import bench

    enc = cfg.model.encoders
    img = enc["image"].args if enc["image"].name == "vit" else \
        {**EQUAL_COST_VIT, "image_size": enc["image"].args.get("image_size", EQUAL_COST_VIT["image_size"])}
    txt = enc["text"].args
    shape = bench.Shape(image_size=img["image_size"], patch_size=img["patch_size"], vision_width=img["width"],
                        vision_depth=img["depth"], vision_heads=img["heads"], text_width=cfg.model.decoder.dim,
                        text_depth=txt["depth"], text_heads=txt["heads"], decoder_depth=cfg.model.decoder.depth,
                        context_length=cfg.model.decoder.max_len, batch=cfg.data.loader.batch_size,
                        vocab_size=6000)
    from mmstory.tokenizer import BPETokenizer

    shape.vocab_size = BPETokenizer(str(REPO / cfg.model.tokenizer.path)).vocab_size
    return bench.build_coca(shape, name="ttq")


class CoCaAdapter(nn.Module):
    """The few methods ``mmstory.evaluate`` calls, implemented with CoCa's own modules, so CoCa is scored
    by exactly the same evaluation code. Decoding is greedy and re-runs CoCa on the prefix each step
    (its own generate() does not run with transformers 5); rows are batched by prompt length because
    CoCa's text tower has no padding mask."""

    def __init__(self, coca: nn.Module, tokenizer, preprocess: dict, context_length: int):
        from mmstory.prompts import Prompts

        super().__init__()
        self.coca = coca
        self.tokenizer = self.text_tokenizer = self.question_tokenizer = tokenizer
        self.encoders = {"image": SimpleNamespace(preprocess=preprocess), "text": SimpleNamespace(max_len=context_length)}
        self.decoder = SimpleNamespace(max_len=context_length)
        self.prompts = Prompts()  # CoCa is trained with the same default prompts as the mmstory arm

    @property
    def device(self) -> torch.device:
        return next(self.coca.parameters()).device

    @torch.no_grad()
    def embed_inputs(self, inputs: dict) -> dict:
        return {"image": F.normalize(self.coca.encode_image(inputs["image"]), dim=-1)}

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        ids, _ = self.tokenizer.batch(texts, max_len=self.decoder.max_len - 1)  # CoCa appends its CLS token
        return F.normalize(self.coca.encode_text(ids.to(self.device)), dim=-1)

    @torch.no_grad()
    def generate(self, inputs: dict, prompts: list[str], max_new_tokens: int = 20, **_) -> list[str]:
        tok = self.tokenizer
        images = inputs["image"]
        latent, embs = self.coca._encode_image(images)
        seqs = [[tok.bos_id] + tok.encode(p) for p in prompts]
        out: list[str] = [""] * len(prompts)
        for length in sorted({len(s) for s in seqs}):
            rows = [i for i, s in enumerate(seqs) if len(s) == length]
            idx = torch.tensor(rows, device=images.device)
            ids = torch.tensor([seqs[i] for i in rows], device=images.device)
            done = torch.zeros(len(rows), dtype=torch.bool, device=images.device)
            new = []
            for _ in range(min(max_new_tokens, self.decoder.max_len - length)):
                logits = self.coca(images[idx], ids, image_latent=latent[idx], image_embs=embs[idx],
                                   output_labels=False)["logits"][:, -1]
                nxt = logits.argmax(-1).masked_fill(done, tok.pad_id)
                new.append(nxt)
                done |= nxt == tok.eos_id
                ids = torch.cat([ids, nxt[:, None]], 1)
                if bool(done.all()):
                    break
            gen = torch.stack(new, 1).tolist() if new else [[] for _ in rows]
            for i, g in zip(rows, gen):
                out[i] = tok.decode(g[: g.index(tok.eos_id)] if tok.eos_id in g else g)
        return out


def train_coca(cfg, minutes: float, out_dir: Path) -> tuple[nn.Module, dict]:
    """CoCa on the main job's image stream, optimiser and schedule, for ``minutes`` of wall time."""
    from open_clip.loss import CoCaLoss

    from mmstory.model import build_model
    from mmstory.schedule import warmup_cosine
    from mmstory.train import autocast_for, build_data, param_groups, seed_everything

    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    torch.set_flush_denormal(True)
    reference = build_model(cfg.model)  # only for its tokenizer and image preprocessing
    coca = coca_for(cfg)
    tok = reference.tokenizer
    opt = torch.optim.AdamW(param_groups(coca, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            fused=True)  # the optimizer kernel mmstory's trainer uses (CPU and CUDA)

    def lr_now(step: int, elapsed: float) -> float:
        """The main job's schedule shape over CoCa's wall-clock budget: the same warmup steps, then a
        cosine over the elapsed fraction of the budget (CoCa's step count is not known in advance)."""
        return cfg.optim.lr * warmup_cosine(step, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio,
                                            progress=elapsed / (60 * minutes))
    w = {n: s.weight for n, s in cfg.model.losses.items()}
    loss_fn = CoCaLoss(caption_loss_weight=w.get("caption", 1.0), clip_loss_weight=w.get("contrastive", 1.0),
                       pad_id=tok.pad_id)
    if cfg.precision == "fp16":
        raise ValueError("time_to_quality trains on the CPU: precision 'fp16' (which needs a grad scaler) is not "
                         "supported here; use bf16, fp32 or auto")
    autocast = autocast_for(cfg.precision, "cpu")  # bf16: as open_clip's --precision amp_bf16
    log = (out_dir / "coca_metrics.jsonl").open("w")
    step, epoch, t0, samples = 0, 0, time.perf_counter(), 0
    coca.train()
    while time.perf_counter() - t0 < 60 * minutes:
        loader = build_data(cfg, reference, splits={"image": cfg.data.train["image"]}, weights={}, train=True,
                            epoch=epoch)
        for batch in loader:
            for group in opt.param_groups:
                group["lr"] = lr_now(step, time.perf_counter() - t0)
            with autocast():
                out = coca(batch["image"], batch["tokens"])
                losses = loss_fn(out["image_features"], out["text_features"], out["logits"], out["labels"],
                                 out["logit_scale"])
                loss = sum(losses)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip > 0:
                nn.utils.clip_grad_norm_(coca.parameters(), cfg.optim.grad_clip)
            opt.step()
            with torch.no_grad():
                coca.logit_scale.clamp_(0, math.log(100))  # as open_clip's training loop does
            step += 1
            samples += batch["image"].shape[0]
            log.write(json.dumps({"step": step, "lr": opt.param_groups[0]["lr"], "loss": loss.item(), "contrastive_loss": losses[0].item(),
                                  "caption_loss": losses[1].item(), "time": time.perf_counter() - t0}) + "\n")
            if time.perf_counter() - t0 >= 60 * minutes:
                break
        epoch += 1
    log.close()
    seconds = time.perf_counter() - t0
    pre = reference.encoders["image"].preprocess
    adapter = CoCaAdapter(coca.eval(), tok, pre, cfg.model.decoder.max_len)
    return adapter, {"steps": step, "samples": samples, "train_seconds": seconds, "samples_per_s": samples / seconds}


def run_config(run: Path) -> dict:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())


def headline(results: dict) -> dict:
    """The three numbers the issue compares, per split."""
    out = {}
    for split, r in results.items():
        m = r["metrics"]
        out[split] = {"CIDEr": m.get("caption", {}).get("CIDEr"),
                      "image_to_text_R@1": m.get("retrieval", {}).get("image_to_text", {}).get("R@1"),
                      "vqa_accuracy": m.get("qa", {}).get("overall")}
    return out


def main(argv: list[str] | None = None) -> dict:
    from mmstory.config import load_config
    from mmstory.data.manifest import load_manifest
    from mmstory.evaluate import evaluate
    from mmstory.generation import DecodeOptions
    from mmstory.config import TrainConfig
    from mmstory.train import resolve_precision, train

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "experiments/emoji_tiny.yaml"))
    p.add_argument("--minutes", type=float, default=10.0, help="training wall time for each model")
    p.add_argument("--mmstory-run", nargs="+", help="finished mmstory run folder(s) to evaluate instead of "
                   "training the main job again (e.g. the main job and a run with CoCa's exact ViT shapes)")
    p.add_argument("--seed", type=int, help="seed of both models and of the data order (default: the config's)")
    p.add_argument("--max-samples", type=int, default=256, help="per validation split")
    p.add_argument("--out", default=str(REPO / "runs/time_to_quality"))
    args, overrides = p.parse_known_args(argv)  # --key.path=value: config overrides for the mmstory run
    bad = [o for o in overrides if not (o.startswith("--") and "=" in o)]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # mmstory trains as its config says (steps, schedule; fewer steps planned if they would not fit the budget);
    # CoCa gets the full budget.
    seed = [] if args.seed is None else [f"--seed={args.seed}", f"--data.loader.seed={args.seed}"]
    cfg = load_config(TrainConfig, args.config, [f"--max_minutes={args.minutes}", "--final_eval=false",
                                                 f"--out_dir={out / 'mmstory'}", *seed, *overrides])
    cfg.precision = resolve_precision(cfg.precision, torch.device("cpu"))  # auto as the trainer resolves it; CoCa too
    cfg.data.manifest = str(REPO / cfg.data.manifest)
    cfg.model.tokenizer.path = str(REPO / cfg.model.tokenizer.path)

    import mmstory

    models, trained = {}, {}
    if args.mmstory_run:
        for folder in args.mmstory_run:
            run = Path(folder)
            rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
            name = f"mmstory:{run.name}"
            models[name] = mmstory.load(run / "model")
            rc = run_config(run)
            trained[name] = {"steps": max(r["step"] for r in rows), "reused": str(run),
                             "image_encoder": rc["model"]["encoders"]["image"],
                             "decoder_depth": rc["model"]["decoder"]["depth"],
                             "fuse_question": rc["data"]["loader"].get("fuse_question", False)}
    else:
        t0 = time.perf_counter()
        run = train(cfg, overwrite=True)  # a benchmark reruns into the same folder
        rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        models["mmstory"] = mmstory.load(run / "model")
        trained["mmstory"] = {"steps": max(r["step"] for r in rows),
                              "wall_seconds_incl_validation": time.perf_counter() - t0,
                              "fuse_question": cfg.data.loader.fuse_question}
    models["open_clip_coca"], trained["open_clip_coca"] = train_coca(cfg, args.minutes, out)

    manifest = load_manifest(cfg.data.manifest)
    decode = DecodeOptions(max_new_tokens=cfg.report.max_new_tokens)  # greedy for both
    tasks = ("caption", "qa", "retrieval")
    results = {}
    for name, model in models.items():
        results[name] = {split: evaluate(model, manifest.split(split), tasks=tasks, max_samples=args.max_samples,
                                         decode=decode, data=dataclasses.replace(cfg.data.loader, workers=1),
                                         fuse_question=trained[name].get("fuse_question", False),
                                         name=f"{name}/{split}")
                         for split in ("val_style", "val_novel")}
    summary = {
        "date": time.strftime("%Y-%m-%d"), "minutes_each": args.minutes, "max_samples": args.max_samples,
        "seed": cfg.seed, "data_seed": cfg.data.loader.seed,
        "config": args.config, "decoding": "greedy", "precision": cfg.precision,
        "train": trained,
        "params_M": {name: sum(p.numel() for p in model.parameters()) / 1e6 for name, model in models.items()},
        "headline": {name: headline(r) for name, r in results.items()},
        "metrics": {name: {s: r[s]["metrics"] for s in r} for name, r in results.items()},
        "examples": {name: {s: [{"references": x["references"][:2], "caption": x["caption"]}
                               for x in r[s]["predictions"][:8]] for s in r} for name, r in results.items()},
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    print(json.dumps({"train": summary["train"], "headline": summary["headline"]}, indent=2))
    return summary


if __name__ == "__main__":
    main()
