"""Console commands for evaluation and inference, each a thin call into mmstory.evaluate / mmstory.inference:

    mmstory eval CHECKPOINT --data MANIFEST_OR_SHARDS [--split S ...] [--out DIR] [--max-samples N] [--beams K]
    mmstory caption IMAGE_OR_AUDIO... --checkpoint C
    mmstory ask IMAGE_OR_AUDIO "question" --checkpoint C
    mmstory retrieve --checkpoint C (--query TEXT | --query-image IMG | --query-audio CLIP)
                     (--images DIR_OR_FILES... | --audio DIR_OR_FILES... | --texts FILE) [-k K]

An image folder with captions is evaluated without code: convert it first,
    mmstory data build image-folder IMAGES captions.jsonl out/ --split val
    mmstory eval CHECKPOINT --data out/manifest.json
(JSONL rows: {"image": "a.png", "captions": ["...", ...]}; CSV: image,caption.)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmstory.data.transforms import AUDIO_EXTS, IMAGE_EXTS


def _load(path: str, device: str | None):
    from mmstory.model import load

    return load(path, map_location=device or "cpu")


def _decode_options(args: argparse.Namespace) -> dict:
    return {"num_beams": args.beams, "max_new_tokens": args.max_new_tokens}


def _decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beams", type=int, default=1, help="beam width (default: 1 = greedy)")
    p.add_argument("--max-new-tokens", type=int, default=20, help="longest output in tokens (default: 20)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--batch-size", type=int, default=32, help="inputs per forward pass (default: 32)")


def _is_audio(path: str) -> bool:
    return Path(path).suffix.lower().lstrip(".") in AUDIO_EXTS


def _expand(entries: list[str], exts) -> list[str]:
    """Files as given, and the files of any folder with one of ``exts`` (sorted)."""
    out = []
    for e in entries:
        p = Path(e)
        if p.is_dir():
            found = sorted(str(f) for f in p.iterdir() if f.suffix.lower().lstrip(".") in exts)
            if not found:
                raise FileNotFoundError(f"no {'/'.join(exts)} files in folder {p}")
            out += found
        else:
            out.append(e)  # a missing file is reported by name when it is read
    return out


# ---------------------------------------------------------------------------------------------- eval
def _eval_sources(data: list[str], splits: list[str] | None) -> list[tuple[str, object]]:
    """(name, split_or_urls) pairs: a manifest's requested splits (default: those named *val* or *test*,
    else all), or the given shard files as one split."""
    if len(data) == 1 and data[0].endswith(".json"):
        from mmstory.data.manifest import load_manifest

        manifest = load_manifest(data[0])
        names = splits or [n for n in manifest.splits if "val" in n or "test" in n] or list(manifest.splits)
        return [(n, manifest.split(n)) for n in names]
    if splits:
        raise SystemExit("--split needs --data to be a manifest JSON; shard files are evaluated as one split")
    return [("data", data)]


def _reference(args: argparse.Namespace, model, data) -> object | None:
    """The nearest-neighbour reference bank: ``--reference`` (a split of the ``--data`` manifest, or a manifest
    JSON's split as PATH:SPLIT); by default the manifest's ``train`` split when it has one."""
    from mmstory.data.manifest import load_manifest
    from mmstory.evaluate import reference_bank

    if args.reference == "none":
        return None
    manifest_path, split = args.data[0] if len(args.data) == 1 and args.data[0].endswith(".json") else None, args.reference
    if split and ":" in split and split.rsplit(":", 1)[0].endswith(".json"):
        manifest_path, split = split.rsplit(":", 1)
    if manifest_path is None:
        if split:
            raise SystemExit("--reference SPLIT needs --data to be a manifest JSON (or give MANIFEST.json:SPLIT)")
        return None
    manifest = load_manifest(manifest_path)
    if split is None:
        if "train" not in manifest.splits:
            return None
        split = "train"
    if split not in manifest.splits:
        raise SystemExit(f"--reference: {manifest_path} has no split {split!r} (splits: {', '.join(manifest.splits)})")
    return reference_bank(model, manifest.split(split), data=data, name=split, progress=not args.quiet)


def cmd_eval(args: argparse.Namespace) -> int:
    from mmstory.data.pipeline import DataConfig
    from mmstory.data.wordings import Wordings
    from mmstory.evaluate import comparison_table, evaluate, summary, write_report
    from mmstory.generation import DecodeOptions

    model = _load(args.checkpoint, args.device)
    out = Path(args.out or Path(args.checkpoint) / "eval")
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    data = DataConfig(workers=args.workers)
    reference = _reference(args, model, data)
    wordings = Wordings.load(args.wordings) if args.wordings else None
    all_metrics = {}
    for name, source in _eval_sources(args.data, args.split):
        results = evaluate(model, source, tasks=tasks, max_samples=args.max_samples,
                           decode=DecodeOptions(num_beams=args.beams, max_new_tokens=args.max_new_tokens),
                           batch_size=args.batch_size, data=data, name=name, reference=reference,
                           wordings=wordings, fuse_question=args.fuse_question, progress=not args.quiet)
        report = write_report(results, out / name, images=args.examples)
        all_metrics[name] = {"num_samples": results["num_samples"], "metrics": results["metrics"]}
        print(f"{name}: {results['num_samples']} samples -> {report}")
        print("\n".join(comparison_table(results["metrics"])))
        for k, v in summary(results).items():
            if not k.endswith("num_samples") and not k.startswith("qa/per_type") and not k.startswith("baselines"):
                print(f"  {k:<36} {v:.4f}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(all_metrics, indent=2, ensure_ascii=False))
    return 0


# ---------------------------------------------------------------------------------------------- inference
def cmd_caption(args: argparse.Namespace) -> int:
    model = _load(args.checkpoint, args.device)
    opts = dict(_decode_options(args), batch_size=args.batch_size, prompt=args.prompt)
    audio = [f for f in args.inputs if _is_audio(f)]
    images = [f for f in args.inputs if not _is_audio(f)]
    captions = dict(zip(images, model.caption(images, **opts))) if images else {}
    if audio:
        captions.update(zip(audio, model.caption(None, audio=audio, **opts)))
    for f in args.inputs:
        print(f"{f}\t{captions[f]}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    model = _load(args.checkpoint, args.device)
    media = {"audio" if _is_audio(args.input) else "image": args.input}
    print(model.answer(question=args.question, **media, **_decode_options(args)))
    return 0


def cmd_retrieve(args: argparse.Namespace) -> int:
    model = _load(args.checkpoint, args.device)
    if args.texts:
        lines = Path(args.texts).read_text(encoding="utf-8").splitlines() if Path(args.texts).is_file() else None
        if lines is None:
            raise FileNotFoundError(f"texts file not found: {args.texts}")
        gallery, gallery_modality = [t.strip() for t in lines if t.strip()], "text"
    elif args.images:
        gallery, gallery_modality = _expand(args.images, IMAGE_EXTS), "image"
    else:
        gallery, gallery_modality = _expand(args.audio, AUDIO_EXTS), "audio"
    if args.query is not None:
        query, query_modality = args.query, "text"
    elif args.query_image is not None:
        query, query_modality = args.query_image, "image"
    else:
        query, query_modality = args.query_audio, "audio"
    matches = model.retrieve(query, gallery, args.k, query_modality=query_modality,
                             gallery_modality=gallery_modality, batch_size=args.batch_size)
    for n, m in enumerate(matches, 1):
        print(f"{n}\t{m.score:.4f}\t{m.item}")
    return 0


def add_eval_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``eval``, ``caption``, ``ask`` and ``retrieve`` to a top-level ``add_subparsers()`` object."""
    p = sub.add_parser("eval", help="captioning / QA / retrieval / zero-shot metrics and a report",
                       description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="model folder written by MultimodalModel.save")
    p.add_argument("--data", nargs="+", required=True, help="a manifest JSON, or shard .tar files (one split)")
    p.add_argument("--split", action="append",
                   help="manifest split to evaluate (repeatable; default: every split named *val* or *test*)")
    p.add_argument("--out", help="output folder (default: CHECKPOINT/eval); one sub-folder per split")
    p.add_argument("--max-samples", type=int, help="evaluate only the first N samples of each split")
    p.add_argument("--tasks", default="caption,qa,retrieval,zeroshot", help="comma-separated (default: all)")
    p.add_argument("--workers", type=int, default=2, help="data loader workers (default: 2)")
    p.add_argument("--examples", type=int, default=16, help="examples shown in the report (default: 16)")
    p.add_argument("--fuse-question", action=argparse.BooleanOptionalAction, default=None,
                   help="give questions to the fusion too (default: as the model was trained, from its config)")
    p.add_argument("--reference", help="training split for the nearest-neighbour baselines: a split of the --data "
                   "manifest or MANIFEST.json:SPLIT; 'none' for no baselines (default: the manifest's train split)")
    p.add_argument("--wordings", help="a wordings YAML (data_manifests/emoji/wordings.yaml): also ask the QA in its "
                   "held-out wordings")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _decode_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("caption", help="caption image (or audio) files")
    p.add_argument("inputs", nargs="+", metavar="IMAGE", help="image or audio files (audio by extension)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", default="caption:", help="decoder prompt (default: caption:)")
    _decode_args(p)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("ask", help="answer a question about an image (or audio) file")
    p.add_argument("input", metavar="IMAGE", help="image or audio file (audio by extension)")
    p.add_argument("question")
    p.add_argument("--checkpoint", required=True)
    _decode_args(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("retrieve", help="rank images / audio for a text, or texts for an image / clip")
    p.add_argument("--checkpoint", required=True)
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--query", help="query text")
    q.add_argument("--query-image", help="query image file")
    q.add_argument("--query-audio", help="query audio file")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--images", nargs="+", help="image files and/or folders to rank")
    g.add_argument("--audio", nargs="+", help="audio files and/or folders to rank")
    g.add_argument("--texts", help="text file, one candidate per line")
    p.add_argument("-k", type=int, default=5, help="results to show (default: 5)")
    p.add_argument("--device", help="cpu, cuda ... (default: cpu)")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_retrieve)
