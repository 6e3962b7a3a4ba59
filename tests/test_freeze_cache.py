"""Freezing submodules (LiT's locked tower) and the frozen-feature cache (mmstory/feature_cache.py)."""
import pytest
import torch

from mmstory.config import Component
from mmstory.feature_cache import FeatureCache
from mmstory.model import build_model
from conftest import TINY_ENCODER_ARGS, tiny_config


def _cnn_model(retrieval=None):
    cfg = tiny_config(audio=False)
    cfg.encoders["image"] = Component("timm_cnn", dict(TINY_ENCODER_ARGS["timm_cnn"]))  # has BatchNorm
    if retrieval is not None:
        cfg.retrieval = retrieval
    torch.manual_seed(0)
    return build_model(cfg)


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_frozen_tower_gets_no_update_and_keeps_its_batchnorm_statistics():
    model = _cnn_model()
    model.freeze(["encoders.image"])
    model.train()
    image = model.encoders["image"]
    assert not image.training and all(not m.training for m in image.modules())
    assert model.embed_proj.training and model.decoder.training
    assert not any(p.requires_grad for p in image.parameters())
    before, proj_before = _state(image), _state(model.embed_proj)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = model.embed(model.encode({"image": torch.randn(4, 3, 32, 32) * 3 + 1}))["image"].square().sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = _state(image)
    assert before.keys() == after.keys() and any("running_mean" in k for k in after)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    assert any(not torch.equal(v, model.embed_proj.state_dict()[k]) for k, v in proj_before.items())


def test_freeze_names_an_unknown_submodule():
    with pytest.raises(ValueError, match="no submodule 'encoders.imag'.*encoders.image"):
        _cnn_model().freeze(["encoders.imag"])


class _Counting(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder, self.rows = encoder, 0

    def forward(self, x, mask=None):
        self.rows += x.shape[0]
        return self.encoder(x, mask)


def test_feature_cache_encodes_each_sample_once_and_returns_what_the_encoder_computes():
    model = _cnn_model().eval()
    counting = _Counting(model.encoders["image"])
    model.encoders["image"] = counting
    images = torch.randn(6, 3, 32, 32)
    keys = [f"s{i}" for i in range(6)]
    cache = FeatureCache(["image"])
    first = cache(model, {"__key__": keys[:4], "image": images[:4]})["image"]
    # a later batch mixes seen and new samples in another order
    order = [5, 1, 4, 0]
    second = cache(model, {"__key__": [keys[i] for i in order], "image": images[order]})["image"]
    assert counting.rows == 6 and (cache.hits, cache.misses) == (2, 6)
    with torch.no_grad():
        direct = counting.encoder(images)
    torch.testing.assert_close(first.pooled, direct.pooled[:4])
    torch.testing.assert_close(second.tokens, direct.tokens[order])
    torch.testing.assert_close(second.pooled, direct.pooled[order])


def test_feature_cache_refuses_an_input_that_changed():
    model = _cnn_model().eval()
    cache = FeatureCache(["image"])
    images = torch.randn(2, 3, 32, 32)
    cache(model, {"__key__": ["a", "b"], "image": images})
    with pytest.raises(RuntimeError, match="input of sample 'b' changed between epochs"):
        cache(model, {"__key__": ["a", "b"], "image": images + torch.tensor([0.0, 0.5]).view(2, 1, 1, 1)})
    with pytest.raises(ValueError, match="cannot cache \\['text'\\]"):
        FeatureCache(["text"])


def test_datastore_fills_the_cache_so_training_runs_the_frozen_tower_once_per_image(tmp_path):
    from mmstory.config import DataConfig, RetrievalConfig
    from mmstory.data.loader import build_loader, fit_to_encoders, model_text_args
    from mmstory.datastore import build_datastore
    from test_baselines import LABELS, _glyph, _write

    shard = _write(tmp_path / "train.tar", [(f"t{i}", _glyph(i % 4, i), LABELS[i % 4]) for i in range(8)])
    model, plain = (_cnn_model(RetrievalConfig(k=1, max_tokens=6)) for _ in range(2))  # the same weights (seed 0)
    model.freeze(["encoders.image"])
    rows = []  # images the tower ran on
    model.encoders["image"].register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    data = DataConfig(workers=0, batch_size=3, augment=False)
    cache = FeatureCache(["image"])
    assert build_datastore(model, [shard], data=data, progress=False, cache=cache) == {"image": 8}
    assert sum(rows) == 8 and sorted(cache.rows["image"]) == [f"t{i}" for i in range(8)]
    build_datastore(plain, [shard], data=data, progress=False)  # the same keys without a cache
    torch.testing.assert_close(model.memory.store().keys, plain.memory.store().keys)
    # an epoch of the training loader (no augmentation) finds every image in the cache, with the same input
    cfg, norm = fit_to_encoders(data, model.encoders)
    for batch in build_loader([shard], cfg, **model_text_args(model), train=True, **norm):
        cache(model, batch)
    assert sum(rows) == 8 and cache.misses == 8 and cache.hits == 8
