"""Compression: int8 weights (outputs close to float, save -> load without pickle), pruning (masks applied, kept
through a fine-tune and saved; structured pruning rebuilds at its new size), distillation (the loss equals a
direct computation; a run with a teacher trains and logs its terms)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import make_batch, tiny_config
from mmstory.compress.prune import (PruneMasks, load_masks, model_sparsity, prune, prune_mlp_channels, ratio_for,
                                    save_masks)
from mmstory.compress.quantize import Int8Linear, linear_weight_bytes, quantize_linear, quantize_rows
from mmstory.losses.distill import similarity_kl, soft_kl

ROOT = Path(__file__).resolve().parents[1]
fbgemm = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="needs FBGEMM (x86)")


def _trained_tiny(steps: int = 60):
    """A tiny model fitted for a few steps on one synthetic batch, so its weights are not the initial ones and
    its greedy captions are a real decision (margins between tokens), not ties of an untrained model."""
    from mmstory.model import build_model

    torch.manual_seed(0)
    model = build_model(tiny_config(audio=False))
    batch = make_batch(model, B=4, audio=False)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        model(batch)["loss"].backward()
        opt.step()
    return model.eval(), batch


def test_quantize_rows_round_trip_error_is_half_a_step():
    w = torch.randn(64, 48)
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    assert int(q.abs().max()) == 127  # each row's largest weight maps to +-127
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())


@fbgemm
def test_int8_linear_matches_the_float_layer_within_quantization_error():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    q = Int8Linear.from_float(lin)
    x = torch.randn(3, 7, 96)
    with torch.no_grad():
        ref, out = lin(x), q(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    # 8-bit weights and 7-bit activations: relative error ~1 %
    assert float((out - ref).norm() / ref.norm()) < 0.03
    # bf16 in, bf16 out (autocast callers); CUDA/CPU-without-FBGEMM path: the dequantized float matmul
    with torch.no_grad():
        assert q(x.bfloat16()).dtype == torch.bfloat16
        deq = torch.nn.functional.linear(x, q.dequantized(), q.bias)
    assert float((out - deq).norm() / deq.norm()) < 0.03


@fbgemm
def test_quantized_model_stays_close_to_float_and_decodes_the_same(tmp_path):
    """The stated tolerance: decoder log-probabilities within 0.15 (max abs), embeddings cosine > 0.99, and the
    same greedy tokens on the fixture."""
    model, batch = _trained_tiny()
    with torch.no_grad():
        ref = model(batch, full_logits=True)
        ref_caps = model.generate({"image": batch["image"]}, max_new_tokens=8)
        before = linear_weight_bytes(model)
        names = quantize_linear(model)
        assert names and all(isinstance(model.get_submodule(n), Int8Linear) for n in names)
        assert not any(isinstance(m, nn.Linear) for m in model.modules())
        assert before / linear_weight_bytes(model) > 3.5
        out = model(batch, full_logits=True)
        caps = model.generate({"image": batch["image"]}, max_new_tokens=8)
    mask = batch["tokens_mask"]
    diff = (out["logits"].log_softmax(-1) - ref["logits"].log_softmax(-1)).abs()[mask]
    assert float(diff.max()) < 0.15
    for m in ref["embeds"]:
        assert float(torch.cosine_similarity(out["embeds"][m], ref["embeds"][m]).min()) > 0.99
    assert caps == ref_caps


@fbgemm
def test_quantize_command_saves_safetensors_only_and_loads_with_mmstory_load(tmp_path):
    import mmstory

    model, batch = _trained_tiny(20)
    model.save(tmp_path / "float")
    res = subprocess.run([sys.executable, "-m", "mmstory.cli", "compress", "quantize", str(tmp_path / "float"),
                          str(tmp_path / "int8"), "--skip", "decoder.lm_head"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "x smaller" in res.stdout
    files = {p.name for p in (tmp_path / "int8").rglob("*") if p.is_file()}
    assert "model.safetensors" in files and not any(f.endswith((".pt", ".pth", ".bin", ".pkl")) for f in files)
    loaded = mmstory.load(tmp_path / "int8")
    assert loaded.config.quantize == "int8" and loaded.config.quantize_skip == ["decoder.lm_head"]
    assert isinstance(loaded.decoder.blocks[0].mlp.fc, Int8Linear)
    assert isinstance(loaded.decoder.lm_head, nn.Linear)  # skipped: stays float (and tied)
    assert loaded.decoder.lm_head.weight.data_ptr() == loaded.decoder.tok.weight.data_ptr()
    # the same int8 model in memory and after the round trip: identical outputs
    direct = mmstory.load(tmp_path / "float")
    quantize_linear(direct, ["decoder.lm_head"])
    with torch.no_grad():
        a, b = direct(batch, full_logits=True), loaded(batch, full_logits=True)
    assert torch.equal(a["logits"], b["logits"])
    info = subprocess.run([sys.executable, "-m", "mmstory.cli", "compress", "info", str(tmp_path / "int8")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert json.loads(info.stdout)["quantize"] == "int8"
    again = subprocess.run([sys.executable, "-m", "mmstory.cli", "compress", "quantize", str(tmp_path / "int8"),
                            str(tmp_path / "twice")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 2 and "already quantized" in again.stderr


def test_unstructured_masks_hit_the_amount_stay_applied_and_save(tmp_path):
    model, batch = _trained_tiny(5)
    model.train()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = prune(model, "unstructured", 0.6, log=lambda *_: None)
    assert abs(masks.sparsity() - 0.6) < 0.01
    assert abs(model_sparsity(model) - masks.sparsity()) < 1e-6
    assert "decoder.lm_head.weight" not in masks.masks and "decoder.tok.weight" not in masks.masks
    # one global threshold: every pruned weight was smaller in magnitude than every kept one
    kept = torch.cat([original[n][m].abs() for n, m in masks.masks.items()])
    gone = torch.cat([original[n][~m].abs() for n, m in masks.masks.items()])
    assert float(gone.max()) <= float(kept.min())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):  # a fine-tune step moves every weight; apply() puts the pruned ones back to zero
        opt.zero_grad()
        model(batch)["loss"].backward()
        opt.step()
        masks.apply(model)
    assert abs(model_sparsity(model) - masks.sparsity()) < 1e-6
    save_masks(masks, tmp_path)
    loaded = load_masks(tmp_path)
    assert loaded.masks.keys() == masks.masks.keys()
    assert all(torch.equal(loaded.masks[k], masks.masks[k]) for k in masks.masks)


def test_global_magnitude_threshold():
    lin = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        lin[0].weight.copy_(torch.tensor([[1.0, -2.0, 3.0, -4.0], [5.0, 6.0, 7.0, 8.0]]))
        lin[1].weight.copy_(torch.tensor([[0.5, -9.0], [2.5, 10.0]]))
    masks = PruneMasks.magnitude(lin, 0.5)  # 12 weights: the 6 smallest |w| (0.5, 1, 2, 2.5, 3, 4) go
    assert masks.masks["0.weight"].tolist() == [[False, False, False, False], [True, True, True, True]]
    assert masks.masks["1.weight"].tolist() == [[False, True], [False, True]]


def test_structured_pruning_shrinks_mlps_and_the_saved_model_rebuilds(tmp_path):
    import mmstory

    model, batch = _trained_tiny(5)
    before = sum(p.numel() for p in model.parameters())
    hidden = model.decoder.blocks[0].mlp.fc.out_features
    kept = prune_mlp_channels(model, 0.5)
    assert kept["decoder"] == hidden // 2 and "encoders.text" in kept
    assert all(b.mlp.fc.out_features == hidden // 2 and b.mlp.proj.in_features == hidden // 2
               for b in model.decoder.blocks)
    assert sum(p.numel() for p in model.parameters()) < before
    with torch.no_grad():
        out = model(batch, full_logits=True)
    model.save(tmp_path / "m")
    loaded = mmstory.load(tmp_path / "m")
    assert loaded.decoder.blocks[0].mlp.fc.out_features == hidden // 2
    with torch.no_grad():
        assert torch.allclose(loaded(batch, full_logits=True)["logits"], out["logits"])
    for width, keep in ((192, 384), (192, 383), (32, 17), (7, 3)):
        assert int(width * ratio_for(width, keep)) == keep


def test_structured_pruning_keeps_the_strongest_channels():
    from mmstory.layers import MLP

    mlp = MLP(2, 4)
    with torch.no_grad():
        mlp.fc.weight.copy_(torch.tensor([[1.0, 0], [0.1, 0], [3.0, 0], [0.2, 0]]))
        mlp.proj.weight.copy_(torch.ones(2, 4))
    from mmstory.compress.prune import _shrink

    _shrink(mlp, 2)
    assert mlp.fc.weight[:, 0].tolist() == [1.0, 3.0]  # channels 0 and 2, in their order


def test_soft_kl_equals_a_direct_computation():
    torch.manual_seed(0)
    s, t, T = torch.randn(5, 7), torch.randn(5, 7), 2.0
    ps, pt = (s / T).softmax(-1), (t / T).softmax(-1)
    direct = sum(float((pt[i] * (pt[i].log() - ps[i].log())).sum()) for i in range(5)) / 5 * T * T
    assert math.isclose(float(soft_kl(s, t, T)), direct, rel_tol=1e-5)
    assert float(soft_kl(t, t, T)) == pytest.approx(0.0, abs=1e-6)
    # log-probabilities (a copy head's output) soften the same as the logits they came from
    assert math.isclose(float(soft_kl(s.log_softmax(-1), t.log_softmax(-1), T)), direct, rel_tol=1e-5)
    with pytest.raises(ValueError, match="share the tokenizer"):
        soft_kl(s, t[:, :6], T)


def test_similarity_kl_equals_a_direct_computation():
    torch.manual_seed(0)
    norm = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    st = {"image": norm(torch.randn(4, 8)), "text": norm(torch.randn(4, 8))}
    te = {"image": norm(torch.randn(4, 16)), "text": norm(torch.randn(4, 16))}  # another width
    scale = torch.tensor(10.0)
    S, Tm = 10 * st["image"] @ st["text"].T, 10 * te["image"] @ te["text"].T

    def kl_rows(a, b):  # KL(softmax(b) || softmax(a)), mean over rows
        pa, pb = a.softmax(-1), b.softmax(-1)
        return float((pb * (pb.log() - pa.log())).sum(-1).mean())

    direct = (kl_rows(S, Tm) + kl_rows(S.T, Tm.T)) / 2
    got = similarity_kl(st, te, [("image", "text"), ("audio", "text")], scale, scale)
    assert math.isclose(float(got), direct, rel_tol=1e-5)
    assert similarity_kl(st, te, [("audio", "text")], scale, scale) is None


def test_distillation_and_pruning_runs(tmp_path):
    """A tiny teacher run, then a student distilled from it (its loss terms logged), then the teacher pruned
    (structured) and fine-tuned: each run's model loads."""
    import mmstory
    from test_train import run_cli, step_losses, tiny_train_config

    teacher = tmp_path / "teacher"
    res = run_cli(tiny_train_config(teacher, steps=4), tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    student_cfg = tiny_train_config(tmp_path / "student", steps=4, **{"distill.teacher": str(teacher / "model"),
                                                                      "model.decoder.depth": 1})
    res = run_cli(student_cfg, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    losses = step_losses(tmp_path / "student")
    assert all("distill_caption_loss" in v and v["distill_caption_loss"] > 0 for v in losses.values())
    assert any("distill_embed_loss" in v for v in losses.values())
    assert len(mmstory.load(tmp_path / "student" / "model").decoder.blocks) == 1

    pruned = tiny_train_config(tmp_path / "pruned", steps=2, init_from=str(teacher / "model"),
                               **{"prune.kind": "structured", "prune.amount": 0.5})
    res = run_cli(pruned, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "pruned (structured)" in res.stdout
    m = mmstory.load(tmp_path / "pruned" / "model")
    assert m.decoder.blocks[0].mlp.fc.out_features == 64  # 32 * 4 / 2

    sparse = tiny_train_config(tmp_path / "sparse", steps=2, init_from=str(teacher / "model"),
                               **{"prune.kind": "unstructured", "prune.amount": 0.5})
    res = run_cli(sparse, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    m = mmstory.load(tmp_path / "sparse" / "model")
    masks = load_masks(tmp_path / "sparse" / "model")
    assert abs(masks.sparsity() - 0.5) < 0.01 and model_sparsity(m) >= masks.sparsity() - 1e-6

    bad = tiny_train_config(tmp_path / "bad", steps=2, **{"prune.kind": "structured"})
    res = run_cli(bad, tmp_path)
    assert res.returncode == 2 and "init_from" in res.stderr


@fbgemm
def test_quantized_model_works_in_every_entry_point(tmp_path):
    """caption / answer / embed_* from Python, `mmstory eval` on a bundled split, and `mmstory serve`'s app."""
    import numpy as np
    from fastapi.testclient import TestClient

    import mmstory
    from mmstory.serve.app import ServeSettings, create_app

    model, _ = _trained_tiny(5)
    quantize_linear(model)
    model.config.quantize = "int8"
    model.save(tmp_path / "q")
    q = mmstory.load(tmp_path / "q")
    image = (np.random.RandomState(0).rand(40, 40, 3) * 255).astype(np.uint8)
    assert len(mmstory.caption(q, [image, image], max_new_tokens=4)) == 2
    assert isinstance(mmstory.answer(q, question="what is shown?", image=image, max_new_tokens=4), str)
    assert mmstory.embed_images(q, [image]).shape == (1, 16) and mmstory.embed_texts(q, ["a cat"]).shape == (1, 16)
    res = subprocess.run([sys.executable, "-m", "mmstory.cli", "eval", str(tmp_path / "q"), "--data",
                          str(ROOT / "data_manifests/emoji.json"), "--split", "val_style", "--max-samples", "8",
                          "--tasks", "caption,retrieval", "--max-new-tokens", "4", "--reference", "none", "--quiet",
                          "--out", str(tmp_path / "eval")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "eval" / "val_style" / "report.md").is_file()
    with TestClient(create_app(q, ServeSettings(max_batch=4, max_wait_ms=5))) as client:
        r = client.post("/v1/caption", files={"image": ("a.png", _png(image), "image/png")},
                        data={"max_new_tokens": "4"})
        assert r.status_code == 200, r.text
        assert r.json()["caption"] == mmstory.caption(q, [image], max_new_tokens=4)[0]


def _png(array) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
