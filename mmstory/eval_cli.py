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

``caption`` and ``retrieve`` read every file first: one that cannot be read is reported on stderr as
``error: FILE: reason``, the others are captioned (ranked), and the command exits 1 at the end so scripts
notice (mmstory/cli.py lists the exit codes).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from mmstory.data.transforms import AUDIO_EXTS, IMAGE_EXTS
from mmstory.errors import UserError


def _load(path: str, device: str | None):
    from mmstory.model import load

    return load(path, map_location=device or "cpu")


def _decode_options(args: argparse.Namespace) -> dict:
    return {"num_beams": args.beams, "max_new_tokens": args.max_new_tokens}


def _int_at_least(name: str, lowest: int):
    """An argparse ``type`` for an integer >= ``lowest`` ("argument -k: k must be >= 1, got 0")."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"{name} must be >= {lowest}, got {value}")
        return value
    return parse


def _decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beams", type=_int_at_least("beams", 1), default=1, help="beam width (default: 1 = greedy)")
    p.add_argument("--max-new-tokens", type=_int_at_least("max-new-tokens", 1), default=20,
                   help="longest output in tokens (default: 20)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--batch-size", type=_int_at_least("batch-size", 1), default=32,
                   help="inputs per forward pass (default: 32)")


def _is_audio(path: str) -> bool:
    return Path(path).suffix.lower().lstrip(".") in AUDIO_EXTS


def _read_media(model, path: str) -> tuple[str, object]:
    """("image", PIL image) or ("audio", waveform at the audio encoder's rate) for one file, decoded as
    ``model.caption(path)`` would decode it; a file that cannot be read is a UserError ``FILE: reason``."""
    from mmstory import inference

    modality = "audio" if _is_audio(path) else "image"
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{path}: is a folder, not a file")
    if not p.exists():
        raise UserError(f"{path}: no such file")
    try:
        inference.require_encoder(model, modality)
        if modality == "image":
            return modality, inference.to_pil(path)
        return modality, inference.load_waveform(path, model.encoders["audio"].preprocess["sample_rate"])
    except OSError as e:
        raise UserError(f"{path}: {e.strerror or e}") from e
    except ValueError as e:  # "cannot read image PATH: UnidentifiedImageError: ...", a NaN clip, no such encoder
        reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e).replace(f"{modality} {path}", modality))
        raise UserError(f"{path}: {reason}") from e


def _read_all(model, paths: list[str]) -> tuple[dict[str, tuple[str, object]], int]:
    """The files that read (path -> ``_read_media``) and how many did not; each failure is printed as
    ``error: FILE: reason`` on stderr."""
    media, failed = {}, 0
    for path in paths:
        try:
            media[path] = _read_media(model, path)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    return media, failed


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
        raise UserError("--split needs --data to be a manifest JSON; shard files are evaluated as one split")
    return [("data", data)]


def _reference(args: argparse.Namespace, model, data) -> list:
    """The nearest-neighbour reference banks: ``--reference`` (a split of the ``--data`` manifest, or a manifest
    JSON's split as PATH:SPLIT; by default the manifest's ``train`` split when it has one) and, for a model with an
    audio encoder, ``--audio-reference`` (by default the manifest's ``audio_train`` split when it has one)."""
    from mmstory.data.manifest import load_manifest
    from mmstory.evaluate import reference_bank

    manifest_path = args.data[0] if len(args.data) == 1 and args.data[0].endswith(".json") else None
    out = []
    for option, given, default, modality in (("--reference", args.reference, "train", "image"),
                                              ("--audio-reference", args.audio_reference, "audio_train", "audio")):
        if given == "none" or (modality == "audio" and "audio" not in model.encoders):
            continue
        path, split = manifest_path, given
        if split and ":" in split and split.rsplit(":", 1)[0].endswith(".json"):
            path, split = split.rsplit(":", 1)
        if path is None:
            if split:
                raise UserError(f"{option} SPLIT needs --data to be a manifest JSON (or give MANIFEST.json:SPLIT)")
            continue
        manifest = load_manifest(path)
        if split is None:
            if default not in manifest.splits:
                continue
            split = default
        if split not in manifest.splits:
            raise UserError(f"{option}: {path} has no split {split!r} (splits: {', '.join(manifest.splits)})")
        out.append(reference_bank(model, manifest.split(split), data=data, name=split, progress=not args.quiet,
                                  modality=modality))
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    from mmstory.config import DataConfig
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
                           wordings=wordings, fuse_question=args.fuse_question, progress=not args.quiet,
                           question_bank=args.question_bank)
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
    from mmstory.inference import caption

    model = _load(args.checkpoint, args.device)
    opts = dict(_decode_options(args), batch_size=args.batch_size, prompt=args.prompt)
    media, failed = _read_all(model, args.inputs)
    captions = {}
    for modality in ("image", "audio"):
        files = [f for f, (m, _) in media.items() if m == modality]
        if files:
            items = [media[f][1] for f in files]
            out = caption(model, items, **opts) if modality == "image" else caption(model, None, audio=items, **opts)
            captions.update(zip(files, out))
    for f in args.inputs:
        if f in captions:
            print(f"{f}\t{captions[f]}")
    return 1 if failed else 0


def _check_question(model, question: str) -> None:
    """The QA prompt with ``question`` leaves the decoder room for an answer (else a UserError saying so,
    rather than a message quoting the whole question)."""
    tokens = 1 + len(model.tokenizer.encode(model.prompts.question(question)))  # + bos
    if tokens >= model.decoder.max_len:
        raise UserError(f"the question is too long: with its prompt it takes {tokens} tokens, and this model's "
                        f"decoder holds {model.decoder.max_len} (prompt and answer together)")


def cmd_ask(args: argparse.Namespace) -> int:
    from mmstory.inference import answer

    question = args.question.strip()
    if not question:
        raise UserError("the question is empty")
    model = _load(args.checkpoint, args.device)
    _check_question(model, question)
    modality, item = _read_media(model, args.input)
    print(answer(model, question=args.question, **{modality: item}, **_decode_options(args)))
    return 0


def _read_texts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"texts file {'is a folder' if p.is_dir() else 'not found'}: {path}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"texts file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    texts = [t.strip() for t in lines if t.strip()]
    if not texts:
        raise UserError(f"texts file {path} has no non-empty line")
    return texts


def cmd_retrieve(args: argparse.Namespace) -> int:
    from mmstory.inference import retrieve

    if args.query is not None and not args.query.strip():
        raise UserError("the query is empty")
    model = _load(args.checkpoint, args.device)
    failed = 0
    if args.texts:
        gallery = items = _read_texts(args.texts)
        gallery_modality = "text"
    else:
        exts, gallery_modality = (IMAGE_EXTS, "image") if args.images else (AUDIO_EXTS, "audio")
        files = _expand(args.images or args.audio, exts)
        media, failed = _read_all(model, files)
        gallery = [f for f in files if f in media]
        items = [media[f][1] for f in gallery]
        if not items:
            raise UserError(f"none of the {len(files)} {gallery_modality} files could be read")
        if any(media[f][0] != gallery_modality for f in gallery):
            raise UserError(f"--{'images' if args.images else 'audio'} takes {gallery_modality} files only, got "
                            f"{next(f for f in gallery if media[f][0] != gallery_modality)}")
    if args.query is not None:
        query, query_modality = args.query, "text"
    else:
        query_modality, query = _read_media(model, args.query_image or args.query_audio)
        expected = "image" if args.query_image else "audio"
        if query_modality != expected:
            raise UserError(f"--query-{expected}: {args.query_image or args.query_audio} is not a {expected} file")
    matches = retrieve(model, query, items, args.k, query_modality=query_modality,
                       gallery_modality=gallery_modality, batch_size=args.batch_size)
    for n, m in enumerate(matches, 1):
        print(f"{n}\t{m.score:.4f}\t{gallery[m.index]}")
    return 1 if failed else 0


def add_eval_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``eval``, ``caption``, ``ask`` and ``retrieve`` to a top-level ``add_subparsers()`` object."""
    p = sub.add_parser("eval", help="captioning / QA / retrieval / zero-shot metrics and a report",
                       description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="model folder written by MultimodalModel.save")
    p.add_argument("--data", nargs="+", required=True, help="a manifest JSON, or shard .tar files (one split)")
    p.add_argument("--split", action="append",
                   help="manifest split to evaluate (repeatable; default: every split named *val* or *test*)")
    p.add_argument("--out", help="output folder (default: CHECKPOINT/eval); one sub-folder per split")
    p.add_argument("--max-samples", type=_int_at_least("max-samples", 1),
                   help="evaluate only the first N samples of each split")
    p.add_argument("--tasks", default="caption,qa,retrieval,zeroshot", help="comma-separated (default: all)")
    p.add_argument("--workers", type=_int_at_least("workers", 0), default=2, help="data loader workers (default: 2)")
    p.add_argument("--examples", type=_int_at_least("examples", 0), default=16,
                   help="examples shown in the report (default: 16)")
    p.add_argument("--fuse-question", action=argparse.BooleanOptionalAction, default=None,
                   help="give questions to the fusion too (default: as the model was trained, from its config)")
    p.add_argument("--reference", help="training split for the nearest-neighbour baselines: a split of the --data "
                   "manifest or MANIFEST.json:SPLIT; 'none' for no baselines (default: the manifest's train split)")
    p.add_argument("--audio-reference", help="training split of clips for the audio nearest-neighbour baselines "
                   "(log-mel, the model's audio embedding), as --reference; 'none' for none (default: the manifest's "
                   "audio_train split, for a model with an audio encoder)")
    p.add_argument("--wordings", help="a wordings YAML (data_manifests/emoji/wordings.yaml): also ask the QA in its "
                   "held-out wordings")
    p.add_argument("--question-bank", action=argparse.BooleanOptionalAction, default=True,
                   help="a model with a question bank asks each question as the nearest training question "
                        "(default); --no-question-bank asks as written")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _decode_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("caption", help="caption image (or audio) files")
    p.add_argument("inputs", nargs="+", metavar="IMAGE", help="image or audio files (audio by extension)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", default=None, help="decoder prompt (default: the caption prompt the model was "
                                                  "trained with, e.g. caption:)")
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
    p.add_argument("-k", type=_int_at_least("k", 1), default=5, help="results to show (default: 5)")
    p.add_argument("--device", help="cpu, cuda ... (default: cpu)")
    p.add_argument("--batch-size", type=_int_at_least("batch-size", 1), default=64)
    p.set_defaults(func=cmd_retrieve)
