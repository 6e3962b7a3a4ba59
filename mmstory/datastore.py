"""Fill a model's memories from its training data, once before training; both are saved with the model:
the retrieval datastores (``mmstory/retrieval.py``) that retrieval-augmented captioning reads (SmallCap's), and the
question bank (``mmstory/question_bank.py``) that answers other wordings as the training questions."""
from __future__ import annotations

from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from mmstory.data.loader import build_loader, fit_to_encoders, model_text_args
from mmstory.data.shards import iter_tar, resolve_shards
from mmstory.data.stats import SilentStats
from mmstory.data.transforms import qa_items, strings
from mmstory.data.wordings import Wordings
from mmstory.evaluate import eval_data_config
from mmstory.feature_cache import FeatureCache
from mmstory.question_bank import QuestionBank


@torch.no_grad()
def build_datastore(model, split_or_urls, *, data=None, batch_size: int | None = None, autocast=None,
                    progress: bool = True, cache: FeatureCache | None = None) -> dict[str, int]:
    """Fill ``model.memory`` from a (training) split: per captioned image sample, the frozen image encoder's pooled
    features (evaluation transforms: the same input the image gets in training without augmentation), and, when
    the model's clips retrieve too (``retrieval.audio``), per captioned audio sample its log-mel key; each with its
    first ``retrieval.captions`` captions joined by "; ", keyed by the sample key. A modality the split has
    replaces that modality's datastore; the others are kept (so an image split and an audio split fill both).
    ``cache``: the training run's ``FeatureCache``; one that caches the image tower is filled on the way (the
    datastore's inputs are the training inputs without augmentation, which is when the tower is cached), so
    training does not run the frozen tower on these images again.
    Returns the number of entries per modality filled."""
    if model.memory is None:
        raise ValueError("this model has no retrieval memory (model.retrieval.k is 0)")
    was_training = model.training
    model.eval()
    cfg, norm = fit_to_encoders(eval_data_config(model, data, batch_size), model.encoders)
    loader = build_loader(split_or_urls, cfg, **model_text_args(model), train=False, **norm)
    found: dict[str, tuple[list, list, list]] = {}  # modality -> (keys, texts, names)
    for batch in tqdm(loader, desc="datastore", disable=not progress, unit="batch"):
        for modality in model.memory.modalities:
            if modality not in batch:
                continue
            present = batch.get(f"{modality}_mask")
            rows = [i for i in range(len(batch["__key__"])) if present is None or present[i].any()]
            captions = {i: strings(batch["meta"][i].get("captions")) for i in rows}
            rows = [i for i in rows if captions[i]]
            if not rows:
                continue
            keys, texts, names = found.setdefault(modality, ([], [], []))
            if modality == "image":
                images = batch["image"][rows].to(model.device)
                with (autocast or nullcontext)():
                    if cache is not None and "image" in cache.modalities:
                        pooled = cache.encode(model, "image", [batch["__key__"][i] for i in rows], images).pooled
                    else:
                        pooled = model.encoders["image"](images).pooled
                keys.append(model.retrieval_key(pooled, images))
            else:
                keys.append(model.audio_retrieval_key(batch["audio"][rows].to(model.device),
                                                      batch["audio_mask"][rows].to(model.device)))
            texts += ["; ".join(captions[i][:model.config.retrieval.captions]) for i in rows]
            names += [batch["__key__"][i] for i in rows]
    model.train(was_training)
    if not found:
        raise ValueError(f"no captioned {' or '.join(model.memory.modalities)} samples to build the retrieval "
                         f"datastore from")
    for modality, (keys, texts, names) in found.items():
        model.memory.fill(torch.cat(keys), texts, names, model.tokenizer, modality)
    return {modality: len(texts) for modality, (_, texts, _) in found.items()}


def training_questions(splits, *, progress: bool = True) -> list[str]:
    """The distinct questions of the QA items of ``splits`` (manifest splits or shard lists), in order of first
    appearance; only each sample's json is parsed."""
    import json

    seen: dict[str, None] = {}
    shards = [shard for split in splits for shard in resolve_shards(split)]
    for shard in tqdm(shards, desc="training questions", disable=not progress, unit="shard"):
        for sample in iter_tar(shard.url, SilentStats()):
            try:
                meta = json.loads(sample.get("json", b"{}"))
            except ValueError:
                continue  # the loader counts bad samples; here they have no question to give
            for item in qa_items(meta if isinstance(meta, dict) else {}):
                seen.setdefault(item["question"], None)
    return list(seen)


def build_question_bank(model, splits, *, wordings: Wordings | None = None, progress: bool = True) -> int:
    """Set ``model.question_bank`` from the questions of the training ``splits`` and, for each one that matches a
    pattern of ``wordings``, its train rewordings (never the held-out ones), with the pattern's slot values.
    ``model.config.question_bank`` names the sentence encoder and the threshold. Returns the number of entries."""
    cfg = model.config.question_bank
    entries = []
    for question in training_questions(splits, progress=progress):
        found = wordings.match(question) if wordings is not None else None
        if found is None:
            entries.append((question, question, None))
            continue
        pattern, slots = found
        values = list(slots.values())
        entries += [(text, question, values) for text in (question, *(t.format(**slots) for t in pattern.train))]
    model.question_bank = QuestionBank(entries, encoder=cfg.encoder, threshold=cfg.threshold)
    return len(entries)
