"""Evaluate a model on a split: captioning, VQA, retrieval and zero-shot, plus a readable report.

    results = evaluate(model, manifest.split("val_novel"), max_samples=500)
    write_report(results, "runs/emoji/eval/val_novel")

One pass over the split through ``build_loader(train=False)`` (the eval transforms, so evaluation sees
exactly what ``model.caption(...)`` on the same file sees). Per sample the media is encoded for the
embeddings, one caption is generated, and every QA pair of the sample is answered; the metrics are
computed at the end:

    caption     one caption per sample vs all its reference captions: BLEU-1..4, METEOR (None without
                Java), ROUGE-L, CIDEr (pycocoevalcap, via mmstory.metrics.caption_scores)
    qa          VQA accuracy over the samples' QA pairs, overall and per ``type``
    retrieval   R@1/5/10 media->text (a sample's captions are its positives) and text->media
    zeroshot    top-1/top-5 over the split's distinct ``labels.label``, CLIP template ensembling

"media" is the image, or the audio clip for audio samples (audio splits: audio captioning, audio QA,
audio<->text retrieval, audio zero-shot). A split mixing both gets metrics per modality.

Any image folder with a JSONL/CSV of captions is evaluable without code:
``mmstory data build image-folder IMAGES captions.jsonl out/ --split val`` then
``mmstory eval CHECKPOINT --data out/manifest.json``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from mmstory.data.pipeline import DataConfig, build_loader, fit_to_encoders
from mmstory.data.transforms import DEFAULT_MEAN, DEFAULT_STD
from mmstory.generation import DecodeOptions
from mmstory.inference import (DEFAULT_TEMPLATES, class_embeddings, embed_texts, fuses_question, generate_text,
                               require_encoder)
from mmstory.metrics import caption_scores, retrieval_recall, vqa_accuracy, zero_shot_accuracy

if TYPE_CHECKING:
    from mmstory.model import MultimodalModel

TASKS = ("caption", "qa", "retrieval", "zeroshot")


# ---------------------------------------------------------------------------------------------- data
def eval_data_config(model: "MultimodalModel", data: DataConfig | None, batch_size: int) -> DataConfig:
    """The data config for evaluation: the training one (prompts, audio_seconds) with no augmentation,
    audio no longer than the audio encoder takes, and every sample kept whatever text it has (the image
    size, normalisation and sample rate then come from ``fit_to_encoders``)."""
    cfg = data or DataConfig()
    changes: dict[str, Any] = dict(batch_size=batch_size, augment=False, resampled=False,
                                   tasks={"caption": 1.0, "qa": 1.0}, audio_tasks={"caption": 1.0, "qa": 1.0})
    if "audio" in model.encoders:
        max_seconds = getattr(model.encoders["audio"], "max_seconds", None)
        if max_seconds is not None and cfg.audio_seconds > max_seconds:
            changes["audio_seconds"] = max_seconds
    return dataclasses.replace(cfg, **changes)


def _strings(value: Any) -> list[str]:
    return [v.strip() for v in value if isinstance(v, str) and v.strip()] if isinstance(value, list) else []


def _qa_items(meta: dict) -> list[dict]:
    items = meta.get("qa") if isinstance(meta.get("qa"), list) else []
    return [{"question": q["question"].strip(), "answers": _strings(q.get("answers")), "type": str(q.get("type", ""))}
            for q in items if isinstance(q, dict) and isinstance(q.get("question"), str) and _strings(q.get("answers"))]


def _label(meta: dict) -> str | None:
    labels = meta.get("labels")
    label = labels.get("label") if isinstance(labels, dict) else None
    return label.strip() if isinstance(label, str) and label.strip() else None


def _groups(batch: dict) -> list[tuple[str, list[int], dict[str, torch.Tensor]]]:
    """Split a batch by modality: rows with an image use it, the others their audio."""
    n = len(batch["__key__"])
    has_image = batch["image_mask"].tolist() if "image_mask" in batch else [("image" in batch)] * n
    out = []
    rows = [i for i in range(n) if has_image[i]]
    if rows:
        out.append(("image", rows, {"image": batch["image"][rows]}))
    rows = [i for i in range(n) if not has_image[i]]
    if rows and "audio" in batch:
        out.append(("audio", rows, {"audio": batch["audio"][rows], "audio_mask": batch["audio_mask"][rows]}))
    return out


def _thumbnail(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised (3, H, W) -> uint8 (H, W, 3) for the report."""
    x = image.float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def _split_name(split_or_urls: Any) -> str:
    if hasattr(split_or_urls, "name"):
        return str(split_or_urls.name)
    if isinstance(split_or_urls, (str, os.PathLike)):
        return Path(split_or_urls).stem
    return "data"


# ---------------------------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(model: "MultimodalModel", split_or_urls: Any, *, tasks: Sequence[str] = TASKS,
             max_samples: int | None = None, decode: DecodeOptions = DecodeOptions(max_new_tokens=20),
             batch_size: int = 32, data: DataConfig | None = None, templates: Sequence[str] = DEFAULT_TEMPLATES,
             fuse_question: bool | None = None, meteor: bool | None = None, keep_images: int = 16,
             device: str | torch.device | None = None, progress: bool = True, name: str | None = None) -> dict:
    """Metrics and per-sample predictions on a split (a manifest ``SplitInfo`` or shard URLs/paths).

    Args:
        tasks: any of ``caption``, ``qa``, ``retrieval``, ``zeroshot``.
        max_samples: stop after this many samples (the first ones of the split, in shard order).
        decode: decoding for captions and answers. data: the training ``DataConfig`` (its prompts and
            audio_seconds are used; image size, sample rate and augmentation are set for eval).
        fuse_question: also give questions to the fusion; None = as the model was trained (its config).
        meteor: compute METEOR (needs Java); None = when Java is available.
        keep_images: how many sample images to keep (uint8 thumbnails) for ``write_report``.

    Returns ``{"split", "num_samples", "modalities", "metrics": {task: ...}, "predictions": [per sample:
    key, modality, references, caption, qa [{question, answers, type, prediction, accuracy}], label,
    zeroshot], "images": {key: uint8 (H, W, 3)}}``. Tasks without data in the split are left out of
    ``metrics``."""
    if fuse_question is None:
        fuse_question = fuses_question(model)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown evaluation task(s) {unknown}; valid tasks: {', '.join(TASKS)}")
    if device is not None:
        model.to(device)
    was_training = model.training
    model.eval()
    cfg, norm = fit_to_encoders(eval_data_config(model, data, batch_size), model.encoders)
    mean, std = norm.get("mean", DEFAULT_MEAN), norm.get("std", DEFAULT_STD)
    loader = build_loader(split_or_urls, cfg, tokenizer=model.tokenizer, text_tokenizer=model.text_tokenizer,
                          train=False, mean=mean, std=std)
    options = dataclasses.asdict(decode)
    caption_prompt, qa_prompt = cfg.prompts["caption"], cfg.prompts["qa"]
    need_embeds = "retrieval" in tasks or "zeroshot" in tasks

    try:
        total = len(loader)
    except TypeError:
        total = None
    if max_samples is not None and total is not None:
        total = min(total, math.ceil(max_samples / batch_size))
    records: list[dict] = []
    embeds: dict[str, list[torch.Tensor]] = defaultdict(list)  # modality -> (n, E) chunks, in record order
    images: dict[str, np.ndarray] = {}
    seen_keys: dict[str, int] = {}
    bar = tqdm(loader, total=total, desc=f"eval {name or _split_name(split_or_urls)}", disable=not progress,
               unit="batch")
    for batch in bar:
        left = None if max_samples is None else max_samples - len(records)
        if left is not None and left <= 0:
            break
        for modality, rows, inputs in _groups(batch):
            if left is not None:
                rows, inputs = rows[:left], {k: v[:left] for k, v in inputs.items()}
                left -= len(rows)
            if not rows:
                continue
            require_encoder(model, modality)
            inputs = {k: v.to(model.device) for k, v in inputs.items()}
            recs = []
            for j, i in enumerate(rows):
                meta = batch["meta"][i]
                refs = _strings(meta.get("captions"))
                if not refs and batch["task"][i] == "caption":  # e.g. img2dataset's .txt caption
                    refs = list(batch["references"][i])
                key = batch["__key__"][i]
                if key in seen_keys:  # keys repeat across shards of some datasets
                    seen_keys[key] += 1
                    key = f"{key}#{seen_keys[key]}"
                else:
                    seen_keys[key] = 0
                recs.append({"key": key, "modality": modality, "references": refs, "caption": None,
                             "qa": _qa_items(meta), "label": _label(meta), "zeroshot": None})
                if modality == "image" and len(images) < keep_images:
                    images[key] = _thumbnail(inputs["image"][j], mean, std)
            if need_embeds:
                embeds[modality].append(model.embed_inputs(inputs)[modality].float().cpu())
            if "caption" in tasks:
                with_refs = [j for j, r in enumerate(recs) if r["references"]]
                if with_refs:
                    sub = {k: v[with_refs] for k, v in inputs.items()}
                    preds = generate_text(model, sub, [caption_prompt] * len(with_refs), batch_size=batch_size,
                                          **options)
                    for j, p in zip(with_refs, preds):
                        recs[j]["caption"] = p
            if "qa" in tasks:
                pairs = [(j, q) for j, r in enumerate(recs) for q in r["qa"]]
                if pairs:
                    index = torch.tensor([j for j, _ in pairs], device=model.device)
                    sub = {k: v.index_select(0, index) for k, v in inputs.items()}
                    questions = [q["question"] for _, q in pairs]
                    preds = generate_text(model, sub, [qa_prompt.format(question=q) for q in questions],
                                          batch_size=batch_size, fuse_question=questions if fuse_question else None,
                                          **options)
                    for (_, q), p in zip(pairs, preds):
                        q["prediction"] = p
            records.extend(recs)
    bar.close()
    if not records:
        raise ValueError(f"no samples to evaluate in {_split_name(split_or_urls)}")

    metrics: dict[str, Any] = {}
    if "caption" in tasks:
        done = [r for r in records if r["caption"] is not None]
        if done:
            metrics["caption"] = caption_scores({r["key"]: r["caption"] for r in done},
                                                {r["key"]: r["references"] for r in done}, meteor=meteor)
            metrics["caption"]["num_samples"] = len(done)
    if "qa" in tasks:
        qs = [q for r in records for q in r["qa"]]
        if qs:
            acc = vqa_accuracy([q["prediction"] for q in qs], [q["answers"] for q in qs], [q["type"] for q in qs])
            for q, a in zip(qs, acc["per_question"]):
                q["accuracy"] = a
            metrics["qa"] = {"overall": acc["overall"], "per_type": acc["per_answer_type"], "num_questions": len(qs)}
    modalities = sorted({r["modality"] for r in records})
    if need_embeds:
        for modality in modalities:
            recs = [r for r in records if r["modality"] == modality]
            media = torch.cat(embeds[modality])  # (N, E), same order as recs
            suffix = "" if len(modalities) == 1 else f"_{modality}"
            if "retrieval" in tasks:
                result = _retrieval(model, recs, media, modality, batch_size)
                if result:
                    metrics["retrieval" + suffix] = result
            if "zeroshot" in tasks:
                result = _zeroshot(model, recs, media, templates, batch_size)
                if result:
                    metrics["zeroshot" + suffix] = result
    if was_training:
        model.train()
    return {"split": name or _split_name(split_or_urls), "num_samples": len(records), "modalities": modalities,
            "metrics": metrics, "predictions": records, "images": images}


def _retrieval(model, recs: list[dict], media: torch.Tensor, modality: str, batch_size: int) -> dict | None:
    """R@1/5/10 media->text over all captions of the split, and text->media."""
    keep = [i for i, r in enumerate(recs) if r["references"]]
    if not keep:
        return None
    texts, owner, positives = [], [], []
    for n, i in enumerate(keep):
        positives.append(list(range(len(texts), len(texts) + len(recs[i]["references"]))))
        texts += recs[i]["references"]
        owner += [n] * len(recs[i]["references"])
    sim = media[keep] @ embed_texts(model, texts, batch_size=max(batch_size, 64)).T  # (N, Nt)
    return {f"{modality}_to_text": retrieval_recall(sim, positives),
            f"text_to_{modality}": retrieval_recall(sim.T.contiguous(), owner),
            "num_samples": len(keep), "num_texts": len(texts)}


def _zeroshot(model, recs: list[dict], media: torch.Tensor, templates: Sequence[str], batch_size: int) -> dict | None:
    """top-1/top-5 over the distinct labels of the split; fills each record's ``zeroshot`` prediction."""
    keep = [i for i, r in enumerate(recs) if r["label"]]
    if not keep:
        return None
    classes = sorted({recs[i]["label"] for i in keep})
    logits = media[keep] @ class_embeddings(model, classes, templates, batch_size=max(batch_size, 64)).T  # (N, C)
    labels = torch.tensor([classes.index(recs[i]["label"]) for i in keep])
    for i, c in zip(keep, logits.argmax(1).tolist()):
        recs[i]["zeroshot"] = classes[c]
    return {**zero_shot_accuracy(logits, labels, topk=(1, 5)), "num_classes": len(classes), "num_samples": len(keep)}


def summary(results: dict) -> dict[str, float]:
    """Flat scalar metrics for logging: ``caption/CIDEr``, ``qa/overall``, ``retrieval/image_to_text/R@1`` ..."""
    flat: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix] = float(value)

    walk("", results["metrics"])
    return flat


# ---------------------------------------------------------------------------------------------- report
def _fmt(v: Any) -> str:
    return "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def _metric_tables(metrics: dict) -> list[str]:
    lines = []
    for task, values in metrics.items():
        lines += [f"### {task}", "", "| metric | value |", "| --- | --- |"]
        for k, v in summary({"metrics": values}).items():
            lines.append(f"| {k} | {int(v) if k.split('/')[-1].startswith('num_') else _fmt(v)} |")
        if task == "caption" and values.get("METEOR") is None:
            lines.append("| METEOR | n/a (needs Java) |")
        lines.append("")
    return lines


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _draw_grid(examples: list[dict], images: Mapping[str, Any], path: Path, *, cell: int = 128,
               columns: int = 4) -> None:
    """A PNG of images, each above its generated caption (G:) and first reference (R:)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    wrap = max(12, cell // 6)
    blocks = []
    for r in examples:
        lines = textwrap.wrap(f"G: {r['caption'] or ''}", wrap)[:3] + \
            textwrap.wrap(f"R: {r['references'][0] if r['references'] else ''}", wrap)[:3]
        blocks.append(lines)
    text_h = 12 * max(len(b) for b in blocks) + 6
    rows = math.ceil(len(examples) / columns)
    grid = Image.new("RGB", (columns * (cell + 8), rows * (cell + text_h + 8)), "white")
    draw = ImageDraw.Draw(grid)
    for n, (r, lines) in enumerate(zip(examples, blocks)):
        x, y = (n % columns) * (cell + 8) + 4, (n // columns) * (cell + text_h + 8) + 4
        img = images[r["key"]]
        img = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
        grid.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
        for k, line in enumerate(lines):
            draw.text((x, y + cell + 3 + 12 * k), line, fill=(20, 20, 160) if line.startswith("G:") else (0, 0, 0),
                      font=font)
    grid.save(path)


def write_report(results: dict, out_dir: str | os.PathLike, images: int | Mapping[str, Any] = 16) -> Path:
    """Write ``metrics.json`` (metrics, split, sample count), ``predictions.jsonl`` (every sample),
    ``report.md`` (metric tables and examples) and, for image samples, ``grid.png`` plus one PNG per
    example under ``images/``. ``images``: how many examples to show (drawn from the thumbnails
    ``evaluate`` kept), or a mapping key -> image (PIL / uint8 array) to show instead. Returns report.md."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    head = {k: results[k] for k in ("split", "num_samples", "modalities") if k in results}
    (out / "metrics.json").write_text(json.dumps({**head, "metrics": results["metrics"]}, indent=2,
                                                 ensure_ascii=False))
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for r in results["predictions"]:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

    pictures = dict(images) if isinstance(images, Mapping) else dict(results.get("images", {}))
    limit = len(pictures) if isinstance(images, Mapping) else int(images)
    preds = results["predictions"]
    examples = [r for r in preds if r["key"] in pictures][:limit] or preds[:min(limit, 8)]

    lines = [f"# Evaluation: {results.get('split', '')}", "",
             f"{results.get('num_samples', len(preds))} samples ({', '.join(results.get('modalities', []))}).", "",
             "## Metrics", ""] + _metric_tables(results["metrics"]) + ["## Examples", ""]
    shown = [r for r in examples if r["key"] in pictures]
    if shown:
        (out / "images").mkdir(exist_ok=True)
        _draw_grid(shown, pictures, out / "grid.png")
        lines += ["![examples: generated (G) and reference (R) captions](grid.png)", ""]
    lines += ["| sample | generated caption | reference captions | questions (predicted / expected) | zero-shot |",
              "| --- | --- | --- | --- | --- |"]
    for n, r in enumerate(examples):
        cell = _md(r["key"])
        if r["key"] in pictures:
            img = pictures[r["key"]]
            img = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
            name = f"images/{n:03d}.png"
            img.save(out / name)
            cell = f"![{_md(r['key'])}]({name})<br>{_md(r['key'])}"
        qa = "<br>".join(f"{_md(q['question'])} → **{_md(q.get('prediction', ''))}** / {_md(q['answers'][0])}"
                         for q in r["qa"])
        zs = "" if r.get("zeroshot") is None else f"{_md(r['zeroshot'])} (true: {_md(r['label'])})"
        lines.append(f"| {cell} | {_md(r['caption'] or '')} | {'<br>'.join(_md(c) for c in r['references'])} "
                     f"| {qa} | {zs} |")
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / "report.md"

