"""The benchmark's code paths on tiny shapes (no timings are asserted), and the shape mapping between
mmstory and open_clip CoCa that makes its comparison fair."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments" / "bench"))
import bench  # noqa: E402

from mmstory.losses.captioning import CaptionLoss  # noqa: E402


@pytest.mark.parametrize("name", ["smoke", "tiny", "small", "main"])
def test_coca_and_mmstory_shapes_match(name):
    s = bench.SHAPES[name]
    coca = bench.coca_shape(bench.build_coca(s))
    ours = bench.mmstory_shape(bench.build_mmstory(s))
    assert coca == ours
    expected = {"image_size": s.image_size, "patch_size": s.patch_size, "vision_width": s.vision_width,
                "vision_depth": s.vision_depth, "vision_heads": s.vision_heads, "text_width": s.text_width,
                "text_depth": s.text_depth, "text_heads": s.text_heads, "decoder_width": s.text_width,
                "decoder_depth": s.decoder_depth, "decoder_heads": s.text_heads, "context_length": s.context_length,
                "vocab_size": s.vocab_size, "decoder_vocab": s.vocab_size, "memory_len": s.memory_len}
    assert ours == expected


def test_synthetic_batch_is_ragged_and_seeded():
    s = bench.SHAPES["smoke"]
    a, b = bench.synthetic_batch(s, seed=1), bench.synthetic_batch(s, seed=1)
    assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["image"], b["image"])
    assert (a["ids"][:, 0] == bench.BOS).all()
    assert ((a["ids"] == bench.EOS).sum(1) == 1).all()
    assert torch.equal(a["mask"], a["ids"] != bench.PAD)


def test_smoke_run_has_every_measurement(tmp_path):
    res = bench.run(smoke=True, isolate=False, log=lambda *_: None)
    assert {"date", "machine", "settings", "shapes", "train", "shape_check", "generate", "data"} <= set(res)
    assert {"cpu", "cores", "torch", "open_clip", "mmstory"} <= set(res["machine"])
    row = res["train"]["smoke"]
    for lib in ("open_clip", "mmstory"):
        assert {"params", "samples_per_s", "samples_per_s_best", "peak_mem_mb", "last_loss"} <= set(row[lib])
        assert row[lib]["samples_per_s"] > 0 and torch.isfinite(torch.tensor(row[lib]["last_loss"])), (lib, row[lib])
    assert {"ratio_samples_per_s", "ratio_peak_mem"} <= set(row)
    gen = res["generate"]["smoke"]["2"]
    for key in ("mmstory_greedy_cache", "mmstory_greedy_nocache", "mmstory_beam4_cache", "mmstory_beam4_nocache",
                "mmstory_greedy_rerun_full_logits", "open_clip_greedy_loop"):
        assert gen[key]["images_per_s"] > 0
    assert gen["greedy_cache_equals_nocache"] and gen["beam4_cache_equals_nocache"] and gen["greedy_cache_equals_rerun"]
    assert {"beam_search", "top_k"} <= set(res["generate"]["smoke"]["open_clip_generate"])
    assert res["data"]["loader"]["samples"] > 0 and res["data"]["ratio_loader_over_train"] > 0
    assert "mmstory / open_clip" in bench.table(res)


def test_caption_loss_equals_sliced_formula_with_gradients():
    """CaptionLoss shifts the targets instead of slicing the logits (it saves a (B, S, V) copy in the
    backward); value and gradient must equal the plain sliced cross-entropy."""
    torch.manual_seed(0)
    tokens = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 5, 8, 2, 0, 0]])
    target = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    got = CaptionLoss()({"logits": logits}, {"tokens": tokens, "target_mask": target})["caption_loss"]
    (g_got,) = torch.autograd.grad(got, logits)
    plain = F.cross_entropy(logits[:, :-1].reshape(-1, 11), tokens[:, 1:].masked_fill(~target[:, 1:], -100).reshape(-1))
    (g_plain,) = torch.autograd.grad(plain, logits)
    torch.testing.assert_close(got, plain)
    torch.testing.assert_close(g_got, g_plain)


def test_time_to_quality_smoke(tmp_path):
    """Both models train for a few seconds and are scored by the same evaluation code; a reused run's
    fuse_question and decoder depth are read from its saved config."""
    import time_to_quality

    res = time_to_quality.main(["--minutes", "0.03", "--max-samples", "4", "--out", str(tmp_path / "ttq"),
                                "--seed", "3", "--report.fit_samples=8"])  # a config override: a smaller fit
    assert set(res["headline"]) == {"mmstory", "open_clip_coca"}
    assert res["seed"] == res["data_seed"] == 3
    for name, per_split in res["headline"].items():
        assert set(per_split) == {"val_style", "val_novel"}
        for split, h in per_split.items():
            assert 0.0 <= h["vqa_accuracy"] <= 1.0 and h["CIDEr"] >= 0.0 and 0.0 <= h["image_to_text_R@1"] <= 1.0
    assert res["train"]["open_clip_coca"]["steps"] >= 1 and res["train"]["mmstory"]["steps"] >= 1
    assert (tmp_path / "ttq" / "results.json").is_file()
    main_job = yaml.safe_load((ROOT / "experiments/emoji_tiny.yaml").read_text())
    from mmstory.train import resolve_precision

    # both models train at the main job's precision, as the trainer resolves it on this machine
    assert res["precision"] == resolve_precision(main_job.get("precision", "fp32"), torch.device("cpu"))
    saved = yaml.safe_load((tmp_path / "ttq" / "mmstory" / "config.yaml").read_text())
    assert saved["precision"] == res["precision"] and saved["seed"] == saved["data"]["loader"]["seed"] == 3
    again = time_to_quality.main(["--minutes", "0.03", "--max-samples", "4", "--out", str(tmp_path / "ttq2"),
                                  "--mmstory-run", str(tmp_path / "ttq" / "mmstory")])
    reused = again["train"]["mmstory:mmstory"]
    assert reused["steps"] == res["train"]["mmstory"]["steps"]
    assert reused["fuse_question"] is main_job["data"]["loader"].get("fuse_question", False) is True  # the main job fuses it
    assert again["headline"]["mmstory:mmstory"] == res["headline"]["mmstory"]


def test_serve_benchmark_runs_both_settings_without_failures(tmp_path):
    """experiments/bench/serve.py end to end on a tiny model, on tiny counts: both settings answer every
    request and the report has its fields (no timing is asserted)."""
    pytest.importorskip("fastapi")
    import serve as serve_bench
    from conftest import tiny_config
    from mmstory.model import build_model

    cfg = tiny_config(audio=False)
    cfg.decoder.max_len = 64
    torch.manual_seed(0)
    build_model(cfg).save(tmp_path / "model")
    res = serve_bench.run(str(tmp_path / "model"), clients=4, requests=8, moderate_clients=2, moderate_requests=4,
                          max_new_tokens=4, n_images=3, threads=1)
    for setting, max_batch in (("batch1", 1), ("batched", 32)):
        assert res[setting]["max_batch"] == max_batch
        for load, n in (("heavy", 8), ("moderate", 4)):
            r = res[setting][load]
            assert r["ok"] == n and r["failures"] == {} and r["p50_ms"] <= r["p99_ms"]
        assert res[setting]["server_stats"]["requests"] == 8 + 8 + 4  # warm-up, heavy, moderate
    assert list(res["batch1"]["server_stats"]["batch_sizes"]) == ["1"]
    assert "max_batch 32 | heavy | 4 | 8 / 0" in serve_bench.table(res)


def test_zeroshot_levers_holds_out_whole_concepts_and_learns_the_rest():
    """experiments/bench/zeroshot_levers.py: both art styles of a held-out concept stay out of training, and the
    trained contrastive path names its training concepts far above chance."""
    import zeroshot_levers

    torch.manual_seed(0)
    names = ["red apple", "blue car", "green tree", "yellow sun", "black cat", "white cloud", "orange fish",
             "purple grape", "brown dog", "pink flower"]
    centres = torch.randn(len(names), 1280)
    data = {"pooled": torch.cat([centres + 0.3 * torch.randn(len(names), 1280) for _ in range(2)]),  # two styles
            "label": names * 2, "concept": [f"c{i}" for i in range(len(names))] * 2,
            "captions": [[n, f"an emoji of a {n}"] for n in names] * 2}
    row = zeroshot_levers.run_arm("frozen", data, fold=0, dev_share=0.2, steps=100, batch=8)
    assert (row["train_images"], row["dev_images"], row["dev_classes"]) == (16, 4, 2)
    assert row["curve"][0]["step"] == 100 and row["text"] == "frozen" and row["steps"] == 100
    assert row["train_zero_shot"] >= 0.75  # chance among the 8 training labels: 0.125
