"""mmstory vs open_clip CoCa, side by side in one process: training throughput and peak memory at equal
shapes, generation with and without the KV cache, and the data loader against the training rate.

    python experiments/bench/bench.py [--quick] [--out experiments/bench/results.json]
                                      [--device cuda] [--bf16] [--profile]

Every training measurement runs in its own spawned subprocess, so peak memory (CPU: ru_maxrss growth
over the post-import baseline; CUDA: max_memory_allocated) belongs to one model. Importable: ``run()``
returns the results dict, ``run(smoke=True)`` runs every code path on tiny shapes in seconds (tests).
See README.md for the architecture mapping and measured numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
BOS, EOS, PAD = 49406, 49407, 0  # open_clip's CLIP BPE; mmstory's "open_clip" tokenizer uses the same ids


@dataclass
class Shape:
    """One architecture, described once and mapped onto both libraries (see README: architecture mapping)."""
    image_size: int
    patch_size: int
    vision_width: int
    vision_depth: int
    vision_heads: int
    text_width: int        # = CoCa embed_dim = multimodal width = mmstory dim/embed_dim/decoder dim
    text_depth: int        # CoCa unimodal text layers = mmstory text encoder depth
    text_heads: int
    decoder_depth: int     # CoCa multimodal layers = mmstory decoder depth
    context_length: int    # caption tokens incl. BOS/EOS
    batch: int
    vocab_size: int = 49408

    @property
    def memory_len(self) -> int:  # image tokens the decoder cross-attends to: class token + patches
        return 1 + (self.image_size // self.patch_size) ** 2


SHAPES = {
    "tiny": Shape(image_size=64, patch_size=8, vision_width=128, vision_depth=4, vision_heads=4, text_width=128,
                  text_depth=4, text_heads=4, decoder_depth=4, context_length=32, batch=32),
    "small": Shape(image_size=128, patch_size=16, vision_width=384, vision_depth=6, vision_heads=6, text_width=384,
                   text_depth=6, text_heads=6, decoder_depth=6, context_length=32, batch=32),
    # the main training job's model (part 4): ViT 64 px / 8, width 256, 4 + 4 + 4 layers, batch 64
    "main": Shape(image_size=64, patch_size=8, vision_width=256, vision_depth=4, vision_heads=4, text_width=256,
                  text_depth=4, text_heads=4, decoder_depth=4, context_length=48, batch=64),
    # open_clip's coca_ViT-B-32 widths/depths (GPU runs; the H100 reference is at batch 256). One
    # difference, as for every shape here: 51 pooler queries (1 contrastive + 50 image tokens for the
    # decoder, what mmstory's decoder sees) instead of coca_ViT-B-32's 256.
    "b32": Shape(image_size=224, patch_size=32, vision_width=768, vision_depth=12, vision_heads=12, text_width=512,
                 text_depth=12, text_heads=8, decoder_depth=12, context_length=76, batch=256),
    # seconds-long smoke run for tests
    "smoke": Shape(image_size=16, patch_size=8, vision_width=32, vision_depth=1, vision_heads=2, text_width=32,
                   text_depth=1, text_heads=2, decoder_depth=1, context_length=8, batch=4, vocab_size=49408),
}


# ---------------------------------------------------------------------------------------------- models
def coca_config(s: Shape) -> dict:
    """open_clip model config (the JSON format of ``open_clip/model_configs/coca_*.json``)."""
    return {
        "embed_dim": s.text_width,
        "vision_cfg": {"image_size": s.image_size, "patch_size": s.patch_size, "width": s.vision_width,
                       "layers": s.vision_depth, "head_width": s.vision_width // s.vision_heads,
                       "attentional_pool": True, "attn_pooler_heads": s.text_heads,
                       # the pooler's first query is the contrastive vector, the rest go to the decoder:
                       # memory_len + 1 queries give the decoder as many image tokens as mmstory's
                       "attn_pooler_queries": s.memory_len + 1, "output_tokens": True},
        "text_cfg": {"context_length": s.context_length, "vocab_size": s.vocab_size, "width": s.text_width,
                     "heads": s.text_heads, "layers": s.text_depth, "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": s.context_length, "vocab_size": s.vocab_size, "width": s.text_width,
                           "heads": s.text_heads, "layers": s.decoder_depth, "attn_pooler_heads": s.text_heads},
        "custom_text": True,
    }


def build_coca(s: Shape, name: str = "bench"):
    import open_clip

    folder = Path(tempfile.mkdtemp(prefix="mmstory-bench-"))
    (folder / f"coca_{name}.json").write_text(json.dumps(coca_config(s)))
    open_clip.add_model_config(folder)
    model = open_clip.create_model(f"coca_{name}")
    # open_clip 3.3.0 never calls MultimodalTransformer.init_parameters (and it would fail: it reads
    # self.transformer.width), so the decoder's vocabulary projection stays torch.empty: zeros or stale
    # memory (we saw 1e20 losses and NaN). Initialise it as that method intends.
    torch.nn.init.normal_(model.text_decoder.text_projection, std=s.text_width ** -0.5)
    return model


def mmstory_config(s: Shape):
    from mmstory.config import Component, DecoderConfig, LossSpec, ModelConfig, TokenizerSpec

    return ModelConfig(
        dim=s.text_width, embed_dim=s.text_width,
        encoders={"image": Component("vit", {"image_size": s.image_size, "patch_size": s.patch_size,
                                             "width": s.vision_width, "depth": s.vision_depth,
                                             "heads": s.vision_heads}),
                  "text": Component("text_transformer", {"width": s.text_width, "depth": s.text_depth,
                                                         "heads": s.text_heads, "max_len": s.context_length})},
        fusion=Component("concat", {"modalities": ["image"]}),
        decoder=DecoderConfig(dim=s.text_width, depth=s.decoder_depth, heads=s.text_heads,
                              max_len=s.context_length, vocab_size=s.vocab_size),
        # CoCa's defaults: clip_loss_weight 1, caption_loss_weight 2
        losses={"contrastive": LossSpec("contrastive", 1.0, {"pairs": [["image", "text"]]}),
                "caption": LossSpec("caption", 2.0)},
        tokenizer=TokenizerSpec(kind="open_clip"),
    )


def build_mmstory(s: Shape):
    from mmstory.model import build_model

    return build_model(mmstory_config(s))


def coca_shape(model) -> dict:
    """The mapped dimensions, read back from a built CoCa (not from its config)."""
    v, t, d = model.visual, model.text, model.text_decoder
    return {"image_size": v.image_size[0], "patch_size": v.patch_size[0], "vision_width": v.conv1.out_channels,
            "vision_depth": len(v.transformer.resblocks), "vision_heads": v.transformer.resblocks[0].attn.num_heads,
            "text_width": t.width, "text_depth": len(t.transformer.resblocks),
            "text_heads": t.transformer.resblocks[0].attn.num_heads, "decoder_width": d.width,
            "decoder_depth": len(d.resblocks), "decoder_heads": d.resblocks[0].attn.num_heads,
            "context_length": t.context_length, "vocab_size": t.token_embedding.num_embeddings,
            "decoder_vocab": d.text_projection.shape[1], "memory_len": v.attn_pool.query.shape[0] - 1}


def mmstory_shape(model) -> dict:
    v, t, d = model.encoders["image"], model.encoders["text"], model.decoder
    p = v.patch.kernel_size[0]
    return {"image_size": p * round((v.pos.shape[1] - 1) ** 0.5), "patch_size": p, "vision_width": v.width,
            "vision_depth": len(v.transformer.blocks), "vision_heads": v.transformer.blocks[0].attn.heads,
            "text_width": t.width, "text_depth": len(t.transformer.blocks),
            "text_heads": t.transformer.blocks[0].attn.heads, "decoder_width": d.tok.embedding_dim,
            "decoder_depth": len(d.blocks), "decoder_heads": d.blocks[0].attn.heads,
            "context_length": t.max_len, "vocab_size": t.tok.num_embeddings,
            "decoder_vocab": d.lm_head.out_features, "memory_len": v.pos.shape[1]}


# ---------------------------------------------------------------------------------------------- data
def synthetic_batch(s: Shape, seed: int = 0) -> dict:
    """Fixed-seed images and right-padded captions [BOS, words..., EOS, PAD...] of random length in
    [context/2, context], as real caption batches are ragged."""
    g = torch.Generator().manual_seed(seed)
    B, L = s.batch, s.context_length
    image = torch.randn(B, 3, s.image_size, s.image_size, generator=g)
    lengths = torch.randint(max(3, L // 2), L + 1, (B,), generator=g)
    ids = torch.randint(1, BOS, (B, L), generator=g)
    pos = torch.arange(L)[None]
    ids = torch.where(pos == 0, BOS, ids)
    ids = torch.where(pos == lengths[:, None] - 1, EOS, ids)
    mask = pos < lengths[:, None]
    ids = ids.masked_fill(~mask, PAD)
    return {"image": image, "ids": ids, "mask": mask}


def mmstory_batch(b: dict) -> dict:
    target = b["mask"].clone()
    target[:, 0] = False  # BOS is never a target; every later real token (incl. EOS) is
    return {"image": b["image"], "text_ids": b["ids"], "text_mask": b["mask"], "tokens": b["ids"],
            "tokens_mask": b["mask"], "target_mask": target}


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------- training
def make_step(lib: str, model, batch: dict, device: str, bf16: bool, compile: bool = False):
    """A closure doing one fwd + bwd + AdamW step; returns the loss as a float. AdamW is torch's fused
    kernel for both libraries, on CUDA and on the CPU, as in mmstory's trainer (results before 2026-12-01
    used the per-tensor loop on the CPU). ``compile``: ``torch.compile`` of forward + loss, the same for both."""
    kind = device.split(":")[0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=kind in ("cuda", "cpu"))
    amp = torch.autocast(device_type=kind, dtype=torch.bfloat16) if bf16 else nullcontext()
    if lib == "open_clip":
        from open_clip.loss import CoCaLoss

        loss_fn = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=PAD)

        def loss_of():
            out = model(batch["image"], batch["ids"])
            return sum(loss_fn(out["image_features"], out["text_features"], out["logits"], out["labels"],
                               out["logit_scale"]))
    else:
        mb = mmstory_batch(batch)

        def loss_of():
            return model(mb)["loss"]

    if compile:
        loss_of = torch.compile(loss_of)

    def step() -> float:
        with amp:
            loss = loss_of()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()  # .item() syncs, so step time is real on CUDA too

    return step


def cpu_settings(device: str) -> None:
    """Flush denormal floats to zero on CPU. Without it CoCa's fp32 AdamW state fills with denormals
    within a few steps and x86 runs those ~100x slower (tiny CoCa: 7-16 s/step instead of ~1 s), which
    measures the CPU's denormal handling, not the models. GPUs are not affected."""
    if device == "cpu":
        torch.set_flush_denormal(True)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train_measure(lib: str, shape: dict, device: str = "cpu", bf16: bool = False, warmup: int = 2,
                  steps: int = 5, seed: int = 0, threads: int | None = None, compile: bool = False) -> dict:
    """Build one model, train ``warmup + steps`` steps on one synthetic batch. Meant to run in a fresh
    process (``isolated``) so that ru_maxrss is this model's peak."""
    if threads:
        torch.set_num_threads(threads)
    cpu_settings(device)
    s = Shape(**shape)
    base = _maxrss_mb()
    torch.manual_seed(seed)
    model = (build_coca(s) if lib == "open_clip" else build_mmstory(s)).to(device).train()
    params = sum(p.numel() for p in model.parameters())
    batch = to_device(synthetic_batch(s, seed), device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    step = make_step(lib, model, batch, device, bf16, compile)
    times, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        losses.append(step())
        if i == 0:
            first_step_s = time.perf_counter() - t0  # includes compilation when compiled
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out = {"params": params, "step_s": med, "step_s_all": times, "samples_per_s": s.batch / med,
           "first_loss": losses[0], "last_loss": losses[-1], "rss_base_mb": base, "rss_peak_mb": _maxrss_mb(),
           "peak_mem_mb": _maxrss_mb() - base, "mem_kind": "cpu_maxrss_delta", "loadavg_1min": os.getloadavg()[0],
           "compiled": compile, "first_step_s": first_step_s}
    if device.startswith("cuda"):
        out.update(peak_mem_mb=torch.cuda.max_memory_allocated() / 2**20, mem_kind="cuda_max_allocated")
    return out


def combine(runs: list[dict], batch: int) -> dict:
    """Several rounds of one model: median over all their timed steps, the fastest step, max peak memory."""
    times = [t for r in runs for t in r["step_s_all"]]
    med = statistics.median(times)
    return {**runs[-1], "step_s": med, "step_s_min": min(times), "step_s_all": times, "samples_per_s": batch / med,
            "samples_per_s_best": batch / min(times), "peak_mem_mb": max(r["peak_mem_mb"] for r in runs),
            "rounds": len(runs), "loadavg_1min": [r["loadavg_1min"] for r in runs]}


def isolated(fn, *args, **kwargs):
    """Run ``fn`` in a freshly spawned interpreter (its own peak RSS) and return its result."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args, kwargs)


def profile(lib: str, s: Shape, device: str = "cpu", bf16: bool = False, steps: int = 2, rows: int = 20,
            compile: bool = False) -> str:
    """torch.profiler table of the ops taking most self time over ``steps`` training steps (``compile``:
    of the torch.compile'd step; the untimed first step compiles)."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    cpu_settings(device)
    torch.manual_seed(0)
    model = (build_coca(s) if lib == "open_clip" else build_mmstory(s)).to(device).train()
    step = make_step(lib, model, to_device(synthetic_batch(s), device), device, bf16, compile)
    step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with tprofile(activities=acts) as prof:
        for _ in range(steps):
            step()
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


# ---------------------------------------------------------------------------------------------- generation
def _timed(fn, device: str) -> tuple[float, object]:
    """(seconds, result) of one call (on CUDA, seconds until its kernels finish)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


@torch.no_grad()
def mmstory_caption(model, images: torch.Tensor, *, new_tokens: int, beams: int, use_cache: bool) -> list:
    """Encode + fuse + decode exactly ``new_tokens`` tokens from a BOS prompt (EOS is blocked until then,
    so every configuration does the same amount of work)."""
    from mmstory.generation import DecodeOptions, generate

    fused = model.fuse(model.encode({"image": images}))
    B = images.shape[0]
    ids = torch.full((B, 1), BOS, device=images.device)
    opts = DecodeOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=beams, use_cache=use_cache)
    return generate(model.decoder, fused["tokens"], fused["mask"], ids, torch.ones_like(ids, dtype=torch.bool),
                    eos_id=EOS, pad_id=PAD, opts=opts)


@torch.no_grad()
def mmstory_greedy_rerun(model, images: torch.Tensor, *, new_tokens: int) -> torch.Tensor:
    """CoCa's decoding approach on mmstory's modules: no cache, the decoder re-runs the whole prefix
    and computes the vocabulary logits at every prefix position each step (``coca_greedy`` below).
    mmstory's own ``use_cache=False`` path also re-runs the prefix but applies the head at the last
    position only, so the two no-cache rows separate the cache's gain from the head's."""
    fused = model.fuse(model.encode({"image": images}))
    out = torch.full((images.shape[0], 1), BOS, device=images.device)
    for _ in range(new_tokens):
        logits = model.decoder(out, fused["tokens"], fused["mask"])[:, -1]
        logits[:, EOS] = float("-inf")
        out = torch.cat([out, logits.argmax(-1, keepdim=True)], 1)
    return out[:, 1:]


@torch.no_grad()
def coca_greedy(model, images: torch.Tensor, *, new_tokens: int) -> torch.Tensor:
    """CoCa's own decoding loop (``CoCa.generate``'s top-k path with k = 1) without its transformers
    logits processors: encode the image once, then re-run text tower + decoder on the whole prefix
    every step. Used to time open_clip's approach when ``CoCa.generate`` itself cannot run."""
    image_latent, image_embs = model._encode_image(images)
    out = torch.full((images.shape[0], 1), BOS, device=images.device)
    for _ in range(new_tokens):
        logits = model(images, out, image_latent=image_latent, image_embs=image_embs, output_labels=False)["logits"]
        logits = logits[:, -1]
        logits[:, EOS] = float("-inf")
        out = torch.cat([out, logits.argmax(-1, keepdim=True)], 1)
    return out[:, 1:]


def generation_bench(s: Shape, sizes: list[int], new_tokens: int, device: str, bf16: bool, seed: int = 0,
                     repeats: int = 3) -> dict:
    """Images/s of every decoding path, fastest of ``repeats`` rounds. Each round times every path once,
    in turn, so a slow spell of the machine (on a shared 2-core VM its speed drifted by ~1.5x within
    minutes) hits all paths alike and the ratios between them hold."""
    cpu_settings(device)
    torch.manual_seed(seed)
    model = build_mmstory(s).to(device).eval()
    coca = build_coca(s).to(device).eval()
    amp = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16) if bf16 else nullcontext()
    g = torch.Generator().manual_seed(seed)
    results: dict = {"new_tokens": new_tokens, "rounds": repeats}
    with amp:
        mmstory_caption(model, torch.randn(2, 3, s.image_size, s.image_size).to(device), new_tokens=2, beams=1,
                        use_cache=True)  # warm-up
        for n in sizes:
            images = torch.randn(n, 3, s.image_size, s.image_size, generator=g).to(device)
            paths = {f"mmstory_{mode}_{'cache' if cache else 'nocache'}":
                     partial(mmstory_caption, model, images, new_tokens=new_tokens, beams=beams, use_cache=cache)
                     for mode, beams in (("greedy", 1), ("beam4", 4)) for cache in (True, False)}
            paths["mmstory_greedy_rerun_full_logits"] = partial(mmstory_greedy_rerun, model, images, new_tokens=new_tokens)
            paths["open_clip_greedy_loop"] = partial(coca_greedy, coca, images, new_tokens=new_tokens)
            seconds: dict = {name: [] for name in paths}
            outs: dict = {}
            for _ in range(repeats):
                for name, fn in paths.items():
                    sec, outs[name] = _timed(fn, device)
                    seconds[name].append(sec)
            row: dict = {name: {"seconds": min(t), "seconds_all": t, "images_per_s": n / min(t)}
                         for name, t in seconds.items()}
            for mode in ("greedy", "beam4"):
                row[f"{mode}_cache_speedup"] = row[f"mmstory_{mode}_nocache"]["seconds"] / row[f"mmstory_{mode}_cache"]["seconds"]
                row[f"{mode}_cache_equals_nocache"] = outs[f"mmstory_{mode}_cache"] == outs[f"mmstory_{mode}_nocache"]
            row["greedy_cache_equals_rerun"] = outs["mmstory_greedy_rerun_full_logits"].tolist() == outs["mmstory_greedy_cache"]
            cached = row["mmstory_greedy_cache"]["seconds"]
            row["greedy_cache_over_rerun_full_logits"] = row["mmstory_greedy_rerun_full_logits"]["seconds"] / cached
            row["greedy_mmstory_cache_over_open_clip"] = row["open_clip_greedy_loop"]["seconds"] / cached
            results[str(n)] = row
    results["open_clip_generate"] = try_coca_generate(coca, device, s)
    return results


def try_coca_generate(coca, device: str, s: Shape) -> dict:
    """Does ``CoCa.generate`` run with the installed transformers? Record the error if not."""
    import transformers

    images = torch.randn(2, 3, s.image_size, s.image_size, device=device)
    out = {"transformers": transformers.__version__}
    try:  # CoCa.generate asserts on a flag set when this import succeeded; record the real cause
        from open_clip.coca_model import BeamSearchScorer  # noqa: F401
    except ImportError:
        try:
            from transformers.generation import BeamSearchScorer  # noqa: F401
        except ImportError as e:
            out["import_error"] = f"{type(e).__name__}: {e}"
    for kind, kwargs in (("beam_search", {"num_beams": 4, "num_beam_groups": 2}), ("top_k", {"top_k": 1})):
        try:
            t0 = time.perf_counter()
            coca.generate(images, seq_len=min(s.context_length, 21), generation_type=kind, **kwargs)
            out[kind] = {"runs": True, "seconds": time.perf_counter() - t0}
        except Exception as e:  # noqa: BLE001 -- the point is to record whatever it raises
            out[kind] = {"runs": False, "error": f"{type(e).__name__}: {e}"[:400]}
    return out


# ---------------------------------------------------------------------------------------------- data loader
def loader_bench(batches: int, batch_size: int = 64, workers: int = 2, image_size: int = 64) -> dict:
    from mmstory.data.manifest import load_manifest
    from mmstory.config import DataConfig
    from mmstory.data.loader import build_loader
    from mmstory.tokenizer import BPETokenizer

    split = load_manifest(str(REPO / "data_manifests/emoji.json")).split("train")
    tok = BPETokenizer(str(REPO / "data_manifests/emoji/tokenizer.json"))
    cfg = DataConfig(batch_size=batch_size, workers=workers, image_size=image_size)
    t0 = time.perf_counter()
    it = iter(build_loader(split, cfg, tokenizer=tok))
    first = next(it)
    t1 = time.perf_counter()
    n, samples, epochs = 0, 0, 0
    while n < batches:  # measured after the first batch (worker start-up is reported separately)
        try:
            b = next(it)
        except StopIteration:
            epochs += 1
            it = iter(build_loader(split, cfg, tokenizer=tok, epoch=epochs))
            continue
        n += 1
        samples += b["image"].shape[0]
    sec = time.perf_counter() - t1
    return {"startup_s": t1 - t0, "batches": n, "samples": samples, "seconds": sec, "samples_per_s": samples / sec,
            "batch_keys": sorted(first), "epochs_restarted": epochs}


# ---------------------------------------------------------------------------------------------- driver
def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import open_clip
    import mmstory

    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "open_clip": open_clip.__version__,
            "mmstory": mmstory.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run(*, quick: bool = False, smoke: bool = False, device: str = "cpu", bf16: bool = False,
        isolate: bool = True, compile: bool = False, parts: tuple = ("train", "generate", "data"),
        rounds: int | None = None, log=print, checkpoint=None) -> dict:
    """All measurements; returns the results dict (see ``main`` for the printed table). On CUDA the
    training shape is ``b32`` (CoCa ViT-B/32 widths, batch 256); ``compile`` adds a torch.compile row
    (one round: compiling takes minutes). ``rounds`` overrides the eager training rounds and the generation
    rounds (more of them on a machine whose speed drifts). ``parts`` selects sections; ``checkpoint(res)``
    is called after each measurement so that a run cut short keeps what it measured."""
    checkpoint = checkpoint or (lambda res: None)
    measure = (lambda *a, **k: isolated(train_measure, *a, **k)) if isolate else train_measure
    gpu = device.startswith("cuda")
    loader_workers = [2]
    if smoke:
        train_shapes, steps, warmup, train_rounds = ["smoke"], 1, 1, 1
        gen_runs, new_tokens = {"smoke": [2]}, 3
        data_batches, data_bs, data_model = 2, 8, "smoke"
    elif gpu:  # steps of ~0.1-0.3 s: more of them; the first compiled step compiles, hence 3 warm-up steps
        train_shapes, steps, warmup, train_rounds = ["b32"], (5 if quick else 15), 3, (1 if quick else 2)
        gen_runs, new_tokens = ({"b32": [64]} if quick else {"b32": [64, 256], "tiny": [256]}), 20
        data_batches, data_bs, data_model, loader_workers = (20 if quick else 60), 64, "main", [2, 8]
    else:
        train_shapes, steps, warmup, train_rounds = ["tiny", "small"], (3 if quick else 5), 2, (1 if quick else 2)
        gen_runs, new_tokens = ({"tiny": [64]} if quick else {"tiny": [64, 256], "small": [64]}), 20
        data_batches, data_bs, data_model = (10 if quick else 30), 64, "main"
    gen_rounds = 1 if smoke or quick else 3
    if rounds:
        train_rounds = gen_rounds = rounds
    res: dict = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(),
                 "settings": {"device": device, "flush_denormal": device == "cpu", "bf16": bf16, "quick": quick,
                              "smoke": smoke, "warmup": warmup, "steps": steps, "rounds": train_rounds,
                              "isolated": isolate, "fused_adamw": True, "compile": compile},
                 "shapes": {n: dataclasses.asdict(SHAPES[n]) for n in set(train_shapes + list(gen_runs) + [data_model])},
                 "train": {}, "shape_check": {}, "generate": {}}
    for name in train_shapes if "train" in parts else []:
        s = SHAPES[name]
        res["shape_check"][name] = {"open_clip": coca_shape(build_coca(s)), "mmstory": mmstory_shape(build_mmstory(s))}
        for compiled in [False] + ([True] if compile else []):
            runs: dict = {"open_clip": [], "mmstory": []}
            n_rounds = 1 if compiled else train_rounds
            for r in range(n_rounds):  # alternate the libraries so background load hits both alike
                for lib in runs:
                    t0 = time.perf_counter()
                    runs[lib].append(measure(lib, dataclasses.asdict(s), device, bf16, warmup, steps,
                                             compile=compiled))
                    m = runs[lib][-1]
                    log(f"[train] {name}{' compiled' if compiled else ''} {lib} round {r + 1}/{n_rounds}: "
                        f"{s.batch / m['step_s']:.1f} samples/s, peak {m['peak_mem_mb']:.0f} MB, first step "
                        f"{m['first_step_s']:.1f} s, {time.perf_counter() - t0:.0f} s in all")
            row = {lib: combine(rs, s.batch) for lib, rs in runs.items()}
            row["ratio_samples_per_s"] = row["mmstory"]["samples_per_s"] / row["open_clip"]["samples_per_s"]
            row["ratio_samples_per_s_best"] = (row["mmstory"]["samples_per_s_best"]
                                               / row["open_clip"]["samples_per_s_best"])
            # in-process (isolate=False) the RSS peak may predate the model: no memory ratio then
            oc_mem = row["open_clip"]["peak_mem_mb"]
            row["ratio_peak_mem"] = row["mmstory"]["peak_mem_mb"] / oc_mem if oc_mem > 0 else None
            res["train"][f"{name} compiled" if compiled else name] = row
            checkpoint(res)
    for name, sizes in gen_runs.items() if "generate" in parts else []:
        log(f"[generate] {name} {sizes} ...")
        res["generate"][name] = generation_bench(SHAPES[name], sizes, new_tokens, device, bf16,
                                                 repeats=gen_rounds)
        checkpoint(res)
    if "data" not in parts:
        return res
    dm = SHAPES[data_model]
    model_rate = combine([measure("mmstory", dataclasses.asdict(dataclasses.replace(dm, batch=data_bs)), device,
                                  bf16, warmup, steps)], data_bs)
    res["data"] = {"model": data_model, "train": model_rate, "loaders": {}}
    for w in loader_workers:
        log(f"[data] loader, {w} workers ...")
        data = loader_bench(data_batches, batch_size=data_bs, workers=w)
        res["data"]["loaders"][str(w)] = {**data, "ratio_loader_over_train": data["samples_per_s"] / model_rate["samples_per_s"]}
    # the main job's loader (2 workers): kept under the old keys
    res["data"].update(loader=res["data"]["loaders"]["2"],
                       ratio_loader_over_train=res["data"]["loaders"]["2"]["ratio_loader_over_train"])
    return res


def table(res: dict) -> str:
    lines = [f"# {res['date']}  {res['machine']['cpu']} ({res['machine']['cores']} cores)  torch "
             f"{res['machine']['torch']}  open_clip {res['machine']['open_clip']}  mmstory {res['machine']['mmstory']}"
             f"  device {res['settings']['device']}{' bf16' if res['settings']['bf16'] else ' fp32'}"]
    if res["train"]:
        lines += ["", "| config | library | params (M) | samples/s (median step) | samples/s (fastest step) | peak mem (MB) |",
                  "|---|---|---|---|---|---|"]
    for name, row in res["train"].items():
        for lib in ("open_clip", "mmstory"):
            r = row[lib]
            lines.append(f"| {name} | {lib} | {r['params'] / 1e6:.1f} | {r['samples_per_s']:.1f} | {r['samples_per_s_best']:.1f} "
                         f"| {r['peak_mem_mb']:.0f} |")
        lines.append(f"| {name} | **mmstory / open_clip** | | **{row['ratio_samples_per_s']:.2f}x** | "
                     f"**{row['ratio_samples_per_s_best']:.2f}x** | "
                     + (f"**{row['ratio_peak_mem']:.2f}x** |" if row["ratio_peak_mem"] else "n/a |"))
    rounds = {g.get("rounds", 2) for g in res["generate"].values()}  # results before rounds were recorded: 2
    lines += [] if not res["generate"] else ["", f"Generation (20 new tokens; fastest of {'/'.join(map(str, sorted(rounds)))} rounds), images/s. *No cache*: mmstory re-runs the prefix, "
              "vocabulary head at the last position only. *Re-run, full logits*: the same decoder run CoCa's way "
              "(head at every prefix position).", "",
              "| config | images | greedy cache | greedy no cache | cache speed-up | greedy re-run, full logits "
              "| cache / re-run | beam-4 cache | beam-4 no cache | cache speed-up | open_clip CoCa greedy loop | "
              "greedy cache / CoCa |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape, g in res["generate"].items():
        for n, r in g.items():
            if not n.isdigit():
                continue
            ips = {k: v["images_per_s"] for k, v in r.items() if isinstance(v, dict)}
            lines.append(f"| {shape} | {n} | {ips['mmstory_greedy_cache']:.1f} | {ips['mmstory_greedy_nocache']:.1f} | "
                         f"{r['greedy_cache_speedup']:.1f}x | {ips['mmstory_greedy_rerun_full_logits']:.1f} | "
                         f"{r['greedy_cache_over_rerun_full_logits']:.1f}x | {ips['mmstory_beam4_cache']:.1f} | "
                         f"{ips['mmstory_beam4_nocache']:.1f} | {r['beam4_cache_speedup']:.1f}x | "
                         f"{ips['open_clip_greedy_loop']:.1f} | {r['greedy_mmstory_cache_over_open_clip']:.1f}x |")
    g = next(iter(res["generate"].values()), {"open_clip_generate": {}})
    for kind in ("beam_search", "top_k") if g["open_clip_generate"] else ():
        r = g["open_clip_generate"][kind]
        lines.append(f"\nopen_clip CoCa.generate({kind}) with transformers {g['open_clip_generate']['transformers']}: "
                     + ("runs" if r["runs"] else f"fails: {r['error']} (cause: "
                                               f"{g['open_clip_generate'].get('import_error')})"))
    d = res.get("data")
    loaders = {} if d is None else d.get("loaders") or {"2": {**d["loader"], "ratio_loader_over_train":
                                                              d["ratio_loader_over_train"]}}
    for w, ld in loaders.items():
        lines += ["", f"Data: loader ({w} workers) {ld['samples_per_s']:.0f} samples/s (start-up {ld['startup_s']:.1f} s) "
                  f"vs '{d['model']}' model training {d['train']['samples_per_s']:.1f} samples/s -> loader/train = "
                  f"{ld['ratio_loader_over_train']:.1f}x"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer timed steps, generation for 64 images only")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one step: checks the code paths only")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results.json"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (for GPU runs)")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile'd training (both libraries)")
    ap.add_argument("--parts", default="train,generate,data", help="comma-separated sections to run")
    ap.add_argument("--rounds", type=int, help="training (eager) and generation rounds (defaults: 2 and 3)")
    ap.add_argument("--no-isolate", action="store_true", help="train in this process (peak memory then mixes models)")
    ap.add_argument("--profile", choices=["tiny", "small", "main", "b32"], help="print torch.profiler tables and exit")
    args = ap.parse_args(argv)
    if args.profile:
        for lib in ("open_clip", "mmstory"):
            print(f"===== {lib} ({args.profile})")
            print(profile(lib, SHAPES[args.profile], args.device, args.bf16, compile=args.compile))
        return {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = run(quick=args.quick, smoke=args.smoke, device=args.device, bf16=args.bf16, isolate=not args.no_isolate,
              compile=args.compile, parts=tuple(args.parts.split(",")), rounds=args.rounds,
              checkpoint=lambda r: out.write_text(json.dumps(r, indent=1)))
    print(table(res))
    out.write_text(json.dumps(res, indent=1))
    print(f"\nwrote {args.out}")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
