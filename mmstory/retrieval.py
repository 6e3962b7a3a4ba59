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
then stay valid. The datastore is data, not weights: it is saved beside the model as ``memory.safetensors``
(keys, token ids) and ``memory.json`` (captions, sample keys), and ``mmstory.load`` reads it back.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmstory.baselines import pixel_features
from mmstory.layers import Block, key_padding_mask
from mmstory.tokenizer import Tokenizer, pad_sequences


class RetrievalMemory(nn.Module):
    """The datastore and the layers that turn retrieved captions into decoder memory tokens."""

    def __init__(self, *, k: int, max_tokens: int, token_dim: int, dim: int, layers: int = 1, heads: int = 4,
                 colour: float = 0.0, colour_size: int = 16):
        super().__init__()
        if colour < 0 or colour_size < 1:
            raise ValueError(f"model.retrieval: colour must be >= 0 and colour_size >= 1 (got {colour}, {colour_size})")
        self.colour, self.colour_size = colour, colour_size
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
        # the datastore: buffers that move with the model but stay out of its state dict (their size is data)
        self.register_buffer("keys", torch.zeros(0, 0), persistent=False)                 # (N, D)
        self.register_buffer("ids", torch.zeros(0, max_tokens, dtype=torch.long), persistent=False)  # (N, L)
        self.texts: list[str] = []
        self.names: list[str] = []
        self._row: dict[str, int] = {}
        self.pad_id = 0

    def __len__(self) -> int:
        return len(self.texts)

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

    def fill(self, keys: torch.Tensor, texts: Sequence[str], names: Sequence[str], tokenizer: Tokenizer) -> None:
        """Replace the datastore: ``keys`` (N, D') from ``key``, one caption and one sample key per entry."""
        if not (keys.shape[0] == len(texts) == len(names)) or keys.dim() != 2:
            raise ValueError(f"datastore: {tuple(keys.shape)} keys for {len(texts)} captions and {len(names)} names")
        if len(texts) < self.k:
            raise ValueError(f"datastore: {len(texts)} entries, fewer than k = {self.k}")
        ids = [tokenizer.encode(" " + t)[: self.max_tokens] for t in texts]
        padded, _ = pad_sequences([i + [tokenizer.pad_id] * (self.max_tokens - len(i)) for i in ids], tokenizer.pad_id)
        device = self.rank.device
        self.keys = keys.float().to(device)
        self.ids = padded.to(device)
        self.texts, self.names, self.pad_id = list(texts), list(names), tokenizer.pad_id
        self._row = {n: i for i, n in enumerate(self.names)}

    def nearest(self, query: torch.Tensor, exclude: Sequence[str] | None = None) -> torch.Tensor:
        """(B, D') query keys -> (B, k) datastore rows, most similar first; ``exclude[b]`` (a sample key) is
        never retrieved for row b."""
        if not len(self):
            raise RuntimeError("this model decodes with retrieved captions (model.retrieval.k > 0) but its datastore "
                               "is empty: train it with mmstory train, or fill it with mmstory.datastore.build_datastore()")
        sim = query.float() @ self.keys.T  # (B, N)
        if exclude is not None:
            for b, name in enumerate(exclude):
                row = self._row.get(name)
                if row is not None:
                    sim[b, row] = float("-inf")
        return sim.topk(self.k, dim=1).indices

    def forward(self, query: torch.Tensor, token_embedding: nn.Embedding, exclude: Sequence[str] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Memory tokens (B, k * L, dim), their mask (B, k * L) and the token ids they stand for (B, k * L; -1 at
        padding) for (B, D') query keys (``key``)."""
        ids = self.ids[self.nearest(query, exclude)]  # (B, k, L)
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
    def save(self, folder: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        save_file({"keys": self.keys.half().contiguous().cpu(), "ids": self.ids.int().contiguous().cpu()},
                  str(folder / "memory.safetensors"))
        (folder / "memory.json").write_text(json.dumps({"texts": self.texts, "names": self.names,
                                                        "pad_id": self.pad_id}, ensure_ascii=False))

    def load(self, folder: str | os.PathLike) -> None:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "memory.safetensors").is_file() or not (folder / "memory.json").is_file():
            raise FileNotFoundError(f"{folder}: this model decodes with retrieved captions but its datastore "
                                    f"(memory.safetensors, memory.json) is missing")
        tensors = load_file(str(folder / "memory.safetensors"))
        meta = json.loads((folder / "memory.json").read_text())
        if tensors["ids"].shape[1] != self.max_tokens or tensors["keys"].shape[0] != len(meta["texts"]):
            raise ValueError(f"{folder}: datastore shapes {tuple(tensors['keys'].shape)} / "
                             f"{tuple(tensors['ids'].shape)} do not fit its {len(meta['texts'])} captions and "
                             f"max_tokens {self.max_tokens}")
        device = self.rank.device
        self.keys, self.ids = tensors["keys"].float().to(device), tensors["ids"].long().to(device)
        self.texts, self.names, self.pad_id = meta["texts"], meta["names"], meta["pad_id"]
        self._row = {n: i for i, n in enumerate(self.names)}

    def copy_from(self, other: "RetrievalMemory") -> None:
        """Take another memory's datastore (e.g. when FSDP's gathered copy of a model is built)."""
        self.keys, self.ids = other.keys.to(self.rank.device), other.ids.to(self.rank.device)
        self.texts, self.names, self.pad_id, self._row = other.texts, other.names, other.pad_id, dict(other._row)
