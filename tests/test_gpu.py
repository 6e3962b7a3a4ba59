"""CUDA: the same equalities the CPU tests check, on the GPU (fast path == full path, cache == no cache,
a CPU-saved model gives the same outputs on the GPU), plus bf16 autocast, torch.compile and a real
training run on the bundled shards. Skipped without a CUDA device (conftest: marker ``gpu``)."""
from __future__ import annotations

import pytest
import torch

from conftest import make_batch, tiny_config
from mmstory.generation import DecodeOptions, generate
from mmstory.model import build_model, load

pytestmark = pytest.mark.gpu
CUDA = "cuda"


@pytest.fixture
def pair():
    """The same tiny model on the CPU and on the GPU, and one batch for each (fp32, TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    cpu = build_model(tiny_config(fusion="cross_attention")).train()
    gpu = build_model(tiny_config(fusion="cross_attention")).to(CUDA).train()
    gpu.load_state_dict(cpu.state_dict())
    batch = make_batch(cpu, B=4, question=True)
    return cpu, gpu, batch, {k: v.to(CUDA) for k, v in batch.items()}


def test_gpu_losses_and_grads_equal_cpu(pair):
    cpu, gpu, b_cpu, b_gpu = pair
    out_c, out_g = cpu(b_cpu), gpu(b_gpu)
    for key in ("loss", "caption_loss", "contrastive_image_text_loss", "contrastive_audio_text_loss"):
        torch.testing.assert_close(out_g[key].cpu(), out_c[key], atol=1e-5, rtol=1e-4, msg=key)
    out_c["loss"].backward()
    out_g["loss"].backward()
    for (name, pc), pg in zip(cpu.named_parameters(), gpu.parameters()):
        if pc.grad is not None:
            torch.testing.assert_close(pg.grad.cpu(), pc.grad, atol=1e-5, rtol=1e-3, msg=name)


def test_gpu_fast_path_equals_full_logits_path(pair):
    _, gpu, _, batch = pair
    full, fast = gpu(batch, full_logits=True), gpu(batch)
    scored = batch["target_mask"][:, 1:]
    torch.testing.assert_close(fast["target_logits"], full["logits"][:, :-1][scored])
    torch.testing.assert_close(fast["loss"], full["loss"])


def test_gpu_bf16_autocast_close_to_fp32(pair):
    _, gpu, _, batch = pair
    ref = gpu(batch)
    with torch.autocast(CUDA, dtype=torch.bfloat16):
        low = gpu(batch)
    assert torch.isfinite(low["loss"])
    torch.testing.assert_close(low["caption_loss"].float(), ref["caption_loss"], atol=0.05, rtol=0.02)


def test_gpu_compiled_training_step_equals_eager(pair):
    """torch.compile of forward + loss (as ``train.compile`` and the bench use it) gives the eager loss
    and gradients; the fast path's boolean selection is a graph break, not an error."""
    _, gpu, _, batch = pair
    eager = gpu(batch)["loss"]
    g_eager = torch.autograd.grad(eager, list(gpu.parameters()), allow_unused=True)
    compiled = torch.compile(lambda b: gpu(b)["loss"])
    loss = compiled(batch)
    g_comp = torch.autograd.grad(loss, list(gpu.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, eager, atol=1e-5, rtol=1e-4)
    for (name, _), a, b in zip(gpu.named_parameters(), g_comp, g_eager):
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3, msg=name)


@pytest.mark.parametrize("beams", [1, 3])
def test_gpu_generation_cache_equals_nocache_and_cpu(pair, beams):
    cpu, gpu, b_cpu, _ = pair
    cpu.eval(), gpu.eval()
    with torch.no_grad():
        for m in (cpu, gpu):
            m.decoder.tok.weight.mul_(8)  # less uniform, so greedy choices are not float-noise ties
    tok = cpu.tokenizer
    ids = torch.full((4, 1), tok.bos_id)
    mask = torch.ones_like(ids, dtype=torch.bool)
    outs = []
    for model, dev in ((cpu, "cpu"), (gpu, CUDA), (gpu, CUDA)):
        fused = model.fuse(model.encode({"image": b_cpu["image"].to(dev)}))
        outs.append(generate(model.decoder, fused["tokens"], fused["mask"], ids.to(dev), mask.to(dev),
                             eos_id=tok.eos_id, pad_id=tok.pad_id,
                             opts=DecodeOptions(max_new_tokens=12, num_beams=beams, use_cache=len(outs) != 2)))
    assert outs[1] == outs[2] == outs[0]


def test_cpu_saved_model_loads_on_gpu(tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    batch = make_batch(model, B=3)
    model.save(tmp_path / "m")
    on_gpu = load(tmp_path / "m", map_location=CUDA)
    assert next(on_gpu.parameters()).device.type == "cuda"
    with torch.no_grad():
        torch.testing.assert_close(on_gpu({k: v.to(CUDA) for k, v in batch.items()})["loss"].cpu(),
                                   model(batch)["loss"], atol=1e-4, rtol=1e-4)


def test_gpu_bf16_compiled_training_run_on_bundled_shards(tmp_path):
    """The trainer end to end on CUDA: bf16 autocast, fused AdamW, torch.compile, checkpoints, final model."""
    from test_train import run_cli, step_losses, tiny_train_config

    res = run_cli(tiny_train_config(tmp_path / "run", device="cuda", precision="bf16", compile=True), tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    losses = step_losses(tmp_path / "run")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(v["loss"])) for v in losses.values())
    assert (tmp_path / "run/model/model.safetensors").is_file()
