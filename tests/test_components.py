"""Registry-parametrized contract tests: every registered encoder, fusion and loss gets forward,
backward, shape, no-NaN and masking checks. Registering a component is enough to have it tested."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import yaml

from conftest import TINY_ENCODER_ARGS, make_batch, tiny_config
from mmstory.config import LossSpec
from mmstory.encoders import ENCODERS, Encoder
from mmstory.fusion import FUSIONS
from mmstory.losses import LOSSES
from mmstory.model import build_model
from mmstory.tokenizer import ByteTokenizer

B = 2
PREPROCESS_KEYS = {"image": {"image_size", "mean", "std"}, "audio": {"sample_rate"}, "text": set()}


def build_encoder(name, minilm_path):
    args = dict(TINY_ENCODER_ARGS.get(name, {}))
    if name == "hf_text":
        args = {"path": minilm_path, "pretrained": False}
    return ENCODERS.build(name, args, vocab_size=ByteTokenizer().vocab_size)


def encoder_input(enc, seed=0):
    g = torch.Generator().manual_seed(seed)
    if enc.modality == "image":
        s = enc.preprocess["image_size"]
        return torch.randn(B, 3, s, s, generator=g), None
    if enc.modality == "audio":
        x = torch.randn(B, 8000, generator=g) * 0.1
        return x, torch.arange(8000)[None] < torch.tensor([8000, 5000])[:, None]
    tok = ByteTokenizer() if enc.tokenizer is None else enc.tokenizer
    return tok.batch(["a small cat", "dog"])


def encoder_loss(out):
    return out.tokens[out.mask].pow(2).mean() + out.pooled.pow(2).mean()


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_contract(name, minilm_path):
    torch.manual_seed(0)
    enc = build_encoder(name, minilm_path)
    assert isinstance(enc, Encoder) and enc.modality in PREPROCESS_KEYS
    assert set(enc.preprocess) == PREPROCESS_KEYS[enc.modality]
    assert (enc.max_len is not None) == (enc.modality == "text")
    assert (enc.max_seconds is not None) == (enc.modality == "audio")
    assert enc.tokenizer is None or enc.modality == "text"
    x, mask = encoder_input(enc)
    out = enc(x, mask)
    assert out.tokens.dim() == 3 and out.tokens.shape[0] == B and out.tokens.shape[2] == enc.width
    assert out.mask.shape == out.tokens.shape[:2] and out.mask.dtype == torch.bool
    assert out.pooled.shape == (B, enc.pooled_width)
    encoder_loss(out).backward()
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()
    grads = [p.grad for p in enc.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", sorted(n for n in ENCODERS if n not in ("vit", "timm_cnn", "timm_vit",
                                                                         "torchvision_resnet", "open_clip_visual")))
def test_encoder_padding_is_masked(name, minilm_path):
    """Changing padded positions changes no real token and no pooled vector."""
    torch.manual_seed(0)
    enc = build_encoder(name, minilm_path).eval()
    x, mask = encoder_input(enc)
    x2 = x.clone()
    if enc.modality == "audio":
        x2[~mask] = torch.randn(int((~mask).sum())) * 5
    else:
        x2[~mask] = 7  # any other token id in the padding
    a, b = enc(x, mask), enc(x2, mask)
    real = a.mask
    torch.testing.assert_close(a.tokens[real], b.tokens[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.pooled, b.pooled, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_rebuilds_from_its_checkpoint_args(name, minilm_path, tmp_path):
    """What a saved model's config.yaml holds for the encoder is plain data and builds the same architecture
    (every tensor's name and shape), given what the model build injects, as loading does."""
    enc = build_encoder(name, minilm_path)
    args = yaml.safe_load(yaml.safe_dump(enc.checkpoint_args(tmp_path)))
    rebuilt = ENCODERS.build(name, args, vocab_size=ByteTokenizer().vocab_size, base_dir=str(tmp_path))
    assert {k: t.shape for k, t in rebuilt.state_dict().items()} == {k: t.shape for k, t in enc.state_dict().items()}


# timm's own checkpointing recomputes BatchNorm in training mode, which updates its running statistics again.
RECOUNTS_BATCHNORM = {"timm_cnn"}


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_grad_checkpointing_changes_nothing_but_memory(name, minilm_path):
    """With set_grad_checkpointing(True) training recomputes blocks in backward, and gives the same outputs,
    gradients and buffers (BatchNorm statistics) as without."""
    torch.manual_seed(0)
    plain = build_encoder(name, minilm_path).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x, mask = encoder_input(plain)
    outs, recomputed = [], []
    for enc in (plain, ckpt):
        torch.manual_seed(1)  # the same dropout masks: checkpointing replays the RNG state when it recomputes
        out = enc(x, mask)
        calls = []  # module calls during backward: the recomputation
        hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in enc.modules()]
        encoder_loss(out).backward()
        for h in hooks:
            h.remove()
        outs.append(out)
        recomputed.append(len(calls))
    assert recomputed[0] == 0 and recomputed[1] > 0
    for field in ("tokens", "mask", "pooled"):
        torch.testing.assert_close(getattr(outs[1], field), getattr(outs[0], field))
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m, n=n: f"{n}: {m}")
    if name not in RECOUNTS_BATCHNORM:
        for (n, b), c in zip(plain.named_buffers(), ckpt.buffers()):
            assert torch.equal(c, b), n


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_frozen_encoder_with_grad_checkpointing_builds_no_graph(name, minilm_path):
    """A frozen tower (no trainable parameters, eval mode: ``MultimodalModel.freeze``) stays out of autograd
    with checkpointing on: its outputs need no gradient."""
    enc = build_encoder(name, minilm_path).requires_grad_(False).eval()
    enc.set_grad_checkpointing(True)
    out = enc(*encoder_input(enc))
    assert not out.tokens.requires_grad and not out.pooled.requires_grad


def test_model_takes_only_encoders():
    cfg = tiny_config(audio=False)
    model = build_model(cfg)
    with pytest.raises(TypeError, match="encoder for 'image' is a Linear, not an mmstory.encoders.Encoder"):
        type(model)(encoders={"image": torch.nn.Linear(2, 2)}, fusion=model.fusion, decoder=model.decoder,
                    losses={}, tokenizer=model.tokenizer, dim=cfg.dim, embed_dim=cfg.embed_dim)


SUBSETS = [("image",), ("image", "question"), ("audio",), ("image", "audio")]


def fusion_inputs(subset, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = {"image": 5, "audio": 7, "question": 4}
    out = {}
    for m in subset:
        n = lengths[m]
        mask = torch.ones(B, n, dtype=torch.bool)
        if m != "image":
            mask[1, n - 2:] = False
        out[m] = (torch.randn(B, n, dim, generator=g), mask)
    return out


@pytest.mark.parametrize("name,subset", list(itertools.product(sorted(FUSIONS), SUBSETS)))
def test_fusion_contract(name, subset):
    torch.manual_seed(0)
    fusion = FUSIONS.build(name, {}, dim=32)
    inputs = fusion_inputs(subset)
    for t, _ in inputs.values():
        t.requires_grad_(True)
    out = fusion(inputs)
    tokens, mask = out["tokens"], out["mask"]
    assert tokens.shape[0] == B and tokens.shape[2] == 32 and mask.shape == tokens.shape[:2]
    assert torch.isfinite(tokens).all()
    tokens[mask].sum().backward()
    assert all(torch.isfinite(t.grad).all() for t, _ in inputs.values())
    assert any(t.grad.abs().sum() > 0 for t, _ in inputs.values())


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_fusion_padding_is_masked(name):
    torch.manual_seed(0)
    fusion = FUSIONS.build(name, {}, dim=32).eval()
    inputs = fusion_inputs(("image", "audio", "question"))
    changed = {m: (t.clone(), mk) for m, (t, mk) in inputs.items()}
    for m, (t, mk) in changed.items():
        t[~mk] = 100.0
    a, b = fusion(inputs), fusion(changed)
    torch.testing.assert_close(a["tokens"][a["mask"]], b["tokens"][b["mask"]], atol=1e-5, rtol=1e-5)


def test_weighted_fusion_gates_can_be_read():
    fusion = FUSIONS.build("weighted", {}, dim=32)
    out = fusion(fusion_inputs(("image", "audio")))
    assert out["gates"].shape == (B, 2) and out["gate_names"] == ["image", "audio"]
    torch.testing.assert_close(out["gates"].sum(1), torch.ones(B))
    with torch.no_grad():
        fusion.bias["audio"].fill_(3.0)
    assert (fusion(fusion_inputs(("image", "audio")))["gates"][:, 1] > 0.9).all()


def test_fusion_unknown_modality_names_it():
    fusion = FUSIONS.build("concat", {"modalities": ["image"]}, dim=32)
    with pytest.raises(KeyError, match="unknown modality \\['audio'\\]"):
        fusion(fusion_inputs(("image", "audio")))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_contract(name):
    torch.manual_seed(0)
    model = build_model(tiny_config(losses={name: LossSpec(name, 1.0)}))
    batch = make_batch(model, B=4)
    out = model(batch)
    terms = [k for k in out if k.endswith("_loss")]
    assert terms, f"loss '{name}' returned no terms"
    assert all(k.endswith("_loss") and torch.isfinite(out[k]) for k in terms)
    torch.testing.assert_close(out["loss"], sum(out[k] for k in terms))
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
@pytest.mark.parametrize("subset", [dict(image=True, audio=False), dict(image=True, audio=False, question=True),
                                    dict(image=False, audio=True), dict(image=True, audio=True)])
def test_model_trains_on_any_modality_subset(fusion, subset):
    torch.manual_seed(0)
    model = build_model(tiny_config(fusion=fusion))
    out = model(make_batch(model, B=3, **subset))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert "caption_loss" in out
