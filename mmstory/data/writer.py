"""Deterministic webdataset shard writing, and writing manifests for what was written.

Tar headers normally carry the wall-clock mtime and the writing user, so re-running a build gives
different bytes and the manifest's sha256 go stale. ``ShardSink`` fixes mtime, uid/gid, user and
group names and file mode (``TarHeader``), and writes samples (and each sample's files, sorted by
extension) in the order given, so the same inputs give byte-identical shards. The converters
(``mmstory data build``) and the emoji builder (tools/build_emoji.py) both write through it.

    with ShardSink(out_dir, "train", max_samples=1000) as sink:
        for sample in samples:             # {"__key__": "x", "jpg": b"...", "json": {...}}
            sink.write(sample)
    write_manifest(out_dir / "manifest.json", "mydata", {"train": sink.shards}, fields)
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds

from .manifest import FORMAT_VERSION, ShardInfo, _relative, sha256_file

log = logging.getLogger(__name__)

KEY_RE = re.compile(r"^[A-Za-z0-9_\-/]+$")


@dataclass(frozen=True)
class TarHeader:
    """The header fields every file of a shard gets besides its name and size (uid and gid are 0).

    The type of ``mtime`` shows in the bytes: Python's tarfile keeps a float mtime exactly in a pax record
    before each file, an int one fits the plain ustar header. The default (0.0, 1970-01-01: any constant
    works) is what ``mmstory data build`` has always written; the bundled emoji set was written with other
    values (tools/build_emoji.py), and changing either would change the bytes behind a manifest's sha256."""
    mtime: int | float = 0.0
    mode: int = 0o444
    user: str = "mmstory"
    group: str = "mmstory"


def encode_json(obj: Any) -> bytes:
    """JSON as stored in shards: UTF-8, no ASCII escaping (readable Chinese captions), key order as given."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def safe_key(name: str) -> str:
    """A webdataset key from a file name: webdataset splits the key from the extension at the first
    dot, so dots (and anything unusual) become underscores."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name)


class ShardSink:
    """Writes samples into ``{out_dir}/{prefix}-{index:06d}.tar``, starting a new shard every
    ``max_samples`` samples, each file with ``header``. After ``close()``, ``shards`` lists a ShardInfo
    (sha256, bytes, samples) per shard. Files are written under a temporary name and renamed when complete,
    and stale shards of the same prefix from an earlier, larger run are removed, so the folder matches the
    manifest."""

    def __init__(self, out_dir: str | os.PathLike, prefix: str, *, max_samples: int = 1000,
                 header: TarHeader = TarHeader()):
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_samples, self.header = prefix, max_samples, header
        self.shards: list[ShardInfo] = []
        self._writer: wds.TarWriter | None = None
        self._count = 0
        self._keys: set[str] = set()

    def _path(self, index: int) -> Path:
        return self.out_dir / f"{self.prefix}-{index:06d}.tar"

    def _open(self) -> None:
        tmp = str(self._path(len(self.shards))) + ".tmp"
        # encoder=False: we pass bytes ourselves, so nothing is re-encoded behind our back.
        h = self.header
        self._writer = wds.TarWriter(tmp, encoder=False, user=h.user, group=h.group, mode=h.mode, mtime=h.mtime)
        self._count = 0

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        final = self._path(len(self.shards))
        os.replace(str(final) + ".tmp", final)
        self.shards.append(ShardInfo(str(final.resolve()), self._count, final.stat().st_size, sha256_file(final)))

    def write(self, sample: dict[str, Any]) -> None:
        """Write one sample: ``__key__`` plus extension -> bytes (``json`` may be a dict, ``txt`` a str)."""
        key = sample["__key__"]
        if not KEY_RE.match(key):
            raise ValueError(f"invalid sample key {key!r}: use letters, digits, '_', '-' (see safe_key)")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in {self.prefix}")
        self._keys.add(key)
        out = {"__key__": key}
        for ext, value in sample.items():
            if ext == "__key__":
                continue
            if ext == "json" and not isinstance(value, (bytes, bytearray)):
                value = encode_json(value)
            elif isinstance(value, str):
                value = value.encode("utf-8")
            out[ext] = value
        if self._writer is None:
            self._open()
        self._writer.write(out)
        self._count += 1
        if self._count >= self.max_samples:
            self._finish()

    def close(self) -> list[ShardInfo]:
        self._finish()
        self._remove_stale()
        return self.shards

    def _remove_stale(self) -> None:
        keep = {Path(s.url).name for s in self.shards}
        for path in sorted(self.out_dir.glob(f"{self.prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar")):
            if path.name not in keep:
                log.warning("removing stale shard %s from an earlier build", path)
                path.unlink()

    def __enter__(self) -> "ShardSink":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._writer is not None:  # leave no half-written shard behind
            self._writer.close()
            Path(str(self._path(len(self.shards))) + ".tmp").unlink(missing_ok=True)


def write_shards(samples, out_dir: str | os.PathLike, prefix: str, *, max_samples: int = 1000,
                 header: TarHeader = TarHeader()) -> list[ShardInfo]:
    """Write an iterable of samples to deterministic shards; returns their ShardInfo list."""
    with ShardSink(out_dir, prefix, max_samples=max_samples, header=header) as sink:
        for sample in samples:
            sink.write(sample)
    return sink.shards


def write_manifest(path: str | os.PathLike, name: str, splits: dict[str, list[ShardInfo]],
                   fields: dict[str, Any], *, merge: bool = True, **extra: Any) -> Path:
    """Write a format-1 manifest listing ``splits`` (shard paths relative to the manifest's folder).

    With ``merge`` (default), splits already in an existing manifest at ``path`` that are not being
    written are kept, so a dataset's train/val/test can be converted by separate commands. ``extra``
    adds top-level keys (description, homepage, licence, build, tokenizer)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    old = json.loads(path.read_text(encoding="utf-8")) if merge and path.exists() else {}
    raw: dict[str, Any] = {"format_version": FORMAT_VERSION, "name": name}
    for key in ("description", "homepage", "licence", "citation", "notes", "build", "tokenizer", "card", "stats"):
        if key in extra or key in old:
            raw[key] = extra.get(key, old.get(key))
    unknown = set(extra) - set(raw)
    if unknown:
        raise ValueError(f"write_manifest: unknown manifest key(s) {sorted(unknown)}")
    raw["fields"] = {**old.get("fields", {}), **fields}
    all_splits = dict(old.get("splits", {}))
    for split, shards in splits.items():
        all_splits[split] = {
            "samples": sum(s.samples or 0 for s in shards),
            "shards": [{"path": _relative(s.url, base), "samples": s.samples, "bytes": s.bytes, "sha256": s.sha256}
                       for s in shards],
        }
    raw["splits"] = all_splits
    path.write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
