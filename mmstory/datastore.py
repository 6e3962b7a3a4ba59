"""Fill a model's retrieval memory (``mmstory/retrieval.py``) from a training split: the datastore that
retrieval-augmented captioning reads (SmallCap's), built once before training and saved with the model."""
from __future__ import annotations

from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from mmstory.data.loader import build_loader, fit_to_encoders
from mmstory.data.transforms import strings
from mmstory.evaluate import eval_data_config


@torch.no_grad()
def build_datastore(model, split_or_urls, *, data=None, batch_size: int | None = None, autocast=None,
                    progress: bool = True) -> int:
    """Fill ``model.memory`` from a (training) split: per image sample, the frozen image encoder's pooled
    features (evaluation transforms: the same input the image gets in training without augmentation) and its
    first ``retrieval.captions`` captions joined by "; ", keyed by the sample key. Returns the number of entries."""
    if model.memory is None:
        raise ValueError("this model has no retrieval memory (model.retrieval.k is 0)")
    was_training = model.training
    model.eval()
    cfg, norm = fit_to_encoders(eval_data_config(model, data, batch_size), model.encoders)
    loader = build_loader(split_or_urls, cfg, tokenizer=model.tokenizer, text_tokenizer=model.text_tokenizer,
                          question_tokenizer=model.question_tokenizer, prompts=model.prompts, train=False, **norm)
    keys, texts, names = [], [], []
    for batch in tqdm(loader, desc="datastore", disable=not progress, unit="batch"):
        if "image" not in batch:
            continue
        rows = [i for i in range(len(batch["__key__"])) if "image_mask" not in batch or batch["image_mask"][i]]
        captions = {i: strings(batch["meta"][i].get("captions")) for i in rows}
        rows = [i for i in rows if captions[i]]
        if not rows:
            continue
        images = batch["image"][rows].to(model.device)
        with (autocast or nullcontext)():
            pooled = model.encoders["image"](images).pooled
        keys.append(model.retrieval_key(pooled, images))
        texts += ["; ".join(captions[i][:model.config.retrieval.captions]) for i in rows]
        names += [batch["__key__"][i] for i in rows]
    model.train(was_training)
    if not keys:
        raise ValueError("no captioned image samples to build the retrieval datastore from")
    model.memory.fill(torch.cat(keys), texts, names, model.tokenizer)
    return len(texts)
