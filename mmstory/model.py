"""``MultimodalModel``: encoders + fusion + the shared decoder + weighted losses, assembled by composition.

Batch keys (bool masks, True = real):
    image (B, 3, H, W) | audio (B, T), audio_mask (B, T)
    text_ids, text_mask (B, L)           the caption for contrastive learning (text tokenizer)
    question_ids, question_mask (B, Lq)  a question to fuse with the image/audio (the question encoder's tokenizer:
                                         ``encoders.question`` where the model has one, else the text encoder's)
    tokens, tokens_mask, target_mask (B, S)  decoder sequence: BOS + prompt + target + EOS

The fusion sees image, audio and question tokens, never ``text``: that is the caption the decoder must
predict, and letting the decoder read it would teach it to copy.

The model works on tensors. Raw inputs (paths, PIL images, arrays, waveforms) go through
``mmstory.inference``: ``mmstory.caption(model, images)``, ``mmstory.answer(model, image=..., question=...)``.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from mmstory.config import Component, ConfigError, ModelConfig, from_dict, load_yaml, to_dict
from mmstory.decoder import TextDecoder
from mmstory.encoders import ENCODERS, Encoder, EncoderOutput
from mmstory.errors import UserError, is_disk_full
from mmstory.fusion import FUSIONS
from mmstory.generation import DecodeOptions, generate
from mmstory.losses import LOSSES
from mmstory.prompts import Prompts, scored_positions
from mmstory.question_bank import QuestionBank
from mmstory.retrieval import RetrievalMemory
from mmstory.tokenizer import Tokenizer, build_tokenizer, pad_sequences

# modality -> (batch key, mask key, encoder that reads it); a question is read by ``encoders.question`` where
# the model has one (e.g. a frozen pretrained sentence encoder beside a caption tower trained from scratch)
INPUTS = {
    "image": ("image", None, "image"),
    "audio": ("audio", "audio_mask", "audio"),
    "text": ("text_ids", "text_mask", "text"),
    "question": ("question_ids", "question_mask", "question"),
}
FUSED = ("image", "audio", "question")
ENCODER_KEYS = {"image": "image", "text": "text", "audio": "audio", "question": "text"}  # key -> modality it reads


class MultimodalModel(nn.Module):
    def __init__(self, *, encoders: dict[str, Encoder], fusion: nn.Module, decoder: TextDecoder,
                 losses: dict[str, tuple[nn.Module, float]], tokenizer: Tokenizer, dim: int, embed_dim: int,
                 config: ModelConfig | None = None):
        super().__init__()
        for name, enc in encoders.items():
            if not isinstance(enc, Encoder):
                raise TypeError(f"encoder for '{name}' is a {type(enc).__name__}, not an mmstory.encoders.Encoder "
                                f"(the interface the model, trainer and loader use)")
            if ENCODER_KEYS.get(name) != enc.modality:
                raise ValueError(f"encoder for '{name}' reads '{enc.modality}' inputs; encoders must be keyed "
                                 f"by the modality they read (image, text, audio; question: a text encoder)")
        self.encoders = nn.ModuleDict(encoders)
        self.token_proj = nn.ModuleDict({m: nn.Linear(e.width, dim) for m, e in encoders.items()})
        # a question has no contrastive embedding: it is only fused
        self.embed_proj = nn.ModuleDict({m: nn.Linear(e.pooled_width, embed_dim, bias=False)
                                         for m, e in encoders.items() if m != "question"})
        retrieval = config.retrieval if config is not None else None
        self.memory = RetrievalMemory(k=retrieval.k, max_tokens=retrieval.max_tokens, token_dim=decoder.tok.embedding_dim,
                                      dim=dim, layers=retrieval.layers, heads=retrieval.heads,
                                      colour=retrieval.colour, colour_size=retrieval.colour_size,
                                      audio=retrieval.audio) \
            if retrieval and retrieval.k else None
        if self.memory is not None and "image" not in encoders:
            raise ValueError("model.retrieval needs an image encoder: its keys are the image encoder's features")
        if self.memory is not None and self.memory.audio_frames and not hasattr(encoders.get("audio"), "logmel"):
            raise ValueError("model.retrieval.audio needs an audio encoder with a log-mel front end "
                             "(audio_transformer): audio keys are its log-mel")
        self.fusion = fusion
        self.decoder = decoder
        self.losses = nn.ModuleDict({n: loss for n, (loss, _) in losses.items()})
        self.loss_weights = {n: w for n, (_, w) in losses.items()}
        self.prompt_scored = any(getattr(loss, "prompt_weight", 0) > 0 for loss, _ in losses.values())
        self.tokenizer = tokenizer
        own = encoders["text"].tokenizer if "text" in encoders else None  # a text encoder may bring its own
        self.text_tokenizer = tokenizer if own is None else own
        own = encoders["question"].tokenizer if "question" in encoders else None
        self.question_tokenizer = own or self.text_tokenizer
        self.config = config
        # the decoder's task prompts, saved in the config: inference asks the way training taught
        self.prompts = config.prompts if config is not None else Prompts()
        self.frozen: list[str] = []  # submodule names set by ``freeze`` (a training choice, not saved)
        # training questions to ask in place of other wordings (mmstory/question_bank.py); filled from the training
        # data (mmstory.datastore.build_question_bank) and saved with the model, like the retrieval datastore
        self.question_bank: QuestionBank | None = None

    # ---------------------------------------------------------------- freezing
    def freeze(self, names: list[str]) -> None:
        """Freeze submodules by name (``encoders.image``, ``decoder.blocks.0``, ...): no gradients, and kept in
        eval mode by ``train()``, so BatchNorm statistics and dropout stay as loaded (LiT's locked tower)."""
        valid = {n for n, _ in self.named_modules() if n}
        for name in names:
            if name not in valid:
                tops = sorted(n for n in valid if n.count(".") <= 1)
                raise ValueError(f"freeze: the model has no submodule '{name}'; submodules: {', '.join(tops)}")
            for p in self.get_submodule(name).parameters():
                p.requires_grad_(False)
        self.frozen = list(names)
        self.train(self.training)

    def train(self, mode: bool = True) -> "MultimodalModel":
        super().train(mode)
        for name in self.frozen:
            self.get_submodule(name).eval()
        return self

    # ---------------------------------------------------------------- encoding
    def encode(self, batch: dict) -> dict[str, EncoderOutput]:
        """Run each encoder on the modalities present in ``batch``; outputs already in ``batch["features"]``
        (a frozen encoder's, from the trainer's ``FeatureCache``) are used as they are."""
        out = dict(batch.get("features", {}))
        for modality, (key, mask_key, _) in INPUTS.items():
            enc = self.input_encoder(modality)
            if key in batch and enc in self.encoders and modality not in out:
                out[modality] = self.encoders[enc](batch[key], batch.get(mask_key) if mask_key else None)
        return out

    def input_encoder(self, modality: str) -> str:
        """The name of the encoder that reads ``modality`` (a question: ``question`` if the model has one)."""
        enc = INPUTS[modality][2]
        return "text" if enc == "question" and "question" not in self.encoders else enc

    @property
    def question_max_len(self) -> int:
        return self.encoders[self.input_encoder("question")].max_len

    def embed(self, feats: dict[str, EncoderOutput]) -> dict[str, torch.Tensor]:
        """L2-normalised contrastive embeddings (B, embed_dim) per encoded modality."""
        return {m: F.normalize(self.embed_proj[INPUTS[m][2]](f.pooled), dim=-1)
                for m, f in feats.items() if m != "question"}

    def retrieval_key(self, pooled: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        """The retrieval key of images from their pooled image features (and pixels, for a colour layout)."""
        pre = self.encoders["image"].preprocess
        return self.memory.key(pooled, images, pre["mean"], pre["std"])

    def audio_retrieval_key(self, wave: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The retrieval key of clips (model.retrieval.audio): their log-mel through the audio encoder's front end."""
        return self.memory.audio_key(wave, mask, self.encoders["audio"].logmel)

    def fuse(self, feats: dict[str, EncoderOutput], exclude: list[str] | None = None,
             media: dict | None = None) -> dict[str, torch.Tensor]:
        """Project fused-modality tokens to the model width and fuse them: {"tokens" (B, M, dim), "mask"}. With
        retrieval, the captions retrieved for the images (or, with ``retrieval.audio``, the clips) follow the fused
        tokens (``media``: the batch's raw ``image`` / ``audio`` + ``audio_mask``, which a colour layout or an
        audio key is computed from; ``exclude``: a sample key per row whose own datastore entry that row may not
        retrieve)."""
        inputs = {m: (self.token_proj[self.input_encoder(m)](f.tokens), f.mask) for m, f in feats.items() if m in FUSED}
        if not inputs:
            raise ValueError(f"nothing to fuse: the batch has none of {FUSED} with an encoder "
                             f"(encoders: {list(self.encoders)})")
        hidden = self._media_dropout(inputs)
        if hidden is not None:  # these rows decode from the retrieved captions (and the question) alone
            inputs = {m: (t, mask & ~hidden[:, None]) if m in ("image", "audio") else (t, mask)
                      for m, (t, mask) in inputs.items()}
        fused = self.fusion(inputs)
        media = media or {}
        query = None
        if self.memory is not None and "image" in feats:
            modality, query = "image", self.retrieval_key(feats["image"].pooled, media.get("image"))
        elif self.memory is not None and self.memory.audio_frames and "audio" in feats:
            if media.get("audio") is None:
                raise ValueError("this model's clips retrieve captions by their log-mel (model.retrieval.audio): "
                                 "fuse needs the waveforms (media['audio']), not only their features")
            modality, query = "audio", self.audio_retrieval_key(media["audio"], media.get("audio_mask"))
        if query is not None:
            tokens, mask, ids = self.memory(query, self.decoder.tok, exclude, modality)
            fused = {**fused, "tokens": torch.cat([fused["tokens"], tokens], 1),
                     "mask": torch.cat([fused["mask"], mask], 1)}
            if self.decoder.copy is not None:  # the decoder may copy the retrieved tokens (the last of its memory)
                fused["copy_ids"] = ids
        return fused

    # ---------------------------------------------------------------- training forward
    def forward(self, batch: dict, *, full_logits: bool = False) -> dict:
        """Returns {"embeds": {modality: (B, E)}, each loss term "<name>_loss", "loss" = sum of weight *
        term} and, when ``tokens`` is given, the decoder's vocabulary logits:

        - with ``target_mask`` (training, validation): "target_logits" (N, V) only at the N positions whose
          next token is a target (or a prompt token, when the caption loss scores those: then also
          "target_is_prompt" (N,)), and "target_ids" (N,) those next tokens;
        - otherwise, or with ``full_logits=True``: "logits" (B, S, V) at every position.

        The first is the fast path. The (B, S, V) logits are the largest tensor of a training step (V is
        49,408 for CLIP's BPE), and BOS, padding and (unless scored) prompt positions never enter the loss, so computing
        the head only where it is scored saves that part of the head's matmuls, softmax and gradient
        (tests check that both paths give the same loss and gradients). Under torch.compile the full path
        is taken: the selection's data-dependent size would split the graph, and inductor fuses the
        head's cross-entropy instead."""
        feats = self.encode(batch)
        out: dict = {"embeds": self.embed(feats)}
        if "tokens" in batch:
            fused = self.fuse(feats, exclude=self._exclude(batch), media=batch)
            if "target_mask" in batch and not (full_logits or torch.compiler.is_compiling()):
                scored, is_prompt = scored_positions(batch, with_prompt=self.prompt_scored)  # (B, S - 1)
                if self.prompt_scored:  # a loss also scores the prompt tokens
                    out["target_is_prompt"] = is_prompt[scored]
                out["target_logits"] = self.decoder(batch["tokens"], fused["tokens"], fused["mask"],
                                                    select=F.pad(scored, (0, 1), value=False),
                                                    copy_ids=fused.get("copy_ids"))
                out["target_ids"] = batch["tokens"][:, 1:][scored]
            else:
                out["logits"] = self.decoder(batch["tokens"], fused["tokens"], fused["mask"],
                                             copy_ids=fused.get("copy_ids"))
            if "gates" in fused:
                out["gates"] = fused["gates"]
        total = None
        for name, loss_fn in self.losses.items():
            for term, value in loss_fn(out, batch).items():
                out[term] = value
                weighted = self.loss_weights[name] * value
                total = weighted if total is None else total + weighted
        if total is None:
            raise ValueError(f"no loss applies to this batch (keys: {sorted(batch)}); "
                             f"losses configured: {list(self.losses)}")
        out["loss"] = total
        return out

    def _media_dropout(self, inputs: dict) -> torch.Tensor | None:
        """Training with retrieval and ``retrieval.media_dropout``: (B,) rows whose image / audio tokens the decoder
        does not see, drawn from the torch RNG (so resumed runs draw the same); None when nothing is hidden."""
        p = self.config.retrieval.media_dropout if self.memory is not None and self.training else 0.0
        media = [m for m in ("image", "audio") if m in inputs]
        if not p or not media:
            return None
        rows = inputs[media[0]][1].shape[0]
        return torch.rand(rows).to(inputs[media[0]][1].device) < p

    def _exclude(self, batch: dict) -> list[str] | None:
        """Training with retrieval: each image may not retrieve its own datastore entry, except with probability
        ``retrieval.keep_self`` (drawn from the torch RNG, so resumed runs draw the same)."""
        if self.memory is None or not self.training or "__key__" not in batch:
            return None
        keep = self.config.retrieval.keep_self
        if not keep:
            return batch["__key__"]
        draws = torch.rand(len(batch["__key__"])).tolist()
        return [None if d < keep else k for k, d in zip(batch["__key__"], draws)]

    # ---------------------------------------------------------------- inference helpers
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """Texts -> normalised embeddings (N, E), tokenised with the text encoder's tokenizer."""
        max_len = self.encoders["text"].max_len
        ids, mask = self.text_tokenizer.batch(texts, max_len=max_len)
        feats = {"text": self.encoders["text"](ids.to(self.device), mask.to(self.device))}
        return self.embed(feats)["text"]

    @torch.no_grad()
    def embed_inputs(self, inputs: dict) -> dict[str, torch.Tensor]:
        """A batch dict (image / audio / text_ids ...) -> normalised embeddings per modality."""
        return self.embed(self.encode(inputs))

    @torch.no_grad()
    def generate(self, inputs: dict, prompts: str | list[str] | None = None, *, exclude: list[str] | None = None,
                 **options) -> list[str]:
        """Decode text for any mix of fused inputs (image, audio, question_ids) with a prompt per row (default:
        the caption prompt the model was trained with, ``self.prompts.caption``).
        ``options`` are ``DecodeOptions`` fields (max_new_tokens, num_beams, do_sample, top_k, ...);
        ``exclude``: per row, a datastore entry (sample key) retrieval may not return (leave-one-out)."""
        inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        fused = self.fuse(self.encode(inputs), exclude=exclude, media=inputs)
        B = fused["tokens"].shape[0]
        prompts = self.prompts.caption if prompts is None else prompts
        prompts = [prompts] * B if isinstance(prompts, str) else list(prompts)
        if len(prompts) != B:
            raise ValueError(f"got {len(prompts)} prompts for a batch of {B}")
        tok = self.tokenizer
        ids, mask = pad_sequences([[tok.bos_id] + tok.encode(p) for p in prompts], tok.pad_id, left=True)
        out = generate(self.decoder, fused["tokens"], fused["mask"], ids.to(self.device), mask.to(self.device),
                       eos_id=tok.eos_id, pad_id=tok.pad_id, opts=DecodeOptions(**options),
                       copy_ids=fused.get("copy_ids"))
        return [tok.decode(row) for row in out]

    # ---------------------------------------------------------------- save / load
    def save(self, folder: str | os.PathLike) -> None:
        """A folder with ``model.safetensors`` and ``config.yaml`` (plus tokenizer files). The saved config
        rebuilds the architecture without reaching for pretrained weights; the weights come from the file.
        A full disk raises ``UserError`` naming the file ("no space left on device while writing ...")."""
        from safetensors.torch import save_model

        folder = Path(folder)
        writing = folder  # the file being written, for the error message
        try:
            folder.mkdir(parents=True, exist_ok=True)
            cfg = dataclasses.replace(self.config) if self.config else ModelConfig()
            cfg.encoders = {m: Component(cfg.encoders[m].name, enc.checkpoint_args(folder, key=m))
                            for m, enc in self.encoders.items()}
            dec = self.decoder.args
            cfg.decoder = dataclasses.replace(cfg.decoder, dim=dec["dim"], depth=dec["depth"], heads=dec["heads"],
                                              mlp_ratio=float(dec["mlp_ratio"]), max_len=dec["max_len"],
                                              vocab_size=dec["vocab_size"], pretrained=None)
            writing = folder / "tokenizer"
            spec = self.tokenizer.save(folder / "tokenizer")
            path = None if spec["path"] is None else str(Path("tokenizer") / spec["path"])
            cfg.tokenizer = dataclasses.replace(cfg.tokenizer, kind=spec["kind"], path=path)
            writing = folder / "model.safetensors"
            save_model(self, str(writing))
            writing = folder / "config.yaml"
            writing.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
            if self.memory is not None:
                writing = folder / "memory.safetensors"
                self.memory.save(folder)
            if self.question_bank is not None:
                writing = folder / "question_bank.json"
                self.question_bank.save(folder)
        except Exception as e:  # OSError(ENOSPC), or safetensors' "... (os error 28)"
            if is_disk_full(e):
                raise UserError(f"no space left on device while writing {getattr(e, 'filename', None) or writing}") from e
            raise


def build_model(cfg: ModelConfig, *, base_dir: str | os.PathLike | None = None) -> MultimodalModel:
    """Construct every component from the registries and hand them to ``MultimodalModel``."""
    tokenizer = build_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path, base_dir)
    inject = {"vocab_size": tokenizer.vocab_size, "base_dir": None if base_dir is None else str(base_dir)}
    encoders = {m: ENCODERS.build(c.name, c.args, **inject) for m, c in cfg.encoders.items()}
    fusion = FUSIONS.build(cfg.fusion.name, cfg.fusion.args, dim=cfg.dim)
    d = cfg.decoder
    copy = bool(cfg.retrieval.k and cfg.retrieval.copy)
    if d.pretrained:
        if copy:
            raise ValueError("model.retrieval.copy is not available with a pretrained decoder (decoder.pretrained)")
        decoder = TextDecoder.from_gpt2(d.pretrained, memory_dim=cfg.dim, dropout=d.dropout)
    else:
        decoder = TextDecoder(vocab_size=d.vocab_size or tokenizer.vocab_size, dim=d.dim, depth=d.depth,
                              heads=d.heads, mlp_ratio=d.mlp_ratio, max_len=d.max_len, memory_dim=cfg.dim,
                              dropout=d.dropout, copy=copy)
    if tokenizer.vocab_size > decoder.tok.num_embeddings:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the decoder only "
                         f"{decoder.tok.num_embeddings} embeddings; use the decoder's own tokenizer")
    losses = {n: (LOSSES.build(s.name, s.args), s.weight) for n, s in cfg.losses.items()}
    return MultimodalModel(encoders=encoders, fusion=fusion, decoder=decoder, losses=losses, tokenizer=tokenizer,
                           dim=cfg.dim, embed_dim=cfg.embed_dim, config=cfg)


class ModelFolderError(UserError, FileNotFoundError):
    """``path`` is not a model folder mmstory can load (missing, not a folder, or lacking a file); also a
    FileNotFoundError, as ``load`` raised before."""


def load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> MultimodalModel:
    """Load a folder written by ``MultimodalModel.save``. Weights come from safetensors only: loading
    never unpickles code from a file. A folder that is missing, incomplete, truncated or not written by
    ``save`` raises ``UserError`` naming the file and what is wrong with it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    folder = Path(path)
    if not folder.is_dir():
        raise ModelFolderError(f"model folder not found: {folder}" if not folder.exists() else
                               f"{folder} is a file, not a model folder (needs config.yaml and model.safetensors)")
    missing = [f for f in ("config.yaml", "model.safetensors") if not (folder / f).is_file()]
    if missing:
        raise ModelFolderError(f"{folder} is not an mmstory model folder (needs config.yaml and model.safetensors; "
                               f"{' and '.join(missing)} missing)")
    config_file = folder / "config.yaml"
    try:
        cfg = from_dict(ModelConfig, load_yaml(config_file))
    except ConfigError as e:
        raise ConfigError(f"{e}" if str(config_file) in str(e) else f"{config_file}: {e}") from None
    tokenizer = cfg.tokenizer.path
    if tokenizer is not None and not (folder / tokenizer).exists() and not Path(tokenizer).exists():
        raise ModelFolderError(f"{folder} lacks its tokenizer {tokenizer} (named in {config_file})")
    try:
        model = build_model(cfg, base_dir=folder).to(map_location)
    except ValueError as e:  # a constructor refused a value of the saved config
        raise ConfigError(f"{config_file} does not build a model: {e}") from e
    if cfg.quantize:  # the int8 layers are rebuilt empty; their weights come from the file below
        from mmstory.compress.quantize import quantize_linear

        quantize_linear(model, cfg.quantize_skip, empty=True)
    weights = folder / "model.safetensors"
    try:
        load_model(model, str(weights), device=str(map_location))
    except SafetensorError as e:
        raise UserError(f"{weights} is not a readable safetensors file (truncated or corrupt): {e}") from None
    except RuntimeError as e:  # missing / unexpected tensors or a shape mismatch
        reason = " ".join(str(e).split())
        raise UserError(f"{weights} does not hold the weights of the model {config_file} describes: "
                        f"{reason[:500]}") from None
    if model.memory is not None:
        try:
            model.memory.load(folder)
        except SafetensorError as e:
            raise UserError(f"{folder / 'memory.safetensors'} is not a readable safetensors file: {e}") from None
        except FileNotFoundError as e:
            raise ModelFolderError(str(e)) from None
    if (folder / "question_bank.json").is_file():
        try:
            model.question_bank = QuestionBank.load(folder)
        except (SafetensorError, FileNotFoundError, ValueError, KeyError) as e:
            raise UserError(f"{folder}: the question bank (question_bank.json / .safetensors) cannot be read: "
                            f"{e}") from None
    return model.eval()
