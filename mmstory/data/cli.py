"""``mmstory data ...`` commands: verify a manifest's shards, and build shards from public datasets.

    mmstory data verify data_manifests/coco_karpathy.json [--split val] [--no-decode] [--write]
    mmstory data build coco dataset_coco.json /data/coco data_manifests/coco_karpathy
    python -m mmstory.data.cli data verify ...        # the same without the console script

The console script hooks these in with ``add_data_commands(subparsers)``; every command sets
``func``, which takes the parsed args and returns the exit code.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from .manifest import ManifestError, load_manifest, verify, write_counts


def _human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def format_report(report: dict[str, Any]) -> tuple[str, str]:
    """(per-split table, one summary line) for a ``verify`` report."""
    rows = [("split", "shards", "samples", "bad", "size", "status")]
    for name, s in report["splits"].items():
        rows.append((name, f"{s['shards']:,}", f"{s['samples']:,}", f"{s['bad']:,}", _human_bytes(s["bytes"]),
                     "OK" if s["ok"] else "FAILED"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                      for r in rows)
    splits = report["splits"].values()
    summary = (f"verified {len(report['splits'])} split{'s' if len(report['splits']) != 1 else ''}, "
               f"{sum(s['shards'] for s in splits):,} shards, {sum(s['samples'] for s in splits):,} samples, "
               f"{len(report['bad_samples']):,} bad, {_human_bytes(sum(s['bytes'] for s in splits))}: "
               f"{'OK' if report['ok'] else 'FAILED'}")
    return table, summary


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        manifest = load_manifest(args.manifest)
        for split in args.split or []:
            manifest.split(split)  # fail before any reading on a typo
    except (ManifestError, KeyError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 1
    report = verify(manifest, args.split, decode=not args.no_decode, progress=not args.quiet)
    table, summary = format_report(report)
    print(table)
    for err in report["errors"]:
        print(f"error: {err}")
    for bad in report["bad_samples"][:args.max_bad]:
        print(f"bad sample: shard {bad['shard']} key {bad['key']}: {bad['reason']}")
    if len(report["bad_samples"]) > args.max_bad:
        print(f"... and {len(report['bad_samples']) - args.max_bad:,} more bad samples")
    if args.write:
        path = write_counts(manifest, report)
        print(f"wrote counts and checksums to {path}")
    print(summary)
    return 0 if report["ok"] else 1


def cmd_build(args: argparse.Namespace) -> int:
    from . import converters  # imported late: PIL/soundfile are not needed for `verify --help`

    common = dict(name=args.name, max_samples=args.max_samples, progress=not args.quiet)
    if args.kind == "image-folder":
        converters.convert_image_folder(args.image_dir, args.captions, args.out_dir, args.split,
                                        resize=args.resize, **common)
    elif args.kind == "coco":
        converters.convert_coco_captions(args.annotations, args.image_root, args.out_dir, args.split,
                                         resize=args.resize, **common)
    elif args.kind == "vqa":
        converters.convert_vqa(args.questions, args.annotations, args.image_root, args.out_dir, args.split,
                               image_subset=args.image_subset, resize=args.resize, **common)
    elif args.kind == "audio-csv":
        converters.convert_audio_captions(args.audio_dir, args.captions, args.out_dir, args.split, **common)
    return 0


def _build_options(p: argparse.ArgumentParser, *, images: bool = True, split_default: str | None = "train") -> None:
    p.add_argument("--split", default=split_default, help=f"split name to write (default: {split_default})")
    p.add_argument("--name", help="dataset name in the manifest (default: the output folder's name)")
    p.add_argument("--max-samples", type=int, default=1000, help="samples per shard (default: 1000)")
    if images:
        p.add_argument("--resize", type=int, metavar="PX",
                       help="downscale so the shorter side is PX (default: store images as they are)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_build)


def add_data_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``data verify`` and ``data build ...`` to a top-level ``add_subparsers()`` object."""
    data = subparsers.add_parser("data", help="verify manifests and build dataset shards")
    sub = data.add_subparsers(dest="data_command", required=True)

    v = sub.add_parser("verify", help="check a manifest's shards: existence, sha256, sample counts, decoding")
    v.add_argument("manifest", help="path to a manifest JSON")
    v.add_argument("--split", action="append", help="split to verify (repeatable; default: all)")
    v.add_argument("--no-decode", action="store_true", help="only count samples; do not decode images/audio/json")
    v.add_argument("--write", action="store_true",
                   help="fill null counts, sizes and sha256 in the manifest (pattern splits become shard lists)")
    v.add_argument("--max-bad", type=int, default=20, help="bad samples to list (default: 20)")
    v.add_argument("--quiet", action="store_true", help="no progress bars")
    v.set_defaults(func=cmd_verify)

    b = sub.add_parser("build", help="convert a public dataset to shards + manifest.json")
    kinds = b.add_subparsers(dest="kind", required=True)

    p = kinds.add_parser("image-folder", help="image folder + CSV/JSONL captions (image|file_name, caption[s])")
    p.add_argument("image_dir")
    p.add_argument("captions", help="CSV (image|file_name, caption) or JSONL (image|file_name, caption|captions)")
    p.add_argument("out_dir")
    _build_options(p)

    p = kinds.add_parser("coco", help="COCO captions JSON, or Karpathy dataset_coco/flickr30k.json (all splits)")
    p.add_argument("annotations", help="captions_*.json or dataset_*.json")
    p.add_argument("image_root", help="folder the file names (Karpathy: filepath/filename) are relative to")
    p.add_argument("out_dir")
    _build_options(p)

    p = kinds.add_parser("vqa", help="VQA v2 questions (+ annotations) with COCO images")
    p.add_argument("--questions", required=True, help="v2_OpenEnded_mscoco_*_questions.json")
    p.add_argument("--annotations", help="v2_mscoco_*_annotations.json (omit for test sets)")
    p.add_argument("--image-subset", help="COCO_{subset}_... image names (default: from data_subtype)")
    p.add_argument("image_root", help="folder of COCO_{subset}_{id:012d}.jpg")
    p.add_argument("out_dir")
    _build_options(p, split_default=None)

    p = kinds.add_parser("audio-csv", help="AudioCaps or Clotho captions CSV + audio folder")
    p.add_argument("audio_dir")
    p.add_argument("captions", help="AudioCaps (audiocap_id,youtube_id,start_time,caption) or Clotho CSV")
    p.add_argument("out_dir")
    _build_options(p, images=False)
    return data


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: ``python -m mmstory.data.cli data verify ...`` (the leading ``data`` may be left out)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("data", "-h", "--help"):
        argv = ["data"] + argv
    parser = argparse.ArgumentParser(prog="mmstory")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
