"""The prompt contract (mmstory/prompts.py): one definition for data, model, loss and inference, saved with the
model, so a model trained with its own prompts is asked with them by caption / answer / evaluate."""
from __future__ import annotations

import re

import pytest
import torch

import mmstory
from mmstory.config import ConfigError, DataConfig, TrainConfig, from_dict, load_config, to_dict
from mmstory.data.manifest import load_manifest
from mmstory.data.loader import build_loader
from mmstory.prompts import Prompts, decoder_sequence, filled_span
from mmstory.tokenizer import build_tokenizer
from test_train import ROOT, tiny_train_config

CUSTOM = {"caption": "describe the emoji:", "caption_zh": "zh:", "qa": "Q: {question} A:"}


def test_fill_puts_the_question_in_its_place_and_says_what_was_filled():
    p = Prompts()
    assert p.fill("caption") == ("caption:", ("", ""))
    assert p.fill("qa", "is it red?") == ("question: is it red? answer:", ("question:", "question: is it red?"))
    assert p.question("what is shown?") == "question: what is shown? answer:"
    custom = Prompts(**CUSTOM)
    assert custom.fill("qa", "why?") == ("Q: why? A:", ("Q:", "Q: why?"))
    with pytest.raises(ValueError, match="unknown decoder task 'vqa'"):
        p.fill("vqa", "x")


def test_the_filled_span_is_the_question_tokens_only():
    tok = build_tokenizer("bytes")
    prompt, filled = Prompts().fill("qa", "is it red?")
    ids, head = decoder_sequence(tok, prompt, "yes", 64)
    start, end = filled_span(tok, prompt, filled)
    assert tok.decode(ids[start:end]).strip() == "is it red?" and end <= head
    assert filled_span(tok, "caption:", ("", "")) == (0, 0)


@pytest.mark.parametrize("override, message", [
    ("--model.prompts.qa=the answer is", "model.prompts.qa must hold exactly one {question}"),
    ("--model.prompts.caption='caption {question}:'", "model.prompts.caption must hold no {...} placeholder"),
    ("--model.prompts.caption=''", "model.prompts.caption must be a non-empty string"),
    ("--model.prompts.vqa=x", "unknown config key 'model.prompts.vqa'"),
    ("--data.loader.prompts={caption: x}", "config key 'data.loader.prompts' is now 'model.prompts'"),
])
def test_bad_prompts_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TrainConfig, overrides=[override])


def test_the_loader_fills_the_prompts_it_is_given():
    split = load_manifest(ROOT / "data_manifests/emoji.json").split("val_novel")
    cfg = DataConfig(batch_size=16, workers=0, image_size=32, max_tokens=64)
    batch = next(iter(build_loader(split, cfg, tokenizer=build_tokenizer("bytes"), train=False,
                                   prompts=Prompts(**CUSTOM))))
    assert {p.split(" ")[0] for p in batch["prompt"]} <= {"describe", "Q:"}
    assert any(p.startswith("Q: ") and p.endswith(" A:") for p in batch["prompt"])


def test_a_model_trained_with_its_own_prompts_saves_them_and_is_asked_with_them(tmp_path, monkeypatch):
    from mmstory.train import train

    d = tiny_train_config(tmp_path / "run", steps=2, ckpt_every=2)
    d["model"]["prompts"] = dict(CUSTOM)
    d["model"]["decoder"]["max_len"] = 96  # room for the emoji questions with the byte tokenizer
    seen: list[str] = []
    real_generate = mmstory.MultimodalModel.generate

    def spy(self, inputs, prompts=None, **kw):
        seen.extend([prompts] if isinstance(prompts, str) else prompts or [self.prompts.caption])
        return real_generate(self, inputs, prompts, **kw)

    train(from_dict(TrainConfig, d))
    model = mmstory.load(tmp_path / "run" / "model")
    assert to_dict(model.prompts) == CUSTOM  # saved in model/config.yaml, read back by load
    assert "Q: {question} A:" in (tmp_path / "run" / "model" / "config.yaml").read_text()

    monkeypatch.setattr(mmstory.MultimodalModel, "generate", spy)
    image = torch.zeros(1, 3, 32, 32)
    mmstory.caption(model, image, max_new_tokens=2)
    mmstory.answer(model, image=image, question="is it red?", max_new_tokens=2)
    assert seen == ["describe the emoji:", "Q: is it red? A:"]

    from mmstory.evaluate import evaluate

    seen.clear()
    split = load_manifest(ROOT / "data_manifests/emoji.json").split("val_novel")
    evaluate(model, split, tasks=("caption", "qa"), max_samples=4, data=DataConfig(workers=0, batch_size=4),
             progress=False, diagnostics=False)
    asked = lambda p: p.startswith("Q: ") and p.endswith(" A:")  # noqa: E731
    assert "describe the emoji:" in seen and any(asked(p) for p in seen)
    assert all(p == "describe the emoji:" or asked(p) for p in seen)
