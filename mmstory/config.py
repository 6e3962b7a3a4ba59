"""Typed configs. Dataclasses hold every default; YAML files only override them; ``--a.b=c`` overrides on
the command line. An unknown key or a wrong type fails at start-up naming the key. No include chains.

``ModelConfig`` describes the architecture as data: which encoder per modality, which fusion, the
decoder, the weighted losses and the tokenizer. Component arguments (``args``) are checked against
the component's constructor by the registry when the model is built.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import re

import yaml


class ConfigError(ValueError):
    pass


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


@dataclass
class RetrievalConfig:
    """Retrieval-augmented decoding (mmstory/retrieval.py): the captions of the k training images nearest to an
    image (by the frozen image encoder's pooled features) join the decoder's memory."""
    k: int = 0                # neighbours retrieved; 0 turns retrieval off
    captions: int = 1         # captions per datastore entry (an image's first N, joined by "; ")
    max_tokens: int = 12      # tokens kept of each retrieved entry
    keep_self: float = 1.0    # training: probability that an image may retrieve its own datastore entry
    layers: int = 1           # Transformer blocks reading each retrieved caption (0: token embeddings only)
    heads: int = 4
    colour: float = 0.0       # weight of the coarse colour layout in the key similarity (0: image features only)
    colour_size: int = 16     # the layout's resolution (colour_size x colour_size)
    copy: bool = False        # a pointer over the retrieved tokens, gated with the vocabulary (decoder.CopyHead)

    def __post_init__(self):
        if self.captions < 1:
            raise ValueError(f"model.retrieval.captions must be >= 1, got {self.captions}")


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
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return {k: _convert(v, args[1], f"{key}.{k}") for k, v in value.items()} if args else dict(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config key '{key}': expected {tp.__name__}, got bool {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type, data: dict, *, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; keys not given keep their defaults."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; valid keys here: {', '.join(names)}")
    kwargs = {k: _convert(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field without default is missing
        raise ConfigError(f"config section '{prefix.rstrip('.') or cls.__name__}': {e}") from e


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
        node[leaf] = yaml_load(raw) if raw != "" else ""
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """``["--model.dim=128", "train.lr=1e-3"]`` -> nested dict; values parsed as YAML scalars."""
    return apply_overrides({}, overrides)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
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
