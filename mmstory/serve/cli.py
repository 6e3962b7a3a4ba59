"""``mmstory serve MODEL``: the HTTP API and web page of mmstory/serve/app.py, run by uvicorn."""
from __future__ import annotations

import argparse
import ipaddress
import sys

from mmstory.errors import UserError
from mmstory.eval_cli import _int_at_least

SERVE_PACKAGES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "multipart": "python-multipart"}


def _require_serve_packages() -> None:
    import importlib.util

    missing = [pkg for module, pkg in SERVE_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"mmstory serve needs {', '.join(missing)}: pip install 'mmstory[serve]'")


def cmd_serve(args: argparse.Namespace) -> int:
    _require_serve_packages()
    import torch
    import uvicorn

    from mmstory.model import load
    from mmstory.serve.app import ServeSettings, create_app
    from mmstory.serve.service import Limits

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(f"warning: serving on {args.host}: anyone who can reach this machine can use the model (there is no "
              f"authentication)", file=sys.stderr)
    limits = Limits(max_image_pixels=args.max_image_pixels, max_audio_seconds=args.max_audio_seconds,
                    max_new_tokens=args.max_new_tokens)
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                             max_body_mb=args.max_body_mb, gallery=args.gallery, limits=limits)
    model = load(args.model, map_location=args.device or "cpu")
    app = create_app(model, settings)
    print(f"mmstory serve: {args.model} at http://{args.host}:{args.port}/ (API docs: /docs); batching up to "
          f"{args.max_batch} requests, waiting at most {args.max_wait_ms:g} ms", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def add_serve_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP: JSON API, web page, dynamic batching",
                       description=__doc__)
    p.add_argument("model", help="a saved model folder (mmstory.load)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_int_at_least("port", 0), default=8000)
    p.add_argument("--gallery", help="a folder of images/audio to index at start-up for /v1/retrieve")
    p.add_argument("--max-batch", type=_int_at_least("max-batch", 1), default=32, help="requests per batched forward (1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long the first request of a batch waits for others (default 5)")
    p.add_argument("--max-queue", type=_int_at_least("max-queue", 1), default=256, help="waiting requests beyond this get 503 + Retry-After")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="larger request bodies get 413")
    p.add_argument("--max-image-pixels", type=_int_at_least("max-image-pixels", 1), default=25_000_000, help="larger images get 413")
    p.add_argument("--max-audio-seconds", type=float, default=60.0, help="longer clips get 413")
    p.add_argument("--max-new-tokens", type=_int_at_least("max-new-tokens", 1), default=64, help="the most tokens a request may ask for")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--threads", type=_int_at_least("threads", 1), help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
