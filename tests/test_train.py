"""Training: exact resume after kill -9, DDP equivalence, config errors, NaN stop, plots/logs."""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_batch, tiny_config
from mmstory.config import ConfigError, TrainConfig, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


def tiny_train_config(out_dir: Path, **over) -> dict:
    """A seconds-long run on the bundled emoji shards with a tiny model."""
    cfg = TrainConfig(name="t", out_dir=str(out_dir), steps=6, log_every=1, ckpt_every=2, eval_every=0,
                      eval_batches=1, final_eval=False, threads=1)
    cfg.model = tiny_config()
    cfg.model.encoders["text"].args["max_len"] = 32
    cfg.data.manifest = str(ROOT / "data_manifests/emoji.json")
    cfg.data.val = ["val_novel"]
    cfg.data.loader.batch_size = 8
    cfg.data.loader.workers = 2
    cfg.data.loader.shuffle_buffer = 64
    cfg.data.loader.audio_seconds = 1.0
    cfg.optim.warmup_steps = 2
    cfg.report.fit_samples = 8
    d = to_dict(cfg)
    for k, v in over.items():
        node = d
        *parts, last = k.split(".")
        for p in parts:
            node = node[p]
        node[last] = v
    return d


def run_cli(cfg: dict, tmp_path: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    path = tmp_path / f"cfg_{abs(hash(json.dumps(cfg, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-m", "mmstory.cli", "train", str(path), *extra], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


def step_losses(out_dir: Path) -> dict[int, dict]:
    rows = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.endswith("loss")} for r in rows if "lr" in r}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    res = run_cli(tiny_train_config(tmp / "run"), tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "run"


def test_run_writes_logs_checkpoints_and_plots(reference_run):
    losses = step_losses(reference_run)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all("loss" in v and "caption_loss" in v for v in losses.values())
    ckpts = sorted(p.name for p in (reference_run / "checkpoints").iterdir())
    assert ckpts == ["best", "step_000004", "step_000006"]  # keep_last=2, plus the best
    assert (reference_run / "config.yaml").is_file() and (reference_run / "plots/losses.png").is_file()
    assert list((reference_run / "tensorboard").iterdir())
    import mmstory

    model = mmstory.load(reference_run / "model")  # the final model folder loads on its own
    assert model.decoder.tok.num_embeddings == model.tokenizer.vocab_size


@pytest.mark.parametrize("kill_at", [3, 4])
def test_resume_after_kill_gives_identical_losses(reference_run, tmp_path, kill_at):
    """kill -9 at a step (3: just after a checkpoint; 4: just before one is written), then --resume:
    every per-step loss equals the uninterrupted run's."""
    cfg = tiny_train_config(tmp_path / "run")
    killed = run_cli(cfg, tmp_path, env={"MMSTORY_KILL_AT_STEP": str(kill_at)})
    assert killed.returncode == -9
    assert max(step_losses(tmp_path / "run")) == kill_at
    resumed = run_cli(cfg, tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_000002" in resumed.stdout
    assert step_losses(tmp_path / "run") == step_losses(reference_run)


def test_overrides_and_config_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\noptim: {lr: fast}\n")
    with pytest.raises(ConfigError, match="config key 'optim.lr': expected float, got str 'fast'"):
        load_config(TrainConfig, path)
    path.write_text("steps: 5\noptim: {lr: 1e-3, warmup: 3}\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.warmup'; valid keys here: lr, weight_decay"):
        load_config(TrainConfig, path)
    path.write_text("steps: 5\noptim: {lr: 1e-3}\n")
    cfg = load_config(TrainConfig, path, ["--optim.warmup_steps=7", "--data.loader.batch_size=4"])
    assert (cfg.steps, cfg.optim.lr, cfg.optim.warmup_steps, cfg.data.loader.batch_size) == (5, 1e-3, 7, 4)
    with pytest.raises(ValueError, match="'precision': 'fp8' is not one of"):
        load_config(TrainConfig, path, ["--precision=fp8"])
    with pytest.raises(ConfigError, match="unknown config key 'data.loader.batchsize'"):
        load_config(TrainConfig, path, ["--data.loader.batchsize=4"])


def test_init_from_another_run(reference_run, tmp_path):
    from safetensors.torch import load_file

    res = run_cli(tiny_train_config(tmp_path / "run", steps=1, init_from=str(reference_run / "model"),
                                    **{"optim.lr": 1e-12}), tmp_path)
    assert res.returncode == 0 and "initialised from" in res.stdout, res.stderr[-2000:]
    a, b = load_file(str(reference_run / "model/model.safetensors")), load_file(str(tmp_path / "run/model/model.safetensors"))
    torch.testing.assert_close(a["decoder.pos.weight"], b["decoder.pos.weight"], atol=1e-6, rtol=0)


def test_time_budget_stops_and_finishes_the_run(tmp_path):
    res = run_cli(tiny_train_config(tmp_path / "run", steps=10_000, max_minutes=0.001), tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "time budget of 0.001 min reached at step" in res.stdout + res.stderr
    last = max(step_losses(tmp_path / "run"))
    assert last < 10_000 and (tmp_path / "run" / "checkpoints" / f"step_{last:06d}").is_dir()
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_cli_reports_bad_override(tmp_path):
    res = run_cli(tiny_train_config(tmp_path / "run"), tmp_path, "--optim.lrr=1")
    assert res.returncode != 0 and "unknown config key 'optim.lrr'" in res.stderr


def test_nan_loss_stops_with_step_and_checkpoint(tmp_path):
    res = run_cli(tiny_train_config(tmp_path / "run", **{"optim.lr": 1e30, "optim.warmup_steps": 1,
                                                        "optim.grad_clip": 0.0, "steps": 40}), tmp_path)
    assert res.returncode == 1
    assert "non-finite loss" in res.stderr and "at step" in res.stderr and "last good checkpoint" in res.stderr
    assert "on a batch of 8 samples (" in res.stderr  # names the samples it happened on


# ------------------------------------------------------------------------------------------------ DDP
def _ddp_worker(rank: int, world: int, port: int, out: str):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    from mmstory.model import build_model

    model = build_model(tiny_config())
    batch = make_batch(model, B=4, seed=1)
    half = {k: v[rank * 2:(rank + 1) * 2] for k, v in batch.items()}
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=1.0)  # delta = gradient (Adam would amplify float noise)
    ddp(half)["loss"].backward()
    opt.step()
    if rank == 0:
        torch.save({k: v.detach() for k, v in model.state_dict().items()}, out)
    dist.destroy_process_group()


def test_ddp_two_processes_equal_one_process_with_the_global_batch(tmp_path):
    """One step on 2 gloo processes with 2 samples each == one process with all 4 (the contrastive loss
    sees the global batch; the caption loss is normalised by the global token count)."""
    import socket

    from mmstory.model import build_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path / "ddp.pt")), nprocs=2)
    torch.manual_seed(0)
    model = build_model(tiny_config())
    build_model_state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = make_batch(model, B=4, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(batch)["loss"].backward()
    opt.step()
    ddp_state = torch.load(tmp_path / "ddp.pt", weights_only=True)
    moved = 0
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp_state[k], v, atol=1e-5, rtol=1e-4, msg=k)
        moved += int(not torch.equal(v, build_model_state[k]))
    assert moved > 10  # the step really changed the parameters


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_torchrun_runs_the_same_command(tmp_path, distributed):
    cfg = tiny_train_config(tmp_path / "run", steps=2, distributed=distributed,
                            **{"data.loader.resampled": True, "data.loader.workers": 1})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "mmstory.cli", "train", str(path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(step_losses(tmp_path / "run")) == [1, 2]
    import mmstory

    mmstory.load(tmp_path / "run" / "model")  # rank 0 saved a complete, unsharded model


def test_cpu_bf16_autocast_training_step_close_to_fp32():
    """The main job trains under bf16 autocast on the CPU: losses stay within bf16 rounding of fp32 and
    every gradient is finite (the image, audio and question paths included)."""
    from mmstory.model import build_model

    torch.manual_seed(0)
    model = build_model(tiny_config(fusion="cross_attention")).train()
    batch = make_batch(model, B=4, question=True)
    ref = model(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(batch)
    for key in ("loss", "caption_loss", "contrastive_image_text_loss", "contrastive_audio_text_loss"):
        torch.testing.assert_close(low[key].float(), ref[key], atol=0.05, rtol=0.02, msg=key)
    low["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_bf16_warning_only_on_x86_without_native_bf16(monkeypatch):
    import mmstory.train as tr

    monkeypatch.setattr(tr.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert tr.cpu_has_native_bf16() is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert tr.cpu_has_native_bf16() is True
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(tr.platform, "machine", lambda: "aarch64")
    assert tr.cpu_has_native_bf16() is None  # not checked on other CPU families: no warning, and auto -> fp32


def test_precision_auto_is_bf16_only_where_native(monkeypatch):
    """On an AVX2-only x86 CPU bf16 autocast made the main job's step 20x slower than fp32, so ``auto``
    takes bf16 only where the CPU is known to compute it natively."""
    import mmstory.train as tr

    cpu = torch.device("cpu")
    monkeypatch.setattr(tr, "cpu_has_native_bf16", lambda: True)
    assert tr.resolve_precision("auto", cpu) == "bf16"
    for answer in (False, None):
        monkeypatch.setattr(tr, "cpu_has_native_bf16", lambda: answer)
        assert tr.resolve_precision("auto", cpu) == "fp32"
    assert [tr.resolve_precision(p, cpu) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]


def test_time_budget_plans_fewer_steps_and_resume_keeps_the_plan(tmp_path, monkeypatch):
    """When the steps would not fit in max_minutes, the run plans fewer at the end of warmup and its cosine
    ends at the new last step; a resumed run keeps that plan and repeats the lost steps exactly. Also: the
    saved config records what ``precision: auto`` resolved to."""
    import shutil

    import mmstory.schedule
    import mmstory.train as tr

    d = tiny_train_config(tmp_path / "run", steps=24, ckpt_every=6, max_minutes=10.0, precision="auto", threads=0)
    asked = []

    def fit(step, elapsed_s, seconds_per_step, **budget):
        asked.append((step, seconds_per_step > 0))
        return 14

    monkeypatch.setattr(mmstory.schedule, "steps_that_fit", fit)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(d))
    out = tr.train(load_config(TrainConfig, path))
    assert asked == [(10, True)]  # once, at the end of warmup (at least 10 steps in)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 10, "planned_steps": 14} in rows
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, 15))
    last_lr = [r["lr"] for r in rows if "lr" in r][-1]
    assert last_lr == pytest.approx(d["optim"]["lr"] * d["optim"]["min_lr_ratio"])  # the cosine ended
    assert yaml.safe_load((out / "config.yaml").read_text())["precision"] == tr.resolve_precision("auto", torch.device("cpu"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "step_000012", "step_000014"]
    # a crash after step 12: --resume trains to the planned 14, not the configured 24, with the same losses
    shutil.rmtree(out / "checkpoints" / "step_000014")
    resumed = run_cli(d, tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_000012" in resumed.stdout
    assert step_losses(out) == losses


def test_time_budget_replans_with_a_continuous_schedule_and_resume_keeps_it(tmp_path, monkeypatch):
    """A budgeted run re-plans its last step every 1/8 of the steps left (at least 10): longer when the
    measured rate allows, shorter when not. The learning rate keeps falling through each change and ends at
    ``lr * min_lr_ratio`` at the last step; a resume from a checkpoint after the changes keeps them."""
    import shutil

    import mmstory.schedule
    import mmstory.train as tr

    d = tiny_train_config(tmp_path / "run", steps=40, ckpt_every=6, max_minutes=10.0)
    plans = iter([22, 34, 32])  # step 10: fewer; step 20: more again; step 30: a little fewer
    asked = []

    def fit(step, elapsed_s, seconds_per_step, **budget):
        asked.append(step)
        return next(plans)

    monkeypatch.setattr(mmstory.schedule, "steps_that_fit", fit)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(d))
    workers_before = set(multiprocessing.active_children())
    out = tr.train(load_config(TrainConfig, path))
    # the loader workers are shut down when train() returns (they used to live on until a garbage collection,
    # and processes forked later, e.g. the next loader's workers, inherited them)
    assert set(multiprocessing.active_children()) <= workers_before
    assert asked == [10, 20, 30]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["planned_steps"]) for r in rows if "planned_steps" in r] == [(10, 22), (20, 34), (30, 32)]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert sorted(lrs) == list(range(1, 33))
    after_warmup = [lrs[s] for s in range(2, 33)]
    # a cosine recomputed over the new total would jump up at step 20 (position 17/20 -> 19/32)
    assert all(b < a for a, b in zip(after_warmup, after_warmup[1:])), after_warmup
    assert lrs[32] == pytest.approx(d["optim"]["lr"] * d["optim"]["min_lr_ratio"])
    shutil.rmtree(out / "checkpoints" / "step_000032")  # a crash after step 30
    resumed = run_cli(d, tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_000030" in resumed.stdout
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["lr"] for r in rows if "lr" in r} == pytest.approx(lrs)


def test_fused_question_is_recorded_in_the_saved_model(tmp_path):
    res = run_cli(tiny_train_config(tmp_path / "run", steps=1, **{"data.loader.fuse_question": True}), tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    saved = yaml.safe_load((tmp_path / "run" / "model" / "config.yaml").read_text())
    assert saved["fuse_question"] is True
    bad = run_cli(tiny_train_config(tmp_path / "bad", steps=1, **{"model.fuse_question": True}), tmp_path)
    assert bad.returncode != 0 and "set data.loader.fuse_question: true" in bad.stderr


# ------------------------------------------------------------------------------------------------ run folders
def test_a_second_run_into_a_finished_run_is_refused(reference_run, tmp_path):
    """Without --resume or --overwrite a run never replaces another; the refusal is one line and leaves the
    earlier run's files as they were. --resume with another number of steps is refused the same way."""
    before = {p: p.stat().st_mtime_ns for p in reference_run.rglob("*") if p.is_file()}
    cfg = tiny_train_config(reference_run)
    res = run_cli(cfg, tmp_path)
    assert res.returncode != 0
    assert f"run folder {reference_run} already holds a finished run (model/); --resume continues it, " \
           "--overwrite replaces it" in res.stderr
    assert "Traceback" not in res.stderr
    res = run_cli(cfg, tmp_path, "--resume", "--steps=12")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "--resume: config key 'steps' is 12 but the run in" in res.stderr and "was started with 6" in res.stderr
    assert "--init_from=" in res.stderr
    after = {p: p.stat().st_mtime_ns for p in reference_run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == {p: t for p, t in before.items() if p.name != ".lock"}  # config.yaml not rewritten either


def test_guard_and_overwrite_remove_only_what_a_run_writes(tmp_path):
    from mmstory.checkpoints import RunFolderError, guard_run_folder, previous_run

    run = tmp_path / "run"
    (run / "checkpoints" / "step_000002").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "notes.txt").write_text("mine")
    assert previous_run(run) == "checkpoints (step_000002)"
    with pytest.raises(RunFolderError, match="already holds checkpoints"):
        guard_run_folder(run, resume=False, overwrite=False)
    guard_run_folder(run, resume=True, overwrite=False)  # continuing is fine
    with pytest.raises(RunFolderError, match="give one of them"):
        guard_run_folder(run, resume=True, overwrite=True)
    guard_run_folder(run, resume=False, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"] and previous_run(run) is None


def test_run_lock_refuses_a_second_process_and_dies_with_its_holder(tmp_path):
    import signal
    import time

    from mmstory.checkpoints import RunFolderError, RunLock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mmstory.checkpoints import RunLock\n"
                               f"with RunLock(__import__('pathlib').Path({str(tmp_path)!r})):\n"
                               "    print('locked', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=rf"run folder {tmp_path} is in use by another training process "
                                                 rf"\(pid {holder.pid}\)"):
            RunLock(tmp_path).__enter__()
        import mmstory.train as tr  # train() takes the lock before it builds or writes anything

        with pytest.raises(RunFolderError, match="is in use by another training process"):
            tr.train(TrainConfig(out_dir=str(tmp_path)))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    time.sleep(0.1)
    with RunLock(tmp_path):  # kill -9 released it: no stale lock
        pass


def test_resume_skips_a_truncated_checkpoint_and_a_stale_swap_folder(reference_run, tmp_path):
    """A kill during the best-checkpoint swap leaves best.old; a crash while the disk filled leaves a truncated
    latest checkpoint. --resume repairs the one, skips the other (saying so), resumes from the checkpoint
    before it and repeats the lost steps exactly."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    shutil.rmtree(run / "model")
    shutil.copytree(run / "checkpoints" / "best", run / "checkpoints" / "best.old")
    weights = run / "checkpoints" / "step_000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    res = run_cli(tiny_train_config(run), tmp_path, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "checkpoints: removed best.old, left by an interrupted checkpoint swap" in res.stdout
    assert f"warning: skipping checkpoint {run / 'checkpoints' / 'step_000006'} that does not load" in res.stdout
    assert f"resumed from {run / 'checkpoints' / 'step_000004'} at step 4" in res.stdout
    assert step_losses(run) == step_losses(reference_run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "step_000004", "step_000006"]


def test_recover_finishes_or_undoes_an_interrupted_swap(tmp_path):
    from mmstory.checkpoints import recover

    ck = tmp_path / "checkpoints"
    for name, files in (("best.old", ["model.safetensors"]), ("best.tmp", ["model.safetensors", "trainer_state.pt"]),
                        ("step_000004.old", ["model.safetensors"]), ("step_000004.tmp", ["model.safetensors"]),
                        ("step_000002.tmp", [])):
        (ck / name).mkdir(parents=True)
        for f in files:
            (ck / name / f).write_text(name)
    done = recover(ck)
    assert sorted(p.name for p in ck.iterdir()) == ["best", "step_000004"]
    assert (ck / "best" / "model.safetensors").read_text() == "best.tmp"  # the complete new one won
    assert (ck / "step_000004" / "model.safetensors").read_text() == "step_000004.old"  # put back
    assert len(done) == 4


def test_every_damaged_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    from mmstory.checkpoints import RunFolderError, load_latest
    from mmstory.model import build_model

    ck = tmp_path / "checkpoints"
    (ck / "step_000002").mkdir(parents=True)
    (ck / "step_000002" / "trainer_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunFolderError, match=r"no checkpoint in .* loads \(step_000002: .*--overwrite"):
        load_latest(ck, build_model(tiny_config()), torch.device("cpu"), log=lambda *_: None)
    assert load_latest(tmp_path / "none", build_model(tiny_config()), torch.device("cpu")) is None


def test_a_shard_shorter_than_its_manifest_stops_the_run_before_it_starts(tmp_path):
    """Sizes of the local shards are checked against the manifest at start (mmstory data verify does the rest)."""
    from mmstory.data.manifest import ManifestError
    from mmstory.train import check_data

    manifest = json.loads((ROOT / "data_manifests/emoji.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            shard["path"] = str(ROOT / "data_manifests" / shard["path"])
    shard = manifest["splits"]["val_novel"]["shards"][0]
    short = tmp_path / "val_novel-000000.tar"
    short.write_bytes(Path(shard["path"]).read_bytes()[:100_000])
    shard["path"] = str(short)
    manifest["tokenizer"] = str(ROOT / "data_manifests" / manifest["tokenizer"])
    manifest["card"] = str(ROOT / "data_manifests" / manifest["card"])
    path = tmp_path / "emoji.json"
    path.write_text(json.dumps(manifest))
    cfg = TrainConfig()
    cfg.data.manifest = str(path)
    with pytest.raises(ManifestError, match=r"val_novel-000000.tar: size mismatch \(expected [\d,]+ bytes, got 100,000\)"):
        check_data(cfg)
    cfg.data.val = ["val_style", "val_nouvel"]
    with pytest.raises(ManifestError, match="has no split 'val_nouvel'"):
        check_data(cfg)


def test_lr_multipliers_by_module_scale_their_groups_and_follow_the_schedule():
    """optim.lr_mult gives a module's parameters lr * multiplier (longest path wins), decay rules unchanged; the
    LambdaLR schedule scales every group alike; a path that is not a module is named."""
    from mmstory.model import build_model
    from mmstory.train import param_groups

    model = build_model(tiny_config())
    groups = param_groups(model, 0.05, 1e-3, {"encoders": 0.5, "encoders.text": 0.1})
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        want = 1e-4 if name.startswith("encoders.text.") else 5e-4 if name.startswith("encoders.") else 1e-3
        assert lr_of[id(p)] == pytest.approx(want), name
        assert decay_of[id(p)] == (0.05 if p.dim() >= 2 else 0.0), name
    assert groups[0]["lr"] == 1e-3  # the logged lr is the base one
    opt = torch.optim.AdamW(groups, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    opt.step()
    sched.step()
    assert sorted({round(g["lr"], 12) for g in opt.param_groups}) == [5e-5, 2.5e-4, 5e-4]
    with pytest.raises(ValueError, match=r"'optim.lr_mult': no module 'encoders.txt' in the model; modules here: .*encoders.text"):
        param_groups(model, 0.05, 1e-3, {"encoders.txt": 0.1})
    # without multipliers: the two groups of before, in the same order (checkpoints of earlier runs resume)
    plain = param_groups(model, 0.05)
    assert [g["weight_decay"] for g in plain] == [0.05, 0.0] and "lr" not in plain[0]


@pytest.mark.parametrize("override, message", [
    ("--keep_last=0", "config key 'keep_last': must be an integer >= 1, got 0"),
    ("--optim.lr=-1", "config key 'optim.lr': must be > 0, got -1.0"),
    ("--optim.betas=[1.5,0.9]", "config key 'optim.betas': must be two numbers in [0, 1), got [1.5, 0.9]"),
    ("--optim.min_lr_ratio=2", "config key 'optim.min_lr_ratio': must be a number in [0, 1], got 2"),
    ("--optim.lr_mult={encoders.text: -1}", "config key 'optim.lr_mult.encoders.text': must be >= 0, got -1.0"),
    ("--report.tasks=[nope]", "config key 'report.tasks': must be a list of caption, qa, retrieval, zeroshot"),
    ("--data.weights.video=1", "config key 'data.weights': must be weights of the sources in data.train"),
    ("--max_minutes=-1", "config key 'max_minutes': must be >= 0 (0: no budget), got -1"),
    ("--data.loader.batch_size=0", "data.loader.batch_size must be an integer >= 1, got 0"),
    ("--data.loader.crop_scale=[0.9,0.5]", "data.loader.crop_scale must be [low, high] with 0 < low <= high <= 1"),
])
def test_training_config_values_are_checked_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, ROOT / "experiments/emoji_tiny.yaml", [override])
    assert str(e.value).startswith(message)


def test_a_full_disk_while_checkpointing_names_the_checkpoint_and_keeps_the_previous(tmp_path, monkeypatch):
    """torch.save into a full disk raises "enforce fail at inline_container.cc"; the trainer reports it as
    ENOSPC with the checkpoint's path (one line on the command line), removes the half-written folder and
    leaves the previous checkpoint as it was."""
    import errno

    import mmstory.checkpoints as ck
    from mmstory.cli import user_error_message
    from mmstory.model import build_model

    model, folder = build_model(tiny_config()), tmp_path / "checkpoints" / "step_000002"
    opt = torch.optim.AdamW(model.parameters())
    ck.save_checkpoint(folder, model, opt, None, {"step": 2}, {})
    before = (folder / "model.safetensors").read_bytes()

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4416 vs 4306")

    monkeypatch.setattr(ck.torch, "save", full)
    with pytest.raises(OSError) as e:
        ck.save_checkpoint(folder, model, opt, None, {"step": 4}, {})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(folder) + ".tmp"
    assert user_error_message(e.value) == f"no space left on device while writing {folder}.tmp"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["step_000002"]
    assert (folder / "model.safetensors").read_bytes() == before
