"""Retrieval-augmented decoding: the captions of the nearest training images join the decoder's memory.

A decoder trained on a few thousand images memorises them (it captions its training images) but does not
carry a concept from one art style to another: it has to know every label by heart, from features that differ
between styles. SmallCap (Ramos et al., CVPR 2023) instead gives its decoder the captions retrieved for an
image from a datastore of training captions, and the decoder learns to use them. Here:

- the **datastore** holds one entry per training image: a key (the image encoder's pooled features, L2
  normalised) and the image's first ``captions`` captions joined by "; ", tokenised with the decoder's
  tokenizer (the first ``max_tokens`` tokens);
- for each image, the captions of its ``k`` nearest entries (cosine) are embedded with the decoder's own
  token embedding, which is tied to its output layer, so copying a retrieved token means matching the embedding
  the decoder writes with; a learned projection, a rank embedding (1st, 2nd ... neighbour) and a position
  embedding are added; the result (B, k * max_tokens, dim) is appended to the fused tokens;
- in training an image may retrieve its own entry (``keep_self``: the probability it may); the decoder then
  learns to copy, which carries over to a new style wherever the frozen features find the right neighbour;
  at inference nothing is excluded;
- with ``copy``, the decoder also has a pointer over the retrieved tokens (``decoder.CopyHead``): its output
  mixes the vocabulary distribution with the attention over the retrieved tokens, put on their ids, by a
  learned gate (See et al.'s pointer-generator), so a copied label is spelt exactly.

Keys come from the image encoder, which must be frozen (``freeze: [encoders.image]``): keys computed once
then stay valid. With ``audio`` > 0, audio samples retrieve too, from a datastore of their own (the training
clips), keyed by a fixed log-mel summary of the clip (``baselines.logmel_features``: no weights, so it never goes
stale); a spoken word retrieves the caption of the training word that sounds most alike. The datastores are data,
not weights: they are saved beside the model as ``memory.safetensors`` (keys, token ids) and ``memory.json``
(captions, sample keys), and ``mmstory.load`` reads them back.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmstory.baselines import logmel_features, pixel_features
from mmstory.layers import Block, key_padding_mask
from mmstory.tokenizer import Tokenizer, pad_sequences


@dataclass
class Datastore:
    """One modality's entries: keys (N, D) L2-normalised, caption token ids (N, L), captions and sample keys."""

    keys: torch.Tensor
    ids: torch.Tensor
    texts: list[str]
    names: list[str]
    row: dict[str, int] = field(init=False)

    def __post_init__(self):
        self.row = {n: i for i, n in enumerate(self.names)}

    def to(self, device: torch.device) -> "Datastore":
        if self.keys.device != device:
            self.keys, self.ids = self.keys.to(device), self.ids.to(device)
        return self


class RetrievalMemory(nn.Module):
    """The datastores (one per modality that retrieves) and the layers that turn retrieved captions into decoder
    memory tokens; the layers are shared: a caption read for a clip is read as one read for an image."""

    def __init__(self, *, k: int, max_tokens: int, token_dim: int, dim: int, layers: int = 1, heads: int = 4,
                 colour: float = 0.0, colour_size: int = 16, audio: int = 0):
        super().__init__()
        if colour < 0 or colour_size < 1 or audio < 0:
            raise ValueError(f"model.retrieval: colour and audio must be >= 0 and colour_size >= 1 "
                             f"(got {colour}, {audio}, {colour_size})")
        self.colour, self.colour_size, self.audio_frames = colour, colour_size, audio
        if k < 1 or max_tokens < 1 or layers < 0:
            raise ValueError(f"model.retrieval: k and max_tokens must be >= 1 and layers >= 0 "
                             f"(got {k}, {max_tokens}, {layers})")
        self.k, self.max_tokens = k, max_tokens
        self.proj = nn.Linear(token_dim, dim)
        self.pos = nn.Parameter(torch.randn(1, max_tokens, dim) * 0.02)    # (1, L, dim)
        # each retrieved caption read on its own by `layers` Transformer blocks, so every memory token knows its
        # neighbours: copying means attending to the token after the one just written, which a context-free
        # token embedding cannot be matched on
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.rank = nn.Parameter(torch.randn(k, 1, dim) * 0.02)            # (k, 1, dim)
        # the datastores: data, not weights (their size is data), so outside the state dict; moved to the query's
        # device when first searched
        self.stores: dict[str, Datastore] = {}
        self.pad_id = 0

    def __len__(self) -> int:
        """Entries of the image datastore."""
        return len(self.stores["image"].texts) if "image" in self.stores else 0

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities whose samples retrieve."""
        return ("image", "audio") if self.audio_frames else ("image",)

    def key(self, pooled: torch.Tensor, images: torch.Tensor | None, mean: Sequence[float], std: Sequence[float]
            ) -> torch.Tensor:
        """Retrieval keys (B, D'): the L2-normalised pooled image features and, with ``colour`` > 0, the image's
        coarse colour layout (``colour_size`` squared, mean-centred, L2-normalised) scaled by sqrt(colour), so the
        dot product of two keys is cos(features) + colour * cos(layouts)."""
        key = F.normalize(pooled.float(), dim=-1)
        if not self.colour:
            return key
        if images is None:
            raise ValueError("retrieval with a colour layout needs the images, not only their features")
        layout = pixel_features(images, mean, std, self.colour_size).to(key.device)
        return torch.cat([key, self.colour ** 0.5 * layout], dim=-1)

    def audio_key(self, wave: torch.Tensor, mask: torch.Tensor | None, logmel: nn.Module) -> torch.Tensor:
        """Retrieval keys (B, n_mels * audio) of clips: their log-mel (``logmel``: the audio encoder's front end,
        which has no weights) resampled to ``audio`` frames, mean-centred, L2-normalised."""
        if not self.audio_frames:
            raise ValueError("this model's audio samples do not retrieve (model.retrieval.audio is 0)")
        return logmel_features(wave, mask, logmel, self.audio_frames)

    def fill(self, keys: torch.Tensor, texts: Sequence[str], names: Sequence[str], tokenizer: Tokenizer,
             modality: str = "image") -> None:
        """Replace one modality's datastore: ``keys`` (N, D') from ``key`` / ``audio_key``, one caption and one
        sample key per entry."""
        if modality not in self.modalities:
            raise ValueError(f"datastore: this model retrieves for {', '.join(self.modalities)}, not {modality}")
        if not (keys.shape[0] == len(texts) == len(names)) or keys.dim() != 2:
            raise ValueError(f"datastore: {tuple(keys.shape)} keys for {len(texts)} captions and {len(names)} names")
        if len(texts) < self.k:
            raise ValueError(f"datastore: {len(texts)} {modality} entries, fewer than k = {self.k}")
        ids = [tokenizer.encode(" " + t)[: self.max_tokens] for t in texts]
        padded, _ = pad_sequences([i + [tokenizer.pad_id] * (self.max_tokens - len(i)) for i in ids], tokenizer.pad_id)
        self.stores[modality] = Datastore(keys.float().to(self.rank.device), padded.to(self.rank.device),
                                          list(texts), list(names))
        self.pad_id = tokenizer.pad_id

    def store(self, modality: str = "image") -> Datastore:
        if modality not in self.stores:
            raise RuntimeError(f"this model decodes with retrieved captions (model.retrieval.k > 0) but its {modality} "
                               f"datastore is empty: train it with mmstory train, or fill it with "
                               f"mmstory.datastore.build_datastore()")
        return self.stores[modality]

    def nearest(self, query: torch.Tensor, exclude: Sequence[str] | None = None, modality: str = "image"
                ) -> torch.Tensor:
        """(B, D') query keys -> (B, k) rows of the ``modality`` datastore, most similar first; ``exclude[b]``
        (a sample key) is never retrieved for row b."""
        store = self.store(modality).to(query.device)
        sim = query.float() @ store.keys.T  # (B, N)
        if exclude is not None:
            for b, name in enumerate(exclude):
                row = store.row.get(name)
                if row is not None:
                    sim[b, row] = float("-inf")
        return sim.topk(self.k, dim=1).indices

    def forward(self, query: torch.Tensor, token_embedding: nn.Embedding, exclude: Sequence[str] | None = None,
                modality: str = "image") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Memory tokens (B, k * L, dim), their mask (B, k * L) and the token ids they stand for (B, k * L; -1 at
        padding) for (B, D') query keys (``key`` / ``audio_key``) of ``modality`` samples."""
        ids = self.store(modality).ids[self.nearest(query, exclude, modality)]  # (B, k, L)
        B, k, L = ids.shape
        mask = ids != self.pad_id                                                # (B, k, L)
        x = self.proj(token_embedding(ids)) + self.pos
        x = x.flatten(0, 1)            # (B * k, L, dim)
        attn_mask = key_padding_mask(mask.flatten(0, 1))
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
        x = x.view(B, k, L, -1) + self.rank                                       # (B, k, L, dim)
        return x.reshape(B, k * L, -1), mask.reshape(B, -1), ids.masked_fill(~mask, -1).reshape(B, -1)

    # ------------------------------------------------------------------------------------------ files
    # the image datastore is saved under the names it had before audio could retrieve ("keys", "ids", and the
    # json's "texts" / "names"), so older model folders load as they are; another modality's under its name
    def save(self, folder: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        tensors, meta = {}, {"pad_id": self.pad_id}
        for modality, store in self.stores.items():
            prefix = "" if modality == "image" else f"{modality}."
            tensors[prefix + "keys"] = store.keys.half().contiguous().cpu()
            tensors[prefix + "ids"] = store.ids.int().contiguous().cpu()
            entry = {"texts": store.texts, "names": store.names}
            if modality == "image":
                meta.update(entry)
            else:
                meta[modality] = entry
        save_file(tensors, str(folder / "memory.safetensors"))
        (folder / "memory.json").write_text(json.dumps(meta, ensure_ascii=False))

    def load(self, folder: str | os.PathLike) -> None:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "memory.safetensors").is_file() or not (folder / "memory.json").is_file():
            raise FileNotFoundError(f"{folder}: this model decodes with retrieved captions but its datastore "
                                    f"(memory.safetensors, memory.json) is missing")
        tensors = load_file(str(folder / "memory.safetensors"))
        meta = json.loads((folder / "memory.json").read_text())
        stores = {}
        for modality in self.modalities:
            prefix, entry = ("", meta) if modality == "image" else (f"{modality}.", meta.get(modality))
            if entry is None or prefix + "keys" not in tensors:
                raise FileNotFoundError(f"{folder}: this model's {modality} samples retrieve captions "
                                        f"(model.retrieval), but memory.safetensors has no {modality} datastore")
            keys, ids = tensors[prefix + "keys"], tensors[prefix + "ids"]
            if ids.shape[1] != self.max_tokens or keys.shape[0] != len(entry["texts"]):
                raise ValueError(f"{folder}: {modality} datastore shapes {tuple(keys.shape)} / {tuple(ids.shape)} "
                                 f"do not fit its {len(entry['texts'])} captions and max_tokens {self.max_tokens}")
            stores[modality] = Datastore(keys.float().to(self.rank.device), ids.long().to(self.rank.device),
                                         entry["texts"], entry["names"])
        self.stores, self.pad_id = stores, meta["pad_id"]

    def copy_from(self, other: "RetrievalMemory") -> None:
        """Take another memory's datastores (e.g. when FSDP's gathered copy of a model is built)."""
        self.stores = {m: Datastore(s.keys.to(self.rank.device), s.ids.to(self.rank.device), s.texts, s.names)
                       for m, s in other.stores.items()}
        self.pad_id = other.pad_id
