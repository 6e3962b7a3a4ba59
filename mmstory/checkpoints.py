"""A run folder and its checkpoints: what a crash can leave behind, and how a run gets back from it.

    runs/NAME/
      .lock                   held (fcntl) by the one process training into the folder
      config.yaml             the config that ran
      metrics.jsonl           one JSON line per log / validation / re-plan / epoch's data counts
      checkpoints/step_NNNNNN the last ``keep_last`` checkpoints; each is a loadable model folder plus
      checkpoints/best        trainer_state.pt (optimizer, RNG, position in the data, schedule)
      model/ report/ plots/ tensorboard/

Guarantees:
- A checkpoint is written to ``<name>.tmp`` and renamed into place, so a kill at any moment leaves the
  previous checkpoint intact; ``recover`` finishes or undoes a swap that a kill interrupted.
- ``--resume`` loads the newest checkpoint that loads completely and falls back to an older one, saying
  which it skipped and why.
- Only one process trains into a folder at a time (``RunLock``), and a folder that holds a run is not
  trained into again without ``--resume`` (continue) or ``--overwrite`` (replace).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import torch

from mmstory.errors import UserError, is_disk_full

# what a run writes into its folder (``--overwrite`` removes exactly these)
RUN_ENTRIES = ("checkpoints", "model", "metrics.jsonl", "report", "plots", "tensorboard", "config.yaml")


class RunFolderError(UserError):
    """A run folder is in use, already holds a run, or has no checkpoint that loads."""


# ---------------------------------------------------------------------------------------------- the folder
class RunLock:
    """An exclusive lock on a run folder for as long as a training process lives.

    A POSIX record lock (``fcntl.lockf``) on ``<folder>/.lock``: the kernel drops it when the process ends,
    however it ends (so a ``kill -9`` never leaves a stale lock behind), and, unlike ``flock``, forked
    DataLoader workers do not inherit it (a resume right after a kill is not blocked by dying workers).
    Where ``fcntl`` does not exist (Windows) the folder is not locked."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderError(f"run folder {self.path.parent} is in use by another training process "
                                 f"({holder}); wait for it to end or train with another --name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None


def previous_run(folder: Path) -> str | None:
    """What a run left in ``folder`` (None if nothing a new run would overwrite): a finished model or
    checkpoints."""
    folder = Path(folder)
    if (folder / "model").is_dir():
        return "a finished run (model/)"
    ckpts = folder / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()):
        return f"checkpoints ({', '.join(sorted(p.name for p in ckpts.iterdir())[:4])})"
    return None


def clear_run(folder: Path) -> None:
    """Remove what a run writes (``RUN_ENTRIES``) from ``folder``, nothing else."""
    for name in RUN_ENTRIES:
        path = Path(folder) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def guard_run_folder(folder: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run over an earlier one unless told to continue it or to replace it."""
    if resume and overwrite:
        raise RunFolderError("--resume continues a run and --overwrite replaces it: give one of them")
    if overwrite:
        clear_run(folder)
        return
    found = None if resume else previous_run(folder)
    if found:
        raise RunFolderError(f"run folder {folder} already holds {found}; --resume continues it, --overwrite "
                             f"replaces it, or set another name (--name=...) or --out_dir")


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(folder: Path, model, optimizer, scaler, state: dict, rng: dict) -> None:
    """Atomic: write into ``<folder>.tmp`` then rename, so a kill never leaves a half-written checkpoint.
    The folder is also a loadable model (``mmstory.load``); the trainer state is tensors and plain data
    only, loaded back with ``weights_only=True``."""
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                    "rng": rng, **state}, tmp / "trainer_state.pt")
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a partial checkpoint taking the last free space
        _raise_write_error(tmp, e)
    shutil.rmtree(old, ignore_errors=True)  # left by a kill during an earlier swap (see recover)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _raise_write_error(path: Path, e: Exception) -> None:
    """A full disk (``errors.is_disk_full``: ENOSPC from Python, a RuntimeError from torch.save) is raised as
    OSError(ENOSPC) with the checkpoint's path and the space left, which the command line prints in one line."""
    if is_disk_full(e):
        free = shutil.disk_usage(path.parent if path.parent.exists() else ".").free
        raise OSError(errno.ENOSPC, f"No space left on device ({free / 1e6:,.0f} MB free; the previous checkpoint "
                                    f"is intact)", str(path)) from e
    raise e


def recover(ckpt_dir: Path) -> list[str]:
    """Finish or undo checkpoint swaps a kill interrupted; returns what it did, one line each.

    ``save_checkpoint`` renames ``X`` to ``X.old``, ``X.tmp`` to ``X``, then deletes ``X.old``. Left over:
    ``X.old`` next to ``X`` (killed before the delete): delete it; ``X.old`` and a complete ``X.tmp`` without
    ``X`` (killed between the renames): the new one is complete, rename it; ``X.old`` alone: put it back;
    ``X.tmp`` otherwise: half written, delete it."""
    done = []
    if not ckpt_dir.is_dir():
        return done
    for old in sorted(ckpt_dir.glob("*.old")):
        final, tmp = old.with_name(old.name[:-4]), old.with_name(old.name[:-4] + ".tmp")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"removed {old.name}, left by an interrupted checkpoint swap")
        elif _complete(tmp):
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"finished an interrupted checkpoint swap: {tmp.name} -> {final.name}")
        else:
            old.rename(final)
            done.append(f"restored {final.name} from {old.name} (its replacement was not complete)")
    for tmp in sorted(ckpt_dir.glob("*.tmp")):
        shutil.rmtree(tmp, ignore_errors=True)
        done.append(f"removed half-written {tmp.name}")
    return done


def _complete(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "trainer_state.pt").is_file()


def step_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete ``step_NNNNNN`` checkpoints, oldest first (half-written ``.tmp``/``.old`` folders excluded)."""
    return sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith((".tmp", ".old")))


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    for p in step_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def load_latest(ckpt_dir: Path, model, device: torch.device, log=print) -> tuple[Path, dict] | None:
    """Load the newest step checkpoint that loads completely into ``model``; returns (folder, trainer state)
    or None when there is none. A damaged one (truncated file, missing part) is skipped with a message and
    the one before it is tried; if every checkpoint is damaged that is an error, not a silent fresh start."""
    from safetensors.torch import load_model

    found = step_checkpoints(ckpt_dir)
    problems = []
    for folder in reversed(found):
        try:
            state = torch.load(folder / "trainer_state.pt", map_location=device, weights_only=True)
            missing = [k for k in ("optimizer", "rng", "step", "epoch", "batch_in_epoch", "best") if k not in state]
            if missing:
                raise KeyError(f"trainer_state.pt lacks {missing}")
            load_model(model, str(folder / "model.safetensors"), device=str(device))
        except Exception as e:  # any failure to read makes the checkpoint unusable; say which and why
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            problems.append(f"{folder.name}: {type(e).__name__}: {reason}")
            log(f"warning: skipping checkpoint {folder} that does not load ({type(e).__name__}: {reason})")
            continue
        return folder, state
    if problems:
        raise RunFolderError(f"no checkpoint in {ckpt_dir} loads ({'; '.join(problems)}); "
                             f"--overwrite starts the run again")
    return None


def truncate_log(path: Path, step: int) -> None:
    """Drop logged lines of steps after ``step`` (a resumed run logs them again; a fresh run starts empty)."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        path.write_text("".join(ln + "\n" for ln in lines))
