"""The ``mmstory`` console script: one sub-command per job, each a thin call into the library.

    mmstory components [--json]          every registered component, by kind
    mmstory data verify|build ...        manifests and converters (mmstory/data/cli.py)
    mmstory eval|caption|ask|retrieve    evaluation and inference (mmstory/eval_cli.py)
    mmstory train CONFIG [--k=v] [--resume]  training (mmstory/train.py)
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys

from mmstory.data.cli import add_data_commands
from mmstory.eval_cli import add_eval_commands
from mmstory.train import add_train_commands


def components() -> dict[str, dict[str, dict]]:
    """{kind: {name: {"class": ..., "module": ..., "args": {arg: default}}}} for every registry."""
    from mmstory.encoders import ENCODERS
    from mmstory.fusion import FUSIONS
    from mmstory.losses import LOSSES
    from mmstory.tokenizer import TOKENIZERS

    out = {}
    for kind, registry in (("encoders", ENCODERS), ("fusions", FUSIONS), ("losses", LOSSES),
                           ("tokenizers", TOKENIZERS)):
        out[kind] = {}
        for name, cls in sorted(registry.items()):
            params = inspect.signature(cls.__init__).parameters
            args = {p: (None if v.default is inspect.Parameter.empty else v.default)
                    for p, v in params.items() if p not in ("self", "base_dir")}
            entry = {"class": cls.__name__, "module": cls.__module__, "args": json.loads(json.dumps(args, default=str))}
            if hasattr(cls, "modality"):
                entry["modality"] = cls.modality
            out[kind][name] = entry
    return out


def cmd_components(args: argparse.Namespace) -> int:
    table = components()
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    for kind, entries in table.items():
        print(f"{kind}:")
        for name, e in entries.items():
            extra = f" [{e['modality']}]" if "modality" in e else ""
            print(f"  {name:<20} {e['module']}.{e['class']}{extra}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmstory", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("components", help="list registered encoders, fusions, losses, tokenizers")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_components)
    add_data_commands(sub)
    add_eval_commands(sub)
    add_train_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # ``--a.b=c`` config overrides are not argparse options: collect them for commands that take them.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(not e.startswith("--") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides or []) + extra
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
