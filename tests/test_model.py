"""Model assembly, losses against references, save/load, config and registry errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mmstory
from conftest import make_batch, tiny_config
from mmstory.config import Component, ConfigError, ModelConfig, from_dict, load_config, parse_overrides
from mmstory.encoders import ENCODERS
from mmstory.losses.captioning import CaptionLoss
from mmstory.losses.contrastive import ContrastiveLoss
from mmstory.model import build_model, load


def test_contrastive_equals_open_clip_clip_loss():
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    ours = ContrastiveLoss(pairs=[["image", "text"]], init_temperature=1 / 14.3)
    expected = ClipLoss()(img, txt, ours.scale())
    got = ours({"embeds": {"image": img, "text": txt}}, {})["contrastive_image_text_loss"]
    torch.testing.assert_close(got, expected)


def test_contrastive_temperature_is_clamped_and_learnable():
    loss = ContrastiveLoss(pairs=[["a", "b"]], max_logit_scale=100.0)
    with torch.no_grad():
        loss.logit_scale.fill_(10.0)
    assert loss.scale().item() == pytest.approx(100.0)
    x = F.normalize(torch.randn(4, 8), dim=-1)
    loss.logit_scale.data.fill_(2.0)
    loss({"embeds": {"a": x, "b": x.roll(1, 0)}}, {})["contrastive_a_b_loss"].backward()
    assert loss.logit_scale.grad is not None and loss.logit_scale.grad != 0


def test_contrastive_label_smoothing_matches_formula():
    x, y = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    loss = ContrastiveLoss(pairs=[["a", "b"]], label_smoothing=0.1, init_temperature=0.5)
    logits = 2.0 * x @ y.T
    target = torch.full((4, 4), 0.1 / 4) + torch.eye(4) * 0.9
    expected = (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean()) / 2
    torch.testing.assert_close(loss({"embeds": {"a": x, "b": y}}, {})["contrastive_a_b_loss"], expected)


def test_contrastive_detach_trains_only_the_other_side():
    torch.manual_seed(0)
    x, y = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    plain = ContrastiveLoss(pairs=[["a", "b"]])
    fixed = ContrastiveLoss(pairs=[["a", "b"]], detach={"a_b": "b"})
    embeds = lambda: {"a": F.normalize(x, dim=-1), "b": F.normalize(y, dim=-1)}  # noqa: E731
    ga = torch.autograd.grad(plain({"embeds": embeds()}, {})["contrastive_a_b_loss"], x)[0]
    loss = fixed({"embeds": embeds()}, {})["contrastive_a_b_loss"]
    torch.testing.assert_close(loss, plain({"embeds": embeds()}, {})["contrastive_a_b_loss"])
    loss.backward()
    torch.testing.assert_close(x.grad, ga)  # the free side gets the same gradient
    assert y.grad is None                   # the fixed side none
    assert fixed.logit_scale.grad is not None


def test_contrastive_detach_names_bad_pair_or_side():
    with pytest.raises(ValueError, match="'audio_image' is not a pair"):
        ContrastiveLoss(pairs=[["audio", "text"]], detach={"audio_image": "text"})
    with pytest.raises(ValueError, match="'image' is not one of its sides"):
        ContrastiveLoss(pairs=[["audio", "text"]], detach={"audio_text": "image"})


def test_prompt_weight_scores_only_the_filled_in_question():
    """A batch from the data pipeline says which prompt tokens were filled in (the question); the caption
    loss's prompt term and the model's fast path score those and not the template's words."""
    from mmstory.data.collate import collate
    from mmstory.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    samples = [dict(__key__="k", image=torch.zeros(3, 8, 8), caption="a cat", question="is it red?", task="qa",
                    prompt="question: is it red? answer:", prompt_filled=("question:", "question: is it red?"),
                    target="no", references=["no"], meta={})]
    batch = collate(samples, tok)
    V, S = tok.vocab_size, batch["tokens"].shape[1]
    logits = torch.randn(1, S, V)
    loss = CaptionLoss(prompt_weight=1.0)
    got = loss({"logits": logits}, batch)["caption_prompt_loss"]
    # by hand: positions t whose next token t + 1 is one of the question's tokens
    head = 1 + len(tok.encode("question:"))
    positions = list(range(head - 1, head - 1 + len(tok.encode(" is it red?"))))
    want = F.cross_entropy(logits[0, positions], batch["tokens"][0, [t + 1 for t in positions]])
    torch.testing.assert_close(got, want)
    hand_built = {k: v for k, v in batch.items() if k != "prompt_filled_mask"}  # old rule: all prompt tokens
    assert loss({"logits": logits}, hand_built)["caption_prompt_loss"] != got


def test_caption_loss_counts_only_targets():
    torch.manual_seed(0)
    V = 11
    tokens = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 5, 8, 2, 0, 0]])
    target = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    logits = torch.randn(2, 6, V)
    got = CaptionLoss()({"logits": logits}, {"tokens": tokens, "target_mask": target})["caption_loss"]
    picks = [(0, 1, 6), (0, 2, 7), (0, 3, 2), (1, 1, 8), (1, 2, 2)]  # (row, position, next token)
    expected = torch.stack([-logits[r, t].log_softmax(-1)[y] for r, t, y in picks]).mean()
    torch.testing.assert_close(got, expected)
    # logits at prompt and padding positions do not matter
    logits2 = logits.clone()
    logits2[0, 0] = 100
    logits2[1, 4:] = -50
    got2 = CaptionLoss()({"logits": logits2}, {"tokens": tokens, "target_mask": target})["caption_loss"]
    torch.testing.assert_close(got, got2)


def test_caption_loss_same_from_full_and_target_logits():
    torch.manual_seed(0)
    tokens = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 5, 8, 2, 0, 0]])
    target = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    logits = torch.randn(2, 6, 11)
    batch = {"tokens": tokens, "target_mask": target}
    full = CaptionLoss(label_smoothing=0.1)({"logits": logits}, batch)["caption_loss"]
    scored = target[:, 1:]
    fast = CaptionLoss(label_smoothing=0.1)({"target_logits": logits[:, :-1][scored],
                                             "target_ids": tokens[:, 1:][scored]}, batch)["caption_loss"]
    torch.testing.assert_close(fast, full)


def test_caption_loss_prompt_weight_adds_a_separate_prompt_mean():
    torch.manual_seed(0)
    tokens = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 5, 9, 8, 2, 0]])
    tokens_mask = tokens != 0
    target = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    logits = torch.randn(2, 6, 11)
    batch = {"tokens": tokens, "tokens_mask": tokens_mask, "target_mask": target}
    got = CaptionLoss(prompt_weight=0.5)({"logits": logits}, batch)
    nll = lambda picks: torch.stack([-logits[r, t].log_softmax(-1)[y] for r, t, y in picks]).mean()  # noqa: E731
    # targets: row 0 predicts 6, 7, 2 from positions 1-3; row 1 predicts 8, 2 from positions 2-3
    torch.testing.assert_close(got["caption_loss"], nll([(0, 1, 6), (0, 2, 7), (0, 3, 2), (1, 2, 8), (1, 3, 2)]))
    # prompt tokens after BOS: row 0 token 5 (from position 0); row 1 tokens 5, 9 (positions 0, 1)
    torch.testing.assert_close(got["caption_prompt_loss"], 0.5 * nll([(0, 0, 5), (1, 0, 5), (1, 1, 9)]))
    assert "caption_prompt_loss" not in CaptionLoss()({"logits": logits}, batch)
    with pytest.raises(ValueError, match="prompt_weight must be >= 0"):
        CaptionLoss(prompt_weight=-1.0)


@pytest.mark.parametrize("fusion,prompt_weight", [("concat", 0.0), ("cross_attention", 0.0), ("concat", 0.5)])
def test_head_at_targets_equals_full_logits_path(fusion, prompt_weight):
    """The training fast path (vocabulary head only where a target or a scored prompt token is) gives
    the same logits there, the same losses and the same gradient for every parameter as the full
    (B, S, V) path."""
    from mmstory.config import LossSpec

    torch.manual_seed(0)
    cfg = tiny_config(fusion=fusion)
    cfg.losses["caption"] = LossSpec("caption", 2.0, {"prompt_weight": prompt_weight})
    model = build_model(cfg).train()
    batch = make_batch(model, B=4, question=True)
    full = model(batch, full_logits=True)
    grads_full = torch.autograd.grad(full["loss"], list(model.parameters()), allow_unused=True)
    fast = model(batch)
    grads_fast = torch.autograd.grad(fast["loss"], list(model.parameters()), allow_unused=True)
    assert "logits" not in fast and "target_logits" not in full
    scored = batch["target_mask"][:, 1:]
    if prompt_weight:
        scored = batch["tokens_mask"][:, 1:]  # every real token after BOS
        assert fast["target_is_prompt"].sum() == (batch["tokens_mask"] & ~batch["target_mask"]).sum() - 4
    assert fast["target_logits"].shape[0] == int(scored.sum()) < scored.numel()
    torch.testing.assert_close(fast["target_logits"], full["logits"][:, :-1][scored])
    assert torch.equal(fast["target_ids"], batch["tokens"][:, 1:][scored])
    keys = ["loss", "caption_loss", "contrastive_image_text_loss"] + (["caption_prompt_loss"] if prompt_weight else [])
    for key in keys:
        torch.testing.assert_close(fast[key], full[key])
    for (name, _), a, b in zip(model.named_parameters(), grads_fast, grads_full):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=name)


def test_decoder_padding_does_not_change_real_positions(tiny_model):
    tiny_model.eval()
    batch = make_batch(tiny_model, B=3)
    changed = dict(batch)
    changed["tokens"] = batch["tokens"].masked_fill(~batch["tokens_mask"], 42)
    a, b = tiny_model(batch, full_logits=True), tiny_model(changed, full_logits=True)
    m = batch["tokens_mask"]
    torch.testing.assert_close(a["logits"][m], b["logits"][m])
    torch.testing.assert_close(a["caption_loss"], b["caption_loss"])


def test_loss_weights_come_from_config():
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.losses["caption"].weight = 3.0
    model = build_model(cfg)
    out = model(make_batch(model))
    expected = 3.0 * out["caption_loss"] + out["contrastive_image_text_loss"] + out["contrastive_audio_text_loss"]
    torch.testing.assert_close(out["loss"], expected)


@pytest.mark.parametrize("fusion", ["concat", "weighted", "cross_attention"])
def test_save_load_gives_identical_outputs(tmp_path, fusion):
    torch.manual_seed(0)
    model = build_model(tiny_config(fusion=fusion)).eval()
    batch = make_batch(model, question=True)
    model.save(tmp_path / "m")
    loaded = load(tmp_path / "m")
    a, b = model(batch, full_logits=True), loaded(batch, full_logits=True)
    for key in ("logits", "loss", "caption_loss"):
        assert torch.equal(a[key], b[key]), key
    images = batch["image"]
    assert mmstory.caption(model, images, max_new_tokens=6) == mmstory.caption(loaded, images, max_new_tokens=6)


def test_save_load_with_library_encoders(tmp_path, minilm_path, open_clip_tiny_config):
    """hf_text and open_clip towers rebuild from the saved folder alone (no pretrained source needed)."""
    torch.manual_seed(0)
    cfg = tiny_config(audio=False)
    cfg.encoders = {"image": Component("open_clip_visual", {"model_name": open_clip_tiny_config}),
                    "text": Component("hf_text", {"path": minilm_path})}
    model = build_model(cfg).eval()
    batch = make_batch(model, B=2, audio=False)
    model.save(tmp_path / "m")
    loaded = load(tmp_path / "m")
    assert "path" not in loaded.config.encoders["text"].args
    torch.testing.assert_close(model(batch)["loss"], loaded(batch)["loss"], rtol=0, atol=0)


def test_load_never_unpickles(tmp_path):
    model = build_model(tiny_config())
    model.save(tmp_path / "m")
    assert not list((tmp_path / "m").rglob("*.pt")) and not list((tmp_path / "m").rglob("*.bin"))
    with pytest.raises(FileNotFoundError, match="not an mmstory model folder"):
        load(tmp_path)


def test_unknown_component_lists_valid_names():
    with pytest.raises(KeyError, match="unknown encoder 'vitt'; valid names: .*audio_transformer.*vit"):
        ENCODERS["vitt"]
    cfg = tiny_config()
    cfg.fusion = Component("concatenate")
    with pytest.raises(KeyError, match="unknown fusion 'concatenate'; valid names: concat, cross_attention, weighted"):
        build_model(cfg)


def test_unknown_component_argument_is_named():
    cfg = tiny_config()
    cfg.encoders["image"].args["widht"] = 32
    with pytest.raises(TypeError, match=r"encoder 'vit' got unknown argument\(s\) \['widht'\]"):
        build_model(cfg)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'decoder.dpeth'"):
        from_dict(ModelConfig, {"decoder": {"dpeth": 3}})
    with pytest.raises(ConfigError, match="config key 'decoder.depth': expected int, got str"):
        from_dict(ModelConfig, {"decoder": {"depth": "three"}})
    with pytest.raises(ConfigError, match="config key 'dim': expected int, got bool"):
        from_dict(ModelConfig, {"dim": True})
    path = tmp_path / "m.yaml"
    path.write_text("dim: 64\nfusion: {name: weighted}\n")
    cfg = load_config(ModelConfig, path, ["--decoder.depth=2", "--encoders.image.args.width=128"])
    assert (cfg.dim, cfg.fusion.name, cfg.decoder.depth, cfg.encoders["image"].args["width"]) == (64, "weighted", 2, 128)
    assert cfg.encoders["image"].args["patch_size"] == 8  # the rest of the mapping is kept
    assert parse_overrides(["--a.b=1e-3", "c=[1, 2]"]) == {"a": {"b": 1e-3}, "c": [1, 2]}
    with pytest.raises(ConfigError, match="not of the form"):
        parse_overrides(["--oops"])


def test_mapping_override_replaces_the_whole_component(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("encoders: {image: {name: timm_cnn, args: {model_name: resnet18, image_size: 64}}}\n")
    cfg = load_config(ModelConfig, path, ['--encoders.image={"name": "vit", "args": {"image_size": 32, "width": 32}}',
                                          "--encoders.image.args.depth=1"])
    assert cfg.encoders["image"] == Component("vit", {"image_size": 32, "width": 32, "depth": 1})
    cfg = load_config(ModelConfig, path, ["--encoders.image.args.model_name=resnet10t"])
    assert cfg.encoders["image"].args == {"model_name": "resnet10t", "image_size": 64}


def test_encoders_must_match_their_modality():
    cfg = tiny_config()
    cfg.encoders["text"] = Component("vit", {"image_size": 32, "width": 32, "depth": 1, "heads": 2})
    with pytest.raises(ValueError, match="encoder for 'text' reads 'image' inputs"):
        build_model(cfg)


def test_training_forward_traces_as_one_graph_for_torch_compile():
    """No host reads or data-dependent shapes under torch.compile (each would split the graph): mask
    checks are skipped, the caption loss takes the full-logits path and sums with torch.where."""
    torch.manual_seed(0)
    model = build_model(tiny_config(fusion="cross_attention")).train()
    batch = make_batch(model, B=4, question=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda b: model(b)["loss"])(batch)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_decoder_rejects_sequences_longer_than_max_len(tiny_model):
    dec = tiny_model.decoder  # max_len 48
    memory = torch.zeros(1, 3, dec.tok.embedding_dim)
    with pytest.raises(ValueError, match="decoder position 48 exceeds max_len 48"):
        dec(torch.ones(1, 49, dtype=torch.long), memory)
    with pytest.raises(ValueError, match="decoder position 50 exceeds max_len 48"):
        dec.features(torch.ones(1, 1, dtype=torch.long), memory, positions=torch.tensor([[50]]))
