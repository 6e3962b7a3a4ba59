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
        _count("k", self.k)
        for key in ("captions", "max_tokens", "heads", "colour_size"):
            _positive_int(key, getattr(self, key))
        _count("layers", self.layers)
        _require(_is_number(self.keep_self) and 0 <= self.keep_self <= 1, "keep_self", self.keep_self,
                 "a number in [0, 1]")
        _require(_is_number(self.colour) and self.colour >= 0, "colour", self.colour, ">= 0")


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
        if modality not in ("image", "text", "audio"):
            raise ConfigError("encoders are keyed by the modality they read: image, text or audio",
                              key=f"encoders.{modality}")
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
