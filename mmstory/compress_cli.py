"""``mmstory compress quantize MODEL OUT`` and ``mmstory compress info MODEL``.

Pruning and distillation train, so they are training config keys (``prune:`` with ``init_from``, e.g.
``--prune.kind=structured``; ``distill:``, as in ``experiments/emoji_distill.yaml``); quantization needs no
training.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from mmstory.errors import UserError


def model_info(model, folder: str | Path) -> dict:
    """Parameters, linear-weight bytes, pruned zeros and files of a loaded model."""
    from mmstory.compress.prune import MASKS_FILE, model_sparsity
    from mmstory.compress.quantize import Int8Linear, linear_weight_bytes

    folder = Path(folder)
    params = sum(p.numel() for p in model.parameters()) + sum(
        m.weight_int8.numel() for m in model.modules() if isinstance(m, Int8Linear))
    files = {p.name: p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    return {"parameters": params, "linear_weight_bytes": linear_weight_bytes(model),
            "quantize": model.config.quantize if model.config else None,
            "linear_sparsity": round(model_sparsity(model), 4), "pruning_masks": MASKS_FILE in files,
            "bytes_on_disk": sum(files.values()), "weights_file_bytes": files.get("model.safetensors")}


def cmd_quantize(args: argparse.Namespace) -> int:
    from mmstory.compress.quantize import linear_weight_bytes, quantize_linear
    from mmstory.model import load

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"{out} exists and is not empty (--overwrite replaces it)")
    model = load(args.model)
    if model.config.quantize:
        raise UserError(f"{args.model} is already quantized ({model.config.quantize})")
    before = linear_weight_bytes(model)
    names = quantize_linear(model, args.skip)
    model.config.quantize, model.config.quantize_skip = "int8", list(args.skip)
    if out.exists():
        shutil.rmtree(out)
    model.save(out)
    after = linear_weight_bytes(model)
    print(f"int8: {len(names)} linear layers, weights {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB "
          f"({before / after:.2f}x smaller); saved to {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from mmstory.model import load

    print(json.dumps(model_info(load(args.model), args.model), indent=2))
    return 0


def add_compress_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="int8-quantize a saved model; show its size (pruning and distillation: "
                       "training configs)", description=__doc__.split("\n\n")[1])
    csub = p.add_subparsers(dest="compress_command", required=True, metavar="{quantize,info}")
    q = csub.add_parser("quantize", help="int8 weights in every linear layer (CPU inference); loads with mmstory.load")
    q.add_argument("model", help="a model folder written by mmstory (e.g. runs/emoji_tiny/model)")
    q.add_argument("out", help="the folder to write the quantized model to")
    q.add_argument("--skip", action="append", default=[], metavar="MODULE",
                   help="leave this module (and what is under it) in float, e.g. decoder.lm_head (repeatable)")
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    q.set_defaults(func=cmd_quantize)
    i = csub.add_parser("info", help="parameters, linear-weight bytes, sparsity and size on disk of a model (JSON)")
    i.add_argument("model")
    i.set_defaults(func=cmd_info)
