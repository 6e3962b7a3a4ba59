"""The question bank (mmstory/question_bank.py): other wordings asked as the nearest training question, with the
rules that keep it from changing what is asked; built from the training data, saved and loaded with the model."""
import pytest
import torch
import yaml

import mmstory
from mmstory.data.wordings import Wordings
from mmstory.question_bank import QuestionBank, asks_yes_no, names, normalise
from test_train import ROOT, run_cli, tiny_train_config

WORDINGS = Wordings([
    {"question": "what is shown?", "train": ["what is this emoji?", "what do you see?"]},
    {"question": "which category is this?", "train": ["what type of emoji is this?", "what group is this in?"]},
    {"question": "is this in the {category} category?", "train": ["does this belong to the {category} category?"]},
    {"question": "is this {thing}?", "train": ["is there {thing} in the picture?"]},
])
TRAINING = ["what is shown?", "which category is this?", "is this in the food & drink category?",
            "is this in the animals & nature category?", "is this an animal?", "is this food?"]


def _entries(questions=TRAINING, wordings=WORDINGS):
    out = []
    for q in questions:
        pattern, slots = wordings.match(q)
        out += [(t, q, list(slots.values())) for t in (q, *(w.format(**slots) for w in pattern.train))]
    return out


@pytest.fixture(scope="module")
def bank(minilm_path):
    return QuestionBank(_entries(), encoder=minilm_path, threshold=0.5)


def test_helpers():
    assert normalise("  What's  THIS?? ") == "what's this"
    assert asks_yes_no("Is there a cat?") and asks_yes_no("can you see food") and not asks_yes_no("which one is it?")
    assert not asks_yes_no("Can you tell me what this shows?")  # an indirect wh-question
    assert names("Does this count as Food & Drink?", "food & drink") and names("is there an animal here", "an animal")
    assert not names("is this foodie?", "food") and not names("is this a plant?", "an animal")


def test_training_questions_and_their_rewordings_are_asked_as_the_dataset_wording(bank):
    assert bank.lookup(["What type of emoji is this", "is there an animal in the picture?", "what is shown?"]) == \
        [("which category is this?", 1.0), ("is this an animal?", 1.0), ("what is shown?", 1.0)]


def test_other_wordings_are_asked_as_the_nearest_training_question(bank):
    asked = bank.ask_as(["What kind of emoji is it?", "What's in this picture?", "Is there an animal here?",
                         "Does this count as food & drink?", "can you see food?", "can you tell me what this shows?"])
    assert asked == ["which category is this?", "what is shown?", "is this an animal?",
                     "is this in the food & drink category?", "is this food?", "what is shown?"]


def test_a_question_is_never_asked_as_one_about_something_else_or_of_another_kind(bank):
    # "a dog" is no slot value of the bank: asking "is this an animal?" instead would change the question
    questions = ["is this a dog?", "is this in the flags category?", "what colour is the sky today?"]
    looked = bank.lookup(questions)
    assert [q for q, _ in looked[:2]] == questions[:2]  # yes/no, but no entry names its subject
    # a wh-question is never asked as a yes/no one, whatever the similarity
    assert not asks_yes_no(looked[2][0])
    strict = QuestionBank(_entries(), encoder=bank.encoder_path, threshold=0.99, embeddings=bank.embeddings)
    assert strict.lookup(["What kind of emoji is it?"]) == [("What kind of emoji is it?", 0.0)]  # below threshold


def test_the_bank_saves_and_loads_without_its_encoder_weights(bank, tmp_path):
    bank.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["question_bank.json", "question_bank.safetensors"]
    back = QuestionBank.load(tmp_path)
    assert back.texts == bank.texts and back.canonical == bank.canonical and back.slots == bank.slots
    assert torch.equal(back.embeddings, bank.embeddings) and back.threshold == 0.5
    questions = ["What kind of emoji is it?", "is this a dog?", "is there an animal here?"]
    a, b = back.lookup(questions), bank.lookup(questions)
    assert [q for q, _ in a] == [q for q, _ in b] and [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-5)
    with pytest.raises(ValueError, match="no training questions"):
        QuestionBank([], encoder=bank.encoder_path)


def test_training_builds_the_bank_from_the_training_questions_and_answers_through_it(minilm_path, tmp_path,
                                                                                     monkeypatch):
    wordings = str(ROOT / "data_manifests/emoji/wordings.yaml")
    cfg = tiny_train_config(tmp_path / "run", steps=2, **{"data.loader.wordings": wordings})
    cfg["model"]["question_bank"] = {"encoder": minilm_path, "threshold": 0.5}
    res = run_cli(cfg, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "question bank:" in res.stdout + res.stderr
    model = mmstory.load(tmp_path / "run" / "model")
    bank = model.question_bank
    assert bank is not None and yaml.safe_load((tmp_path / "run/model/config.yaml").read_text())[
        "question_bank"]["encoder"] == minilm_path
    # every question of the emoji training QA is in the bank, with its train rewordings and none held out
    table = Wordings.load(wordings)
    for q in ("what is shown?", "which category is this?", "is this in the food & drink category?"):
        assert bank.ask_as([q]) == [q]
        pattern, slots = table.match(q)
        assert all(normalise(t.format(**slots)) in bank.texts for t in pattern.train)
        assert not any(normalise(t.format(**slots)) in bank.texts for t in pattern.heldout)
    # mmstory.answer asks the model the mapped question
    seen = []
    real = mmstory.inference.generate_text
    monkeypatch.setattr(mmstory.inference, "generate_text",
                        lambda m, inputs, prompts, **kw: seen.extend(prompts) or real(m, inputs, prompts, **kw))
    mmstory.answer(model, image=torch.rand(1, 3, 32, 32), question="What kind of emoji is it?", max_new_tokens=2)
    assert seen == [model.prompts.question("which category is this?")]


def test_a_held_out_wording_record_says_what_was_asked(minilm_path, tmp_path):
    from mmstory.data.manifest import load_manifest
    from mmstory.evaluate import evaluate
    from mmstory.model import build_model
    from conftest import tiny_config

    from mmstory.config import TokenizerSpec

    cfg = tiny_config(audio=False)
    cfg.tokenizer = TokenizerSpec("bpe", str(ROOT / "data_manifests/emoji/tokenizer.json"))  # short prompts
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    model.question_bank = QuestionBank(_entries(), encoder=minilm_path)
    split = load_manifest(ROOT / "data_manifests/emoji.json").split("val_style")
    table = Wordings.load(ROOT / "data_manifests/emoji/wordings.yaml")
    kw = dict(tasks=("qa",), max_samples=4, wordings=table, diagnostics=False, progress=False, batch_size=4,
              meteor=False)
    on = evaluate(model, split, **kw)["predictions"]
    off = evaluate(model, split, question_bank=False, **kw)["predictions"]
    held = [q["heldout"] for r in on for q in r["qa"] if "heldout" in q]
    assert held and any("asked_as" in h for h in held)
    assert all(h.get("asked_as", h["question"]) in [e[1] for e in _entries()] + [h["question"]] for h in held)
    assert not any("asked_as" in q["heldout"] for r in off for q in r["qa"] if "heldout" in q)


def test_the_served_answer_says_which_training_question_was_asked(minilm_path):
    pytest.importorskip("fastapi")
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from conftest import tiny_config
    from mmstory.config import TokenizerSpec
    from mmstory.model import build_model
    from mmstory.serve.app import ServeSettings, create_app

    cfg = tiny_config(audio=False)
    cfg.tokenizer = TokenizerSpec("bpe", str(ROOT / "data_manifests/emoji/tokenizer.json"))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    model.question_bank = QuestionBank(_entries(), encoder=minilm_path)
    image = torch.rand(3, 32, 32)
    buf = io.BytesIO()
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(buf, format="PNG")
    with TestClient(create_app(model, ServeSettings(max_batch=4, max_wait_ms=5))) as client:
        replies = {q: client.post("/v1/answer", files={"image": ("a.png", buf.getvalue(), "image/png")},
                                  data={"question": q, "max_new_tokens": "3"}).json()
                   for q in ("What kind of emoji is it?", "which category is this?", "is this a dog?")}
    assert replies["What kind of emoji is it?"]["asked_as"] == "which category is this?"
    assert replies["What kind of emoji is it?"]["answer"] == replies["which category is this?"]["answer"]
    assert replies["which category is this?"]["asked_as"] is None and replies["is this a dog?"]["asked_as"] is None
