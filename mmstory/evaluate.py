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
import random
import textwrap
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from mmstory.baselines import (LabelMatcher, Reference, chance_recall, distinct_fraction, nearest, nn_answers,
                               nn_captions, nn_classes, nn_text_scores, logmel_features, pixel_features)
from mmstory.data.manifest import check_shards
from mmstory.config import DataConfig
from mmstory.data.loader import build_loader, fit_to_encoders, model_text_args, stable_seed
from mmstory.data.stats import read_counts, report as report_line
from mmstory.data.wordings import Wordings
from mmstory.data.transforms import DEFAULT_MEAN, DEFAULT_STD, qa_items, strings
from mmstory.generation import DecodeOptions
from mmstory.inference import (DEFAULT_TEMPLATES, asked_as_trained, class_embeddings, embed_texts, fuses_question,
                               generate_text, require_encoder, take_rows)
from mmstory.metrics import caption_scores, retrieval_recall, vqa_accuracy, zero_shot_accuracy

if TYPE_CHECKING:
    from mmstory.model import MultimodalModel

EVAL_TASKS = ("caption", "qa", "retrieval", "zeroshot")


# ---------------------------------------------------------------------------------------------- data
def eval_data_config(model: "MultimodalModel", data: DataConfig | None, batch_size: int | None) -> DataConfig:
    """The data config for evaluation: the training one (audio_seconds, wordings) with no augmentation,
    audio no longer than the audio encoder takes, and every sample kept whatever text it has (the image
    size, normalisation and sample rate then come from ``fit_to_encoders``)."""
    cfg = data or DataConfig()
    changes: dict[str, Any] = dict(batch_size=batch_size or cfg.batch_size, augment=False, resampled=False,
                                   tasks={"caption": 1.0, "qa": 1.0}, audio_tasks={"caption": 1.0, "qa": 1.0})
    if "audio" in model.encoders:
        max_seconds = model.encoders["audio"].max_seconds
        if max_seconds is not None and cfg.audio_seconds > max_seconds:
            changes["audio_seconds"] = max_seconds
    return dataclasses.replace(cfg, **changes)


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
def _derangement(n: int, seed: int) -> list[int] | None:
    """A seeded permutation of range(n) with no fixed point (None for n < 2): row i gets row perm[i]'s media."""
    if n < 2:
        return None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    fixed = [i for i in range(n) if perm[i] == i]
    for a, b in zip(fixed, fixed[1:] + fixed[:1]):  # rotate the fixed points among themselves
        perm[a] = b
    if len(fixed) == 1:  # a single fixed point swaps with its neighbour
        i, j = fixed[0], (fixed[0] + 1) % n
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def _caption_loss(model, batch: dict, rows: list[int], media: dict[str, torch.Tensor],
                  shuffled: dict[str, torch.Tensor]) -> tuple[float, float, int] | None:
    """Teacher-forced caption loss summed over the target tokens of the caption-task ``rows`` of ``batch``,
    with the true media and with the shuffled media: (sum true, sum shuffled, tokens), or None."""
    sel = [j for j, i in enumerate(rows) if batch["task"][i] == "caption"]
    if not sel or "caption" not in getattr(model, "losses", {}):
        return None
    index = torch.tensor([rows[j] for j in sel])
    keys = ("tokens", "tokens_mask", "target_mask", "prompt_filled_mask", "question_ids", "question_mask")
    base = {k: batch[k].index_select(0, index).to(model.device) for k in keys if k in batch}
    count = int(base["target_mask"][:, 1:].sum())
    sums = []
    for m in (media, shuffled):
        out = model({**base, **take_rows(m, sel)})
        sums.append(float(out["caption_loss"]) * count)
    return sums[0], sums[1], count


@torch.no_grad()
def evaluate(model: "MultimodalModel", split_or_urls: Any, *, tasks: Sequence[str] = EVAL_TASKS,
             max_samples: int | None = None, decode: DecodeOptions = DecodeOptions(max_new_tokens=20),
             batch_size: int | None = None, data: DataConfig | None = None,
             templates: Sequence[str] = DEFAULT_TEMPLATES,
             fuse_question: bool | None = None, meteor: bool | None = None, keep_images: int = 16,
             device: str | torch.device | None = None, progress: bool = True, name: str | None = None,
             reference: Reference | Sequence[Reference] | None = None, diagnostics: bool = True,
             wordings: Wordings | None = None,
             every: int = 1, labels: Iterable[str] = (), leave_one_out: bool = False,
             qa_decode: DecodeOptions | None = None, seed: int = 0, question_bank: bool = True) -> dict:
    """Metrics and per-sample predictions on a split (a manifest ``SplitInfo`` or shard URLs/paths), with the
    baselines and diagnostics that say what the metrics mean.

    Args:
        tasks: any of ``caption``, ``qa``, ``retrieval``, ``zeroshot``.
        max_samples: stop after this many samples (the first ones of the split, in shard order).
        decode: decoding for captions (and answers, unless ``qa_decode`` is given). data: the training
            ``DataConfig`` (its audio_seconds and wordings are used; image size, sample rate and augmentation are
            set for eval; the prompts are the model's own). batch_size: default ``data.batch_size``; a value
            given here is the one used (batches also pair the "media shuffled" diagnostics).
        fuse_question: also give questions to the fusion; None = as the model was trained (its config).
        meteor: compute METEOR (needs Java); None = when Java is available.
        keep_images: how many sample images to keep (uint8 thumbnails) for ``write_report``.
        reference: a training split's ``Reference`` (``reference_bank``), or one per modality: adds the
            nearest-neighbour baselines, for image samples ``baselines.pixel_nn`` and ``baselines.embedding_nn``,
            for audio samples (from an audio reference) ``baselines.logmel_nn`` and ``baselines.embedding_nn``.
        diagnostics: the model with each sample's media replaced by another sample's of the same batch
            (a seeded derangement): caption loss, captions and answers (``image_dependence``); the majority and
            chance baselines; caption diversity and label accuracy.
        wordings: ask every question a second time in a held-out wording (``qa.heldout_wording``).
        question_bank: a model with a question bank asks each question as the nearest training question
            (``inference.asked_as_trained``; the held-out wording's record then has ``asked_as``); False: as written.
        every: evaluate about one sample in ``every`` (a fixed subset spread over the split, chosen by key:
            e.g. a training split's, for the model's fit).
        labels: further labels a caption may name (e.g. every label of the training split), beside those of
            the evaluated samples and the reference, for ``label_accuracy``.
        leave_one_out: a model with retrieval may not retrieve a sample's own datastore entry (for its fit on
            training images without looking each one up).

    Returns ``{"split", "num_samples", "modalities", "metrics": {task: ...}, "predictions": [per sample:
    key, modality, references, caption, qa [{question, answers, type, prediction, accuracy}], label,
    zeroshot], "images": {key: uint8 (H, W, 3)}}``. Tasks without data in the split are left out of
    ``metrics``."""
    if fuse_question is None:
        fuse_question = fuses_question(model)
    nn_refs = {} if reference is None else {r.modality: r for r in ([reference] if isinstance(reference, Reference)
                                                                  else reference)}
    unknown = sorted(set(tasks) - set(EVAL_TASKS))
    if unknown:
        raise ValueError(f"unknown evaluation task(s) {unknown}; valid tasks: {', '.join(EVAL_TASKS)}")
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if device is not None:
        model.to(device)
    if hasattr(split_or_urls, "shards"):  # a manifest split: its local shards are all there, at their size
        check_shards(split_or_urls, sha256=False)
    was_training = model.training
    model.eval()
    cfg, norm = fit_to_encoders(eval_data_config(model, data, batch_size), model.encoders)
    cfg = dataclasses.replace(cfg, subsample=every)
    batch_size = cfg.batch_size
    mean, std = norm.get("mean", DEFAULT_MEAN), norm.get("std", DEFAULT_STD)
    loader = build_loader(split_or_urls, cfg, **model_text_args(model), train=False, mean=mean, std=std)
    options = dataclasses.asdict(decode)
    qa_options = dataclasses.asdict(qa_decode or decode)
    prompts = model.prompts
    need_embeds = "retrieval" in tasks or "zeroshot" in tasks or bool(nn_refs)

    def asked(questions: list[str]) -> list[str]:
        return asked_as_trained(model, questions) if question_bank else list(questions)

    def answers(inputs: dict, questions: list[str]) -> list[str]:
        return generate_text(model, inputs, [prompts.question(q) for q in questions], batch_size=batch_size,
                             fuse_question=questions if fuse_question else None, **qa_options)

    try:
        total = len(loader)
    except TypeError:
        total = None
    if max_samples is not None and total is not None:
        total = min(total, math.ceil(max_samples / batch_size))
    # thumbnails for the report: every ``spread``-th sample, so the grid spans the split, not its first shard
    spread = max(1, min(max_samples or math.inf, (total or 0) * batch_size) // max(keep_images, 1))
    records: list[dict] = []
    embeds: dict[str, list[torch.Tensor]] = defaultdict(list)  # modality -> (n, E) chunks, in record order
    raw: dict[str, list[torch.Tensor]] = defaultdict(list)  # raw-input baseline features per modality, in order
    images: dict[str, np.ndarray] = {}
    seen_keys: dict[str, int] = {}
    losses = [0.0, 0.0, 0]  # caption loss summed over target tokens: true media, shuffled media, tokens
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
            if hasattr(model, "encode"):  # (a model adapter, e.g. the CoCa benchmark's, may encode its own way)
                inputs["features"] = model.encode(inputs)  # once: every caption and answer below decodes from these
            perm = _derangement(len(rows), stable_seed("shuffle", seed, batch["__key__"][rows[0]])) \
                if diagnostics else None
            shuffled = take_rows(inputs, perm) if perm else None
            recs = []
            for j, i in enumerate(rows):
                meta = batch["meta"][i]
                refs = strings(meta.get("captions"))
                if not refs and batch["task"][i] == "caption":  # e.g. img2dataset's .txt caption
                    refs = list(batch["references"][i])
                key = batch["__key__"][i]
                if key in seen_keys:  # keys repeat across shards of some datasets
                    seen_keys[key] += 1
                    key = f"{key}#{seen_keys[key]}"
                else:
                    seen_keys[key] = 0
                recs.append({"key": key, "modality": modality, "references": refs, "caption": None,
                             "qa": qa_items(meta), "label": _label(meta), "zeroshot": None})
                if modality == "image" and len(images) < keep_images and (len(records) + j) % spread == 0:
                    images[key] = _thumbnail(inputs["image"][j], mean, std)
            if need_embeds:
                embeds[modality].append(model.embed_inputs(inputs)[modality].float().cpu())
            if modality in nn_refs:
                raw[modality].append(raw_features(model, modality, inputs, mean, std))
            if "caption" in tasks:
                with_refs = [j for j, r in enumerate(recs) if r["references"]]
                if with_refs:
                    for media, field, owner in ((inputs, "caption", None), (shuffled, "caption_shuffled", perm)):
                        if media is None:
                            continue
                        sub = take_rows(media, with_refs)
                        # leave-one-out excludes the entry of the image being captioned (row perm[j]'s when shuffled)
                        skip = [batch["__key__"][rows[j if owner is None else owner[j]]] for j in with_refs] \
                            if leave_one_out else None
                        for j, p in zip(with_refs, generate_text(model, sub, [prompts.caption] * len(with_refs),
                                                                  batch_size=batch_size, exclude=skip, **options)):
                            recs[j][field] = p
            if "qa" in tasks:
                pairs = [(j, q) for j, r in enumerate(recs) for q in r["qa"]]
                if pairs:
                    index = [j for j, _ in pairs]
                    questions = asked([q["question"] for _, q in pairs])
                    for media, field in ((inputs, "prediction"), (shuffled, "prediction_shuffled")):
                        if media is not None:
                            sub = take_rows(media, index)
                            for (_, q), p in zip(pairs, answers(sub, questions)):
                                q[field] = p
                    if wordings is not None:
                        reworded = [(k, wordings.heldout(q["question"], random.Random(
                            stable_seed("wording", seed, recs[j]["key"], q["question"]))))
                            for k, (j, q) in enumerate(pairs)]
                        reworded = [(k, text) for k, text in reworded if text]
                        if reworded:
                            sub = take_rows(inputs, [index[k] for k, _ in reworded])
                            texts = [t for _, t in reworded]
                            as_trained = asked(texts)
                            for (k, text), p, a in zip(reworded, answers(sub, as_trained), as_trained):
                                pairs[k][1]["heldout"] = {"question": text, "prediction": p,
                                                          **({"asked_as": a} if a != text else {})}
            if shuffled is not None:
                got = _caption_loss(model, batch, rows, inputs, shuffled)
                if got:
                    losses = [a + b for a, b in zip(losses, got)]
            records.extend(recs)
    bar.close()
    if not records:
        raise ValueError(f"no samples to evaluate in {_split_name(split_or_urls)}")

    metrics: dict[str, Any] = {}
    known = {r["label"] for r in records if r["label"]} | {x for r in nn_refs.values() for x in r.known_labels()} \
        | set(labels)
    matcher = LabelMatcher(known) if known else None
    if "caption" in tasks:
        done = [r for r in records if r["caption"] is not None]
        if done:
            metrics["caption"] = caption_metrics(done, "caption", matcher, meteor=meteor, use_java=None)
    if "qa" in tasks:
        qs = [q for r in records for q in r["qa"] if "prediction" in q]
        if qs:
            metrics["qa"] = qa_metrics(qs, "prediction")
            for q, a in zip(qs, vqa_accuracy([q["prediction"] for q in qs], [q["answers"] for q in qs])["per_question"]):
                q["accuracy"] = a
            reworded = [q for q in qs if "heldout" in q]
            if reworded:
                metrics["qa"]["heldout_wording"] = {
                    **qa_metrics([{**q, "prediction": q["heldout"]["prediction"]} for q in reworded], "prediction"),
                    "dataset_wording_same_questions": qa_metrics(reworded, "prediction")["overall"]}
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
    if diagnostics:
        metrics["image_dependence"] = _dependence(records, losses, matcher)
        metrics["baselines"] = _baselines(records, nn_refs, matcher, raw, embeds, tasks)
    if was_training:
        model.train()
    data_counts = read_counts(loader.stats, complete=max_samples is None or len(records) < max_samples)
    if data_counts["skipped"] or data_counts["missing_samples"]:
        tqdm.write(f"eval {name or _split_name(split_or_urls)}: {report_line(loader.stats)}")
    return {"split": name or _split_name(split_or_urls), "num_samples": len(records), "modalities": modalities,
            "data": data_counts, "metrics": metrics, "predictions": records, "images": images}


# ---------------------------------------------------------------------------------------------- metric groups
def caption_metrics(recs: list[dict], field: str, matcher: LabelMatcher | None, *, meteor: bool | None = False,
                    use_java: bool | None = False) -> dict:
    """COCO scores of ``rec[field]`` against each record's references, the fraction of distinct captions
    and, for labelled records, the fraction naming their label. The model's own captions are scored with
    Java's PTB tokenizer where available (``use_java=None``), as COCO does; the baselines and diagnostics with
    its pure-Python reproduction (``ptb_tokenize``, tested equal), which spares a JVM start per score."""
    out = caption_scores({r["key"]: r[field] for r in recs}, {r["key"]: r["references"] for r in recs}, meteor=meteor,
                         use_java=use_java)
    out["distinct"] = distinct_fraction([r[field] for r in recs])
    labelled = [r for r in recs if r["label"]]
    if matcher is not None and labelled:
        out["label_accuracy"] = matcher.accuracy([r[field] for r in labelled], [r["label"] for r in labelled])
    out["num_samples"] = len(recs)
    return out


def qa_metrics(questions: list[dict], field: str) -> dict:
    """VQA accuracy of ``q[field]`` overall and per question type."""
    acc = vqa_accuracy([q[field] for q in questions], [q["answers"] for q in questions], [q["type"] for q in questions])
    return {"overall": acc["overall"], "per_type": acc["per_answer_type"], "num_questions": len(questions)}


def _dependence(records: list[dict], losses: list, matcher: LabelMatcher | None) -> dict:
    """How much the model's outputs depend on its input: the same metrics with every sample's media replaced
    by another sample's of the same batch. A model that sees loses clearly."""
    out: dict[str, Any] = {}
    if losses[2]:
        out["caption_loss"], out["caption_loss_shuffled"] = losses[0] / losses[2], losses[1] / losses[2]
    both = [r for r in records if r["caption"] is not None and r.get("caption_shuffled") is not None]
    if both:  # CIDEr's weights depend on the reference set: score both on the same records
        for field, suffix in (("caption", ""), ("caption_shuffled", "_shuffled")):
            m = caption_metrics(both, field, matcher)
            out[f"CIDEr{suffix}"] = m["CIDEr"]
            if "label_accuracy" in m:
                out[f"label_accuracy{suffix}"] = m["label_accuracy"]
    qs = [q for r in records for q in r["qa"] if "prediction_shuffled" in q]
    if qs:
        out["qa_shuffled"] = qa_metrics(qs, "prediction_shuffled")
    return out


RAW_NN = {"image": "pixel_nn", "audio": "logmel_nn"}  # the raw-input nearest-neighbour baseline of each modality


def raw_features(model, modality: str, inputs: dict, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The raw-input baseline's features (``RAW_NN``) of one modality's batch, on the CPU: raw pixels for images,
    the log-mel through the audio encoder's front end for clips (``inputs`` on that encoder's device)."""
    if modality == "image":
        return pixel_features(inputs["image"], mean, std).cpu()
    return logmel_features(inputs["audio"], inputs.get("audio_mask"), model.encoders["audio"].logmel).cpu()


def _baselines(records: list[dict], refs: Mapping[str, Reference], matcher: LabelMatcher | None,
               raw: Mapping[str, list[torch.Tensor]], embeds: Mapping[str, list[torch.Tensor]],
               tasks: Sequence[str]) -> dict:
    """Nearest-neighbour transfer from each modality's reference (raw input: pixels or log-mel; the model's
    embedding), majority and chance."""
    out: dict[str, Any] = {}
    capped = [r for r in records if r["references"]]
    qs = [q for r in records for q in r["qa"]]
    for modality, ref in refs.items():
        media = [r for r in records if r["modality"] == modality]
        if not media:
            continue
        queries = {RAW_NN[modality]: torch.cat(raw[modality]) if raw.get(modality) else None,
                   "embedding_nn": torch.cat(embeds[modality]) if embeds.get(modality) else None}
        for feature, query in queries.items():
            if query is None or feature not in ref.features:
                continue
            sim = nearest(query, ref.features[feature])  # (Q, N) in the order of ``media``
            # (a split of both modalities: the second one's embedding baseline is named by its modality)
            out[feature if feature not in out else f"{feature}_{modality}"] = _transfer(media, ref, sim, matcher, tasks)
    # the majority comes from the reference of the split's (first) modality, else from the split itself
    reference = next((refs[r["modality"]] for r in records if r["modality"] in refs), None)
    majority: dict[str, Any] = {}
    if capped and reference is not None and reference.majority_caption and "caption" in tasks:
        majority["caption"] = caption_metrics([{**r, "nn": reference.majority_caption} for r in capped], "nn", matcher)
    if qs and "qa" in tasks:
        pool = reference.majority_answer if reference is not None else \
            {t: Counter(q["answers"][0] for q in qs if q["type"] == t).most_common(1)[0][0] for t in {q["type"] for q in qs}}
        majority["qa"] = qa_metrics([{**q, "nn": pool.get(q["type"], "")} for q in qs], "nn")
        majority["qa"]["source"] = "reference split" if reference is not None else "this split"
    if majority:
        out["majority"] = majority
    chance: dict[str, Any] = {}
    if capped and "retrieval" in tasks:
        texts, positives = text_gallery(capped)  # the gallery _retrieval ranks
        chance["retrieval_R@1"] = chance_recall(positives, len(texts))
    classes = {r["label"] for r in records if r["label"]}
    if classes and "zeroshot" in tasks:
        chance["zeroshot_top1"] = 1 / len(classes)
    if chance:
        out["chance"] = chance
    return out


def _transfer(images: list[dict], ref: Reference, sim: torch.Tensor, matcher: LabelMatcher | None,
              tasks: Sequence[str]) -> dict:
    """One nearest-neighbour baseline's caption, QA, media->text and zero-shot scores on ``images`` (the records
    of one modality)."""
    out: dict[str, Any] = {}
    rows = [i for i, r in enumerate(images) if r["references"]]
    if rows and "caption" in tasks:
        caps = nn_captions(ref, sim[rows])
        out["caption"] = caption_metrics([{**images[i], "nn": c} for i, c in zip(rows, caps)], "nn", matcher)
    asked = [(i, q) for i, r in enumerate(images) for q in r["qa"]]
    if asked and "qa" in tasks:
        preds = nn_answers(ref, sim, [(i, q["question"], q["type"]) for i, q in asked])
        out["qa"] = qa_metrics([{**q, "nn": p} for (_, q), p in zip(asked, preds)], "nn")
    if rows and "retrieval" in tasks:
        texts, positives = text_gallery([images[i] for i in rows])
        scores = nn_text_scores(ref, sim[rows], texts)
        out["retrieval"] = {f"{images[0]['modality']}_to_text": retrieval_recall(scores, positives)}
    labelled = [i for i, r in enumerate(images) if r["label"]]
    if labelled and "zeroshot" in tasks:
        classes = sorted({images[i]["label"] for i in labelled})
        preds = nn_classes(ref, sim[labelled], classes)
        out["zeroshot"] = {"top1": sum(p == images[i]["label"] for i, p in zip(labelled, preds)) / len(labelled)}
    return out


def split_labels(split_or_urls: Any) -> set[str]:
    """Every ``labels.label`` of a split, read from its samples' json without decoding any media."""
    from mmstory.data.shards import iter_tar, resolve_shards
    from mmstory.data.stats import WorkerStats

    out = set()
    for shard in resolve_shards(split_or_urls):
        for raw in iter_tar(shard.url, WorkerStats(None, 0, 0)):
            try:
                meta = json.loads(raw.get("json", b"{}"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            label = _label(meta) if isinstance(meta, dict) else None
            if label:
                out.add(label)
    return out


@torch.no_grad()
def reference_bank(model: "MultimodalModel", split_or_urls: Any, *, data: DataConfig | None = None,
                   batch_size: int | None = None, progress: bool = True, name: str | None = None,
                   modality: str = "image") -> Reference:
    """One pass over a (training) split with the evaluation transforms: each ``modality`` sample's raw-input
    baseline features (image: ``pixel_features``; audio: ``logmel_features`` through the audio encoder's front end)
    and model embedding, captions, label and QA, for the nearest-neighbour baselines."""
    if modality not in RAW_NN:
        raise ValueError(f"reference_bank: modality must be one of {', '.join(RAW_NN)}, not {modality!r}")
    was_training = model.training
    model.eval()
    cfg, norm = fit_to_encoders(eval_data_config(model, data, batch_size), model.encoders)
    mean, std = norm.get("mean", DEFAULT_MEAN), norm.get("std", DEFAULT_STD)
    loader = build_loader(split_or_urls, cfg, **model_text_args(model), train=False, mean=mean, std=std)
    try:
        total = len(loader)
    except TypeError:
        total = None
    feats: dict[str, list[torch.Tensor]] = defaultdict(list)
    captions, labels, qa = [], [], []
    for batch in tqdm(loader, total=total, desc=f"reference {name or _split_name(split_or_urls)}",
                      disable=not progress, unit="batch"):
        for found, rows, inputs in _groups(batch):
            if found != modality:
                continue
            require_encoder(model, modality)
            inputs = {k: v.to(model.device) for k, v in inputs.items()}
            feats[RAW_NN[modality]].append(raw_features(model, modality, inputs, mean, std))
            if modality in model.embed_proj:
                feats["embedding_nn"].append(model.embed_inputs(inputs)[modality].float().cpu())
            for i in rows:
                meta = batch["meta"][i]
                captions.append(strings(meta.get("captions")) or list(batch["references"][i]))
                labels.append(_label(meta))
                qa.append(qa_items(meta))
    if was_training:
        model.train()
    if not captions:
        raise ValueError(f"no {modality} samples in the reference split {name or _split_name(split_or_urls)}")
    return Reference(name=name or _split_name(split_or_urls), features={k: torch.cat(v) for k, v in feats.items()},
                     captions=captions, labels=labels, qa=qa, modality=modality)


def text_gallery(recs: Sequence[dict]) -> tuple[list[str], list[list[int]]]:
    """The distinct reference texts of ``recs`` (the retrieval gallery) and, per record, the gallery indices of its
    own references. A caption that several records carry (one concept in two art styles) is one gallery entry and a
    positive of each of them: listed once per record, its copies would tie with the positive and count as
    negatives (``retrieval_recall`` breaks ties pessimistically), so no model could rank it first."""
    index: dict[str, int] = {}
    positives = [sorted({index.setdefault(t, len(index)) for t in r["references"]}) for r in recs]
    return list(index), positives


def _retrieval(model, recs: list[dict], media: torch.Tensor, modality: str, batch_size: int) -> dict | None:
    """R@1/5/10 media->text over the distinct captions of the split (``text_gallery``), and text->media (a text's
    positives: every sample that carries it)."""
    keep = [i for i, r in enumerate(recs) if r["references"]]
    if not keep:
        return None
    texts, positives = text_gallery([recs[i] for i in keep])
    owners: list[list[int]] = [[] for _ in texts]
    for n, pos in enumerate(positives):
        for t in pos:
            owners[t].append(n)
    sim = media[keep] @ embed_texts(model, texts, batch_size=max(batch_size, 64)).T  # (N, Nt)
    return {f"{modality}_to_text": retrieval_recall(sim, positives),
            f"text_to_{modality}": retrieval_recall(sim.T.contiguous(), owners),
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


def _get(metrics: Mapping, path: str) -> Any:
    """``metrics["a"]["b"]...`` for ``path`` "a/b/...", or None where a part is missing."""
    node: Any = metrics
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def comparison_table(metrics: Mapping) -> list[str]:
    """Markdown rows: each headline number of the model beside the same number for the model with shuffled
    media and for the baselines (empty where not measured)."""
    raw = "logmel_nn" if "logmel_nn" in (_get(metrics, "baselines") or {}) else "pixel_nn"
    columns = [("model", ""), ("model, media shuffled", "image_dependence"),
               ("log-mel NN" if raw == "logmel_nn" else "pixel NN", f"baselines/{raw}"),
               ("embedding NN", "baselines/embedding_nn"), ("majority", "baselines/majority"),
               ("chance", "baselines/chance")]
    retrieval = next((k for k in metrics.get("retrieval", {}) if k.endswith("_to_text")), "image_to_text")
    rows = [("caption CIDEr", ["caption/CIDEr", "image_dependence/CIDEr_shuffled", "{b}/caption/CIDEr",
                               "{b}/caption/CIDEr", "{b}/caption/CIDEr", None]),
            ("caption names the label", ["caption/label_accuracy", "image_dependence/label_accuracy_shuffled",
                                         "{b}/caption/label_accuracy", "{b}/caption/label_accuracy",
                                         "{b}/caption/label_accuracy", None]),
            ("distinct captions / samples", ["caption/distinct", None, "{b}/caption/distinct", "{b}/caption/distinct",
                                             "{b}/caption/distinct", None]),
            ("caption loss (teacher-forced)", ["image_dependence/caption_loss",
                                               "image_dependence/caption_loss_shuffled", None, None, None, None]),
            ("VQA accuracy", ["qa/overall", "image_dependence/qa_shuffled/overall", "{b}/qa/overall",
                              "{b}/qa/overall", "{b}/qa/overall", None])]
    for qtype in sorted(_get(metrics, "qa/per_type") or {}):
        rows.append((f"VQA: {qtype}", [f"qa/per_type/{qtype}", f"image_dependence/qa_shuffled/per_type/{qtype}"]
                     + [f"{{b}}/qa/per_type/{qtype}"] * 3 + [None]))
    if _get(metrics, "qa/heldout_wording") is not None:
        rows.append(("VQA, held-out wordings", ["qa/heldout_wording/overall"] + [None] * 5))
        for qtype in sorted(_get(metrics, "qa/heldout_wording/per_type") or {}):
            rows.append((f"VQA, held-out wordings: {qtype}", [f"qa/heldout_wording/per_type/{qtype}"] + [None] * 5))
    rows += [(f"{retrieval.replace('_to_', '->')} R@1", [f"retrieval/{retrieval}/R@1", None,
                                                        f"{{b}}/retrieval/{retrieval}/R@1",
                                                        f"{{b}}/retrieval/{retrieval}/R@1", None,
                                                        "baselines/chance/retrieval_R@1"]),
             ("zero-shot top-1", ["zeroshot/top1", None, "{b}/zeroshot/top1", "{b}/zeroshot/top1", None,
                                  "baselines/chance/zeroshot_top1"])]
    out = ["| | " + " | ".join(c for c, _ in columns) + " |", "| --- |" + " --- |" * len(columns)]
    for label, paths in rows:
        cells = [_get(metrics, p.format(b=base)) if p else None for p, (_, base) in zip(paths, columns)]
        if all(c is None for c in cells):
            continue
        out.append(f"| {label} | " + " | ".join("" if c is None else f"{c:.3f}" for c in cells) + " |")
    return out if len(out) > 2 else []


def _data_line(data: Mapping | None) -> str:
    """" Skipped: ..." for the report when the loader dropped samples or shards held fewer than counted."""
    if not data or not (data.get("skipped") or data.get("missing_samples")):
        return ""
    parts = [f"{k} {v}" for k, v in data["skipped"].items()]
    if data.get("missing_samples"):
        parts.append(f"{data['missing_samples']} samples the manifest counts were not in their shards")
    return f" **Data skipped while reading** ({data['samples_read']} samples read): {', '.join(parts)}."


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
    head = {k: results[k] for k in ("split", "num_samples", "modalities", "data") if k in results}
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
             f"{results.get('num_samples', len(preds))} samples ({', '.join(results.get('modalities', []))})."
             + _data_line(results.get("data")), "",
             "## The model beside its baselines", ""] + (comparison_table(results["metrics"]) or ["(none measured)"]) + [
             "", "Pixel / log-mel / embedding NN: the caption, answers and label of the most similar training image "
             "or clip (raw 32x32 pixels; a clip's log-mel resampled to 16 frames; the model's embedding). Media "
             "shuffled: every sample's image or audio replaced by another sample's of its batch; a model that uses its "
             "input loses clearly there.", "",
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
        qa = "<br>".join(f"{_md(q['question'])} → **{_md(q['prediction'])}** / {_md(q['answers'][0])}"
                         for q in r["qa"] if "prediction" in q)  # (questions not asked, e.g. a captions-only fit: none)
        zs = "" if r.get("zeroshot") is None else f"{_md(r['zeroshot'])} (true: {_md(r['label'])})"
        lines.append(f"| {cell} | {_md(r['caption'] or '')} | {'<br>'.join(_md(c) for c in r['references'])} "
                     f"| {qa} | {zs} |")
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / "report.md"

