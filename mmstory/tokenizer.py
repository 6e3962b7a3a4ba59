"""Tokenizers that work offline, behind one small interface.

Every tokenizer exposes ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``, ``encode(text) -> ids``
(no special tokens), ``decode(ids) -> text`` (special tokens dropped) and ``save(folder) -> spec``,
which writes its files into ``folder`` and returns the ``{"kind", "path"}`` dict (path relative to
``folder``) that rebuilds it with ``build_tokenizer(**spec, base_dir=folder)``.

- ``bytes``: UTF-8 bytes; needs no files (tests, quick demos).
- ``bpe``: a ``tokenizers`` BPE file (``tokenizer.json``), e.g. the one trained on the bundled captions.
- ``hf``: any local transformers tokenizer folder (GPT-2, BERT/MiniLM, ...).
- ``open_clip``: open_clip's bundled CLIP BPE vocabulary.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

import torch

from mmstory.registry import Registry


class Tokenizer:
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def save(self, folder: str | os.PathLike) -> dict:
        raise NotImplementedError

    @property
    def special_ids(self) -> set[int]:
        return {self.pad_id, self.bos_id, self.eos_id}

    def batch(self, texts: Sequence[str], *, max_len: int | None = None, bos: bool = True,
              eos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and right-pad. Returns ids ``(B, L)`` long and mask ``(B, L)`` bool (True = real token).

        Sequences longer than ``max_len`` are cut, keeping the EOS token last when ``eos`` is set.
        """
        seqs = [([self.bos_id] if bos else []) + self.encode(t) for t in texts]
        if max_len is not None:
            seqs = [s[: max_len - int(eos)] for s in seqs]
        seqs = [s + ([self.eos_id] if eos else []) for s in seqs]
        return pad_sequences(seqs, self.pad_id)


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, *, left: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad lists of ids to ``(B, L)``; returns ids and a bool mask (True = real token)."""
    length = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.bool)
    for i, s in enumerate(seqs):
        if not s:
            continue
        sl = slice(length - len(s), length) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(list(s), dtype=torch.long)
        mask[i, sl] = True
    return ids, mask


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes shifted past three special ids: pad 0, bos 1, eos 2. Any language, no files."""

    offset = 3

    def __init__(self, path: str | None = None):
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.vocab_size = 256 + self.offset

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) - self.offset for i in ids if int(i) >= self.offset)
        return data.decode("utf-8", errors="replace")

    def save(self, folder) -> dict:
        return {"kind": "bytes", "path": None}


class BPETokenizer(Tokenizer):
    """A ``tokenizers`` model file with ``<pad>``, ``<bos>``, ``<eos>`` special tokens."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTok

        if not Path(path).is_file():
            raise FileNotFoundError(f"BPE tokenizer file not found: {path}")
        self.path = str(path)
        self.tok = HFTok.from_file(self.path)
        ids = {name: self.tok.token_to_id(name) for name in ("<pad>", "<bos>", "<eos>")}
        missing = [n for n, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer {path} lacks special token(s) {missing}")
        self.pad_id, self.bos_id, self.eos_id = ids["<pad>"], ids["<bos>"], ids["<eos>"]
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True).strip()

    def save(self, folder) -> dict:
        Path(folder).mkdir(parents=True, exist_ok=True)
        target = Path(folder) / "tokenizer.json"
        if not (target.exists() and target.samefile(self.path)):  # a model saved back into its own folder
            shutil.copyfile(self.path, target)
        return {"kind": "bpe", "path": "tokenizer.json"}


class HFTokenizer(Tokenizer):
    """A local transformers tokenizer folder. BOS/EOS fall back to CLS/SEP (BERT-style) and PAD to EOS
    (GPT-2 has none), so every family fits the same interface."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # transformers raises OSError/ValueError/HF hub errors here
            raise OSError(f"could not load the transformers tokenizer '{path}': {e}") from e
        t = self.tok
        self.bos_id = t.bos_token_id if t.bos_token_id is not None else t.cls_token_id
        self.eos_id = t.eos_token_id if t.eos_token_id is not None else t.sep_token_id
        self.pad_id = t.pad_token_id if t.pad_token_id is not None else self.eos_id
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(f"tokenizer '{path}' has neither BOS/EOS nor CLS/SEP tokens")
        self.vocab_size = len(t)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True).strip()

    def save(self, folder) -> dict:
        self.tok.save_pretrained(Path(folder))
        return {"kind": "hf", "path": "."}


class OpenCLIPTokenizer(Tokenizer):
    """open_clip's CLIP BPE (its vocabulary ships inside the package). Pads with 0 as open_clip does."""

    def __init__(self, path: str | None = None):
        from open_clip.tokenizer import SimpleTokenizer

        self.tok = SimpleTokenizer()
        self.bos_id, self.eos_id, self.pad_id = self.tok.sot_token_id, self.tok.eot_token_id, 0
        self.vocab_size = self.tok.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        keep = [int(i) for i in ids if int(i) not in self.special_ids]
        return self.tok.decode(keep).strip()

    def save(self, folder) -> dict:
        return {"kind": "open_clip", "path": None}


TOKENIZERS = Registry("tokenizer", {
    "bytes": ByteTokenizer,
    "bpe": BPETokenizer,
    "hf": HFTokenizer,
    "open_clip": OpenCLIPTokenizer,
})


def build_tokenizer(kind: str, path: str | None = None, base_dir: str | os.PathLike | None = None) -> Tokenizer:
    """Build a tokenizer; a relative ``path`` is resolved against ``base_dir`` (a checkpoint folder)."""
    if path is not None and base_dir is not None and not os.path.isabs(path):
        candidate = Path(base_dir) / path
        if candidate.exists():
            path = str(candidate)
    return TOKENIZERS[kind](path) if path is not None else TOKENIZERS[kind]()


def train_bpe(texts: Sequence[str], vocab_size: int, path: str | os.PathLike) -> BPETokenizer:
    """Train a byte-level BPE on ``texts`` with the ``tokenizers`` library and save it to ``path``."""
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return BPETokenizer(str(path))
