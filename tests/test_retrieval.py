"""Retrieval-augmented decoding (mmstory/retrieval.py): nearest entries, exclusion, the memory tokens, the
datastore built from a split and saved/loaded with the model."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import mmstory
from conftest import tiny_config
from mmstory.config import RetrievalConfig
from mmstory.config import DataConfig
from mmstory.model import build_model
from mmstory.datastore import build_datastore
from mmstory.retrieval import RetrievalMemory
from mmstory.tokenizer import build_tokenizer


def _memory(k=2, max_tokens=4):
    tok = build_tokenizer("bytes", None)
    mem = RetrievalMemory(k=k, max_tokens=max_tokens, token_dim=8, dim=8)
    keys = mem.key(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]]), None, (), ())
    mem.fill(keys, ["cat", "dog", "sun", "cat dog"], ["a", "b", "c", "d"], tok)
    return mem, tok


def test_nearest_entries_and_exclusion():
    mem, _ = _memory()
    q = mem.key(torch.tensor([[1.0, 0.1, 0], [0, 0.1, 2.0]]), None, (), ())
    assert mem.nearest(q).tolist() == [[0, 3], [2, 1]]  # by cosine
    assert mem.nearest(q, exclude=["a", None]).tolist() == [[3, 1], [2, 1]]  # a row's own entry is never returned
    assert mem.nearest(q, exclude=["zzz", "c"]).tolist() == [[0, 3], [1, 3]]


def test_memory_tokens_embed_the_retrieved_captions():
    mem, tok = _memory()
    emb = torch.nn.Embedding(tok.vocab_size, 8)
    tokens, mask, copy_ids = mem(mem.key(torch.tensor([[1.0, 0.1, 0]]), None, (), ()), emb)
    assert tokens.shape == (1, 2 * 4, 8) and mask.shape == (1, 8)
    ids = tok.encode(" cat")[:4]
    assert mask[0, :4].tolist() == [True] * len(ids) + [False] * (4 - len(ids))
    assert copy_ids[0, :4].tolist() == ids + [-1] * (4 - len(ids))
    mem.blocks = torch.nn.ModuleList()  # without the reading blocks: the embedded tokens themselves
    tokens, mask, _ = mem(mem.key(torch.tensor([[1.0, 0.1, 0]]), None, (), ()), emb)
    want = mem.proj(emb(torch.tensor(ids))) + mem.rank[0, 0] + mem.pos[0, :len(ids)]
    torch.testing.assert_close(tokens[0, :len(ids)], want)


def test_empty_datastore_fails_clearly():
    mem = RetrievalMemory(k=2, max_tokens=4, token_dim=8, dim=8)
    with pytest.raises(RuntimeError, match="datastore is empty"):
        mem.nearest(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="fewer than k"):
        mem.fill(torch.zeros(1, 3), ["x"], ["x"], build_tokenizer("bytes", None))


def test_model_with_retrieval_builds_saves_and_loads_its_datastore(tmp_path):
    from test_baselines import LABELS, _glyph, _write

    shard = _write(tmp_path / "train.tar", [(f"t{i}", _glyph(i % 4, i), LABELS[i % 4]) for i in range(8)])
    cfg = tiny_config(audio=False)
    cfg.retrieval = RetrievalConfig(k=2, max_tokens=6)
    cfg.decoder.max_len = 64
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with pytest.raises(RuntimeError, match="datastore is empty"):
        mmstory.caption(model, torch.zeros(1, 3, 32, 32), max_new_tokens=3)
    assert build_datastore(model, [shard], data=DataConfig(workers=0), progress=False) == {"image": 8}
    assert model.memory.store().names == [f"t{i}" for i in range(8)] and model.memory.store().texts[1] == LABELS[1]
    image = _glyph(1, 99)
    before = mmstory.caption(model, image, max_new_tokens=5)
    model.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "memory.json").read_text())["texts"] == model.memory.store().texts
    loaded = mmstory.load(tmp_path / "m")
    assert mmstory.caption(loaded, image, max_new_tokens=5) == before
    torch.testing.assert_close(loaded.memory.store().keys, model.memory.store().keys, atol=1e-3, rtol=1e-3)  # stored as fp16
    (tmp_path / "m" / "memory.json").unlink()
    with pytest.raises(FileNotFoundError, match="memory.safetensors, memory.json"):
        mmstory.load(tmp_path / "m")
    model.config.retrieval.captions = 2  # entries: the first two captions joined
    build_datastore(model, [shard], data=DataConfig(workers=0), progress=False)
    assert model.memory.store().texts[1] == f"{LABELS[1]}; an emoji of a {LABELS[1]}"


def test_training_excludes_each_images_own_entry():
    cfg = tiny_config(audio=False)
    cfg.retrieval = RetrievalConfig(k=1, max_tokens=4, keep_self=0.0)
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = {"__key__": ["a", "b"]}
    model.train()
    assert model._exclude(batch) == ["a", "b"]
    model.eval()
    assert model._exclude(batch) is None
    model.config.retrieval.keep_self = 1.0
    model.train()
    assert model._exclude(batch) == [None, None]


def test_colour_layout_keys_add_a_weighted_pixel_similarity():
    from mmstory.baselines import pixel_features

    mem = RetrievalMemory(k=1, max_tokens=4, token_dim=8, dim=8, colour=2.0, colour_size=4)
    pooled, images = torch.randn(3, 5), torch.randn(3, 3, 16, 16)
    keys = mem.key(pooled, images, (0.5,) * 3, (0.5,) * 3)
    f = torch.nn.functional.normalize(pooled, dim=-1)
    p = pixel_features(images, (0.5,) * 3, (0.5,) * 3, 4)
    torch.testing.assert_close(keys @ keys.T, f @ f.T + 2.0 * (p @ p.T))
    with pytest.raises(ValueError, match="needs the images"):
        mem.key(pooled, None, (0.5,) * 3, (0.5,) * 3)


def test_copy_head_is_a_gated_mixture_of_vocabulary_and_pointer():
    """The decoder's copy head returns normalised log-probabilities; with the gate shut the mass sits on the
    memory's token ids in proportion to the attention; every ``select`` path gives the same rows."""
    from mmstory.decoder import LAST, TextDecoder

    torch.manual_seed(0)
    dec = TextDecoder(vocab_size=50, dim=16, depth=1, heads=2, max_len=12, memory_dim=16, copy=True).eval()
    tokens, memory = torch.randint(4, 50, (3, 5)), torch.randn(3, 6, 16)
    memory_mask = torch.ones(3, 6, dtype=torch.bool)
    copy_ids = torch.tensor([[7, 8, 9, -1], [10, 10, 11, 12], [-1, -1, -1, -1]])  # last 4 memory tokens
    full = dec(tokens, memory, memory_mask, copy_ids=copy_ids)
    torch.testing.assert_close(full.logsumexp(-1), torch.zeros(3, 5), atol=1e-5, rtol=0)
    select = torch.rand(3, 5) > 0.5
    torch.testing.assert_close(dec(tokens, memory, memory_mask, select=select, copy_ids=copy_ids), full[select])
    torch.testing.assert_close(dec(tokens, memory, memory_mask, select=LAST, copy_ids=copy_ids), full[:, -1])
    # a row without ids is the plain vocabulary distribution
    torch.testing.assert_close(full[2], dec(tokens, memory, memory_mask)[2].log_softmax(-1), atol=1e-5, rtol=0)
    with torch.no_grad():
        dec.copy.gate.bias.fill_(-50.0)  # all mass to the pointer
    probs = dec(tokens, memory, memory_mask, copy_ids=copy_ids).exp()
    assert probs[0][:, [7, 8, 9]].sum(-1).allclose(torch.ones(5), atol=1e-4)
    assert probs[1][:, 10].gt(probs[1][:, 11]).any()  # two memory tokens point at 10
    assert probs[1][:, [10, 11, 12]].sum(-1).allclose(torch.ones(5), atol=1e-4)


def test_copying_model_decodes_the_same_with_and_without_the_cache(tmp_path):
    cfg = tiny_config(audio=False)
    cfg.retrieval = RetrievalConfig(k=2, max_tokens=6, copy=True)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert model.decoder.copy is not None
    texts = ["an emoji of a cat", "an emoji of a red heart", "an emoji of the sun"]
    model.memory.fill(F.normalize(torch.randn(3, model.encoders["image"].pooled_width), dim=-1), texts,
                      ["a", "b", "c"], model.tokenizer)
    images = torch.randn(2, 3, 32, 32)
    for beams in (1, 3):
        cached = model.generate({"image": images}, max_new_tokens=6, num_beams=beams)
        assert cached == model.generate({"image": images}, max_new_tokens=6, num_beams=beams, use_cache=False)
    model.save(tmp_path / "m")
    loaded = mmstory.load(tmp_path / "m")
    assert loaded.decoder.copy is not None
    assert loaded.generate({"image": images}, max_new_tokens=6) == model.generate({"image": images}, max_new_tokens=6)
