"""Compressed models beside the model they came from, each row measured in its own process on the same machine:
size on disk, parameters, peak RSS, caption latency at batch 1 and images/s at batch 64 (greedy, 16 new tokens,
KV cache), and val_style / val_novel quality (CIDEr, VQA, image->text R@1) with the run's report settings.
``--make-base DIR`` writes a randomly initialised 768-wide model and its int8 twin, for speed rows only.

    python experiments/bench/compress.py --run runs/emoji_tiny \\
        float=runs/emoji_tiny/model int8=runs/emoji_tiny_int8 ... [--out experiments/bench/compress_results.json]

The file keeps the raw measurements; `--table FILE --reference NAME` prints them with speed, size and parameter
ratios against one row (default: the first). Timings: the median of --repeats runs after --warmup runs, torch threads = 2.
The quality numbers use the report's decoding (captions beam 3, answers greedy), up to --max-samples per split.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.processor()
    return "AVX512-BF16/AMX" if {"avx512_bf16", "amx_tile"} & set(flags) else ("AVX2" if "avx2" in flags else "other")


def measure(folder: str, run: str, *, repeats: int, warmup: int, max_samples: int, quality: bool) -> dict:
    """One row, in this process (the parent runs it in a fresh one per row)."""
    import torch
    from PIL import Image

    import mmstory
    from mmstory.compress_cli import model_info
    from mmstory.data.manifest import load_manifest
    from mmstory.config import TrainConfig
    from mmstory.config import load_config

    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = load_config(TrainConfig, Path(run) / "config.yaml")
    model = mmstory.load(folder)
    info = model_info(model, folder)
    manifest = load_manifest(cfg.data.manifest)
    split = manifest.split("val_style")
    # the first 64 val_style images, as files a user would caption
    import io
    import tarfile

    images = []
    for shard in split.shards:
        with tarfile.open(shard.url) as tar:
            for m in tar:
                if m.name.endswith((".png", ".jpg")):
                    images.append(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB"))
                if len(images) == 64:
                    break
        if len(images) == 64:
            break
    opts = dict(max_new_tokens=16, min_new_tokens=16, num_beams=1)  # 16 tokens for every model: equal work

    def timed(fn, n):
        out = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return out

    with torch.inference_mode():
        one = lambda: mmstory.caption(model, images[:1], **opts)  # noqa: E731
        timed(one, warmup)
        lat = timed(one, repeats)
        batch = lambda: mmstory.caption(model, images, batch_size=64, **opts)  # noqa: E731
        timed(batch, 1)
        bat = timed(batch, max(3, repeats // 10))
    row = {**info, "caption_batch1_ms_median": 1000 * statistics.median(lat), "caption_batch1_ms_min": 1000 * min(lat),
           "images_per_s_batch64": 64 / statistics.median(bat),
           "peak_rss_mb_inference": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "sample_captions": mmstory.caption(model, images[:4], max_new_tokens=16)}
    if quality:
        import dataclasses

        from mmstory.evaluate import evaluate
        from mmstory.generation import DecodeOptions

        decode = DecodeOptions(num_beams=cfg.report.num_beams, max_new_tokens=cfg.report.max_new_tokens)
        for name in ("val_style", "val_novel"):
            r = evaluate(model, manifest.split(name), tasks=("caption", "qa", "retrieval"), max_samples=max_samples,
                         decode=decode, data=cfg.data.loader, fuse_question=cfg.data.loader.fuse_question,
                         name=name, diagnostics=False, progress=False,
                         qa_decode=dataclasses.replace(decode, num_beams=cfg.report.qa_beams))
            m = r["metrics"]
            row[name] = {"CIDEr": m["caption"]["CIDEr"], "VQA": m["qa"]["overall"],
                         "R@1": m["retrieval"]["image_to_text"]["R@1"]}
    return row


def make_base(run: str, folder: Path) -> None:
    """A randomly initialised model at GPT-2-small / BERT-base widths (768, 6 decoder and 6 text layers, 12 heads)
    with the main job's tokenizer and image tower, no retrieval, and its int8, 50 %-unstructured and
    50 %-structured twins: for speed only, to show what each does where the matmuls, not the per-op overhead, are
    the work."""
    import torch

    from mmstory.compress.prune import PruneMasks, prune
    from mmstory.compress.quantize import quantize_linear
    from mmstory.config import Component, load_config
    from mmstory.model import build_model
    from mmstory.config import TrainConfig

    cfg = load_config(TrainConfig, Path(run) / "config.yaml").model
    cfg.dim = 768
    image = cfg.encoders["image"]
    cfg.encoders = {"image": Component(image.name, {**image.args, "pretrained": False}),
                    "text": Component("text_transformer", {"width": 768, "depth": 6, "heads": 12, "max_len": 32})}
    cfg.decoder.dim, cfg.decoder.depth, cfg.decoder.heads = 768, 6, 12
    cfg.retrieval.k = 0
    cfg.losses = {k: v for k, v in cfg.losses.items() if k != "contrastive"}
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    model.save(folder / "base_float")
    sparse = copy.deepcopy(model)
    PruneMasks.magnitude(sparse, 0.5).apply(sparse)
    sparse.save(folder / "base_pruned_unstructured_50")
    narrow = copy.deepcopy(model)
    prune(narrow, "structured", 0.5, log=lambda *_: None)
    narrow.save(folder / "base_pruned_structured_50")
    quantize_linear(model)
    model.config.quantize = "int8"
    model.save(folder / "base_int8")


def table(path: str, reference: str | None = None) -> str:
    """The markdown table of a results file (experiments/README.md shows it as printed), with speed, size and
    parameter ratios against the ``reference`` row (default: the first)."""
    res = json.loads(Path(path).read_text())
    rows = res["rows"]
    reference = reference or next(iter(rows))
    ref = rows[reference]
    quality = "val_style" in ref
    head = ["model", "params", "linear weights MiB", "weights file MiB", "peak RSS MiB", "batch-1 caption ms",
            "batch-64 images/s"] + (["val_style CIDEr / VQA / R@1", "val_novel CIDEr / VQA / R@1"] if quality else [])
    lines = [f"Measured {res['date']}, {res['machine']}, torch {res['torch']}, {res['threads']} threads, each row in "
             f"its own process; ratios against `{reference}`.", "", "| " + " | ".join(head) + " |",
             "|" + " --- |" * len(head)]
    for name, r in rows.items():
        cells = [f"`{name}`", f"{r['parameters'] / 1e6:.2f} M ({r['parameters'] / ref['parameters']:.2f}x)",
                 f"{r['linear_weight_bytes'] / 2**20:.2f} ({r['linear_weight_bytes'] / ref['linear_weight_bytes']:.2f}x)",
                 f"{r['weights_file_bytes'] / 2**20:.1f}", f"{r['peak_rss_mb_inference']:.0f}",
                 f"{r['caption_batch1_ms_median']:.1f} "
                 f"({ref['caption_batch1_ms_median'] / r['caption_batch1_ms_median']:.2f}x faster)",
                 f"{r['images_per_s_batch64']:.1f} ({r['images_per_s_batch64'] / ref['images_per_s_batch64']:.2f}x)"]
        if quality:
            for s in ("val_style", "val_novel"):
                cells.append(" / ".join(f"{r[s][k]:.3f}" for k in ("CIDEr", "VQA", "R@1")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", nargs="*", metavar="NAME=MODEL_FOLDER")
    ap.add_argument("--run", default="runs/emoji_tiny", help="the run whose config gives the data and report settings")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--max-samples", type=int, default=256)
    ap.add_argument("--no-quality", action="store_true", help="speed and size only")
    ap.add_argument("--out", default=str(ROOT / "experiments/bench/compress_results.json"))
    ap.add_argument("--make-base", metavar="DIR", help="write DIR/base_float and DIR/base_int8 (random weights, "
                    "768 wide; see make_base) and exit")
    ap.add_argument("--table", metavar="RESULTS_JSON", help="print a results file as a markdown table and exit")
    ap.add_argument("--reference", help="with --table: the row the ratios are against (default: the first)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this folder and print JSON
    args = ap.parse_args()
    if args.table:
        print(table(args.table, args.reference))
        return
    if args.make_base:
        make_base(args.run, Path(args.make_base))
        return
    if args.one:
        print("ROW " + json.dumps(measure(args.one, args.run, repeats=args.repeats, warmup=args.warmup,
                                          max_samples=args.max_samples, quality=not args.no_quality)))
        return
    rows = {}
    for spec in args.rows:
        name, _, folder = spec.partition("=")
        cmd = [sys.executable, __file__, "x", "--one", folder, "--run", args.run, "--repeats", str(args.repeats),
               "--warmup", str(args.warmup), "--max-samples", str(args.max_samples)] + (["--no-quality"] * args.no_quality)
        t = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if out.returncode:
            sys.exit(f"{name}: {out.stderr[-2000:]}")
        rows[name] = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("ROW "))[4:])
        rows[name]["folder"] = folder
        print(f"{name}: {time.perf_counter() - t:.0f} s  {json.dumps({k: v for k, v in rows[name].items() if k != 'sample_captions'})}",
              flush=True)
    # ratios are not stored: `--table FILE --reference NAME` derives them against the row chosen
    import torch

    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_flags()}",
              "torch": torch.__version__, "threads": 2, "repeats": args.repeats, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
