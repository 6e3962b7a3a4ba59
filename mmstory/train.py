"""``mmstory train CONFIG [--key=value ...] [--resume]``: a plain training loop, read top to bottom.

config -> data (mixed image/audio webdataset streams) -> model -> weighted losses -> AdamW (warmup +
cosine) -> checkpoints (atomic, last N + best, exact resume) -> final evaluation and report.

``_train`` is ``setup`` (a ``Run``: model, optimizer, schedule, data, resumed where the last checkpoint left
off), ``train_loop`` (``train_step``, ``follow_budget``, ``log_step``, ``validate``, ``save``) and ``finish``;
the learning-rate schedule and the time budget are objects of their own (mmstory/schedule.py).

Runs the same under ``torchrun --nproc_per_node=N``: DDP by default (``distributed: fsdp`` shards with
FSDP2); the contrastive loss gathers features, so it sees the global batch.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import random
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from mmstory.checkpoints import (RunFolderError, RunLock, guard_run_folder, load_latest, prune_checkpoints, recover,
                                 save_checkpoint, truncate_log)
from mmstory.compress.distill import Distiller
from mmstory.compress.prune import prune, save_masks
from mmstory.config import ConfigError, TrainConfig, load_config, to_dict
from mmstory.data.manifest import ManifestError, check_shards, load_manifest
from mmstory.data.loader import build_mixed_loader, fit_to_encoders, model_text_args
from mmstory.data.stats import read_counts
from mmstory.data.wordings import Wordings
from mmstory.datastore import build_datastore, build_question_bank
from mmstory.feature_cache import FeatureCache
from mmstory.model import MultimodalModel, build_model, load
from mmstory.schedule import Budget, Schedule


class NonFiniteLoss(FloatingPointError):
    pass


# ---------------------------------------------------------------------------------------------- setup
def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def cpu_has_native_bf16() -> bool | None:
    """Whether an x86 CPU computes bf16 matmuls natively (AVX512-BF16 or AMX), where bf16 autocast trains
    ~1.2-1.4x faster than fp32 (measured on the main job); without them autocast emulates bf16 and the main
    job's step took 20x longer (23 s vs 1.1 s, AVX2-only AMD EPYC). None: not checked (other CPU families)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(c is None for c in checks):
        return None
    return any(check() for check in checks if check is not None)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where the device computes bf16 natively (a CUDA GPU that supports it, an x86 CPU
    with AVX512-BF16 or AMX), else ``fp32``; any other value is returned as it is."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast_for(precision: str, device_type: str):
    """A factory of the autocast context for ``precision`` (fp32: no autocast) on ``device_type``."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return (lambda: torch.autocast(device_type, dtype=dtype)) if dtype else nullcontext


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state()[1].tolist(),
             "numpy_pos": int(np.random.get_state()[2]), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None,
                 lr_mult: dict[str, float] | None = None) -> list[dict]:
    """Weight decay on matrices and embeddings (dim >= 2); none on biases, norms, scales (nanoGPT's rule).
    ``lr_mult`` ({module path: multiplier}, e.g. ``{"encoders.text": 0.1}``) gives the parameters under a
    module ``lr * multiplier``; the longest matching path wins. Each group keeps its own ``lr``, so the
    schedule (a LambdaLR factor) scales every group alike and the optimizer state saves and resumes them."""
    lr_mult = dict(lr_mult or {})
    names = dict(model.named_modules())
    unknown = sorted(p for p in lr_mult if p not in names)
    if unknown:
        raise ConfigError(f"config key 'optim.lr_mult': no module {unknown[0]!r} in the model; modules here: "
                         f"{', '.join(sorted(n for n in names if n and n.count('.') <= 1))}")
    bad = {p: m for p, m in lr_mult.items() if not (isinstance(m, (int, float)) and m >= 0)}
    if bad:
        raise ConfigError(f"config key 'optim.lr_mult': multipliers must be numbers >= 0, got {bad}")
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        match = max((m for m in lr_mult if name.startswith(m + ".")), key=len, default=None)
        mult = 1.0 if match is None else float(lr_mult[match])
        groups.setdefault((mult, p.dim() >= 2), []).append(p)
    out = []
    # the base groups (multiplier 1) first: the logged ``lr`` is group 0's
    for (mult, decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0] != 1.0, -kv[0][0], not kv[0][1])):
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if lr is not None:
            group["lr"] = lr * mult
        out.append(group)
    return out


def build_data(cfg: TrainConfig, model: MultimodalModel, *, splits: dict[str, str], weights: dict[str, float],
               train: bool, rank: int = 0, world: int = 1, epoch: int = 0, skip_batches: int = 0):
    """A mixed loader over the named manifest splits; image size/normalisation and audio rate follow the
    model's encoders, so data and model cannot disagree."""
    manifest = load_manifest(cfg.data.manifest)
    loader_cfg = cfg.data.loader if train else dataclasses.replace(cfg.data.loader, resampled=False)
    loader_cfg, kwargs = fit_to_encoders(loader_cfg, model.encoders)
    sources = {name: manifest.split(split) for name, split in splits.items()}
    return build_mixed_loader(sources, {n: weights.get(n, 1.0) for n in sources}, loader_cfg,
                              skip_batches=skip_batches, epoch=epoch, **model_text_args(model), train=train,
                              rank=rank, world_size=world, **kwargs)


def unsharded(core: MultimodalModel, cfg: TrainConfig, fsdp: bool, device: torch.device) -> MultimodalModel:
    """The model as one plain module for saving and evaluation. Under FSDP every rank must call this (it
    gathers the full state dict); rank 0 gets an unsharded copy, the other ranks get ``core`` back."""
    if not fsdp:
        return core
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(core, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return core
    plain = build_model(cfg.model)
    plain.load_state_dict(state)
    if core.memory is not None:
        plain.memory.copy_from(core.memory)
    return plain.to(device)


def frozen_feature_cache(cfg: TrainConfig, model: MultimodalModel, verbose: bool) -> FeatureCache | None:
    """A ``FeatureCache`` for the encoders frozen whole whose inputs repeat exactly every epoch (no
    augmentation; a question encoder's are keyed by the question), or None."""
    frozen = [m for m in ("image", "audio", "question") if f"encoders.{m}" in cfg.freeze and m in model.encoders]
    if not (cfg.cache_frozen and frozen):
        return None
    media = [m for m in frozen if m != "question"]  # cached by the sample's key; a question by its content
    if cfg.data.loader.augment and media:
        if verbose:
            print(f"frozen {media} encoder(s) not cached: data.loader.augment is on, so inputs change every epoch")
        frozen = [m for m in frozen if m not in media]
    return FeatureCache(frozen) if frozen else None


def init_weights(model: MultimodalModel, folder: str, device: torch.device, log=print) -> None:
    """Start from the weights of a saved model folder (``init_from``); tensors the model lacks or that the
    folder lacks are reported, not fatal (e.g. a new loss's temperature)."""
    from safetensors.torch import load_model

    weights = Path(folder) / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"init_from: no model.safetensors in {folder}")
    # load_model, not load_state_dict: it knows the file stores a tied weight (lm_head = token embedding) once
    missing, unexpected = load_model(model, str(weights), strict=False, device=str(device))
    log(f"initialised from {folder} ({len(missing)} missing, {len(unexpected)} unexpected keys)"
        + (f"; missing: {missing[:8]}" if missing else ""))


def loss_items(out: dict) -> dict[str, float]:
    """The scalar loss terms of a model output ("loss" and every "<name>_loss") as floats."""
    return {k: v.item() for k, v in out.items() if k.endswith("loss") and torch.is_tensor(v)}


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def validation_losses(model, cfg: TrainConfig, device, autocast) -> dict[str, float]:
    """Mean loss terms over the first ``eval_batches`` batches of each validation split."""
    model.eval()
    out = {}
    for split in cfg.data.val:
        loader = build_data(cfg, model, splits={"val": split}, weights={}, train=False)
        sums: dict[str, float] = {}
        n = 0
        for i, batch in enumerate(loader):
            if i >= cfg.eval_batches:
                break
            with autocast():
                res = model(to_device(batch, device))
            for k, v in loss_items(res).items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
        out.update({f"val/{split}/{k}": v / max(n, 1) for k, v in sums.items()})
    model.train()
    return out


# ---------------------------------------------------------------------------------------------- the loop
def check_run_config(cfg: TrainConfig) -> None:
    """Config errors that need more than one key to see, raised before anything is built or written."""
    if cfg.model.retrieval.k and cfg.model.retrieval.audio and "audio" not in cfg.data.train:
        raise ConfigError("config key 'model.retrieval.audio' > 0 needs an audio training split (data.train.audio): "
                          "the clips' datastore is built from it")
    if cfg.model.retrieval.k and "encoders.image" not in cfg.freeze:
        raise ConfigError("config key 'model.retrieval.k' > 0 needs a frozen image encoder (freeze: [encoders.image]): "
                         "retrieval keys are its features, computed once")
    if cfg.model.fuse_question and not cfg.data.loader.fuse_question:
        raise ConfigError("config key 'model.fuse_question' is recorded from 'data.loader.fuse_question' "
                         "(the loader makes the fused question); set data.loader.fuse_question: true instead")
    if "question" in cfg.model.encoders and not cfg.data.loader.fuse_question:
        raise ConfigError("config key 'model.encoders.question' reads the fused question, which the loader makes only "
                         "with data.loader.fuse_question: true")


def check_data(cfg: TrainConfig) -> None:
    """Before a run starts: every split it reads exists in the manifest, and every local shard of them is
    there with the size the manifest records (cheap; ``mmstory data verify`` also checks checksums and
    decodes every sample). Samples a shard lacks or cannot decode are counted as the run reads them."""
    manifest = load_manifest(cfg.data.manifest)
    names = list(cfg.data.train.values()) + list(cfg.data.val)
    if cfg.report.fit_samples or cfg.model.retrieval.k:
        names.append(fit_split(cfg))
    if cfg.final_eval and cfg.report.reference_split:
        names.append(cfg.report.reference_split)
    for name in dict.fromkeys(names):
        try:
            split = manifest.split(name)
        except KeyError as e:
            raise ManifestError(e.args[0]) from None
        check_shards(split, sha256=False)


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Train as ``cfg`` says into its run folder; returns the folder. The folder is locked while the run lives;
    one that holds an earlier run needs ``resume`` (continue it) or ``overwrite`` (replace it)."""
    check_run_config(cfg)
    out_dir = Path(cfg.out_dir.format(name=cfg.name))
    if int(os.environ.get("RANK", "0")) != 0:
        return _train(cfg, out_dir, resume=resume)
    check_data(cfg)
    with RunLock(out_dir):
        guard_run_folder(out_dir, resume=resume, overwrite=overwrite)
        return _train(cfg, out_dir, resume=resume)


def _train(cfg: TrainConfig, out_dir: Path, *, resume: bool) -> Path:
    """Set the run up in ``out_dir``, train it, then save the model and write the report."""
    run = setup(cfg, out_dir, resume=resume)
    train_loop(run)
    finish(run)
    return out_dir


# ---------------------------------------------------------------------------------------------- the run's state
class BatchStream:
    """The endless stream of training batches, one pass over the data after another; ``epoch`` and
    ``batch_in_epoch`` say where it is, so a resume continues exactly."""

    def __init__(self, cfg: TrainConfig, model: MultimodalModel, *, rank: int, world: int, epoch: int = 0,
                 batch_in_epoch: int = 0, verbose: bool = False):
        self.cfg, self.model, self.rank, self.world, self.verbose = cfg, model, rank, world, verbose
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        self.read: Counter = Counter()  # this process's data counts of the finished passes
        self.loader = None  # the pass in progress
        self._batches = self._passes()

    def _passes(self):
        while True:
            self.loader = build_data(self.cfg, self.model, splits=self.cfg.data.train, weights=self.cfg.data.weights,
                                     train=True, rank=self.rank, world=self.world, epoch=self.epoch,
                                     skip_batches=self.batch_in_epoch)
            for batch in self.loader:
                self.batch_in_epoch += 1
                yield batch
            loader, self.loader = self.loader, None
            self.read.update(loader.stats)
            if self.verbose and loader.stats:
                loader.report(print_fn=lambda s: tqdm.write(f"epoch {self.epoch} data: {s}"))
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def __next__(self) -> dict:
        return next(self._batches)

    def counts(self) -> dict:
        """Training samples read and skipped (with reasons) since this process started."""
        return read_counts(self.read + (self.loader.stats if self.loader is not None else Counter()), complete=True)

    def close(self) -> None:
        """Shut the loader workers down now, not at some later garbage collection."""
        self._batches.close()


@dataclasses.dataclass
class Run:
    """What the training loop reads and advances; ``setup`` builds it."""
    cfg: TrainConfig
    out_dir: Path
    rank: int
    world: int
    device: torch.device
    core: MultimodalModel  # the plain module: saved, evaluated, read by the data pipeline and the feature cache
    model: torch.nn.Module  # what a step runs: ``core``, or ``core`` wrapped by DDP and/or torch.compile
    fsdp: bool  # FSDP2 shards ``core`` in place
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only
    schedule: Schedule
    scheduler: torch.optim.lr_scheduler.LambdaLR  # reads ``schedule.factor``; the optimizer state keeps the base lrs
    autocast: Callable
    masks: Any  # pruning masks, applied again after every step; None when not pruning
    distiller: Distiller | None
    cache: FeatureCache | None
    stream: BatchStream
    writer: Any  # tensorboard's SummaryWriter on rank 0, else None
    fit_labels: set[str]  # the fit split's labels, for the fit metrics at each validation (report.fit_samples)
    step: int = 0
    best: float = math.inf  # the lowest mean validation loss so far
    last_ckpt: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def log_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    def agree(self, value: float, op: str) -> float:
        """The ``min`` or ``max`` of ``value`` over the ranks, so that every rank decides alike (``Budget``)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
        return t.item()


# ---------------------------------------------------------------------------------------------- setting a run up
def setup(cfg: TrainConfig, out_dir: Path, *, resume: bool) -> Run:
    """Everything before the first step: the process, the run folder, the model (frozen, pruned, distilled,
    its frozen features cached), optimizer and schedule, a resume, the retrieval datastore, the wrapping for
    several processes, data and logs. The order is the one runs were made in: with the same seed a run
    draws the same random numbers."""
    cfg.model.fuse_question = cfg.data.loader.fuse_question  # saved with the model: inference answers the same way
    rank, world, device = setup_process(cfg)
    is_main = rank == 0
    ckpt_dir = out_dir / "checkpoints"
    if is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for line in recover(ckpt_dir):
            print(f"checkpoints: {line}")
    if world > 1:
        dist.barrier()  # the other ranks read the checkpoints rank 0 may just have repaired

    log = print if is_main else (lambda *_: None)  # messages from rank 0 only
    seed_everything(cfg.seed)
    model, masks, distiller, cache = build_trainee(cfg, device, log=log, verbose=is_main)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay, cfg.optim.lr, cfg.optim.lr_mult), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  fused=device.type in ("cuda", "cpu"))  # CPU: 21 vs 72 ms a step (main job)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    # cfg.steps, or fewer if max_minutes is set and the measured rate shows they would not fit (Budget)
    schedule = Schedule(cfg.optim.warmup_steps, cfg.optim.min_lr_ratio, total=cfg.steps)
    autocast = autocast_for(cfg.precision, device.type)
    last, position = restore(cfg, out_dir, model, optimizer, scaler, schedule, resume=resume, device=device,
                             is_main=is_main)
    if is_main:  # after restore's checks: a refused resume leaves the run's config as it was
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))

    manifest = load_manifest(cfg.data.manifest)
    if model.memory is not None:  # the captions retrieval reads, keyed by the frozen image encoder's features
        sources = [fit_split(cfg)] + ([cfg.data.train["audio"]] if cfg.model.retrieval.audio else [])
        for split in sources:  # (with retrieval.audio, also the training clips', keyed by their log-mel)
            n = build_datastore(model, manifest.split(split), data=cfg.data.loader, autocast=autocast,
                                progress=is_main, cache=cache)  # (which it fills: the tower runs once an image)
            log(f"retrieval datastore: {', '.join(f'{v} captioned {m} samples' for m, v in n.items())} of {split}")
    if cfg.model.question_bank.encoder:  # other wordings are asked as the nearest training question
        wordings = Wordings.load(cfg.data.loader.wordings) if cfg.data.loader.wordings else None
        n = build_question_bank(model, [manifest.split(s) for s in cfg.data.train.values()], wordings=wordings,
                                progress=is_main)
        log(f"question bank: {n} training questions and rewordings of {', '.join(cfg.data.train.values())}")
    wrapped, fsdp = wrap(model, cfg, world, resumed=last is not None)
    # the LambdaLR multiplies each param group's own base lr (optim.lr_mult) by the schedule's factor
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor, last_epoch=position["step"] - 1)

    writer, fit_labels = None, set()
    if is_main:
        from torch.utils.tensorboard import SummaryWriter

        if cfg.report.fit_samples:
            from mmstory.evaluate import split_labels

            fit_labels = split_labels(manifest.split(fit_split(cfg)))
        writer = SummaryWriter(str(out_dir / "tensorboard"))
    stream = BatchStream(cfg, model, rank=rank, world=world, epoch=position["epoch"],
                         batch_in_epoch=position["batch_in_epoch"], verbose=is_main)
    return Run(cfg, out_dir, rank, world, device, core=model, model=wrapped, fsdp=fsdp, optimizer=optimizer,
               scaler=scaler, schedule=schedule, scheduler=scheduler, autocast=autocast,
               masks=masks, distiller=distiller, cache=cache, stream=stream, writer=writer, fit_labels=fit_labels,
               step=position["step"], best=position["best"], last_ckpt=str(last) if last else "none")


def setup_process(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """This process's rank, the number of processes and the device; threads, denormals and ``precision:
    auto`` (resolved in ``cfg``: the saved config records what ran)."""
    rank, world, device = setup_distributed(cfg)
    is_main = rank == 0
    if world > 1 and not cfg.data.loader.resampled:
        # In epoch mode ranks can run out of a source at different steps and then disagree on which
        # modality the next batch holds; resampled streams keep every rank in lockstep.
        raise ConfigError("config key 'data.loader.resampled' must be true when training on several processes")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cpu":
        # fp32 AdamW state drifts into denormal floats, which x86 CPUs process ~100x slower; flushing
        # them to zero changes nothing that matters numerically (|x| < 1.2e-38).
        torch.set_flush_denormal(True)
        if cfg.precision == "bf16" and is_main and cpu_has_native_bf16() is False:
            print("warning: precision bf16 on a CPU without AVX512-BF16/AMX: autocast emulates bf16 there and can "
                  "be many times slower than fp32 (try --precision=fp32, or auto)")
    if cfg.precision == "auto":
        cfg.precision = resolve_precision("auto", device)
        if is_main:
            print(f"precision auto -> {cfg.precision} on {device.type}")
    return rank, world, device


def build_trainee(cfg: TrainConfig, device: torch.device, *, log=print, verbose: bool = False):
    """The model to train, with its parts frozen (``freeze``), pruned (``prune``: from ``init_from``'s weights,
    so a resume gets the same structure and masks), its teacher (``distill``), the cache of its frozen
    encoders' features and gradient checkpointing; returns (model, masks, distiller, cache)."""
    model = build_model(cfg.model).to(device)
    model.freeze(cfg.freeze)
    masks = None
    if cfg.prune.kind != "none":
        init_weights(model, cfg.init_from, device, log=log)
        masks = prune(model, cfg.prune.kind, cfg.prune.amount, log=log)
    distiller = Distiller(cfg.distill, model, load(cfg.distill.teacher, map_location=device)) \
        if cfg.distill.teacher else None
    cache = frozen_feature_cache(cfg, model, verbose)
    for enc in model.encoders.values():
        enc.set_grad_checkpointing(cfg.grad_checkpointing)
    model.decoder.grad_checkpointing = cfg.grad_checkpointing
    return model, masks, distiller, cache


def restore(cfg: TrainConfig, out_dir: Path, model: MultimodalModel, optimizer, scaler, schedule: Schedule, *,
            resume: bool, device: torch.device, is_main: bool = True) -> tuple[Path | None, dict]:
    """Where the run starts: with ``resume`` the latest checkpoint that loads (model, optimizer, scaler, the
    schedule's plan, random state; the log is cut back to its step), else ``init_from``'s weights or the
    model as built (the log starts empty). Returns the checkpoint (None: none) and the loop's position
    (``step``, ``epoch``, ``batch_in_epoch``, ``best``)."""
    ckpt_dir, log_path = out_dir / "checkpoints", out_dir / "metrics.jsonl"
    log = print if is_main else (lambda *_: None)
    position = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": math.inf}
    loaded = load_latest(ckpt_dir, model, device, log=log) if resume else None
    if cfg.init_from and loaded is None and cfg.prune.kind == "none":
        init_weights(model, cfg.init_from, device, log=log)
    if loaded is None:
        if resume:
            log(f"--resume: no checkpoint in {ckpt_dir}; starting from scratch")
        if is_main:
            log_path.unlink(missing_ok=True)  # a fresh start: lines of an earlier attempt would interleave
        return None, position
    last, state = loaded
    configured = state.get("configured_steps")
    if configured is not None and configured != cfg.steps:
        # the schedule (warmup, cosine, a budget's plan) was laid out for the old number of steps
        raise RunFolderError(
            f"--resume: config key 'steps' is {cfg.steps} but the run in {out_dir} was started with {configured} "
            f"(it is at step {state['step']}); resume with steps={configured}, or start a new run from it with "
            f"--init_from={out_dir / 'model' if (out_dir / 'model').is_dir() else last}")
    optimizer.load_state_dict(state["optimizer"])
    if scaler and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    position = {k: state[k] for k in position}
    schedule.load_state_dict(state)
    set_rng_state(state["rng"])
    if is_main:
        truncate_log(log_path, position["step"])
    log(f"resumed from {last} at step {position['step']} (epoch {position['epoch']}, batch {position['batch_in_epoch']})")
    return last, position


def wrap(model: MultimodalModel, cfg: TrainConfig, world: int, *, resumed: bool) -> tuple[torch.nn.Module, bool]:
    """The module the steps run: for several processes FSDP2 (``distributed: fsdp``, shards ``model`` in
    place) or DDP around it, then torch.compile (``compile``). Returns it and whether FSDP shards."""
    fsdp = world > 1 and cfg.distributed == "fsdp"
    if fsdp and resumed:
        raise ConfigError("--resume with distributed: fsdp is not supported yet (the optimizer state is saved "
                         "unsharded only for DDP); resume with distributed: ddp")
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for module in list(model.encoders.values()) + [model.decoder]:
            fully_shard(module)
        fully_shard(model)
    elif world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    if cfg.compile:
        model = torch.compile(model)
    return model, fsdp


# ---------------------------------------------------------------------------------------------- the loop
def train_loop(run: Run) -> None:
    """Step to the planned last step (or until the time budget's guard stops the run), logging every
    ``log_every`` steps, validating every ``eval_every`` and saving a checkpoint every ``ckpt_every`` steps and
    at the last."""
    cfg = run.cfg
    bar = tqdm(total=run.schedule.total, initial=run.step, desc="train", disable=not run.is_main, dynamic_ncols=True)
    t_log, samples = time.perf_counter(), 0  # throughput since the last logged step
    run.model.train()
    budget = Budget(cfg.max_minutes, cfg.steps, cfg.optim.warmup_steps, step=run.step, total=run.schedule.total,
                    agree=run.agree)
    while run.step < budget.stop_at:
        terms, n = train_step(run)
        samples += n
        follow_budget(run, budget, bar)
        step, last = run.step, run.step == budget.stop_at
        if run.is_main and (step % cfg.log_every == 0 or last or step == 1):
            now = time.perf_counter()
            log_step(run, terms, samples / max(now - t_log, 1e-9), bar)
            t_log, samples = now, 0
        bar.update(1)
        if os.environ.get("MMSTORY_KILL_AT_STEP") == str(step):  # test hook: simulate kill -9 here
            os.kill(os.getpid(), 9)

        validate_now = bool(cfg.eval_every) and step % cfg.eval_every == 0
        if validate_now or step % cfg.ckpt_every == 0 or last:
            host = unsharded(run.core, cfg, run.fsdp, run.device)  # every rank takes part in the FSDP gather
            if run.is_main:
                save(run, host, val_loss=validate(run, host) if validate_now or last else math.inf)
    bar.close()
    run.stream.close()


def train_step(run: Run) -> tuple[dict[str, float], int]:
    """One optimizer step over ``accum_steps`` micro-batches (autocast; DDP syncs gradients on the last one
    only; the fp16 grad scaler; gradient clipping; pruned weights kept at zero), then the schedule's next
    learning rate; ``run.step`` counts it. Returns the step's loss terms and the number of samples it trained
    on over all ranks. A non-finite loss stops the run, naming the batch's samples."""
    cfg, model, accum = run.cfg, run.model, run.cfg.optim.accum_steps
    terms: dict[str, float] = {}
    samples = 0
    for micro in range(accum):
        batch = to_device(next(run.stream), run.device)
        sync = micro == accum - 1 or not isinstance(model, torch.nn.parallel.DistributedDataParallel)
        with run.autocast(), (nullcontext() if sync else model.no_sync()):
            if run.cache is not None:
                batch["features"] = run.cache(run.core, batch)
            out = model(batch)
            if run.distiller is not None:
                run.distiller.add_terms(out, batch)
            loss = out["loss"] / accum
        if not torch.isfinite(loss):
            keys = batch["__key__"]
            raise NonFiniteLoss(f"non-finite loss ({loss.item()}) at step {run.step + 1} on a batch of {len(keys)} "
                                f"samples ({', '.join(keys[:4])}{', ...' * (len(keys) > 4)}); "
                                f"last good checkpoint: {run.last_ckpt}")
        (run.scaler.scale(loss) if run.scaler else loss).backward()
        for k, v in loss_items(out).items():
            terms[k] = terms.get(k, 0.0) + v / accum
        samples += len(batch["__key__"]) * run.world
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    if run.scaler:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.masks is not None:
        run.masks.apply(run.core)
    run.scheduler.step()
    run.step += 1
    return terms, samples


def follow_budget(run: Run, budget: Budget, bar: tqdm) -> None:
    """The time budget after a step (``Budget``): a re-plan of the last step when one is due, or the stop
    when the budget is spent; both are said on the console, a re-plan also in the log."""
    rate = budget.replan(run.step, run.schedule)
    if rate is not None:
        bar.total = run.schedule.total
        bar.refresh()
        if run.is_main:
            tqdm.write(f"time budget of {run.cfg.max_minutes} min at {rate:.2f} s/step: planned {run.schedule.total} "
                       f"steps (configured: {run.cfg.steps})")
            append_log(run.log_path, {"step": run.step, "planned_steps": run.schedule.total})
    if budget.out_of_time(run.step, run.schedule) and run.is_main:
        tqdm.write(f"time budget of {run.cfg.max_minutes} min reached at step {run.step}")


def log_step(run: Run, terms: dict[str, float], samples_per_s: float, bar: tqdm) -> None:
    """The step's loss terms, learning rate (the base group's, for the next step), epoch and throughput, to
    metrics.jsonl, tensorboard and the progress bar."""
    core = run.core
    record = {"step": run.step, **terms, "lr": run.scheduler.get_last_lr()[0], "epoch": run.stream.epoch,
              "samples_per_s": samples_per_s,
              "logit_scale": core.losses["contrastive"].scale().item() if "contrastive" in core.losses else None}
    append_log(run.log_path, record)
    for k, v in record.items():
        if isinstance(v, (int, float)) and k != "step":
            run.writer.add_scalar(f"train/{k}", v, run.step)
    bar.set_postfix(loss=f"{terms['loss']:.3f}", lr=f"{record['lr']:.2e}", sps=f"{record['samples_per_s']:.0f}")


def validate(run: Run, host: MultimodalModel) -> float:
    """Validation losses, the fit on training images (``report.fit_samples``) and the data read so far, to
    metrics.jsonl, tensorboard and the console; returns the mean validation loss (inf: no validation data)."""
    cfg = run.cfg
    val = validation_losses(host, cfg, run.device, run.autocast)
    if not val:
        return math.inf
    val_loss = float(np.mean([v for k, v in val.items() if k.endswith("/loss")]))
    fit = fit_metrics(host, cfg, run.fit_labels) if cfg.report.fit_samples else {}
    counts = run.stream.counts()
    read = {"data/samples_read": counts["samples_read"], "data/missing_samples": counts["missing_samples"],
            **{f"data/skipped/{k}": v for k, v in counts["skipped"].items()}}
    append_log(run.log_path, {"step": run.step, **val, "val/loss": val_loss, **fit, **read})
    for k, v in {**val, **fit}.items():
        run.writer.add_scalar(k, v, run.step)
    tqdm.write(f"step {run.step}: " + ", ".join(f"{k}={v:.3f}" for k, v in {**val, **fit}.items()
                                                if k.endswith("/loss") or k.startswith("fit")))
    return val_loss


def save(run: Run, host: MultimodalModel, val_loss: float) -> None:
    """A checkpoint of this step (``step_NNNNNN``; ``best`` too when ``val_loss`` is the lowest yet), of which
    the last ``keep_last`` are kept. Its trainer state is what ``restore`` reads back."""
    state = {"step": run.step, "epoch": run.stream.epoch, "batch_in_epoch": run.stream.batch_in_epoch,
             "best": run.best, **run.schedule.state_dict(), "configured_steps": run.cfg.steps}
    if val_loss < run.best:
        run.best = state["best"] = val_loss
        save_checkpoint(run.ckpt_dir / "best", host, run.optimizer, run.scaler, state, rng_state())
    folder = run.ckpt_dir / f"step_{run.step:06d}"
    save_checkpoint(folder, host, run.optimizer, run.scaler, state, rng_state())
    prune_checkpoints(run.ckpt_dir, run.cfg.keep_last)
    run.last_ckpt = str(folder)


def finish(run: Run) -> None:
    """After the last step: the model folder (with the pruning masks), plots of the log and the final report."""
    host = unsharded(run.core, run.cfg, run.fsdp, run.device)
    if run.is_main:
        run.writer.close()
        host.save(run.out_dir / "model")
        if run.masks is not None:
            save_masks(run.masks, run.out_dir / "model")
        from mmstory.plots import plot_metrics

        plot_metrics(run.log_path, run.out_dir / "plots")
        if run.cfg.final_eval:
            final_report(host, run.cfg, run.out_dir, fit_labels=run.fit_labels or None, train_data=run.stream.counts())
    if run.world > 1:
        dist.barrier()


def append_log(path: Path, record: dict) -> None:
    """One line of metrics.jsonl."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def fit_split(cfg: TrainConfig) -> str:
    return cfg.report.fit_split or next(iter(cfg.data.train.values()))


def train_fit(model: MultimodalModel, cfg: TrainConfig, labels: set[str], *, keep_images: int = 0,
              leave_one_out: bool = False) -> dict:
    """The model's fit on its own training data: greedy captions of a fixed spread-out sample of
    ``report.fit_samples`` training images (evaluation transforms), scored like a validation split.
    ``leave_one_out``: a model with retrieval may not look each image up in its datastore."""
    from mmstory.evaluate import evaluate
    from mmstory.generation import DecodeOptions

    split = load_manifest(cfg.data.manifest).split(fit_split(cfg))
    total = sum(s.samples or 0 for s in split.shards)
    every = max(1, total // cfg.report.fit_samples) if total else 1
    return evaluate(model, split, tasks=("caption",), max_samples=cfg.report.fit_samples, every=every,
                    decode=DecodeOptions(max_new_tokens=cfg.report.max_new_tokens), data=cfg.data.loader,
                    batch_size=cfg.report.batch_size,
                    diagnostics=False, meteor=False, labels=labels, progress=False, keep_images=keep_images,
                    leave_one_out=leave_one_out, name=f"{fit_split(cfg)} (fit{', leave-one-out' * leave_one_out})")


def fit_metrics(model: MultimodalModel, cfg: TrainConfig, labels: set[str]) -> dict[str, float]:
    """The fit scalars logged at every validation: ``fit/label_accuracy``, ``fit/distinct``, ``fit/CIDEr``."""
    cap = train_fit(model, cfg, labels)["metrics"].get("caption", {})
    return {f"fit/{k}": cap[k] for k in ("label_accuracy", "distinct", "CIDEr") if cap.get(k) is not None}


def final_report(model: MultimodalModel, cfg: TrainConfig, out_dir: Path, *, fit_labels: set[str] | None = None,
                 train_data: dict | None = None) -> dict:
    """Evaluate every validation split beside its baselines (nearest neighbour from the training split,
    majority, chance, shuffled media) and the model's fit on its training images; write metrics JSON, a
    report per split and ``report/summary.md``. ``fit_labels``: the fit split's labels, when the caller has
    read them already (the trainer does, for the fit logged at each validation)."""
    from mmstory.evaluate import comparison_table, evaluate, reference_bank, split_labels, write_report
    from mmstory.generation import DecodeOptions

    model.eval()
    manifest = load_manifest(cfg.data.manifest)
    decode = DecodeOptions(num_beams=cfg.report.num_beams, max_new_tokens=cfg.report.max_new_tokens)
    ref_split = cfg.report.reference_split or fit_split(cfg)
    reference = [reference_bank(model, manifest.split(ref_split), data=cfg.data.loader, name=ref_split)]
    if "audio" in cfg.data.train and "audio" in model.encoders:  # the clips' baselines: the nearest training clip
        reference.append(reference_bank(model, manifest.split(cfg.data.train["audio"]), data=cfg.data.loader,
                                        name=cfg.data.train["audio"], modality="audio"))
    wordings = Wordings.load(cfg.data.loader.wordings) if cfg.data.loader.wordings else None
    results = {}
    for split in cfg.data.val:
        results[split] = evaluate(model, manifest.split(split), tasks=tuple(cfg.report.tasks),
                                  max_samples=cfg.report.max_samples, decode=decode, data=cfg.data.loader,
                                  batch_size=cfg.report.batch_size,
                                  fuse_question=cfg.data.loader.fuse_question, name=split, reference=reference,
                                  wordings=wordings, qa_decode=dataclasses.replace(decode, num_beams=cfg.report.qa_beams))
        write_report(results[split], out_dir / "report" / split)
    summary: dict = {split: {**r["metrics"], "data": r["data"]} for split, r in results.items()}
    lines = [f"# {cfg.name}: the model beside its baselines", ""]
    if train_data is not None:  # what the training process read (since its last resume)
        summary["train_data"] = train_data
        skipped = ", ".join(f"{k} {v}" for k, v in train_data["skipped"].items()) or "none"
        lines += [f"Training data read: {train_data['samples_read']:,} samples; skipped: {skipped}"
                  + (f"; {train_data['missing_samples']:,} samples the manifest counts were not in their shards"
                     if train_data["missing_samples"] else "") + ".", ""]
    if cfg.report.fit_samples:
        labels = fit_labels or split_labels(manifest.split(fit_split(cfg)))
        for name, loo in (("train_fit", False), ("train_fit_loo", True)) if model.memory is not None else \
                (("train_fit", False),):
            fit = train_fit(model, cfg, labels, keep_images=16, leave_one_out=loo)
            write_report(fit, out_dir / "report" / name)
            summary[name] = fit["metrics"]
            cap = fit["metrics"].get("caption", {})
            how = ", no image retrieving its own entry" if loo else ""
            lines += [f"Fit on {fit['num_samples']} training images ({fit_split(cfg)}, greedy{how}): captions naming "
                      f"their label {cap.get('label_accuracy', float('nan')):.3f}, distinct {cap.get('distinct', 0):.3f}, "
                      f"CIDEr {cap.get('CIDEr', 0):.3f} ([examples]({name}/report.md)).", ""]
    for split, r in results.items():
        lines += [f"## {split} ({r['num_samples']} samples, [report]({split}/report.md))", ""]
        lines += comparison_table(r["metrics"]) + [""]
    (out_dir / "report" / "metrics.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    (out_dir / "report" / "summary.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return summary


# ---------------------------------------------------------------------------------------------- CLI
def cmd_train(args) -> int:
    cfg = load_config(TrainConfig, args.config, args.overrides)
    if not cfg.name or cfg.name == "run":
        cfg.name = Path(args.config).stem
    try:
        train(cfg, resume=args.resume, overwrite=args.overwrite)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def add_train_commands(sub) -> None:
    p = sub.add_parser("train", help="train from a YAML config (experiments/*.yaml)")
    p.add_argument("config")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint that loads")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in the run folder (its checkpoints, model, logs and report)")
    p.add_argument("overrides", nargs="*", help="--key.path=value overrides")
    p.set_defaults(func=cmd_train)
