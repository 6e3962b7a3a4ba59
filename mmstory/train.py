"""``mmstory train CONFIG [--key=value ...] [--resume]``: a plain training loop, read top to bottom.

config -> data (mixed image/audio webdataset streams) -> model -> weighted losses -> AdamW (warmup +
cosine) -> checkpoints (atomic, last N + best, exact resume) -> final evaluation and report.

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from mmstory.checkpoints import (RunFolderError, RunLock, guard_run_folder, load_latest, prune_checkpoints, recover,
                                 save_checkpoint, truncate_log)
from mmstory.compress.distill import Distiller
from mmstory.compress.prune import KINDS as PRUNE_KINDS, prune, save_masks
from mmstory.config import (ConfigError, ModelConfig, _count, _is_number, _positive_int, _require, load_config,
                            to_dict)
from mmstory.data.manifest import ManifestError, check_shards, load_manifest
from mmstory.data.pipeline import DataConfig, build_mixed_loader, fit_to_encoders, read_counts
from mmstory.feature_cache import FeatureCache
from mmstory.model import MultimodalModel, build_model
from mmstory.retrieval import build_datastore


@dataclass
class DataSpec:
    manifest: str = "data_manifests/emoji.json"
    train: dict[str, str] = field(default_factory=lambda: {"image": "train", "audio": "audio_train"})
    # epoch mode: how the sources interleave (each epoch uses every batch of each); resampled: their shares
    weights: dict[str, float] = field(default_factory=lambda: {"image": 3.0, "audio": 1.0})
    val: list[str] = field(default_factory=lambda: ["val_style", "val_novel", "audio_val_novel"])
    loader: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self):
        _require(bool(self.train), "train", self.train, "at least one source: {name: split}")
        for name, w in self.weights.items():
            _require(_is_number(w) and w > 0, f"weights.{name}", w, "> 0")
        extra = sorted(set(self.weights) - set(self.train))
        _require(not extra, "weights", self.weights, f"weights of the sources in data.train {sorted(self.train)} "
                 f"(no source {extra[0] if extra else ''!r})")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05   # cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0       # 0 disables
    accum_steps: int = 1
    # learning-rate multipliers by module path, e.g. {encoders.text: 0.1} to tune a pretrained tower gently
    lr_mult: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        _require(_is_number(self.lr) and self.lr > 0, "lr", self.lr, "> 0")
        _require(_is_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _require(len(self.betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in self.betas), "betas", self.betas,
                 "two numbers in [0, 1)")
        _require(_is_number(self.eps) and self.eps > 0, "eps", self.eps, "> 0")
        _count("warmup_steps", self.warmup_steps)
        _require(_is_number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio,
                 "a number in [0, 1]")
        _require(_is_number(self.grad_clip) and self.grad_clip >= 0, "grad_clip", self.grad_clip, ">= 0 (0: off)")
        _positive_int("accum_steps", self.accum_steps)
        for path, mult in self.lr_mult.items():
            _require(_is_number(mult) and mult >= 0, f"lr_mult.{path}", mult, ">= 0")


@dataclass
class ReportConfig:
    max_samples: int = 256       # per validation split, for the final evaluation
    num_beams: int = 3           # captions
    qa_beams: int = 1            # answers: a few tokens each, asked three times (as is, media shuffled, reworded)
    max_new_tokens: int = 20
    tasks: list[str] = field(default_factory=lambda: ["caption", "qa", "retrieval", "zeroshot"])
    # fit: greedy captions of a fixed sample of this many training images (of fit_split, default the first
    # training split), scored at every validation and in the report; 0 turns it off
    fit_samples: int = 256
    fit_split: str | None = None
    # nearest-neighbour baselines from this split (default: fit_split) beside every image metric
    reference_split: str | None = None

    def __post_init__(self):
        for key in ("max_samples", "num_beams", "qa_beams", "max_new_tokens"):
            _positive_int(key, getattr(self, key))
        _count("fit_samples", self.fit_samples)
        unknown = sorted(set(self.tasks) - {"caption", "qa", "retrieval", "zeroshot"})
        _require(not unknown, "tasks", self.tasks, "a list of caption, qa, retrieval, zeroshot")


@dataclass
class PruneSpec:
    """Prune the ``init_from`` model before training it further (mmstory/compress/prune.py): ``unstructured``
    zeroes the fraction ``amount`` of the linear weights with the smallest magnitude (sparsity, no CPU speed-up);
    ``structured`` removes that fraction of every MLP's hidden channels (smaller matrices: faster)."""
    kind: str = "none"
    amount: float = 0.5

    def __post_init__(self):
        _require(self.kind in PRUNE_KINDS, "prune.kind", self.kind, f"one of {', '.join(PRUNE_KINDS)}")
        _require(_is_number(self.amount) and 0 < self.amount < 1, "prune.amount", self.amount, "a fraction in (0, 1)")


@dataclass
class DistillSpec:
    """Train this (smaller) model from a trained teacher as well as from the data (mmstory/compress/distill.py):
    the teacher's softened next-token distribution at every scored position (``weight``) and its image-text /
    audio-text similarities (``embed_weight``) join the model's own losses."""
    teacher: str | None = None   # a saved model folder (e.g. runs/emoji_tiny/model); None: no distillation
    temperature: float = 2.0
    weight: float = 1.0
    embed_weight: float = 1.0

    def __post_init__(self):
        _require(_is_number(self.temperature) and self.temperature > 0, "distill.temperature", self.temperature, "> 0")
        for key in ("weight", "embed_weight"):
            _require(_is_number(getattr(self, key)) and getattr(self, key) >= 0, f"distill.{key}",
                     getattr(self, key), ">= 0")


@dataclass
class TrainConfig:
    name: str = "run"
    out_dir: str = "runs/{name}"
    seed: int = 0
    steps: int = 1000
    max_minutes: float = 0.0     # > 0: a budget: fewer steps planned at the end of warmup if `steps` would
                                 # not fit at the measured rate; a guard stops (and evaluates) at the budget
    precision: str = "fp32"      # fp32 | bf16 | fp16 (autocast; fp16 adds a grad scaler) | auto (bf16 where native)
    device: str = "auto"         # auto | cpu | cuda
    threads: int = 0             # torch intra-op threads on CPU (0: torch's default)
    compile: bool = False
    grad_checkpointing: bool = False
    # submodules trained no further (e.g. [encoders.image]: a pretrained tower locked as in LiT); kept in eval mode
    freeze: list[str] = field(default_factory=list)
    # a frozen encoder whose inputs do not change between epochs (data.loader.augment: false) runs once per
    # training sample; its outputs are reused (mmstory/feature_cache.py)
    cache_frozen: bool = True
    distributed: str = "ddp"     # ddp | fsdp, used under torchrun
    log_every: int = 10
    eval_every: int = 0          # 0: only at the end
    eval_batches: int = 4
    ckpt_every: int = 100
    keep_last: int = 2
    final_eval: bool = True
    init_from: str | None = None  # a model folder (e.g. another run's checkpoint) to start from
    prune: PruneSpec = field(default_factory=PruneSpec)  # prune the init_from model, then fine-tune it
    distill: DistillSpec = field(default_factory=DistillSpec)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self):
        choices = {"precision": ("fp32", "bf16", "fp16", "auto"), "device": ("auto", "cpu", "cuda"),
                   "distributed": ("ddp", "fsdp")}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ConfigError(f"config key '{key}': {getattr(self, key)!r} is not one of {valid}")
        for key in ("steps", "log_every", "eval_batches", "ckpt_every", "keep_last"):
            _positive_int(key, getattr(self, key))
        for key in ("eval_every", "threads", "seed"):
            _count(key, getattr(self, key))
        _require(_is_number(self.max_minutes) and self.max_minutes >= 0, "max_minutes", self.max_minutes,
                 ">= 0 (0: no budget)")
        _require(self.prune.kind == "none" or self.init_from, "init_from", self.init_from,
                 "a model folder to prune (prune.kind is set)")


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


def lr_factor(step: int, cfg: TrainConfig, progress: float | None = None, total: int | None = None) -> float:
    """Linear warmup, then cosine from 1 to ``min_lr_ratio`` at the last step (``total``, default
    ``cfg.steps``). ``progress`` (0..1) replaces the step-based position on the cosine, e.g. the elapsed
    fraction of a wall-clock budget."""
    o = cfg.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if progress is None:
        progress = cosine_position(step, cfg, total or cfg.steps, [])
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def cosine_position(step: int, cfg: TrainConfig, total: int, replans: list) -> float:
    """Where ``step`` is on the cosine: 0 at the end of warmup, 1 at the last step ``total``. A run with a
    time budget re-plans its last step as it measures its rate; ``replans`` holds the (step, position) of
    each change, from which the position runs on linearly to 1 at the new ``total``. So the learning rate
    stays continuous (and keeps falling) when the plan changes, instead of jumping to where a cosine over
    the new total would be. Without re-plans this is (step - warmup) / (total - warmup)."""
    s0, p0 = replans[-1] if replans else (cfg.optim.warmup_steps, 0.0)
    return p0 + (1 - p0) * (step - s0) / max(1, total - s0)


def plan_at_step(cfg: TrainConfig) -> int:
    """The step at which a run with a time budget checks that its steps fit: the end of warmup (the learning
    rate until then does not depend on the number of steps), but at least 10 steps in."""
    return max(10, cfg.optim.warmup_steps)


def steps_that_fit(cfg: TrainConfig, step: int, elapsed_s: float, seconds_per_step: float,
                   margin: float = 0.9) -> int:
    """How many steps the run can plan for (between ``step`` and ``cfg.steps``) so that, at the measured
    rate, training ends inside ``max_minutes``; ``margin`` of the remaining time is kept for steps, the rest
    for validation and checkpoints."""
    left = 60 * cfg.max_minutes - elapsed_s
    return max(step, min(cfg.steps, step + int(margin * left / max(seconds_per_step, 1e-9))))


def build_data(cfg: TrainConfig, model: MultimodalModel, *, splits: dict[str, str], weights: dict[str, float],
               train: bool, rank: int = 0, world: int = 1, epoch: int = 0, skip_batches: int = 0):
    """A mixed loader over the named manifest splits; image size/normalisation and audio rate follow the
    model's encoders, so data and model cannot disagree."""
    manifest = load_manifest(cfg.data.manifest)
    loader_cfg = cfg.data.loader if train else dataclasses.replace(cfg.data.loader, resampled=False)
    loader_cfg, kwargs = fit_to_encoders(loader_cfg, model.encoders)
    sources = {name: manifest.split(split) for name, split in splits.items()}
    return build_mixed_loader(sources, {n: weights.get(n, 1.0) for n in sources}, loader_cfg,
                              skip_batches=skip_batches, epoch=epoch, tokenizer=model.tokenizer,
                              text_tokenizer=model.text_tokenizer, train=train, rank=rank, world_size=world, **kwargs)


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
    augmentation), or None."""
    frozen = [m for m in ("image", "audio") if f"encoders.{m}" in cfg.freeze and m in model.encoders]
    if not (cfg.cache_frozen and frozen):
        return None
    if cfg.data.loader.augment:
        if verbose:
            print(f"frozen {frozen} encoder(s) not cached: data.loader.augment is on, so inputs change every epoch")
        return None
    return FeatureCache(frozen)


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
    if cfg.model.retrieval.k and "encoders.image" not in cfg.freeze:
        raise ConfigError("config key 'model.retrieval.k' > 0 needs a frozen image encoder (freeze: [encoders.image]): "
                         "retrieval keys are its features, computed once")
    if cfg.model.fuse_question and not cfg.data.loader.fuse_question:
        raise ConfigError("config key 'model.fuse_question' is recorded from 'data.loader.fuse_question' "
                         "(the loader makes the fused question); set data.loader.fuse_question: true instead")


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
    cfg.model.fuse_question = cfg.data.loader.fuse_question  # saved with the model: inference answers the same way
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
        cfg.precision = resolve_precision("auto", device)  # the saved config records what ran
        if is_main:
            print(f"precision auto -> {cfg.precision} on {device.type}")
    ckpt_dir, log_path = out_dir / "checkpoints", out_dir / "metrics.jsonl"
    if is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for line in recover(ckpt_dir):
            print(f"checkpoints: {line}")
    if world > 1:
        dist.barrier()  # the other ranks read the checkpoints rank 0 may just have repaired

    log = print if is_main else (lambda *_: None)  # messages from rank 0 only
    seed_everything(cfg.seed)
    model = build_model(cfg.model).to(device)
    model.freeze(cfg.freeze)
    masks = None
    if cfg.prune.kind != "none":  # the same structure and masks on a resume: they follow from init_from's weights
        init_weights(model, cfg.init_from, device, log=log)
        masks = prune(model, cfg.prune.kind, cfg.prune.amount, log=log)
    distiller = Distiller(cfg.distill, model, device) if cfg.distill.teacher else None
    cache = frozen_feature_cache(cfg, model, is_main)
    for enc in model.encoders.values():
        if hasattr(enc, "transformer"):
            enc.transformer.grad_checkpointing = cfg.grad_checkpointing
    model.decoder.grad_checkpointing = cfg.grad_checkpointing
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay, cfg.optim.lr, cfg.optim.lr_mult), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  fused=device.type in ("cuda", "cpu"))  # CPU: 21 vs 72 ms a step (main job)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None

    step, epoch, batch_in_epoch, best = 0, 0, 0, math.inf
    total = cfg.steps  # fewer if max_minutes is set and the measured rate shows cfg.steps would not fit
    replans: list = []  # (step, cosine position) where a budgeted run changed `total`: see cosine_position
    loaded = load_latest(ckpt_dir, model, device, log=log) if resume else None
    last = loaded[0] if loaded else None
    if cfg.init_from and last is None and cfg.prune.kind == "none":
        init_weights(model, cfg.init_from, device, log=log)
    if resume and last is None and is_main:
        print(f"--resume: no checkpoint in {ckpt_dir}; starting from scratch")
    if loaded is not None:
        state = loaded[1]
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
        step, epoch, batch_in_epoch, best = state["step"], state["epoch"], state["batch_in_epoch"], state["best"]
        total, replans = state.get("total", cfg.steps), [tuple(r) for r in state.get("replans", [])]
        set_rng_state(state["rng"])
        if is_main:
            truncate_log(log_path, step)
            print(f"resumed from {last} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
    elif is_main:
        log_path.unlink(missing_ok=True)  # a fresh start: lines of an earlier attempt would interleave
    if is_main:  # after the checks above: a refused resume leaves the run's config as it was
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))

    if model.memory is not None:  # the captions retrieval reads, keyed by the frozen image encoder's features
        n = build_datastore(model, load_manifest(cfg.data.manifest).split(fit_split(cfg)), data=cfg.data.loader,
                            autocast=autocast_for(cfg.precision, device.type), progress=is_main)
        if is_main:
            print(f"retrieval datastore: {n} captioned images of {fit_split(cfg)}")

    # Wrap for several processes; ``core`` is the module without the DDP/compile wrappers.
    core = model
    fsdp = world > 1 and cfg.distributed == "fsdp"
    if fsdp and last is not None:
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
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg, progress=cosine_position(s, cfg, total, replans)), last_epoch=step - 1)

    autocast = autocast_for(cfg.precision, device.type)

    data_read, reading = Counter(), {}  # this process's data counts: finished passes; the pass in progress

    def batches():
        """Endless batch stream; (epoch, batch_in_epoch) say where it is, so a resume continues exactly."""
        nonlocal epoch, batch_in_epoch
        while True:
            loader = reading["loader"] = build_data(cfg, core, splits=cfg.data.train, weights=cfg.data.weights,
                                                    train=True, rank=rank, world=world, epoch=epoch,
                                                    skip_batches=batch_in_epoch)
            for batch in loader:
                batch_in_epoch += 1
                yield batch
            del reading["loader"]
            data_read.update(loader.stats)
            if is_main and loader.stats:
                loader.report(print_fn=lambda s: tqdm.write(f"epoch {epoch} data: {s}"))
            epoch, batch_in_epoch = epoch + 1, 0

    def data_counts() -> dict:
        """Training samples read and skipped (with reasons) since this process started."""
        stats = data_read + (reading["loader"].stats if "loader" in reading else Counter())
        return read_counts(stats, complete=True)

    writer = None
    fit_labels: set[str] = set()
    if is_main:
        from torch.utils.tensorboard import SummaryWriter

        if cfg.report.fit_samples:
            from mmstory.evaluate import split_labels

            fit_labels = split_labels(load_manifest(cfg.data.manifest).split(fit_split(cfg)))

        writer = SummaryWriter(str(out_dir / "tensorboard"))
    stream = batches()
    bar = tqdm(total=total, initial=step, desc="train", disable=not is_main, dynamic_ncols=True)
    last_ckpt = str(last) if last else "none"
    t_log, samples_since = time.perf_counter(), 0
    model.train()
    t_start = time.perf_counter()
    first_step, t_first = step, None  # rate of this process's steps, measured from its second step on
    plan0, replan_every = None, 0  # (step, time) of this process's first plan; re-plans every replan_every steps
    stop_at = total
    while step < stop_at:
        terms: dict[str, float] = {}
        for micro in range(cfg.optim.accum_steps):
            batch = to_device(next(stream), device)
            sync = micro == cfg.optim.accum_steps - 1 or not isinstance(model, torch.nn.parallel.DistributedDataParallel)
            with autocast(), (nullcontext() if sync else model.no_sync()):
                if cache is not None:
                    batch["features"] = cache(core, batch)
                out = model(batch)
                if distiller is not None:
                    distiller.add_terms(out, batch)
                loss = out["loss"] / cfg.optim.accum_steps
            if not torch.isfinite(loss):
                keys = batch["__key__"]
                raise NonFiniteLoss(f"non-finite loss ({loss.item()}) at step {step + 1} on a batch of {len(keys)} "
                                    f"samples ({', '.join(keys[:4])}{', ...' * (len(keys) > 4)}); "
                                    f"last good checkpoint: {last_ckpt}")
            (scaler.scale(loss) if scaler else loss).backward()
            for k, v in loss_items(out).items():
                terms[k] = terms.get(k, 0.0) + v / cfg.optim.accum_steps
            samples_since += len(batch["__key__"]) * world
        if scaler:
            scaler.unscale_(optimizer)
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if masks is not None:  # pruned weights stay zero
            masks.apply(core)
        scheduler.step()
        step += 1
        if step == first_step + 1:
            t_first = time.perf_counter()
        due = step == plan_at_step(cfg) if plan0 is None else (step - plan0[0]) % replan_every == 0
        if cfg.max_minutes and due and step - first_step > 5 and step < total:
            # Budget check: at the end of warmup (the learning rate until then does not depend on the number
            # of steps), then every 1/8 of the steps left: at the rate measured so far, do the planned steps
            # fit in max_minutes? Plan fewer (or more again, up to cfg.steps) so the cosine ends at the last
            # step inside the budget: not cut off by the guard below at a high learning rate, and no budget
            # left unused when the first estimate was pessimistic (the machine's speed can drift by 1.5x).
            now = time.perf_counter()
            # s/step: at the first plan since this process's second step (its start-up excluded); later since
            # the first plan, so the validations and checkpoints of the run are in the rate
            rate = ((now - t_first) / (step - first_step - 1) if plan0 is None
                    else (now - plan0[1]) / (step - plan0[0]))
            fit = torch.tensor([steps_that_fit(cfg, step, now - t_start, rate)], device=device)
            if world > 1:  # every rank plans the same number of steps
                dist.all_reduce(fit, op=dist.ReduceOp.MIN)
            planned = int(fit.item())
            if plan0 is None:
                plan0, replan_every = (step, now), max(10, (planned - step) // 8)
            if planned != total:
                replans.append((step, cosine_position(step, cfg, total, replans)))
                total = stop_at = planned
                bar.total = total
                bar.refresh()
                if is_main:
                    tqdm.write(f"time budget of {cfg.max_minutes} min at {rate:.2f} s/step: planned {total} steps"
                               f" (configured: {cfg.steps})")
                    with log_path.open("a") as f:
                        f.write(json.dumps({"step": step, "planned_steps": total}) + "\n")
        if cfg.max_minutes and stop_at == total and step < total:
            over = torch.tensor([float(time.perf_counter() - t_start > 60 * cfg.max_minutes)], device=device)
            if world > 1:  # every rank must agree on the step it stops at
                dist.all_reduce(over, op=dist.ReduceOp.MAX)
            if over.item():
                stop_at = step  # evaluate and save as at the last step
                if is_main:
                    tqdm.write(f"time budget of {cfg.max_minutes} min reached at step {step}")

        if is_main and (step % cfg.log_every == 0 or step == stop_at or step == 1):
            now = time.perf_counter()
            record = {"step": step, **terms, "lr": scheduler.get_last_lr()[0], "epoch": epoch,
                      "samples_per_s": samples_since / max(now - t_log, 1e-9),
                      "logit_scale": core.losses["contrastive"].scale().item() if "contrastive" in core.losses else None}
            t_log, samples_since = now, 0
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    writer.add_scalar(f"train/{k}", v, step)
            bar.set_postfix(loss=f"{terms['loss']:.3f}", lr=f"{record['lr']:.2e}", sps=f"{record['samples_per_s']:.0f}")
        bar.update(1)
        if os.environ.get("MMSTORY_KILL_AT_STEP") == str(step):  # test hook: simulate kill -9 here
            os.kill(os.getpid(), 9)

        evaluate_now = cfg.eval_every and step % cfg.eval_every == 0
        if not (evaluate_now or step % cfg.ckpt_every == 0 or step == stop_at):
            continue
        host = unsharded(core, cfg, fsdp, device)  # every rank takes part in the FSDP gather
        if is_main:
            val = validation_losses(host, cfg, device, autocast) if (evaluate_now or step == stop_at) else {}
            val_loss = math.inf
            if val:
                val_loss = float(np.mean([v for k, v in val.items() if k.endswith("/loss")]))
                fit = fit_metrics(host, cfg, fit_labels) if cfg.report.fit_samples else {}
                counts = data_counts()
                read = {"data/samples_read": counts["samples_read"], "data/missing_samples": counts["missing_samples"],
                        **{f"data/skipped/{k}": v for k, v in counts["skipped"].items()}}
                with log_path.open("a") as f:
                    f.write(json.dumps({"step": step, **val, "val/loss": val_loss, **fit, **read}) + "\n")
                for k, v in {**val, **fit}.items():
                    writer.add_scalar(k, v, step)
                tqdm.write(f"step {step}: " + ", ".join(f"{k}={v:.3f}" for k, v in {**val, **fit}.items()
                                                        if k.endswith("/loss") or k.startswith("fit")))
            state = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "best": best, "total": total,
                     "replans": replans, "configured_steps": cfg.steps}
            if val_loss < best:
                best = state["best"] = val_loss
                save_checkpoint(ckpt_dir / "best", host, optimizer, scaler, state, rng_state())
            save_checkpoint(ckpt_dir / f"step_{step:06d}", host, optimizer, scaler, state, rng_state())
            prune_checkpoints(ckpt_dir, cfg.keep_last)
            last_ckpt = str(ckpt_dir / f"step_{step:06d}")
    bar.close()
    stream.close()  # shuts the loader workers down now, not at some later garbage collection

    host = unsharded(core, cfg, fsdp, device)
    if is_main:
        writer.close()
        host.save(out_dir / "model")
        if masks is not None:
            save_masks(masks, out_dir / "model")
        from mmstory.plots import plot_metrics

        plot_metrics(log_path, out_dir / "plots")
        if cfg.final_eval:
            final_report(host, cfg, out_dir, fit_labels=fit_labels or None, train_data=data_counts())
    if world > 1:
        dist.barrier()
    return out_dir


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
    from mmstory.data.wordings import Wordings
    from mmstory.evaluate import comparison_table, evaluate, reference_bank, split_labels, write_report
    from mmstory.generation import DecodeOptions

    model.eval()
    manifest = load_manifest(cfg.data.manifest)
    decode = DecodeOptions(num_beams=cfg.report.num_beams, max_new_tokens=cfg.report.max_new_tokens)
    ref_split = cfg.report.reference_split or fit_split(cfg)
    reference = reference_bank(model, manifest.split(ref_split), data=cfg.data.loader, name=ref_split)
    wordings = Wordings.load(cfg.data.loader.wordings) if cfg.data.loader.wordings else None
    results = {}
    for split in cfg.data.val:
        results[split] = evaluate(model, manifest.split(split), tasks=tuple(cfg.report.tasks),
                                  max_samples=cfg.report.max_samples, decode=decode, data=cfg.data.loader,
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
