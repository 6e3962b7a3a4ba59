"""What the loader read and skipped: per-worker counts of samples, batches and bad data, summed in the
main process, and the one-line report and the ``read_counts`` dict that training and evaluation record.

Counter keys: ``samples``, ``batches``, ``missing_samples`` (samples the manifest counts but the shards did
not hold) and ``bad/<reason>`` (``bad_image``, ``truncated_shard``, ``short_shard``, ...).
"""
from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mmstory.data.loader import Loader, MixedLoader

MAX_WARNINGS_PER_WORKER = 20


class WorkerStats:
    """Counts of bad data for one worker, written to a small JSON file the main process sums: workers
    are separate processes, and files work with any start method and with persistent workers."""

    def __init__(self, folder: str | None, rank: int, worker: int):
        self.path = os.path.join(folder, f"rank{rank}-worker{worker}.json") if folder else None
        self.counts: Counter = Counter()
        self.warned = 0

    def bad(self, reason: str, shard: str, key: str | None, detail: str) -> None:
        self.counts[f"bad/{reason}"] += 1
        if self.warned < MAX_WARNINGS_PER_WORKER:
            self.warned += 1
            more = " (further data warnings from this worker are counted but not shown)" \
                if self.warned == MAX_WARNINGS_PER_WORKER else ""
            warnings.warn(f"skipping {reason}: shard {shard} key {key}: {detail}{more}", RuntimeWarning,
                          stacklevel=2)
        self.flush()

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def flush(self) -> None:
        if self.path is None:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(self.counts), f)
        os.replace(tmp, self.path)  # atomic: the main process never reads half a file


class SilentStats:
    """Shard-level problems (unreadable or truncated tar, samples missing) of a shard that several workers
    share are reported once, by the worker reading it from offset 0; the others read it with this."""

    def bad(self, *args) -> None:
        pass

    def add(self, *args) -> None:
        pass


def read_stats(folder: str) -> Counter:
    """The counts of every worker that wrote into ``folder``, summed."""
    total: Counter = Counter()
    if folder and os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".json"):
                with open(os.path.join(folder, name)) as f:
                    total.update(json.load(f))
    return total


def bad_counts(stats: "Counter | dict[str, int]") -> dict[str, int]:
    """{reason: n} of the bad data counted (the ``bad/<reason>`` keys), sorted by reason."""
    return {k.split("/", 1)[1]: int(v) for k, v in sorted(stats.items()) if k.startswith("bad/")}


def bad_summary(stats: Counter) -> str:
    """``reason=n, ...`` for the bad data counted, for error messages."""
    return ", ".join(f"{k}={v}" for k, v in bad_counts(stats).items()) or "none counted"


def report(stats: "Counter | Loader | MixedLoader", *, print_fn=print) -> str:
    """Print (and return) one line: samples and batches produced, and bad data skipped per reason."""
    if not isinstance(stats, Counter):
        stats = stats.stats
    bad = bad_counts(stats)
    line = (f"data: {stats.get('samples', 0)} samples in {stats.get('batches', 0)} batches; "
            + (f"skipped {sum(bad.values())} bad: " + ", ".join(f"{k}={v}" for k, v in bad.items())
               if bad else "no bad data")
            + (f"; {stats['missing_samples']} samples the manifest counts were not in their shards"
               if stats.get("missing_samples") else ""))
    print_fn(line)
    return line


def read_counts(stats: "Counter | dict[str, int]", *, complete: bool) -> dict:
    """What the loader read: ``samples_read``, ``skipped`` {reason: n} (undecodable samples, unreadable or
    truncated shards, shards with fewer samples than the manifest says), ``missing_samples`` (how many the
    manifest counts but the shards did not hold) and whether the whole split was read (``complete``)."""
    return {"samples_read": int(stats.get("samples", 0)), "complete": complete,
            "skipped": bad_counts(stats),
            "missing_samples": int(stats.get("missing_samples", 0))}
