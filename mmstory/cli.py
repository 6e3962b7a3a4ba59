"""The ``mmstory`` console script: one sub-command per job, each a thin call into the library.

    mmstory components [--json]          every registered component, by kind
    mmstory data verify|build ...        manifests and converters (mmstory/data/cli.py)
    mmstory eval|caption|ask|retrieve    evaluation and inference (mmstory/eval_cli.py)
    mmstory train CONFIG [--k=v] [--resume]  training (mmstory/train.py)
    mmstory serve MODEL [--gallery DIR]  HTTP API + web page (mmstory/serve/)
    mmstory compress quantize|info ...   int8 weights, model size (mmstory/compress/)

Global options (before or after the command): --debug, --allow-pipe.

Errors and exit codes. A user error -- a bad file, config key or value, command-line argument, a model folder
that does not load, a full disk -- prints one line ``error: <message>`` (naming the file, key or value) on
stderr and nothing else; ``--debug`` shows its traceback instead. Anything else is a bug and keeps its
traceback. Exit codes:

    0    done
    1    done in part: some inputs failed, each reported on stderr as ``error: FILE: reason`` (caption,
         retrieve), or the command found problems it reports (data verify, a training run stopped by a
         non-finite loss)
    2    a user error: nothing was done (also argparse's code for a bad command line)
    130  interrupted (Ctrl-C)
"""
from __future__ import annotations

import argparse
import errno
import inspect
import json
import os
import sys

import yaml
from safetensors import SafetensorError

from mmstory.compress_cli import add_compress_commands
from mmstory.data.cli import add_data_commands
from mmstory.data.manifest import ManifestError
from mmstory.encoders.base import PretrainedLoadError
from mmstory.errors import UserError, is_disk_full
from mmstory.eval_cli import add_eval_commands
from mmstory.serve.cli import add_serve_commands
from mmstory.train import add_train_commands


def components() -> dict[str, dict[str, dict]]:
    """{kind: {name: {"class": ..., "module": ..., "args": {arg: default}}}} for every registry."""
    from mmstory.encoders import ENCODERS, Encoder
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
            if issubclass(cls, Encoder):
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


USER_ERROR = 2   # exit code of a user error (see the module docstring)
INTERRUPTED = 130


def _add_global_options(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show the Python traceback of every error, user errors included")
    parser.add_argument("--allow-pipe", action="store_true", default=default,
                        help="let manifests read shards through shell commands (pipe:...); only for manifests "
                             "you wrote")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmstory", description=__doc__.split("\n\n")[0])
    _add_global_options(parser, False)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("components", help="list registered encoders, fusions, losses, tokenizers")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_components)
    add_data_commands(sub)
    add_eval_commands(sub)
    add_train_commands(sub)
    add_serve_commands(sub)
    add_compress_commands(sub)
    # the global options also after the command (``mmstory train X.yaml --debug``); SUPPRESS: a command that
    # is not given one leaves the value parsed before it
    todo = list(sub.choices.values())
    while todo:
        command = todo.pop()
        _add_global_options(command, argparse.SUPPRESS)
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += action.choices.values()
    return parser


def _os_error_message(e: OSError) -> str:
    if e.strerror and e.filename is not None:
        names = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
        return f"{names}: {e.strerror}"
    return str(e)


def user_error_message(e: BaseException) -> str | None:
    """The one-line message for a user error, or None when ``e`` is a bug (which keeps its traceback)."""
    if isinstance(e, (UserError, ManifestError, PretrainedLoadError)):  # ConfigError is a UserError
        return str(e)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "no space left on device" + (f" while writing {e.filename}" if e.filename is not None else "")
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return _os_error_message(e)
    if isinstance(e, RuntimeError) and is_disk_full(e):
        # torch.save writing into a full disk: "[enforce fail at inline_container.cc:672] . unexpected pos ..."
        return f"writing a file failed, is the disk full? ({' '.join(str(e).split())})"
    if isinstance(e, yaml.YAMLError):
        return f"invalid YAML: {' '.join(str(e).split())}"
    if isinstance(e, SafetensorError):
        return f"cannot read or write a safetensors file: {e}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # ``--a.b=c`` config overrides are not argparse options: collect them for commands that take them.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(not e.startswith("--") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides or []) + extra
    if args.allow_pipe:
        os.environ["MMSTORY_ALLOW_PIPE"] = "1"
    if args.debug:
        return args.func(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as e:
        message = user_error_message(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
