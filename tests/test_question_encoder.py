"""A question encoder of its own (``model.encoders.question``): a pretrained sentence encoder reads the fused
question, beside a caption text tower trained from scratch. It tokenizes with its own tokenizer, saves it apart
from the text encoder's, and, frozen, is cached by the question (mmstory/feature_cache.py)."""
import pytest
import torch
import yaml

import mmstory
from conftest import tiny_config
from mmstory.config import Component, ConfigError, TrainConfig, check_components
from mmstory.feature_cache import FeatureCache
from mmstory.model import build_model, load
from mmstory.train import check_run_config
from test_train import run_cli, tiny_train_config


def _tiny_bert(minilm_path: str, width: int) -> Component:
    """A small random BERT with MiniLM's WordPiece tokenizer (hf_text built from a config dict)."""
    config = {"model_type": "bert", "hidden_size": width, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 2 * width, "vocab_size": 30522, "max_position_embeddings": 64}
    return Component("hf_text", {"config": config, "tokenizer_path": minilm_path})


def _model(minilm_path: str, *, hf_text_tower: bool = False):
    cfg = tiny_config(audio=False)
    if hf_text_tower:
        cfg.encoders["text"] = _tiny_bert(minilm_path, 40)
    cfg.encoders["question"] = _tiny_bert(minilm_path, 48)
    cfg.fuse_question = True
    torch.manual_seed(0)
    return build_model(cfg)


def _questions(model, texts: list[str]) -> dict:
    ids, mask = model.question_tokenizer.batch(texts, max_len=32)
    return {"question_ids": ids, "question_mask": mask}


def test_the_question_encoder_reads_the_question_with_its_own_tokenizer(minilm_path):
    model = _model(minilm_path).eval()
    assert model.question_tokenizer is model.encoders["question"].tokenizer
    assert model.text_tokenizer is model.tokenizer  # the caption tower keeps the BPE
    assert "question" not in model.embed_proj  # a question is fused, never embedded for the contrastive loss
    calls = {"text": 0, "question": 0}
    for name in calls:
        model.encoders[name].register_forward_hook(lambda *a, n=name: calls.__setitem__(n, calls[n] + 1))
    batch = {"image": torch.randn(2, 3, 32, 32), **_questions(model, ["Is there an animal here?", "what kind?"])}
    feats = model.encode(batch)
    assert calls == {"text": 0, "question": 1}
    assert feats["question"].tokens.shape[-1] == 48  # the question encoder's width, projected by its own token_proj
    fused = model.fuse(feats)
    assert fused["tokens"].shape[-1] == 32


def test_text_and_question_encoders_save_their_tokenizers_apart_and_load_back(minilm_path, tmp_path):
    model = _model(minilm_path, hf_text_tower=True).eval()
    model.save(tmp_path / "m")
    saved = yaml.safe_load((tmp_path / "m" / "config.yaml").read_text())
    assert saved["encoders"]["text"]["args"]["tokenizer_path"] == "text_tokenizer"
    assert saved["encoders"]["question"]["args"]["tokenizer_path"] == "question_tokenizer"
    assert (tmp_path / "m" / "text_tokenizer").is_dir() and (tmp_path / "m" / "question_tokenizer").is_dir()
    back = load(tmp_path / "m").eval()
    image = torch.randn(2, 3, 32, 32)
    questions = ["is this an animal?", "what's in this picture?"]
    assert back.question_tokenizer.encode(questions[1]) == model.question_tokenizer.encode(questions[1])
    with torch.no_grad():
        a = model.fuse(model.encode({"image": image, **_questions(model, questions)}))
        b = back.fuse(back.encode({"image": image, **_questions(back, questions)}))
    torch.testing.assert_close(a["tokens"], b["tokens"])
    kw = dict(image=image, question=questions, max_new_tokens=4)
    assert mmstory.answer(model, **kw) == mmstory.answer(back, **kw)


def test_a_frozen_question_encoder_is_cached_by_the_question(minilm_path):
    model = _model(minilm_path).eval()
    model.freeze(["encoders.question"])
    encoder = model.encoders["question"]
    rows = []
    encoder.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    cache = FeatureCache(["question"])
    first = ["is this an animal?", "what is shown?"]
    second = ["what is shown?", "is this about food and drink, or about something else?", "is this an animal?"]
    cache(model, {"__key__": ["a", "b"], **_questions(model, first)})
    b2 = _questions(model, second)  # other samples, another padded width
    out = cache(model, {"__key__": ["a", "c", "d"], **b2})["question"]
    assert rows == [2, 1] and (cache.hits, cache.misses) == (2, 3)  # each distinct question encoded once
    with torch.no_grad():
        direct = encoder(b2["question_ids"], b2["question_mask"])
    assert torch.equal(out.mask, b2["question_mask"])
    real = b2["question_mask"].unsqueeze(-1)
    torch.testing.assert_close(out.tokens * real, direct.tokens * real, atol=1e-5, rtol=1e-5)
    assert torch.all(out.tokens[~b2["question_mask"]] == 0)  # padding rows of a cached question are zeros
    torch.testing.assert_close(out.pooled, direct.pooled, atol=1e-5, rtol=1e-5)


def test_a_question_encoder_is_checked_naming_the_key(minilm_path):
    cfg = tiny_config(audio=False)
    cfg.encoders["questions"] = _tiny_bert(minilm_path, 32)
    with pytest.raises(ConfigError, match="encoders.questions.*question: a text encoder"):
        check_components(cfg)
    cfg = tiny_config(audio=False)
    cfg.encoders["question"] = Component("vit", dict(cfg.encoders["image"].args))
    with pytest.raises(ValueError, match="encoder for 'question' reads 'image' inputs"):
        build_model(cfg)
    train = TrainConfig()
    train.model.encoders["question"] = _tiny_bert(minilm_path, 32)
    with pytest.raises(ConfigError, match="'model.encoders.question'.*data.loader.fuse_question: true"):
        check_run_config(train)


def test_training_with_a_frozen_question_encoder_answers_after_loading(minilm_path, tmp_path):
    cfg = tiny_train_config(tmp_path / "run", steps=3, freeze=["encoders.question"],
                            **{"data.loader.fuse_question": True})
    cfg["model"]["encoders"]["question"] = {"name": "hf_text", "args": _tiny_bert(minilm_path, 32).args}
    res = run_cli(cfg, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    model = load(tmp_path / "run" / "model")
    assert model.config.fuse_question and type(model.encoders["question"]).__name__ == "HFTextEncoder"
    answers = mmstory.answer(model, image=torch.rand(2, 3, 32, 32), question=["What kind of emoji is it?",
                                                                             "is this an animal?"], max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_a_model_trained_with_fused_questions_captions_with_the_empty_question_it_was_trained_on(minilm_path):
    """The loader gives every caption sample the question "" when questions are fused; captioning must fuse it
    too (without it the decoder's memory lacks tokens it always had in training: fit 0.80 instead of 1.00 in the
    main job with a MiniLM question encoder)."""
    from mmstory.inference import generate_text

    model = _model(minilm_path).eval()
    image = torch.randn(3, 3, 32, 32)
    prompts = [model.prompts.caption] * 3
    kw = dict(max_new_tokens=5)
    with_empty = generate_text(model, {"image": image}, prompts, fuse_question=["", "", ""], **kw)
    assert mmstory.caption(model, image, **kw) == with_empty
    # the decoder reads different memory without the question tokens: at least its logits differ
    no_question = model.fuse(model.encode({"image": image}))
    empty = model.fuse(model.encode({"image": image, **_questions(model, ["", "", ""])}))
    assert empty["tokens"].shape[1] == no_question["tokens"].shape[1] + 2  # [CLS] [SEP]
