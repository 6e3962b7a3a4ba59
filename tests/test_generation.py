"""Decoding: the KV-cached path equals re-running the full sequence; width-1 beam equals greedy."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from mmstory.generation import DecodeOptions, _Stepper, generate
from mmstory.model import build_model
from mmstory.tokenizer import pad_sequences


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    # Make the random decoder less uniform so greedy paths are not decided by float noise.
    with torch.no_grad():
        model.decoder.tok.weight.mul_(8)
    images = torch.randn(4, 3, 32, 32)
    fused = model.fuse(model.encode({"image": images}))
    tok = model.tokenizer
    prompts = ["caption:", "question: is it red? answer:", "q", "caption zh:"]  # ragged: left padding matters
    ids, mask = pad_sequences([[tok.bos_id] + tok.encode(p) for p in prompts], tok.pad_id, left=True)
    return model, fused, ids, mask


def run(setup, **kw):
    model, fused, ids, mask = setup
    tok = model.tokenizer
    return generate(model.decoder, fused["tokens"], fused["mask"], ids, mask, eos_id=tok.eos_id, pad_id=tok.pad_id,
                    opts=DecodeOptions(**kw))


def test_cached_logits_equal_full_recompute(setup):
    model, fused, ids, mask = setup
    cached = _Stepper(model.decoder, fused["tokens"], fused["mask"], use_cache=True)
    full = _Stepper(model.decoder, fused["tokens"], fused["mask"], use_cache=False)
    a, b = cached.start(ids, mask), full.start(ids, mask)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for _ in range(10):
        nxt = a.argmax(-1, keepdim=True)
        assert torch.equal(nxt, b.argmax(-1, keepdim=True))
        a, b = cached.step(nxt), full.step(nxt)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # the projected memory is stored contiguous, once (strided views made each CPU decode step slower)
    for _, cross in cached.cache:
        assert cross.k.is_contiguous() and cross.v.is_contiguous() and cross.length == fused["tokens"].shape[1]


def test_left_padding_does_not_change_a_row(setup):
    """A prompt decoded alone equals the same prompt decoded in a left-padded batch."""
    model, fused, ids, mask = setup
    tok = model.tokenizer
    batch = run(setup, max_new_tokens=12)
    one_ids = torch.tensor([[tok.bos_id] + tok.encode("q")])
    alone = generate(model.decoder, fused["tokens"][2:3], fused["mask"][2:3], one_ids, torch.ones_like(one_ids, dtype=torch.bool),
                     eos_id=tok.eos_id, pad_id=tok.pad_id, opts=DecodeOptions(max_new_tokens=12))
    assert alone[0] == batch[2]


@pytest.mark.parametrize("kw", [dict(), dict(num_beams=3), dict(repetition_penalty=1.5, min_new_tokens=4)])
def test_cache_gives_the_same_tokens(setup, kw):
    assert run(setup, max_new_tokens=15, use_cache=True, **kw) == run(setup, max_new_tokens=15, use_cache=False, **kw)


def test_beam_width_one_equals_greedy(setup):
    assert run(setup, max_new_tokens=15, num_beams=1) == run(setup, max_new_tokens=15)
    from mmstory.generation import _beam_search
    model, fused, ids, mask = setup
    beam1 = _beam_search(model.decoder, fused["tokens"], fused["mask"], ids, mask, model.tokenizer.eos_id,
                         DecodeOptions(max_new_tokens=15, num_beams=1))
    assert beam1 == run(setup, max_new_tokens=15)


def test_sampling_is_reproducible_with_a_seed(setup):
    a = run(setup, max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9, temperature=1.2, seed=3)
    b = run(setup, max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9, temperature=1.2, seed=3)
    c = run(setup, max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9, temperature=1.2, seed=4)
    assert a == b and a != c


def test_min_and_max_length(setup):
    model = setup[0]
    for row in run(setup, max_new_tokens=6, min_new_tokens=6):
        assert len(row) == 6
    with pytest.raises(ValueError, match="exceeds the decoder's max_len"):
        run(setup, max_new_tokens=model.decoder.max_len)


def test_top_k_one_sampling_equals_greedy(setup):
    assert run(setup, max_new_tokens=10, do_sample=True, top_k=1, seed=0) == run(setup, max_new_tokens=10)


def test_model_generate_api(setup):
    model = setup[0]
    out = model.generate({"image": torch.randn(2, 3, 32, 32)}, "caption:", max_new_tokens=5)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    with pytest.raises(ValueError, match="got 3 prompts for a batch of 2"):
        model.generate({"image": torch.randn(2, 3, 32, 32)}, ["a", "b", "c"])


@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_search_rows_decode_as_if_alone(setup, use_cache):
    """Beam search leaves the memory and cross-attention caches unreordered (beams never leave their
    input's rows); each row of a batch must still decode exactly as that input alone."""
    model, fused, ids, mask = setup
    tok = model.tokenizer
    opts = DecodeOptions(max_new_tokens=12, num_beams=3, use_cache=use_cache)
    batch = generate(model.decoder, fused["tokens"], fused["mask"], ids, mask, eos_id=tok.eos_id, pad_id=tok.pad_id,
                     opts=opts)
    for i in range(ids.shape[0]):
        keep = mask[i]
        alone = generate(model.decoder, fused["tokens"][i:i + 1], fused["mask"][i:i + 1], ids[i:i + 1, keep],
                         mask[i:i + 1, keep], eos_id=tok.eos_id, pad_id=tok.pad_id, opts=opts)
        assert alone[0] == batch[i]
