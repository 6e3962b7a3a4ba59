"""Shards: where a shard lives, which shard URLs may be opened, and how a tar's files become samples.

A shard is a webdataset tar. A sample is a run of consecutive files that share a key, the path up to the
first dot of the file name (``cat_01.png`` + ``cat_01.json`` -> key ``cat_01``, extensions ``png``, ``json``).
``TarSamples`` is the one place that groups files into samples: the loader reads shards through it
(``iter_tar``), ``count_samples`` counts with the same key rule, and ``mmstory data verify``
(mmstory/data/manifest.py) uses it too, so the verifier and the loader agree on what a sample is.
"""
from __future__ import annotations

import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

from mmstory.data.stats import SilentStats, WorkerStats
from mmstory.errors import ManifestError

PIPE_OPT_IN = "MMSTORY_ALLOW_PIPE"


# ---------------------------------------------------------------------------------------------- URLs
def is_url(s: str) -> bool:
    """Whether a shard entry is a URL (``scheme://...`` or ``pipe:...``) rather than a path."""
    return s.startswith("pipe:") or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", s) is not None


def local_path(url: str) -> str | None:
    """The filesystem path of a local shard, or None for a remote one."""
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if is_url(url) else url


def pipe_allowed() -> bool:
    """Whether ``pipe:`` shard URLs may run (``mmstory --allow-pipe`` sets the variable, which DataLoader
    workers inherit)."""
    return os.environ.get(PIPE_OPT_IN, "") == "1"


def url_scheme(url: str) -> str:
    """The scheme webdataset's ``gopen`` dispatches ``url`` on ("" for a local path). Parsed exactly as gopen
    parses it (``urllib.parse``: lower-cased, leading spaces and control characters dropped, tabs and
    newlines removed), so ``PIPE:cmd`` or `` pipe:cmd`` cannot slip past a plain ``startswith("pipe:")``."""
    from urllib.parse import urlparse

    try:
        return urlparse(url).scheme
    except ValueError:  # e.g. a malformed IPv6 host: gopen fails on it too, before running anything
        return "?"


def check_url(url: str) -> None:
    """Refuse a shard URL that would run a shell command or read standard input; the one check that every
    reader of shards (manifest loading, the loader, the verifier) makes before opening one.

    What webdataset 1.0's ``gopen`` does with each URL (webdataset/gopen.py): ``-`` reads stdin; no scheme
    and ``file:`` open a local file; ``pipe:CMD`` runs CMD through ``/bin/sh`` (``shell=True``); http, https,
    sftp, ftps and scp run ``curl ... URL``, gs runs ``gsutil cat URL``, ais ``ais get URL -``, hf and htgs
    curl: a fixed program with the URL as one argument, no shell, so those are allowed; any other scheme is
    refused by gopen itself. A manifest is data that people download, so ``pipe:`` is refused unless the user
    opts in (``mmstory --allow-pipe`` or ``MMSTORY_ALLOW_PIPE=1``, which DataLoader workers inherit)."""
    if url_scheme(url) == "pipe" and not pipe_allowed():
        raise ManifestError(f"shard {url!r} would run a shell command; pipe: shards run only when you allow them "
                            f"(mmstory --allow-pipe ..., or {PIPE_OPT_IN}=1), for manifests you wrote")
    if url.strip() == "-":
        raise ManifestError("shard '-' (standard input) is not a shard path")


@dataclass(frozen=True)
class Shard:
    """A shard to read: its URL or path, and its sample count when a manifest gives it."""
    url: str
    samples: int | None = None


def resolve_shards(source: Any) -> list[Shard]:
    """Accept a manifest ``SplitInfo``, a list of ``ShardInfo``-likes (``.url``, ``.samples``), or a
    list of URL/path strings (a single string is one shard)."""
    if hasattr(source, "shards"):
        source = source.shards
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    shards = []
    for s in source:
        if isinstance(s, (str, os.PathLike)):
            shards.append(Shard(os.fspath(s)))
        else:
            shards.append(Shard(s.url, getattr(s, "samples", None)))
    if not shards:
        raise ValueError("no shards given")
    for shard in shards:
        check_url(shard.url)  # a manifest's pipe: shards never reach a shell without the user's opt-in
    return shards


# ---------------------------------------------------------------------------------------------- samples
def _member_key(name: str) -> tuple[str | None, str | None]:
    """webdataset's key/extension split of a member name: key = path up to the first dot of the file name.
    (None, None) for a name without one, or a dot file (``.DS_Store``, ``dir/._x.png``): not a sample."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash:
        return None, None
    return name[:dot], name[dot + 1:]


class TarSamples:
    """The samples of an open tar, in order, as ``(key, {extension: bytes})`` (extensions lower-cased);
    members that are not files or have no key are skipped.

    A file's data is read before the sample ahead of it is handed out, as webdataset does, so a tar that
    breaks inside the first file of a sample loses the sample before it as well. ``reading`` is the key of
    the sample being gathered (None before the first file), which says where a broken tar broke."""

    def __init__(self, tar: tarfile.TarFile):
        self.tar = tar
        self.reading: str | None = None

    def __iter__(self) -> Iterator[tuple[str, dict[str, bytes]]]:
        files: dict[str, bytes] = {}
        for member in self.tar:
            if not member.isfile():
                continue
            key, ext = _member_key(member.name)
            if key is None:
                continue
            data = self.tar.extractfile(member).read()
            if key != self.reading:
                if self.reading is not None:
                    yield self.reading, files
                self.reading, files = key, {}
            files[ext.lower()] = data
        if self.reading is not None:
            yield self.reading, files


def count_samples(url: str) -> int | None:
    """Number of samples in a local shard from its tar headers (no data read); None if not local."""
    path = local_path(url)
    if path is None or not os.path.isfile(path):
        return None
    keys, last = 0, None
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                key = _member_key(member.name)[0] if member.isfile() else None
                if key is not None and key != last:
                    keys, last = keys + 1, key
    except (tarfile.TarError, EOFError, OSError):
        pass  # a truncated shard: count what is there, as the reader will
    return keys


# ---------------------------------------------------------------------------------------------- reading
def iter_tar(url: str, stats: WorkerStats | SilentStats, expected: int | None = None) -> Iterator[dict]:
    """Raw samples ``{"__key__", "__url__", ext: bytes}`` of one shard. An unreadable or truncated tar
    ends the shard with a warning; the sample being read when it broke is dropped (it may be partial).
    ``expected``: the manifest's sample count; a shard that holds fewer is counted (``bad/short_shard``,
    ``missing_samples``), whether it ended early or was written short."""
    from webdataset.gopen import gopen

    check_url(url)
    try:
        stream = gopen(url, "rb")
    except Exception as e:  # gopen raises OSError/ValueError/IOError depending on the scheme
        stats.bad("unreadable_shard", url, None, f"{type(e).__name__}: {e}")
        _count_missing(stats, url, expected, 0, report=False)
        return
    samples: TarSamples | None = None
    read = 0
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            samples = TarSamples(tar)
            for key, files in samples:
                read += 1
                yield {"__key__": key, "__url__": url, **files}
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        stats.bad("truncated_shard", url, samples.reading if samples else None, f"{type(e).__name__}: {e}")
        _count_missing(stats, url, expected, read, report=False)
        return
    _count_missing(stats, url, expected, read, report=True)


def _count_missing(stats: WorkerStats | SilentStats, url: str, expected: int | None, read: int, *,
                   report: bool) -> None:
    """Count the samples a shard lacks against its manifest count (``report``: also as a short shard, when
    no other problem of the shard was counted)."""
    if expected is None or read >= expected:
        return
    stats.add("missing_samples", expected - read)
    if report:
        stats.bad("short_shard", url, None, f"expected {expected} samples (manifest), read {read}")
