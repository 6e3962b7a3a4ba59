"""Typed configs. Dataclasses hold every default; YAML files only override them; ``--a.b=c`` overrides on
the command line. An unknown key or a wrong type fails at start-up naming the key. No include chains.

``ModelConfig`` describes the architecture as data: which encoder per modality, which fusion, the
decoder, the weighted losses and the tokenizer. Its values are checked when it is made (``__post_init__``),
before any model is built: sizes must be positive, heads must divide their width, and each component's name
and ``args`` are checked against its registered constructor (names, types, required arguments), so a bad
value fails naming its key (``config key 'model.encoders.text.args.width': expected int, got str 'abc'``).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmstory.errors import UserError
from mmstory.prompts import TASKS, Prompts


class ConfigError(UserError):
    """A config file, key or value is wrong. With ``key``, the message reads ``config key '<key>': <detail>``;
    ``from_dict`` prefixes the key with the section it was found in (``decoder.heads`` -> ``model.decoder.heads``)."""

    def __init__(self, message: str, *, key: str | None = None):
        self.key, self.detail = key, message
        super().__init__(f"config key '{key}': {message}" if key else message)

    def under(self, prefix: str) -> "ConfigError":
        """The same error for a config nested at ``prefix`` (``"model."``)."""
        return ConfigError(self.detail, key=prefix + self.key) if self.key and prefix else self


def _require(ok: bool, key: str, value: Any, requirement: str) -> None:
    if not ok:
        raise ConfigError(f"must be {requirement}, got {value!r}", key=key)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_int(key: str, v: Any) -> None:
    _require(_is_int(v) and v >= 1, key, v, "an integer >= 1")


def _count(key: str, v: Any) -> None:
    _require(_is_int(v) and v >= 0, key, v, "an integer >= 0")


def _fraction(key: str, v: Any) -> None:
    _require(_is_number(v) and 0 <= v < 1, key, v, "a number in [0, 1)")


def _divides(heads_key: str, heads: Any, width_name: str, width: Any) -> None:
    if _is_int(heads) and _is_int(width) and heads >= 1 and width % heads:
        raise ConfigError(f"{heads} heads do not divide {width_name} {width}", key=heads_key)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``; people write ``1e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+][0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


@dataclass
class Component:
    name: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossSpec:
    name: str
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class TokenizerSpec:
    kind: str = "bytes"       # bytes | bpe | hf | open_clip (see mmstory/tokenizer.py)
    path: str | None = None   # file or folder, for bpe/hf


@dataclass
class DecoderConfig:
    dim: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    max_len: int = 64
    dropout: float = 0.0
    vocab_size: int | None = None  # None: the tokenizer's size
    pretrained: str | None = None  # a GPT-2-family causal LM (local folder or hub name); sets the dims

    def __post_init__(self):
        for key in ("dim", "depth", "heads"):
            _positive_int(key, getattr(self, key))
        _divides("heads", self.heads, "the decoder's dim", self.dim)
        _require(_is_number(self.mlp_ratio) and self.mlp_ratio > 0, "mlp_ratio", self.mlp_ratio, "> 0")
        _require(_is_int(self.max_len) and self.max_len >= 2, "max_len", self.max_len, "an integer >= 2")
        _fraction("dropout", self.dropout)
        if self.vocab_size is not None:
            _positive_int("vocab_size", self.vocab_size)


@dataclass
class RetrievalConfig:
    """Retrieval-augmented decoding (mmstory/retrieval.py): the captions of the k training images nearest to an
    image (by the frozen image encoder's pooled features) join the decoder's memory; with ``audio``, those of the
    k training clips nearest to a clip (by their log-mel) too."""
    k: int = 0                # neighbours retrieved; 0 turns retrieval off
    captions: int = 1         # captions per datastore entry (an image's first N, joined by "; ")
    max_tokens: int = 12      # tokens kept of each retrieved entry
    keep_self: float = 1.0    # training: probability that an image may retrieve its own datastore entry
    layers: int = 1           # Transformer blocks reading each retrieved caption (0: token embeddings only)
    heads: int = 4
    colour: float = 0.0       # weight of the coarse colour layout in the key similarity (0: image features only)
    colour_size: int = 16     # the layout's resolution (colour_size x colour_size)
    copy: bool = False        # a pointer over the retrieved tokens, gated with the vocabulary (decoder.CopyHead)
    audio: int = 0            # audio samples retrieve too (from the training clips), keyed by their log-mel
                              # resampled to this many frames; 0: only images retrieve
    media_dropout: float = 0.0  # training: probability that a sample's image / audio tokens are hidden from the
                              # decoder, which then decodes from the retrieved captions (and the question) alone

    def __post_init__(self):
        _count("k", self.k)
        for key in ("captions", "max_tokens", "heads", "colour_size"):
            _positive_int(key, getattr(self, key))
        _count("layers", self.layers)
        _require(_is_number(self.keep_self) and 0 <= self.keep_self <= 1, "keep_self", self.keep_self,
                 "a number in [0, 1]")
        _require(_is_number(self.colour) and self.colour >= 0, "colour", self.colour, ">= 0")
        _count("audio", self.audio)
        _fraction("media_dropout", self.media_dropout)


@dataclass
class QuestionBankConfig:
    """Questions asked as the nearest training question (mmstory/question_bank.py), built from the training splits'
    questions and data.loader.wordings' train rewordings when ``encoder`` names a sentence encoder."""
    encoder: str = ""         # an hf_text path ("package:all_minilm_l6_v2", a folder); "" turns the bank off
    threshold: float = 0.5    # least cosine similarity to the nearest training question for it to be asked instead

    def __post_init__(self):
        _require(isinstance(self.encoder, str), "encoder", self.encoder, "a string")
        _require(_is_number(self.threshold) and -1 <= self.threshold <= 1, "threshold", self.threshold,
                 "a number in [-1, 1]")


@dataclass
class ModelConfig:
    dim: int = 256        # width of the fused tokens the decoder cross-attends to
    embed_dim: int = 256  # contrastive embedding width
    encoders: dict[str, Component] = field(default_factory=lambda: {
        "image": Component("vit", {"image_size": 64, "patch_size": 8, "width": 256, "depth": 4, "heads": 4}),
        "text": Component("text_transformer", {"width": 256, "depth": 4, "heads": 4, "max_len": 64}),
    })
    fusion: Component = field(default_factory=lambda: Component("concat"))
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    losses: dict[str, LossSpec] = field(default_factory=lambda: {
        "contrastive": LossSpec("contrastive", 1.0, {"pairs": [["image", "text"], ["audio", "text"]]}),
        "caption": LossSpec("caption", 2.0),
    })
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    # QA also fuses the question's text-encoder tokens with the media (recorded by the trainer from
    # data.loader.fuse_question, so a saved model answers the way it was trained)
    fuse_question: bool = False
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    question_bank: QuestionBankConfig = field(default_factory=QuestionBankConfig)
    # the decoder's task prompts (mmstory/prompts.py), saved with the model: inference asks as training taught
    prompts: Prompts = field(default_factory=Prompts)
    # set by `mmstory compress quantize` (mmstory/compress/quantize.py): "int8" -- the linear layers hold int8
    # weights; `load` rebuilds them as Int8Linear before reading the file. quantize_skip: modules left in float.
    quantize: str | None = None
    quantize_skip: list[str] = field(default_factory=list)

    def __post_init__(self):
        _positive_int("dim", self.dim)
        _require(self.quantize in (None, "int8"), "quantize", self.quantize, "null or int8")
        _positive_int("embed_dim", self.embed_dim)
        if self.retrieval.k and self.retrieval.layers:
            _divides("retrieval.heads", self.retrieval.heads, "the model's dim", self.dim)
        check_components(self)


# ----------------------------------------------------------------------------------------------------
# data and training (the keys of an experiment file besides ``model``)


@dataclass
class DataConfig:
    """``data.loader``: how samples become batches (the task prompts are the model's: ``model.prompts``)."""
    image_size: int = 64
    batch_size: int = 64
    workers: int = 2
    shuffle_buffer: int = 1000          # raw samples held per worker (train only)
    resampled: bool = False             # infinite stream: shards drawn with replacement
    seed: int = 0
    # sampling weights of the decoder task for a sample with an image / for an audio-only sample;
    # a sample only gets tasks it has text for
    tasks: dict[str, float] = field(default_factory=lambda: {"caption": 1.0, "qa": 1.0})
    audio_tasks: dict[str, float] = field(default_factory=lambda: {"caption": 1.0})
    max_text_len: int = 32              # contrastive caption / fused question, incl. bos and eos
    max_tokens: int = 48                # decoder sequence, incl. bos and eos
    audio_seconds: float = 2.0
    sample_rate: int = 16000
    augment: bool = True                # random crop + colour jitter (train), random audio crop
    crop_scale: tuple[float, float] = (0.7, 1.0)
    color_jitter: float = 0.1
    fuse_question: bool = False         # also emit question_ids/question_mask
    # other wordings of the dataset's templated questions (mmstory/data/wordings.py), used in training with
    # probability reword_prob; evaluation asks in the file's held-out wordings too
    wordings: str | None = None
    reword_prob: float = 0.75
    subsample: int = 1                  # keep about 1 in N samples, chosen by key (evaluating a fixed subset)
    drop_last: bool = False             # drop each worker's last partial batch
    prefetch_factor: int = 2
    pin_memory: bool = False

    def __post_init__(self):
        for name in ("tasks", "audio_tasks"):
            weights = getattr(self, name)
            unknown = sorted(set(weights) - set(TASKS))
            if unknown:
                raise ValueError(f"data.loader.{name}: unknown task(s) {unknown}; valid tasks: {', '.join(TASKS)}")
            if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
                raise ValueError(f"data.loader.{name}: weights must be >= 0 with at least one > 0, got {weights}")
        if self.subsample < 1:
            raise ValueError(f"data.loader.subsample must be >= 1, got {self.subsample}")
        if not 0.0 <= self.reword_prob <= 1.0:
            raise ValueError(f"data.loader.reword_prob must be in [0, 1], got {self.reword_prob}")
        for key, value, low in (("batch_size", self.batch_size, 1), ("workers", self.workers, 0),
                                ("image_size", self.image_size, 1), ("max_text_len", self.max_text_len, 2),
                                ("max_tokens", self.max_tokens, 3), ("shuffle_buffer", self.shuffle_buffer, 0),
                                ("sample_rate", self.sample_rate, 1), ("prefetch_factor", self.prefetch_factor, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"data.loader.{key} must be an integer >= {low}, got {value!r}")
        if not self.audio_seconds > 0:
            raise ValueError(f"data.loader.audio_seconds must be > 0, got {self.audio_seconds!r}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"data.loader.crop_scale must be [low, high] with 0 < low <= high <= 1, "
                             f"got {list(self.crop_scale)}")


PRUNE_KINDS = ("none", "unstructured", "structured")  # mmstory/compress/prune.py


@dataclass
class DataSpec:
    manifest: str = "data_manifests/emoji.json"
    train: dict[str, str] = field(default_factory=lambda: {"image": "train", "audio": "audio_train"})
    # epoch mode: how the sources interleave (each epoch uses every batch of each); resampled: their shares
    weights: dict[str, float] = field(default_factory=lambda: {"image": 3.0, "audio": 1.0})
    val: list[str] = field(default_factory=lambda: ["val_style", "val_novel", "audio_val_novel"])
    loader: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self):
        _require(bool(self.train), "train", self.train, "at least one source: {name: split}")
        for name, w in self.weights.items():
            _require(_is_number(w) and w > 0, f"weights.{name}", w, "> 0")
        extra = sorted(set(self.weights) - set(self.train))
        _require(not extra, "weights", self.weights, f"weights of the sources in data.train {sorted(self.train)} "
                 f"(no source {extra[0] if extra else ''!r})")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05   # cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0       # 0 disables
    accum_steps: int = 1
    # learning-rate multipliers by module path, e.g. {encoders.text: 0.1} to tune a pretrained tower gently
    lr_mult: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        _require(_is_number(self.lr) and self.lr > 0, "lr", self.lr, "> 0")
        _require(_is_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _require(len(self.betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in self.betas), "betas", self.betas,
                 "two numbers in [0, 1)")
        _require(_is_number(self.eps) and self.eps > 0, "eps", self.eps, "> 0")
        _count("warmup_steps", self.warmup_steps)
        _require(_is_number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio,
                 "a number in [0, 1]")
        _require(_is_number(self.grad_clip) and self.grad_clip >= 0, "grad_clip", self.grad_clip, ">= 0 (0: off)")
        _positive_int("accum_steps", self.accum_steps)
        for path, mult in self.lr_mult.items():
            _require(_is_number(mult) and mult >= 0, f"lr_mult.{path}", mult, ">= 0")


@dataclass
class ReportConfig:
    max_samples: int = 256       # per validation split, for the final evaluation
    batch_size: int = 32         # evaluation batches (the "media shuffled" diagnostics pair samples within one)
    num_beams: int = 3           # captions
    qa_beams: int = 1            # answers: a few tokens each, asked three times (as is, media shuffled, reworded)
    max_new_tokens: int = 20
    tasks: list[str] = field(default_factory=lambda: ["caption", "qa", "retrieval", "zeroshot"])
    # fit: greedy captions of a fixed sample of this many training images (of fit_split, default the first
    # training split), scored at every validation and in the report; 0 turns it off
    fit_samples: int = 256
    fit_split: str | None = None
    # nearest-neighbour baselines from this split (default: fit_split) beside every image metric
    reference_split: str | None = None

    def __post_init__(self):
        for key in ("max_samples", "batch_size", "num_beams", "qa_beams", "max_new_tokens"):
            _positive_int(key, getattr(self, key))
        _count("fit_samples", self.fit_samples)
        unknown = sorted(set(self.tasks) - {"caption", "qa", "retrieval", "zeroshot"})
        _require(not unknown, "tasks", self.tasks, "a list of caption, qa, retrieval, zeroshot")


@dataclass
class PruneSpec:
    """Prune the ``init_from`` model before training it further (mmstory/compress/prune.py): ``unstructured``
    zeroes the fraction ``amount`` of the linear weights with the smallest magnitude (sparsity, no CPU speed-up);
    ``structured`` removes that fraction of every MLP's hidden channels (smaller matrices: faster)."""
    kind: str = "none"
    amount: float = 0.5

    def __post_init__(self):
        _require(self.kind in PRUNE_KINDS, "prune.kind", self.kind, f"one of {', '.join(PRUNE_KINDS)}")
        _require(_is_number(self.amount) and 0 < self.amount < 1, "prune.amount", self.amount, "a fraction in (0, 1)")


@dataclass
class DistillSpec:
    """Train this (smaller) model from a trained teacher as well as from the data (mmstory/compress/distill.py):
    the teacher's softened next-token distribution at every scored position (``weight``) and its image-text /
    audio-text similarities (``embed_weight``) join the model's own losses."""
    teacher: str | None = None   # a saved model folder (e.g. runs/emoji_tiny/model); None: no distillation
    temperature: float = 2.0
    weight: float = 1.0
    embed_weight: float = 1.0

    def __post_init__(self):
        _require(_is_number(self.temperature) and self.temperature > 0, "distill.temperature", self.temperature, "> 0")
        for key in ("weight", "embed_weight"):
            _require(_is_number(getattr(self, key)) and getattr(self, key) >= 0, f"distill.{key}",
                     getattr(self, key), ">= 0")


@dataclass
class TrainConfig:
    name: str = "run"
    out_dir: str = "runs/{name}"
    seed: int = 0
    steps: int = 1000
    max_minutes: float = 0.0     # > 0: a budget: fewer steps planned at the end of warmup if `steps` would
                                 # not fit at the measured rate; a guard stops (and evaluates) at the budget
    precision: str = "fp32"      # fp32 | bf16 | fp16 (autocast; fp16 adds a grad scaler) | auto (bf16 where native)
    device: str = "auto"         # auto | cpu | cuda
    threads: int = 0             # torch intra-op threads on CPU (0: torch's default)
    compile: bool = False
    grad_checkpointing: bool = False
    # submodules trained no further (e.g. [encoders.image]: a pretrained tower locked as in LiT); kept in eval mode
    freeze: list[str] = field(default_factory=list)
    # a frozen encoder whose inputs do not change between epochs (data.loader.augment: false) runs once per
    # training sample; its outputs are reused (mmstory/feature_cache.py)
    cache_frozen: bool = True
    distributed: str = "ddp"     # ddp | fsdp, used under torchrun
    log_every: int = 10
    eval_every: int = 0          # 0: only at the end
    eval_batches: int = 4
    ckpt_every: int = 100
    keep_last: int = 2
    final_eval: bool = True
    init_from: str | None = None  # a model folder (e.g. another run's checkpoint) to start from
    prune: PruneSpec = field(default_factory=PruneSpec)  # prune the init_from model, then fine-tune it
    distill: DistillSpec = field(default_factory=DistillSpec)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self):
        choices = {"precision": ("fp32", "bf16", "fp16", "auto"), "device": ("auto", "cpu", "cuda"),
                   "distributed": ("ddp", "fsdp")}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ConfigError(f"config key '{key}': {getattr(self, key)!r} is not one of {valid}")
        for key in ("steps", "log_every", "eval_batches", "ckpt_every", "keep_last"):
            _positive_int(key, getattr(self, key))
        for key in ("eval_every", "threads", "seed"):
            _count(key, getattr(self, key))
        _require(_is_number(self.max_minutes) and self.max_minutes >= 0, "max_minutes", self.max_minutes,
                 ">= 0 (0: no budget)")
        _require(self.prune.kind == "none" or self.init_from, "init_from", self.init_from,
                 "a model folder to prune (prune.kind is set)")


# ----------------------------------------------------------------------------------------------------
# component names and arguments, checked against the registered constructors

# Constraints on constructor arguments of that name, whichever component takes them: a zero or negative size
# otherwise fails deep inside torch ("Trying to create tensor with negative dimension -5").
_POSITIVE_ARGS = ("width", "heads", "image_size", "patch_size", "max_len", "n_mels", "n_fft", "hop_length",
                  "sample_rate", "frames_per_token", "num_latents", "max_seconds", "mlp_ratio", "init_temperature",
                  "max_logit_scale")
_NON_NEGATIVE_ARGS = ("depth", "prompt_weight")
_FRACTION_ARGS = ("dropout", "label_smoothing")
# arguments the model fills in when the config does not (``Registry.build``'s ``injected``)
_INJECTED_ARGS = ("vocab_size", "base_dir", "dim")


def _check_args(kind: str, registry: dict, key: str, name: Any, args: dict, injected: dict) -> None:
    """``name`` is registered and ``args`` fit its constructor: known names, the annotated types, required
    arguments present, sizes positive, heads dividing the width (``width`` or the injected ``dim``)."""
    if name not in registry:
        raise ConfigError(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(registry))}", key=f"{key}.name")
    init = registry[name].__init__
    signature = inspect.signature(init).parameters
    accepts_any = any(v.kind is inspect.Parameter.VAR_KEYWORD for v in signature.values())
    params = {p: v for p, v in signature.items() if p != "self" and v.kind is not inspect.Parameter.VAR_KEYWORD}
    hints = typing.get_type_hints(init)
    for arg, value in args.items():
        k = f"{key}.args.{arg}"
        if arg not in params:
            if accepts_any:
                continue
            raise ConfigError(f"{kind} '{name}' has no argument '{arg}'; valid arguments: {', '.join(params)}", key=k)
        if value is None and hints.get(arg) not in (int, float):
            continue  # annotations are not exact about None: ``pretrained: bool | str = False`` takes None too
        if arg in hints:
            _convert(value, hints[arg], k)
        if arg in _POSITIVE_ARGS:
            _require(_is_number(value) and value > 0, k, value, "> 0")
        elif arg in _NON_NEGATIVE_ARGS:
            _require(_is_number(value) and value >= 0, k, value, ">= 0")
        elif arg in _FRACTION_ARGS:
            _fraction(k, value)
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in args
               and p not in _INJECTED_ARGS]
    if missing:
        raise ConfigError(f"{kind} '{name}' needs argument(s) {', '.join(missing)}", key=f"{key}.args")
    value = {p: args.get(p, injected.get(p, v.default)) for p, v in params.items()}
    width = next((w for w in ("width", "dim") if w in value), None)
    if "heads" in value and width is not None:
        _divides(f"{key}.args.heads", value["heads"], "the model's dim" if width in injected else width, value[width])
    if "patch_size" in params and _is_int(value.get("image_size")) and _is_int(value["patch_size"]):
        if value["image_size"] % value["patch_size"]:
            raise ConfigError(f"image_size {value['image_size']} is not a multiple of patch_size "
                              f"{value['patch_size']}", key=f"{key}.args")


def check_components(cfg: "ModelConfig") -> None:
    """Every component of ``cfg`` names a registered class and passes it arguments it takes (ConfigError
    naming the key otherwise). The registries are imported here, not at the top: they import torch models."""
    from mmstory.encoders import ENCODERS
    from mmstory.fusion import FUSIONS
    from mmstory.losses import LOSSES
    from mmstory.tokenizer import TOKENIZERS

    for modality, comp in cfg.encoders.items():
        if modality not in ("image", "text", "audio", "question"):
            raise ConfigError("encoders are keyed by the modality they read: image, text or audio (or question: "
                              "a text encoder for the fused question only)", key=f"encoders.{modality}")
        _check_args("encoder", ENCODERS, f"encoders.{modality}", comp.name, comp.args, {})
    _check_args("fusion", FUSIONS, "fusion", cfg.fusion.name, cfg.fusion.args, {"dim": cfg.dim})
    for n, spec in cfg.losses.items():
        _check_args("loss", LOSSES, f"losses.{n}", spec.name, spec.args, {})
        _require(_is_number(spec.weight) and math.isfinite(spec.weight) and spec.weight >= 0,
                 f"losses.{n}.weight", spec.weight, "a finite number >= 0")
    if cfg.tokenizer.kind not in TOKENIZERS:
        raise ConfigError(f"unknown tokenizer {cfg.tokenizer.kind!r}; valid kinds: {', '.join(sorted(TOKENIZERS))}",
                          key="tokenizer.kind")
    path = inspect.signature(TOKENIZERS[cfg.tokenizer.kind].__init__).parameters.get("path")
    if cfg.tokenizer.path is None and path is not None and path.default is inspect.Parameter.empty:
        raise ConfigError(f"tokenizer kind '{cfg.tokenizer.kind}' needs a path (a file or folder)",
                          key="tokenizer.path")


# ----------------------------------------------------------------------------------------------------
# dict <-> dataclass with strict checking

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", key=key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping for {tp.__name__}, got {value!r}", key=key)
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {value!r}", key=key)
        return {k: _convert(v, args[1], f"{key}.{k}") for k, v in value.items()} if args else dict(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {value!r}", key=key)
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"expected {tp.__name__}, got bool {value!r}", key=key)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"expected {tp.__name__}, got {type(value).__name__} {value!r}", key=key)
    return value


MOVED_KEYS = {"data.loader.prompts": "model.prompts"}  # keys of older configs, and where they live now


def from_dict(cls: type, data: dict, *, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; keys not given keep their defaults."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if f"{prefix}{unknown[0] if unknown else ''}" in MOVED_KEYS:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"config key '{key}' is now '{MOVED_KEYS[key]}'")
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; valid keys here: {', '.join(names)}")
    kwargs = {k: _convert(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:  # from __post_init__, keyed relative to this section
        raise e.under(prefix) from None
    except TypeError as e:  # a required field without default is missing
        raise ConfigError(f"config section '{prefix.rstrip('.') or cls.__name__}': {e}") from e
    except ValueError as e:  # another check in __post_init__: a config error all the same
        named = not prefix or str(e).startswith((prefix, "config key"))  # the message names its key already
        raise ConfigError(str(e) if named else f"config section '{prefix.rstrip('.')}': {e}") from e


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set ``--a.b=c`` overrides into a nested dict (a copy); values are parsed as YAML. The value replaces
    whatever was at that key: ``--model.encoders.image={name: vit, args: {width: 64}}`` swaps a whole
    component, ``--model.encoders.image.args.width=64`` changes one argument and keeps the others."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override '{item}' is not of the form --key.path=value")
        key, raw = text.split("=", 1)
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a mapping")
        try:
            node[leaf] = yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"override '{item}': the value is not valid YAML ({problem})") from None
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """``["--model.dim=128", "train.lr=1e-3"]`` -> nested dict; values parsed as YAML scalars."""
    return apply_overrides({}, overrides)


def load_yaml(path: str | Path) -> dict:
    """The mapping in a YAML config file; a missing, empty, unreadable or malformed file is a ConfigError
    naming it (an empty file is more likely a failed write than a wish for every default)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} is a folder, not a file" if path.is_dir()
                          else f"config file not found: {path}")
    try:
        data = yaml_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        raise ConfigError(f"config file {path} is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, not a {type(data).__name__}")
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = ()) -> Any:
    """Defaults <- YAML file <- command-line overrides.

    The YAML is validated against the defaults first (a mapping such as ``encoders`` given in YAML
    replaces the default mapping whole); overrides then set values in that resolved config (see
    ``apply_overrides``), so ``--model.encoders.image.args.width=128`` changes one value."""
    cfg = from_dict(cls, load_yaml(path)) if path else cls()
    if overrides:
        cfg = from_dict(cls, apply_overrides(to_dict(cfg), list(overrides)))
    return cfg
