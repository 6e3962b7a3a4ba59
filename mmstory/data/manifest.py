"""Dataset manifests: which shards make up each split, and checks that they are intact.

A manifest is a JSON file (``format_version: 1``, described in ``data_manifests/README.md``) that
lists, per split, webdataset tar shards with optional sample counts, sizes and sha256 checksums.
Shard paths are relative to the manifest's folder, absolute, or URLs (``http(s)://``, ``pipe:``).
A split may give a brace ``pattern`` (``train-{000000..000099}.tar``) instead of a shard list, for
data the user builds; ``write_counts`` then replaces it by an explicit, checksummed shard list.
Which shard URLs may be opened, and how a tar's files group into samples, is mmstory/data/shards.py's,
shared with the loader, so ``verify`` counts the samples the loader reads.

    m = load_manifest("data_manifests/coco_karpathy.json")
    urls = m.split("train").urls                 # feed to webdataset.WebDataset
    check_shards(m.split("val"))                 # fast: existence and size (sha256=True: checksums too)
    report = verify(m)                           # slow: reads and decodes every sample
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import braceexpand
from tqdm import tqdm

from mmstory.data.shards import TarSamples, check_url, is_url, local_path
from mmstory.errors import ManifestError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# "card" (path of a dataset card) and "stats" (free-form statistics) are used by the bundled emoji set.
TOP_LEVEL_KEYS = {"format_version", "name", "description", "homepage", "licence", "citation", "notes",
                  "build", "fields", "splits", "tokenizer", "card", "stats"}
SPLIT_KEYS = {"samples", "shards", "pattern", "description"}
SHARD_KEYS = {"path", "samples", "bytes", "sha256"}

IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "gif", "bmp", "ppm"}
AUDIO_EXTS = {"flac", "wav", "mp3", "ogg"}
TEXT_EXTS = {"txt", "text", "caption"}


@dataclass
class ShardInfo:
    url: str                      # absolute local path or URL, ready for webdataset
    samples: int | None = None
    bytes: int | None = None
    sha256: str | None = None

    @property
    def is_local(self) -> bool:
        return local_path(self.url) is not None

    @property
    def display(self) -> str:
        """The path as a person would type it (relative to the working directory when inside it)."""
        return _display(self.url)


@dataclass
class SplitInfo:
    name: str
    shards: list[ShardInfo]
    samples: int | None = None
    pattern: str | None = None    # the brace/glob pattern the shards came from, if any
    manifest: str | None = None   # the manifest file it was read from, as shown to people (for messages)

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.shards]

    @property
    def verify_command(self) -> str:
        """The command that reads every sample of this split and says what is wrong with each shard."""
        return f"mmstory data verify {self.manifest or 'MANIFEST'} --split {self.name}"


@dataclass
class Manifest:
    path: Path
    name: str
    splits: dict[str, SplitInfo]
    fields: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None  # absolute path
    raw: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise KeyError(f"manifest {_display(str(self.path))} has no split '{name}'; "
                           f"valid splits: {', '.join(self.splits)}")
        return self.splits[name]


# ---------------------------------------------------------------------------------------- loading

def _display(url: str) -> str:
    path = local_path(url)
    if path is None:
        return url
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _resolve(entry: str, base: Path) -> str:
    if is_url(entry) or os.path.isabs(entry):
        return entry
    return str((base / entry).resolve())


def _expand_pattern(pattern: str, base: Path) -> list[str]:
    """Brace-expand a shard pattern; parts with glob characters are globbed (sorted) locally."""
    urls = []
    for item in braceexpand.braceexpand(pattern):
        url = _resolve(item, base)
        if not is_url(url) and any(c in item for c in "*?["):
            urls.extend(sorted(glob.glob(url)))  # an empty match is reported by check_shards
        else:
            urls.append(url)
    return urls


def _check_keys(where: str, got: dict, allowed: set[str], file: str) -> None:
    unknown = sorted(set(got) - allowed)
    if unknown:
        raise ManifestError(f"{file}: unknown key(s) {', '.join(repr(k) for k in unknown)} in {where}; "
                            f"allowed: {', '.join(sorted(allowed))}")


def _opt_int(value: Any, what: str, file: str) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ManifestError(f"{file}: {what} must be a non-negative integer or null, got {value!r}")
    return value


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate a manifest; relative shard and tokenizer paths resolve against its folder."""
    path = Path(path).resolve()
    shown = _display(str(path))
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"manifest {shown} does not exist") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"manifest {shown} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{shown}: a manifest must be a JSON object")
    _check_keys("the top level", raw, TOP_LEVEL_KEYS, shown)
    if raw.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise ManifestError(f"{shown}: format_version {raw['format_version']!r} is not supported "
                            f"(this code reads {FORMAT_VERSION})")
    if "splits" not in raw:
        raise ManifestError(f"{shown}: missing required key 'splits'")
    if not isinstance(raw["splits"], dict) or not raw["splits"]:
        raise ManifestError(f"{shown}: 'splits' must be a non-empty object of split name -> split")

    base = path.parent
    splits = {}
    for name, spec in raw["splits"].items():
        if not isinstance(spec, dict):
            raise ManifestError(f"{shown}: split '{name}' must be an object")
        _check_keys(f"split '{name}'", spec, SPLIT_KEYS, shown)
        if ("shards" in spec) == ("pattern" in spec):
            raise ManifestError(f"{shown}: split '{name}' needs exactly one of 'shards' or 'pattern'")
        if "pattern" in spec:
            shards = [ShardInfo(url) for url in _expand_pattern(spec["pattern"], base)]
        else:
            shards = []
            for i, s in enumerate(spec["shards"]):
                where = f"split '{name}' shard {i}"
                if isinstance(s, str):  # a bare path is allowed as shorthand
                    s = {"path": s}
                if not isinstance(s, dict) or "path" not in s:
                    raise ManifestError(f"{shown}: {where} needs a 'path'")
                _check_keys(where, s, SHARD_KEYS, shown)
                shards.append(ShardInfo(_resolve(s["path"], base), _opt_int(s.get("samples"), f"{where} samples", shown),
                                        _opt_int(s.get("bytes"), f"{where} bytes", shown), s.get("sha256")))
        for shard in shards:
            try:
                check_url(shard.url)
            except ManifestError as e:
                raise ManifestError(f"{shown}: split '{name}': {e}") from None
        samples = _opt_int(spec.get("samples"), f"split '{name}' samples", shown)
        splits[name] = SplitInfo(name, shards, samples, spec.get("pattern"), shown)

    tokenizer = raw.get("tokenizer")
    if tokenizer is not None:
        tokenizer = _resolve(tokenizer, base)
    return Manifest(path, raw.get("name", path.stem), splits, raw.get("fields", {}), tokenizer, raw)


# ---------------------------------------------------------------------------------------- checking

def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _short(digest: str) -> str:
    return digest[:8] + "…"


MAX_SHOWN = 20  # bad shards named one by one in check_shards' message


def check_shards(split_info: SplitInfo, *, sha256: bool = False, progress: bool = False) -> None:
    """Fast integrity check of a split's local shards, for the start of a run: each exists and its size
    matches the manifest where the manifest gives one; with ``sha256``, its checksum too (that reads every
    byte, so it is off unless asked). Remote shards are skipped (nothing to check offline). Sample counts
    are checked as the shards are read (the loader counts ``short_shard``/``missing_samples``).

    Raises ManifestError naming every bad shard of the split (past ``MAX_SHOWN``, a count: a message of a
    thousand paths helps nobody) and the ``mmstory data verify`` command that reads them all.
    """
    if not split_info.shards:
        raise ManifestError(_no_shards(split_info))
    problems = []
    for shard in tqdm(split_info.shards, desc=f"check {split_info.name}", unit="shard", disable=not progress):
        error = _shard_problem(shard, sha256=sha256)
        if error:
            problems.append(f"shard {shard.display}: {error}")
    if problems:
        shown = "; ".join(problems[:MAX_SHOWN]) + (f"; and {len(problems) - MAX_SHOWN} more shards"
                                                   if len(problems) > MAX_SHOWN else "")
        where = f"{split_info.manifest}: " if split_info.manifest else ""
        raise ManifestError(f"{where}split '{split_info.name}': {len(problems)} of {len(split_info.shards)} shards "
                            f"are not as the manifest says: {shown} ({split_info.verify_command} reads every "
                            f"sample and says what is wrong with each)")


def _no_shards(split: SplitInfo) -> str:
    if split.pattern is None:
        return f"split '{split.name}' lists no shards"
    return (f"split '{split.name}': pattern {split.pattern!r} matched no files "
            f"(build the data first: see the manifest's 'build')")


def _shard_problem(shard: ShardInfo, *, sha256: bool) -> str | None:
    path = local_path(shard.url)
    if path is None:
        return None
    if not os.path.isfile(path):
        return "file is missing"
    size = os.path.getsize(path)
    if shard.bytes is not None and size != shard.bytes:
        return f"size mismatch (expected {shard.bytes:,} bytes, got {size:,})"
    if sha256 and shard.sha256:
        got = sha256_file(path)
        if got != shard.sha256.lower():
            return f"sha256 mismatch (expected {_short(shard.sha256)}, got {_short(got)})"
    return None


class _HashingReader(io.RawIOBase):
    """Wraps a stream so one pass computes the sha256 and byte count while tarfile reads it."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.hash, self.bytes = stream, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self.stream.read(len(buf))
        n = len(data)
        buf[:n] = data
        self.hash.update(data)
        self.bytes += n
        return n

    def drain(self) -> None:
        """Read what tarfile left (end-of-archive padding) so the hash covers the whole file."""
        while self.read(1 << 20):
            pass


def _open_stream(url: str) -> BinaryIO:
    check_url(url)
    path = local_path(url)
    if path is not None:
        return open(path, "rb")
    from webdataset.gopen import gopen  # curl/pipe handling for remote shards
    return gopen(url, "rb")


def check_sample(files: dict[str, bytes], *, decode: bool = True) -> str | None:
    """Why a sample is unusable (None if fine): it needs an image or audio file and a json or text file (what
    the loader trains on); with ``decode``, its images and audio decode exactly as the loader decodes them
    (mmstory/data/transforms.py: 16-bit images rescaled, audio finite and non-empty) and its json follows
    the mmstory schema (captions: [str], qa: [{question, answers}], labels: {})."""
    lasts = {ext.rsplit(".", 1)[-1] for ext in files}
    if not lasts & (IMAGE_EXTS | AUDIO_EXTS):
        return f"no image or audio file (has {', '.join(sorted(files)) or 'nothing'})"
    if not lasts & ({"json"} | TEXT_EXTS):
        return f"no json or text file (has {', '.join(sorted(files))})"
    if not decode:
        return None
    from mmstory.data.transforms import decode_audio, decode_image

    for ext, data in files.items():
        last = ext.rsplit(".", 1)[-1]
        try:
            if last in IMAGE_EXTS:
                decode_image(data)
            elif last in AUDIO_EXTS:
                decode_audio(data, None)
            elif last == "json":
                problem = _schema_problem(json.loads(data.decode("utf-8")))
                if problem:
                    return f"{ext}: {problem}"
            elif last in TEXT_EXTS:
                data.decode("utf-8")
        except Exception as e:  # any decoder failure makes the sample bad; say which part and why
            return f"{ext}: cannot decode ({type(e).__name__}: {e})"
    return None


def _schema_problem(meta: Any) -> str | None:
    if not isinstance(meta, dict):
        return "json is not an object"
    for key in ("captions", "captions_zh"):
        if key in meta and not (isinstance(meta[key], list) and all(isinstance(c, str) for c in meta[key])):
            return f"'{key}' must be a list of strings"
    if "qa" in meta:
        if not isinstance(meta["qa"], list):
            return "'qa' must be a list"
        for qa in meta["qa"]:
            if not (isinstance(qa, dict) and isinstance(qa.get("question"), str)
                    and isinstance(qa.get("answers", []), list)):
                return "each 'qa' item needs a string 'question' and a list 'answers'"
    if "labels" in meta and not isinstance(meta["labels"], dict):
        return "'labels' must be an object"
    return None


def verify_shard(shard: ShardInfo, *, decode: bool = True) -> dict[str, Any]:
    """Read one shard end to end. Returns {"url", "samples", "bytes", "sha256", "errors": [str],
    "bad_samples": [{"shard", "key", "reason"}]}; never raises for a damaged shard."""
    result: dict[str, Any] = {"url": shard.url, "samples": 0, "bytes": None, "sha256": None,
                              "errors": [], "bad_samples": []}
    name = shard.display
    path = local_path(shard.url)
    if path is not None and not os.path.isfile(path):
        result["errors"].append(f"shard {name}: file is missing")
        return result
    try:
        check_url(shard.url)
    except ManifestError as e:
        result["errors"].append(str(e))
        return result
    last_key = None
    try:
        with _open_stream(shard.url) as raw:
            reader = _HashingReader(raw)
            try:
                with tarfile.open(fileobj=io.BufferedReader(reader, 1 << 20), mode="r|") as tar:
                    for key, files in TarSamples(tar):
                        last_key = key
                        result["samples"] += 1
                        reason = check_sample(files, decode=decode)
                        if reason:
                            result["bad_samples"].append({"shard": name, "key": key, "reason": reason})
            except (tarfile.TarError, EOFError, OSError) as e:
                after = f" after sample '{last_key}'" if last_key else ""
                result["errors"].append(f"shard {name}: unreadable tar{after}, truncated or corrupt "
                                        f"({type(e).__name__}: {e})")
            reader.drain()
            result["bytes"], result["sha256"] = reader.bytes, reader.hash.hexdigest()
    except OSError as e:
        result["errors"].append(f"shard {name}: cannot open ({e})")
        return result

    if shard.bytes is not None and result["bytes"] != shard.bytes:
        result["errors"].append(f"shard {name}: size mismatch (expected {shard.bytes:,} bytes, "
                                f"got {result['bytes']:,})")
    if shard.sha256 and result["sha256"] != shard.sha256.lower():
        result["errors"].append(f"shard {name}: sha256 mismatch (expected {_short(shard.sha256)}, "
                                f"got {_short(result['sha256'])})")
    if shard.samples is not None and result["samples"] != shard.samples and not result["errors"]:
        result["errors"].append(f"shard {name}: expected {shard.samples:,} samples, found {result['samples']:,}")
    return result


def verify(manifest: Manifest, splits: list[str] | None = None, *, decode: bool = True,
           progress: bool = True) -> dict[str, Any]:
    """Read every shard of the chosen splits: existence, size, sha256, sample counts, and (with
    ``decode``) that every image, audio clip and json decodes.

    Returns {"manifest": path, "ok": bool, "errors": [str], "bad_samples": [{shard, key, reason}],
    "splits": {name: {"shards", "samples", "bytes", "bad", "errors", "ok", "shard_results": [...]}}}.
    """
    names = list(manifest.splits) if not splits else splits
    report: dict[str, Any] = {"manifest": str(manifest.path), "splits": {}, "errors": [], "bad_samples": []}
    for name in names:
        split = manifest.split(name)
        entry = {"shards": len(split.shards), "samples": 0, "bytes": 0, "bad": 0, "errors": [],
                 "shard_results": []}
        if not split.shards:
            entry["errors"].append(_no_shards(split))
        bar = tqdm(split.shards, desc=f"verify {name}", unit="shard", disable=not progress)
        for shard in bar:
            res = verify_shard(shard, decode=decode)
            entry["shard_results"].append(res)
            entry["samples"] += res["samples"]
            entry["bytes"] += res["bytes"] or 0
            entry["bad"] += len(res["bad_samples"])
            entry["errors"].extend(res["errors"])
            report["bad_samples"].extend(res["bad_samples"])
            bar.set_postfix(samples=entry["samples"], bad=entry["bad"])
        if split.samples is not None and entry["samples"] != split.samples and not entry["errors"]:
            entry["errors"].append(f"split '{name}': expected {split.samples:,} samples, found {entry['samples']:,}")
        entry["ok"] = not entry["errors"] and entry["bad"] == 0
        report["splits"][name] = entry
        report["errors"].extend(entry["errors"])
    report["ok"] = not report["errors"] and not report["bad_samples"]
    return report


# ---------------------------------------------------------------------------------------- writing back

def _relative(url: str, base: Path) -> str:
    """How a shard is written in a manifest: relative to the manifest's folder when inside it."""
    path = local_path(url)
    if path is None:
        return url
    rel = os.path.relpath(path, base)
    return path if rel.startswith("..") else rel


def write_counts(manifest: Manifest, report: dict[str, Any] | None = None) -> Path:
    """Fill the manifest's null sample counts, sizes and sha256 from a ``verify`` report (run without
    decoding if none is given) and rewrite the file. Pattern splits become explicit shard lists, so
    later checks compare checksums. Values already in the manifest are never overwritten (a mismatch
    is an error that ``verify`` reports), and splits that failed verification are left as they are.
    Returns the manifest's path."""
    if report is None:
        report = verify(manifest, decode=False, progress=True)
    raw = json.loads(json.dumps(manifest.raw))  # deep copy
    base = manifest.path.parent
    skipped = []
    for name, entry in report["splits"].items():
        split, spec = manifest.split(name), raw["splits"][name]
        # Only a split whose shards all read cleanly is written: recording the counts of a damaged or
        # missing shard, or freezing a glob that matched half a build, would make later checks lie.
        if entry["errors"] or not split.shards:
            skipped.append(name)
            continue
        results = {r["url"]: r for r in entry["shard_results"]}
        shards_out = []
        for shard in split.shards:
            res = results[shard.url]
            shards_out.append({
                "path": _relative(shard.url, base),
                "samples": shard.samples if shard.samples is not None else res["samples"],
                "bytes": shard.bytes if shard.bytes is not None else res["bytes"],
                "sha256": shard.sha256 if shard.sha256 else res["sha256"],
            })
        spec.pop("pattern", None)
        spec["shards"] = shards_out
        if spec.get("samples") is None and all(s["samples"] is not None for s in shards_out):
            spec["samples"] = sum(s["samples"] for s in shards_out)
    if skipped:
        log.warning("%s: left split(s) %s unchanged because they failed verification",
                    _display(str(manifest.path)), ", ".join(skipped))
    manifest.path.write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest.path
