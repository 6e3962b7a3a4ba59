"""Webdataset shards -> padded training/eval batches, deterministic enough to resume mid-epoch.

Stages, all inside each DataLoader worker (the main process only drops empty batches):

    shard list --shuffle(seed, epoch)--> split by DDP rank, then by worker (whole shards; workers share
      a shard, each taking every k-th sample, when a rank has fewer shards than workers)
      --> tar reading, grouped by key (raw bytes)                    shards.iter_tar
      --> sample shuffle buffer (seed, epoch, rank, worker)          [train only]
      --> groups of batch_size raw samples   <- skip_batches drops whole groups here, before decoding
      --> decode + transforms + task choice (transforms.SampleDecoder), per-sample RNG from (seed, epoch, key)
      --> collate: padding and masks (the batch format: mmstory/data/collate.py)

Why batches are formed *before* decoding: a bad sample is dropped from its group (the batch comes out
one smaller) instead of pulling in the next sample, so which samples land in batch ``i`` never
depends on decoding, and a resumed run can skip whole groups without decoding them.

DataLoader hands out batch ``i`` from worker ``i % W`` (skipping exhausted workers), so resuming
at batch ``k`` means: each worker skips its share of the first ``k`` batches, and the workers are
rotated so that the one owning batch ``k`` runs first. Exact when per-shard sample counts are known
(manifest, or counted from local tar headers) and in resampled mode.

Bad data is counted per worker (mmstory/data/stats.py) and never stops a run, unless a whole split gives
nothing (``EmptySplitError``).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import shutil
import tempfile
import warnings
import weakref
from collections import Counter
from dataclasses import replace
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmstory.config import DataConfig
from mmstory.data.collate import collate
from mmstory.data.shards import Shard, count_samples, iter_tar, resolve_shards
from mmstory.data.stats import SilentStats, WorkerStats, bad_summary, read_stats, report
from mmstory.data.transforms import DEFAULT_MEAN, DEFAULT_STD, BadSample, SampleDecoder
from mmstory.errors import UserError
from mmstory.prompts import Prompts
from mmstory.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class EmptySplitError(UserError):
    """A split gave no sample at all (every shard unreadable, missing or empty): a run would otherwise loop
    over empty epochs forever."""


def fit_to_encoders(cfg: DataConfig, encoders: Any) -> tuple[DataConfig, dict]:
    """What a model's encoders dictate to its data: the image encoder's size and normalisation and the
    audio encoder's sample rate (each encoder's ``preprocess`` dict). Returns the adjusted config and the
    ``mean``/``std`` keywords for ``build_loader`` (empty without an image encoder: the defaults)."""
    norm = {}
    if "image" in encoders:
        pre = encoders["image"].preprocess
        cfg = replace(cfg, image_size=pre["image_size"])
        norm = {"mean": tuple(pre["mean"]), "std": tuple(pre["std"])}
    if "audio" in encoders:
        cfg = replace(cfg, sample_rate=encoders["audio"].preprocess["sample_rate"])
    return cfg, norm


def model_text_args(model: Any) -> dict:
    """The ``build_loader`` arguments a model dictates besides its encoders' (``fit_to_encoders``): the decoder's,
    text encoder's and question encoder's tokenizers, and the prompts it was trained with."""
    return {"tokenizer": model.tokenizer, "text_tokenizer": model.text_tokenizer,
            "question_tokenizer": model.question_tokenizer, "prompts": model.prompts}


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable values; unlike ``hash()`` it is the same in every process."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


# ---------------------------------------------------------------------------------------------- who reads what
def epoch_shards(shards: Sequence[Shard], *, seed: int, epoch: int, shuffle: bool, rank: int,
                 world_size: int, worker: int, num_workers: int) -> list[tuple[Shard, int, int]]:
    """What one (rank, worker) reads in epoch mode, as ``(shard, stride, offset)``: samples
    ``offset, offset + stride, ...`` of that shard. A global seeded shuffle, then every
    ``world_size``-th shard for this rank, then every ``num_workers``-th of those for this worker
    (stride 1). When the rank has fewer shards than workers (a small dataset on a machine with many
    cores), workers share shards instead of idling: worker ``w`` reads shard ``w % n`` and keeps every
    k-th sample from offset ``w // n``, k being the number of workers on that shard. Every sample is
    still read by exactly one worker."""
    order = list(shards)
    if shuffle:
        random.Random(stable_seed("shards", seed, epoch)).shuffle(order)
    mine = order[rank::world_size]
    n = len(mine)
    if n == 0 or n >= num_workers:
        return [(s, 1, 0) for s in mine[worker::num_workers]]
    return [(mine[worker % n], len(range(worker % n, num_workers, n)), worker // n)]


# ---------------------------------------------------------------------------------------------- dataset
def shuffle_buffer(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """Reservoir-style shuffle: keep ``size`` items, emit a random one as each new item arrives."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


class ShardStream(IterableDataset):
    """Yields collated batches (or None for a group whose samples were all bad, so every worker's
    i-th yield is its i-th group and the round-robin order DataLoader relies on is kept)."""

    def __init__(self, shards: list[Shard], cfg: DataConfig, *, tokenizer: Tokenizer,
                 text_tokenizer: Tokenizer | None, question_tokenizer: Tokenizer | None = None, train: bool,
                 rank: int, world_size: int, epoch: int, prompts: Prompts, mean, std):
        self.shards, self.cfg, self.train = shards, cfg, train
        self.tokenizer, self.text_tokenizer = tokenizer, text_tokenizer or tokenizer
        self.question_tokenizer = question_tokenizer or self.text_tokenizer
        self.rank, self.world_size, self.epoch = rank, world_size, epoch
        self.name = f"{len(shards)} shard(s) from {shards[0].url}"  # build_loader names the split
        self.verify_command = "mmstory data verify MANIFEST"         # ... and the manifest it came from
        self.decoder = SampleDecoder(cfg, train=train, prompts=prompts, mean=mean, std=std)
        self.skips: list[int] = [0] * max(1, cfg.workers)  # groups each logical worker skips
        self.rotation = 0                                   # DataLoader worker i acts as logical (i + rotation) % W
        self.stats_dir: str | None = None

    def _raw(self, worker: int, num_workers: int, stats: WorkerStats) -> Iterator[tuple[dict, tuple]]:
        """Raw samples with the tuple their per-sample RNG is seeded from."""
        cfg = self.cfg
        if not cfg.resampled:
            for shard, stride, offset in epoch_shards(
                    self.shards, seed=cfg.seed, epoch=self.epoch, shuffle=self.train, rank=self.rank,
                    world_size=self.world_size, worker=worker, num_workers=num_workers):
                for i, raw in enumerate(iter_tar(shard.url, stats if offset == 0 else SilentStats(), shard.samples)):
                    if i % stride == offset:
                        yield raw, (cfg.seed, self.epoch, raw["__key__"])
            return
        # resampled: an infinite stream of shards drawn with replacement from this worker's own RNG;
        # the draw number goes into the sample seed so a repeated sample gets a new augmentation
        rng = random.Random(stable_seed("resample", cfg.seed, self.epoch, self.rank, worker))
        draw, empty_draws = 0, 0
        while True:
            shard = rng.choice(self.shards)
            got = False
            for raw in iter_tar(shard.url, stats, shard.samples):
                got = True
                yield raw, (cfg.seed, self.epoch, self.rank, worker, draw, raw["__key__"])
            draw += 1
            empty_draws = 0 if got else empty_draws + 1
            if empty_draws > 10 * len(self.shards):
                raise EmptySplitError(f"{self.name}: {empty_draws} shard draws in a row gave no samples "
                                      f"(resampled); bad data: {bad_summary(stats.counts)}")

    def __iter__(self) -> Iterator[dict | None]:
        cfg = self.cfg
        info = get_worker_info()
        num_workers = info.num_workers if info else 1
        worker = ((info.id if info else 0) + self.rotation) % num_workers
        stats = WorkerStats(self.stats_dir, self.rank, worker)
        raws = self._raw(worker, num_workers, stats)
        if cfg.subsample > 1:  # a fixed, spread-out subset: chosen by the key, before any decoding
            raws = (r for r in raws if stable_seed("subsample", r[0]["__key__"]) % cfg.subsample == 0)
        if self.train and cfg.shuffle_buffer > 1:
            raws = shuffle_buffer(raws, cfg.shuffle_buffer,
                                  random.Random(stable_seed("buffer", cfg.seed, self.epoch, self.rank, worker)))
        skip = self.skips[worker] if worker < len(self.skips) else 0
        for index, group in enumerate(_raw_batches(raws, cfg.batch_size, cfg.drop_last)):
            if index < skip:
                continue  # resume: skipped before any decoding
            samples = []
            for raw, seed_parts in group:
                try:
                    samples.append(self.decoder(raw, random.Random(stable_seed(*seed_parts))))
                except BadSample as e:
                    stats.bad(e.reason, raw["__url__"], raw["__key__"], str(e))
            stats.add("samples", len(samples))
            stats.add("batches", 1 if samples else 0)
            if index % 50 == 0:
                stats.flush()
            yield collate(samples, self.tokenizer, self.text_tokenizer, max_text_len=cfg.max_text_len,
                          max_tokens=cfg.max_tokens, fuse_question=cfg.fuse_question,
                          question_tokenizer=self.question_tokenizer) if samples else None
        stats.flush()


def _raw_batches(items: Iterable, size: int, drop_last: bool) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last one shorter unless ``drop_last``): a batch's raw samples."""
    group = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group and not drop_last:
        yield group


def _as_is(batch):
    return batch  # batches are collated in the worker; DataLoader's default_convert would re-walk them


def _worker_init(_):
    torch.set_num_threads(1)  # W workers x N threads on a few cores only thrash


def resume_plan(counts: Sequence[int | None], skip_batches: int) -> tuple[list[int], int]:
    """How many batches each logical worker skips, and the rotation so that the worker owning global
    batch ``skip_batches`` runs first. ``counts`` = batches per logical worker (None = unbounded).

    DataLoader's order is round r, then worker w, over the workers that still have a round r batch."""
    num = len(counts)
    if all(c is None for c in counts):
        q, r = divmod(skip_batches, num)
        return [q + (w < r) for w in range(num)], r
    skips, last = [0] * num, None
    for _ in range(skip_batches):
        live = [w for w in range(num) if counts[w] is None or skips[w] < counts[w]]
        if not live:
            break
        # next batch: the smallest (round, worker) not yet taken
        w = min(live, key=lambda w: (skips[w], w))
        skips[w] += 1
        last = w
    return skips, (0 if last is None else (last + 1) % num)


class Loader:
    """A DataLoader over a ``ShardStream`` with bad-data stats, ``len()`` when counts are known, and
    ``set_epoch``. Iterate it once per epoch; ``skip_batches`` applies to the first pass only."""

    def __init__(self, dataset: ShardStream, cfg: DataConfig, *, skip_batches: int = 0):
        self.dataset, self.cfg = dataset, cfg
        self.num_workers = max(1, cfg.workers)
        self._root = tempfile.mkdtemp(prefix="mmstory-data-stats-")
        weakref.finalize(self, shutil.rmtree, self._root, True)
        self._passes = 0
        self._stats_dir: str | None = None
        self._counted: dict[str, int | None] = {}
        self._set_skip(skip_batches)

    def _shard_samples(self, shard: Shard) -> int | None:
        """Samples in a shard: from the manifest, else counted once from a local tar's headers."""
        if shard.samples is not None:
            return shard.samples
        if shard.url not in self._counted:
            self._counted[shard.url] = count_samples(shard.url)
        return self._counted[shard.url]

    def _batches_per_worker(self) -> list[int | None]:
        """Batches each logical worker yields this epoch (None: unknown or unbounded)."""
        ds, cfg = self.dataset, self.cfg
        if cfg.resampled or cfg.subsample > 1:
            return [None] * self.num_workers
        out = []
        for w in range(self.num_workers):
            parts = epoch_shards(ds.shards, seed=cfg.seed, epoch=ds.epoch, shuffle=ds.train, rank=ds.rank,
                                 world_size=ds.world_size, worker=w, num_workers=self.num_workers)
            counts = [self._shard_samples(s) for s, _, _ in parts]
            if any(c is None for c in counts):
                out.append(None)
                continue
            n = sum(len(range(offset, c, stride)) for c, (_, stride, offset) in zip(counts, parts))
            out.append(n // cfg.batch_size if cfg.drop_last else -(-n // cfg.batch_size))
        return out

    def _set_skip(self, skip_batches: int) -> None:
        self.skip_batches = skip_batches
        counts = self._batches_per_worker()
        if skip_batches > 0 and not self.cfg.resampled and any(c is None for c in counts):
            warnings.warn("resuming with unknown shard sizes (remote shards without manifest counts): "
                          "the resumed batches are exact only while every worker still has batches left")
        self.dataset.skips, self.dataset.rotation = resume_plan(counts, skip_batches)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = epoch
        self._set_skip(0)

    def __len__(self) -> int:
        counts = self._batches_per_worker()
        if any(c is None for c in counts):
            raise TypeError("length unknown: resampled mode, or remote shards without sample counts")
        return max(0, sum(counts) - self.skip_batches)

    def __iter__(self) -> Iterator[dict]:
        self._passes += 1
        self._stats_dir = os.path.join(self._root, f"pass{self._passes}")
        os.makedirs(self._stats_dir)
        self.dataset.stats_dir = self._stats_dir
        kwargs = {}
        if self.cfg.workers > 0:
            # the tokenizers library warns (and may deadlock) when a process forks after using threads
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            kwargs = dict(worker_init_fn=_worker_init, prefetch_factor=self.cfg.prefetch_factor)
        # Our own generator: otherwise creating the iterator draws a worker seed from the global torch
        # RNG, and a resumed run (which creates it at another step) would see different dropout.
        # Worker randomness is seeded per sample anyway, so this seed feeds nothing else.
        loader = DataLoader(self.dataset, batch_size=None, collate_fn=_as_is, num_workers=self.cfg.workers,
                            pin_memory=self.cfg.pin_memory, generator=torch.Generator().manual_seed(self.cfg.seed),
                            **kwargs)
        whole_pass = self.skip_batches == 0
        yielded = 0
        try:
            try:
                for batch in loader:
                    if batch is not None:
                        yielded += 1
                        yield batch
            except EmptySplitError:  # raised in a worker: DataLoader re-raises it with the worker's traceback
                raise EmptySplitError(self._empty_message()) from None
        finally:
            if self.skip_batches:  # the resume offset belongs to the first pass only
                self._set_skip(0)
        if whole_pass and not yielded and self._should_yield():
            raise EmptySplitError(self._empty_message())

    def _should_yield(self) -> bool:
        """Whether an empty pass means broken data: not when this rank has no shard of its own, nor when a
        subsample of a small split happens to keep nothing and nothing was bad."""
        ds = self.dataset
        if not self.cfg.resampled and len(ds.shards) < ds.world_size:
            return False
        return self.cfg.subsample == 1 or any(k.startswith("bad/") for k in self.stats)

    def _empty_message(self) -> str:
        ds = self.dataset
        return (f"{ds.name} ({len(ds.shards)} shard{'s' if len(ds.shards) != 1 else ''}) gave no samples: "
                f"bad data: {bad_summary(self.stats)} ({ds.verify_command} says what is wrong with each shard)")

    @property
    def stats(self) -> Counter:
        """Counts for the latest pass, summed over workers: samples, batches, bad/<reason>."""
        return read_stats(self._stats_dir) if self._stats_dir else Counter()

    def report(self, print_fn=print) -> str:
        return report(self.stats, print_fn=print_fn)


def build_loader(shards_or_split: Any, cfg: DataConfig, *, tokenizer: Tokenizer,
                 text_tokenizer: Tokenizer | None = None, question_tokenizer: Tokenizer | None = None,
                 train: bool = True, rank: int = 0, world_size: int = 1, epoch: int = 0, skip_batches: int = 0,
                 prompts: Prompts = Prompts(),
                 mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD,
                 name: str | None = None) -> Loader:
    """Batches for one DDP rank. ``shards_or_split``: a manifest ``SplitInfo`` or a list of shard
    URLs/paths. The batch sequence is a pure function of (shards, cfg, train, rank, world_size,
    epoch, cfg.workers); ``skip_batches=k`` yields batches k, k+1, ... of that sequence. ``prompts``: the
    model's (``model.prompts``), which each sample's task prompt is filled from.

    ``name`` (default: the split's name) is what errors call the data: a whole pass (or, resampled, many
    shard draws in a row) without a single sample raises ``EmptySplitError`` naming it, instead of training
    on empty epochs forever."""
    shards = resolve_shards(shards_or_split)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    dataset = ShardStream(shards, cfg, tokenizer=tokenizer, text_tokenizer=text_tokenizer,
                          question_tokenizer=question_tokenizer, train=train,
                          rank=rank, world_size=world_size, epoch=epoch, prompts=prompts, mean=mean, std=std)
    name = name or getattr(shards_or_split, "name", None)
    if name:
        dataset.name = f"split '{name}'"
    if hasattr(shards_or_split, "verify_command"):
        dataset.verify_command = shards_or_split.verify_command
    if not cfg.resampled and len(shards) < world_size:
        log.warning("%d shards for %d ranks: some ranks get no data", len(shards), world_size)
    return Loader(dataset, cfg, skip_batches=skip_batches)


# ---------------------------------------------------------------------------------------------- mixing
class MixedLoader:
    """Interleave batches of several loaders (e.g. image and audio streams). At each step a source is
    drawn with probability proportional to its weight from an RNG seeded by (seed, epoch); a source
    that runs out leaves the draw. Each batch comes whole from one source, so modalities never mix
    inside a batch. In epoch mode an epoch uses every batch of every source once, so the weights set how
    the sources interleave, not their share of the steps: that is their batch counts (e.g. 41 image and
    20 audio batches for the bundled emoji splits at batch 64, whatever the weights). With resampled
    (infinite) sources the weights are the shares."""

    def __init__(self, loaders: dict[str, Loader], weights: dict[str, float], *, seed: int = 0, epoch: int = 0):
        if set(weights) != set(loaders) or not all(w > 0 for w in weights.values()):
            raise ValueError(f"weights {weights} must give a positive weight to each loader {sorted(loaders)}")
        self.loaders, self.weights, self.seed, self.epoch = loaders, weights, seed, epoch
        self.skip_batches = 0

    def _choices(self, lengths: dict[str, float]) -> Iterator[str]:
        """The source of each step, given how many batches each source has (inf = unbounded)."""
        rng = random.Random(stable_seed("mix", self.seed, self.epoch))
        left = dict(lengths)
        names = sorted(self.loaders)
        while True:
            live = [n for n in names if left[n] > 0]
            if not live:
                return
            name = rng.choices(live, weights=[self.weights[n] for n in live])[0]
            left[name] -= 1
            yield name

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.skip_batches = epoch, 0
        for loader in self.loaders.values():
            loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict]:
        lengths = {n: _length(loader) + loader.skip_batches for n, loader in self.loaders.items()}
        for loader in self.loaders.values():  # a source counted empty would never be drawn, so never complain
            if lengths_empty(loader):
                ds = loader.dataset
                raise EmptySplitError(f"{ds.name} ({len(ds.shards)} shard{'s' if len(ds.shards) != 1 else ''}) "
                                      f"has no samples: its shards hold none that can be read "
                                      f"({ds.verify_command} says why)")
        iters = {n: iter(loader) for n, loader in self.loaders.items()}
        skip, self.skip_batches = self.skip_batches, 0  # the resume offset belongs to the first pass only
        for step, name in enumerate(self._choices(lengths)):
            if step < skip:
                continue  # these batches were skipped inside the sources already
            batch = next(iters[name], None)
            if batch is not None:  # None: fewer batches than counted (a damaged shard)
                yield batch

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.loaders.values())

    @property
    def stats(self) -> Counter:
        total = Counter()
        for loader in self.loaders.values():
            total.update(loader.stats)
        return total

    def report(self, print_fn=print) -> str:
        return report(self.stats, print_fn=print_fn)


def lengths_empty(loader: Loader) -> bool:
    """Whether an epoch-mode loader counts no batch at all (manifest counts or tar headers) in a whole pass."""
    return loader.skip_batches == 0 and _length(loader) == 0 and loader._should_yield()


def _length(loader: Loader) -> float:
    try:
        return len(loader)
    except TypeError:
        return math.inf


def build_mixed_loader(sources: dict[str, Any], weights: dict[str, float], cfg: DataConfig, *,
                       skip_batches: int = 0, epoch: int = 0, name: str | None = None,
                       **loader_kwargs) -> MixedLoader:
    """Mix e.g. ``{"image": split_or_urls, "audio": split_or_urls}`` with ``weights`` deterministically.
    ``skip_batches`` counts mixed batches; each source skips the ones it contributed. A source is named in
    errors by its split's name, or else by ``"<name>/<source>"`` (``name`` defaults to "mixed")."""
    loaders = {n: build_loader(s, cfg, epoch=epoch, name=getattr(s, "name", None) or f"{name or 'mixed'}/{n}",
                               **loader_kwargs)
               for n, s in sources.items()}
    mixed = MixedLoader(loaders, weights, seed=cfg.seed, epoch=epoch)
    if skip_batches:
        lengths = {n: _length(loader) for n, loader in loaders.items()}
        taken = Counter(name for _, name in zip(range(skip_batches), mixed._choices(lengths)))
        for n, loader in loaders.items():
            loader._set_skip(taken[n])
        mixed.skip_batches = skip_batches
    return mixed
