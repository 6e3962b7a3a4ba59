"""Converters from public dataset layouts to mmstory webdataset shards + a manifest.

Each converter reads the dataset's own annotation files, writes ``{split}-NNNNNN.tar`` shards into
``out_dir`` and (merging with an existing one) ``out_dir/manifest.json``. Samples follow the mmstory
schema: an image (``jpg``/``png``/``webp``) or audio (``wav``/``flac``/``mp3``) plus a ``json`` with
``captions`` or ``qa`` and the dataset's own ids. Images and audio are stored byte for byte as found
(no re-encoding; a ``resize`` option downscales images). Missing or undecodable files are skipped
with a warning naming the file, and the counts are printed at the end.

| converter                  | input                                                          |
| -------------------------- | -------------------------------------------------------------- |
| convert_image_folder       | folder of images + CSV/JSONL of (image, caption) rows          |
| convert_coco_captions      | COCO ``captions_*.json`` or Karpathy ``dataset_{coco,flickr30k}.json`` |
| convert_vqa                | VQA v2 questions (+ annotations) JSON + COCO image folder       |
| convert_audio_captions     | AudioCaps or Clotho captions CSV + audio folder                 |
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from tqdm import tqdm

from .manifest import ShardInfo
from .writer import ShardSink, safe_key, write_manifest

log = logging.getLogger(__name__)

# PIL format name -> shard extension; anything else is re-encoded losslessly to PNG.
IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
AUDIO_EXTS = ("wav", "flac", "mp3")
MANIFEST_NAME = "manifest.json"


@dataclass
class ConversionResult:
    manifest: Path
    shards: dict[str, list[ShardInfo]]
    counts: Counter = field(default_factory=Counter)  # written / missing / bad_image / ...


# ---------------------------------------------------------------------------------------- media

def load_image(path: Path, resize: int | None = None) -> tuple[str, bytes]:
    """Return (extension, bytes) for an image file, checking that it fully decodes.

    The original bytes are kept unless ``resize`` is given (then the shorter side is downscaled to
    ``resize`` pixels, never upscaled) or the format is not jpg/png/webp (then it becomes PNG).
    Raises OSError/ValueError (from PIL) for a damaged file."""
    from PIL import Image

    from .transforms import to_rgb

    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # full decode: Image.verify() misses truncated pixel data
        rgb = to_rgb(im)  # what the loader will make of it (transforms.decode_image): fails here, not in training
        ext = IMAGE_FORMATS.get(im.format or "")
        if ext is not None and (resize is None or min(im.size) <= resize):
            return ext, data  # kept as it is; the loader decodes 16-bit images right (transforms.to_rgb)
        if im.mode not in ("RGB", "RGBA", "L", "LA", "P"):
            im = rgb  # 16-bit, float, CMYK...: 8-bit RGB before resizing and re-encoding (16-bit grey is rescaled)
        if resize is not None and min(im.size) > resize:
            scale = resize / min(im.size)
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                           Image.Resampling.BICUBIC)
        ext = ext or "png"
        buf = io.BytesIO()
        if ext == "jpg":
            to_rgb(im).save(buf, format="JPEG", quality=95)  # JPEG has no alpha: composited on white
        elif ext == "webp":
            im.save(buf, format="WEBP", quality=95)
        else:
            im.save(buf, format="PNG")
        return ext, buf.getvalue()


def load_audio(path: Path) -> tuple[str, bytes]:
    """Return (extension, bytes) for an audio file, checking that it fully decodes with soundfile.
    wav/flac/mp3 are kept as they are; other formats soundfile reads are re-encoded to FLAC."""
    import numpy as np
    import soundfile

    data = path.read_bytes()
    audio, rate = soundfile.read(io.BytesIO(data))
    if len(audio) == 0:
        raise ValueError("no audio frames")
    if not np.isfinite(audio).all():
        raise ValueError("samples that are not finite (NaN or inf)")
    ext = path.suffix.lower().lstrip(".")
    if ext in AUDIO_EXTS:
        return ext, data
    buf = io.BytesIO()
    soundfile.write(buf, audio, rate, format="FLAC")
    return "flac", buf.getvalue()


# ---------------------------------------------------------------------------------------- shared loop

def _write_split(records: list[dict[str, Any]], out_dir: Path, split: str, *, media: str,
                 resize: int | None, max_samples: int, counts: Counter, progress: bool) -> list[ShardInfo]:
    """Write records ({"key", "file": Path, "json": dict}) to shards, skipping missing/bad media.
    ``media`` is "image" or "audio" and selects the loader."""
    seen: Counter = Counter()
    with ShardSink(out_dir, split, max_samples=max_samples) as sink:
        for rec in tqdm(records, desc=f"{split}", unit="sample", disable=not progress):
            path: Path = rec["file"]
            if not path.is_file():
                log.warning("skipping %s: file not found", path)
                counts["missing"] += 1
                continue
            try:
                ext, data = load_image(path, resize) if media == "image" else load_audio(path)
            except Exception as e:  # PIL/soundfile raise many types for damaged files
                log.warning("skipping %s: cannot decode %s (%s: %s)", path, media, type(e).__name__, e)
                counts[f"bad_{media}"] += 1
                continue
            key = safe_key(rec["key"])
            seen[key] += 1
            if seen[key] > 1:  # two names that sanitise alike (e.g. "a.b.jpg" and "a_b.jpg")
                key = f"{key}_{seen[key] - 1}"
            sink.write({"__key__": key, ext: data, "json": rec["json"]})
            counts["written"] += 1
    return sink.shards


def _finish(out_dir: Path, name: str, splits: dict[str, list[ShardInfo]], fields: dict[str, Any],
            counts: Counter, what: str, **extra: Any) -> ConversionResult:
    manifest = write_manifest(out_dir / MANIFEST_NAME, name, splits, fields, **extra)
    parts = [f"{split}: {sum(s.samples or 0 for s in shards):,} samples in {len(shards)} shard(s)"
             for split, shards in splits.items()]
    skipped = {k: v for k, v in sorted(counts.items()) if k != "written" and v}
    print(f"{what} -> {manifest}: " + "; ".join(parts)
          + (f"; skipped {', '.join(f'{v:,} {k}' for k, v in skipped.items())}" if skipped else "; skipped 0"))
    return ConversionResult(manifest, splits, counts)


def _group(rows: Iterable[tuple[str, Any]]) -> dict[str, list[Any]]:
    """Group values by key, keeping the order in which keys first appear (deterministic output)."""
    groups: dict[str, list[Any]] = {}
    for key, value in rows:
        groups.setdefault(key, []).append(value)
    return groups


def _read_csv(path: Path) -> list[dict[str, str]]:
    # utf-8-sig: some released CSVs (Clotho) start with a byte-order mark that would rename column 1
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def _pick_column(columns: Iterable[str], options: tuple[str, ...], file: Path) -> str:
    for option in options:
        if option in columns:
            return option
    raise ValueError(f"{file}: needs a column named one of {', '.join(options)}; found {', '.join(columns)}")


# ---------------------------------------------------------------------------------------- image folder

def read_caption_rows(captions_file: str | os.PathLike) -> list[tuple[str, list[str]]]:
    """(image path, captions) rows from a CSV (columns image|file_name, caption) or JSONL
    ({"image"|"file_name": ..., "caption": str | "captions": [str]}), in file order."""
    path = Path(captions_file)
    rows: list[tuple[str, list[str]]] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                obj = json.loads(line)
                image = obj.get("image", obj.get("file_name"))
                caps = obj.get("captions", [obj["caption"]] if "caption" in obj else None)
                if image is None or caps is None:
                    raise ValueError(f"{path}:{n}: needs 'image' or 'file_name', and 'caption' or 'captions'")
                rows.append((image, [caps] if isinstance(caps, str) else list(caps)))
    else:
        table = _read_csv(path)
        cols = list(table[0]) if table else []
        image_col = _pick_column(cols, ("image", "file_name", "filename"), path)
        caption_col = _pick_column(cols, ("caption",), path)
        rows = [(r[image_col], [r[caption_col]]) for r in table]
    return rows


def convert_image_folder(image_dir: str | os.PathLike, captions_file: str | os.PathLike,
                         out_dir: str | os.PathLike, split: str = "train", *, name: str | None = None,
                         max_samples: int = 1000, resize: int | None = None,
                         progress: bool = True) -> ConversionResult:
    """Images in ``image_dir`` captioned by ``captions_file``; several rows for one image become one
    sample with several captions."""
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    grouped = _group((image, caps) for image, caps in read_caption_rows(captions_file))
    records = []
    for image, cap_lists in grouped.items():
        captions = [c.strip() for caps in cap_lists for c in caps if c.strip()]
        records.append({"key": str(Path(image).with_suffix("")), "file": image_dir / image,
                        "json": {"captions": captions, "file_name": image, "source": name or out_dir.name}})
    counts: Counter = Counter()
    shards = _write_split(records, out_dir, split, media="image", resize=resize, max_samples=max_samples,
                          counts=counts, progress=progress)
    fields = {"image": {"description": "the image file as found (jpg/png/webp; other formats as png)",
                        "source": str(image_dir)},
              "json.captions": {"description": "captions from the captions file", "source": str(captions_file)}}
    return _finish(out_dir, name or out_dir.name, {split: shards}, fields, counts, "image-folder")


# ---------------------------------------------------------------------------------------- COCO / Karpathy

def convert_coco_captions(annotation_json: str | os.PathLike, image_root: str | os.PathLike,
                          out_dir: str | os.PathLike, split: str = "train", *, name: str | None = None,
                          max_samples: int = 1000, resize: int | None = None,
                          progress: bool = True) -> ConversionResult:
    """COCO captions JSON (``images[]`` id/file_name + ``annotations[]`` image_id/caption; written as
    ``split``) or a Karpathy split file (``images[]`` with split/filepath/filename/sentences; its own
    train/val/test splits, restval joined to train). The format is detected from the keys."""
    annotation_json, image_root, out_dir = Path(annotation_json), Path(image_root), Path(out_dir)
    data = json.loads(annotation_json.read_text(encoding="utf-8"))
    images = data.get("images")
    if not isinstance(images, list):
        raise ValueError(f"{annotation_json}: expected an 'images' list (COCO or Karpathy format)")
    if "annotations" in data:
        by_split = {split: _coco_records(data, image_root)}
        source = "coco"
    elif images and "sentences" in images[0]:
        by_split = _karpathy_records(images, image_root, data.get("dataset", "karpathy"))
        source = f"karpathy {data.get('dataset', '')}".strip()
    else:
        raise ValueError(f"{annotation_json}: neither COCO ('annotations') nor Karpathy ('images[].sentences') format")
    name = name or out_dir.name
    counts: Counter = Counter()
    splits = {s: _write_split(recs, out_dir, s, media="image", resize=resize, max_samples=max_samples,
                              counts=counts, progress=progress) for s, recs in by_split.items()}
    fields = {"jpg": {"description": "the image file as found (COCO/Flickr JPEG)", "source": str(image_root)},
              "json.captions": {"description": f"reference captions ({source})", "source": str(annotation_json)}}
    return _finish(out_dir, name, splits, fields, counts, source)


def _coco_records(data: dict[str, Any], image_root: Path) -> list[dict[str, Any]]:
    captions = _group((a["image_id"], a["caption"].strip()) for a in data["annotations"])
    records = []
    for im in data["images"]:
        if im["id"] not in captions:
            continue  # an image without captions is not a caption sample (COCO test sets)
        records.append({"key": Path(im["file_name"]).stem, "file": image_root / im["file_name"],
                        "json": {"captions": captions[im["id"]], "image_id": im["id"],
                                 "file_name": im["file_name"], "source": "coco"}})
    return records


def _karpathy_records(images: list[dict[str, Any]], image_root: Path, dataset: str) -> dict[str, list]:
    by_split: dict[str, list] = {}
    for im in images:
        split = "train" if im["split"] == "restval" else im["split"]
        rel = Path(im.get("filepath", "")) / im["filename"]
        meta = {"captions": [s["raw"].strip() for s in im["sentences"]], "file_name": str(rel),
                "karpathy_split": im["split"], "source": dataset}
        for id_key in ("cocoid", "imgid"):
            if id_key in im:
                meta[id_key] = im[id_key]
        by_split.setdefault(split, []).append({"key": Path(im["filename"]).stem, "file": image_root / rel,
                                               "json": meta})
    return by_split


# ---------------------------------------------------------------------------------------- VQA v2

# questions' data_subtype -> (split name, image subset folder name used in COCO file names)
VQA_SUBTYPES = {"train2014": ("train", "train2014"), "val2014": ("val", "val2014"),
                "test2015": ("test", "test2015"), "test-dev2015": ("testdev", "test2015")}


def convert_vqa(questions_json: str | os.PathLike, annotations_json: str | os.PathLike | None,
                image_root: str | os.PathLike, out_dir: str | os.PathLike, split: str | None = None, *,
                image_subset: str | None = None, name: str | None = None, max_samples: int = 1000,
                resize: int | None = None, progress: bool = True) -> ConversionResult:
    """VQA v2: one sample per image holding all its questions. Each qa item has ``question``,
    ``answers`` (the 10 human answers; empty for test sets without annotations), ``type`` (answer
    type), ``question_id``, ``question_type`` and ``multiple_choice_answer``. Images are
    ``image_root/COCO_{subset}_{image_id:012d}.jpg``; split and subset come from the questions'
    ``data_subtype`` unless given."""
    questions_json, image_root, out_dir = Path(questions_json), Path(image_root), Path(out_dir)
    qdata = json.loads(questions_json.read_text(encoding="utf-8"))
    subtype = qdata.get("data_subtype")
    default_split, default_subset = VQA_SUBTYPES.get(subtype, (None, subtype))
    split, image_subset = split or default_split, image_subset or default_subset
    if split is None or image_subset is None:
        raise ValueError(f"{questions_json}: data_subtype {subtype!r} is not one of {', '.join(VQA_SUBTYPES)}; "
                         "pass split and image_subset")
    answers: dict[int, dict[str, Any]] = {}
    if annotations_json is not None:
        adata = json.loads(Path(annotations_json).read_text(encoding="utf-8"))
        answers = {a["question_id"]: a for a in adata["annotations"]}

    grouped = _group((q["image_id"], q) for q in qdata["questions"])
    records, unanswered = [], 0
    for image_id, questions in grouped.items():
        qa = []
        for q in questions:
            item: dict[str, Any] = {"question": q["question"], "answers": [], "question_id": q["question_id"]}
            ann = answers.get(q["question_id"])
            if ann is not None:
                item["answers"] = [a["answer"] for a in ann["answers"]]
                item["type"] = ann.get("answer_type")
                item["question_type"] = ann.get("question_type")
                item["multiple_choice_answer"] = ann.get("multiple_choice_answer")
            elif annotations_json is not None:
                unanswered += 1
            qa.append(item)
        file_name = f"COCO_{image_subset}_{image_id:012d}.jpg"
        records.append({"key": Path(file_name).stem, "file": image_root / file_name,
                        "json": {"qa": qa, "image_id": image_id, "file_name": file_name, "source": "vqav2"}})
    if unanswered:
        log.warning("%s: %d question(s) have no annotation in %s", questions_json, unanswered, annotations_json)
    counts: Counter = Counter()
    shards = _write_split(records, out_dir, split, media="image", resize=resize, max_samples=max_samples,
                          counts=counts, progress=progress)
    fields = {"jpg": {"description": "COCO image as found", "source": str(image_root)},
              "json.qa": {"description": "VQA v2 questions with their 10 answers", "source":
                          f"{questions_json}" + (f" + {annotations_json}" if annotations_json else "")}}
    return _finish(out_dir, name or out_dir.name, {split: shards}, fields, counts, "vqa")


# ---------------------------------------------------------------------------------------- audio

AUDIOCAPS_COLUMNS = {"audiocap_id", "youtube_id", "start_time", "caption"}
CLOTHO_COLUMNS = {"file_name", "caption_1"}


def _find_audio(audio_dir: Path, stems: list[str]) -> Path:
    """The first existing ``audio_dir/{stem}.{wav,flac,mp3}``; the first candidate if none exists
    (so the 'missing' warning names a file the user can look for)."""
    for stem in stems:
        for ext in AUDIO_EXTS:
            path = audio_dir / f"{stem}.{ext}"
            if path.is_file():
                return path
    return audio_dir / f"{stems[0]}.wav"


def convert_audio_captions(audio_dir: str | os.PathLike, captions_csv: str | os.PathLike,
                           out_dir: str | os.PathLike, split: str = "train", *, name: str | None = None,
                           max_samples: int = 1000, progress: bool = True) -> ConversionResult:
    """AudioCaps or Clotho captions CSV, detected by its columns.

    AudioCaps (``audiocap_id,youtube_id,start_time,caption``): rows with the same (youtube_id,
    start_time) form one sample. The clip is looked up as ``{youtube_id}.{ext}``,
    ``Y{youtube_id}.{ext}`` (AudioSet style), ``{youtube_id}_{start_time}.{ext}`` or
    ``{audiocap_id}.{ext}`` for ext in wav/flac/mp3, in that order.
    Clotho (``file_name,caption_1..caption_5``): ``audio_dir/{file_name}``."""
    audio_dir, captions_csv, out_dir = Path(audio_dir), Path(captions_csv), Path(out_dir)
    rows = _read_csv(captions_csv)
    cols = set(rows[0]) if rows else set()
    if AUDIOCAPS_COLUMNS <= cols:
        records, source = _audiocaps_records(rows, audio_dir), "audiocaps"
    elif CLOTHO_COLUMNS <= cols:
        records, source = _clotho_records(rows, audio_dir), "clotho"
    else:
        raise ValueError(f"{captions_csv}: columns {sorted(cols)} match neither AudioCaps "
                         f"({', '.join(sorted(AUDIOCAPS_COLUMNS))}) nor Clotho (file_name, caption_1..caption_5)")
    counts: Counter = Counter()
    shards = _write_split(records, out_dir, split, media="audio", resize=None, max_samples=max_samples,
                          counts=counts, progress=progress)
    fields = {"audio": {"description": f"{source} clip as found (wav/flac/mp3)", "source": str(audio_dir)},
              "json.captions": {"description": f"{source} captions", "source": str(captions_csv)}}
    return _finish(out_dir, name or out_dir.name, {split: shards}, fields, counts, source)


def _audiocaps_records(rows: list[dict[str, str]], audio_dir: Path) -> list[dict[str, Any]]:
    grouped = _group(((r["youtube_id"], r["start_time"]), r) for r in rows)
    records = []
    for (youtube_id, start), group in grouped.items():
        stems = [youtube_id, f"Y{youtube_id}", f"{youtube_id}_{start}"] + [r["audiocap_id"] for r in group]
        start_value = float(start) if start else None
        records.append({"key": f"{youtube_id}_{start}", "file": _find_audio(audio_dir, stems),
                        "json": {"captions": [r["caption"].strip() for r in group], "youtube_id": youtube_id,
                                 "start_time": start_value, "audiocap_ids": [int(r["audiocap_id"]) for r in group],
                                 "source": "audiocaps"}})
    return records


def _clotho_records(rows: list[dict[str, str]], audio_dir: Path) -> list[dict[str, Any]]:
    records = []
    for r in rows:
        caption_cols = sorted((c for c in r if c.startswith("caption_")), key=lambda c: int(c.split("_")[1]))
        captions = [r[c].strip() for c in caption_cols if r[c] and r[c].strip()]
        records.append({"key": Path(r["file_name"]).stem, "file": audio_dir / r["file_name"],
                        "json": {"captions": captions, "file_name": r["file_name"], "source": "clotho"}})
    return records
