"""Clips that retrieve (model.retrieval.audio) and the audio nearest-neighbour baseline: the log-mel key, the clips'
datastore built from an audio split, saved and loaded beside the image one, and evaluate's log-mel NN numbers."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from conftest import tiny_config
from mmstory.baselines import logmel_features
from mmstory.config import DataConfig, RetrievalConfig
from mmstory.datastore import build_datastore
from mmstory.encoders.audio import LogMel
from mmstory.evaluate import comparison_table, evaluate, reference_bank
from mmstory.generation import DecodeOptions
from mmstory.model import build_model, load

SR = 16000
SOUNDS = ["low hum", "bright bell", "high whistle", "rising siren"]


def _clip(kind: int, seed: int, seconds: float = 0.6) -> np.ndarray:
    """A tone whose pitch contour says its kind (a little noise and a random length on top)."""
    rng = np.random.RandomState(seed)
    t = np.arange(int(SR * seconds * rng.uniform(0.8, 1.2))) / SR
    freq = [200 + 0 * t, 1200 + 0 * t, 4000 + 0 * t, 500 + 3000 * t / t[-1]][kind]
    wave = 0.5 * np.sin(2 * np.pi * np.cumsum(freq) / SR) + 0.01 * rng.randn(len(t))
    return wave.astype(np.float32)


def _write(path, rows: list[tuple[str, np.ndarray, str]]) -> str:
    import soundfile as sf
    import webdataset as wds

    with wds.TarWriter(str(path)) as w:
        for key, wave, label in rows:
            buf = io.BytesIO()
            sf.write(buf, wave, SR, format="FLAC")
            meta = {"captions": [label, f"the sound of a {label}"], "labels": {"label": label},
                    "qa": [{"question": "what is heard?", "answers": [label], "type": "what"},
                           {"question": "is this high?", "answers": ["yes" if "high" in label else "no"],
                            "type": "yesno"}]}
            w.write({"__key__": key, "flac": buf.getvalue(), "json": json.dumps(meta).encode()})
    return str(path)


def _direct_logmel(wave: np.ndarray, frames: int = 16) -> np.ndarray:
    """The log-mel key by hand: the clip's log-mel frames, linearly resampled (sample centres, as
    align_corners=False) with numpy, mean-centred, unit norm."""
    mel = LogMel(n_mels=32)(torch.from_numpy(wave)[None])[0].numpy().T  # (n_mels, F)
    n = mel.shape[1]
    pos = np.clip((np.arange(frames) + 0.5) * n / frames - 0.5, 0, n - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    out = mel[:, lo] * (1 - (pos - lo)) + mel[:, hi] * (pos - lo)
    out = (out - out.mean()).reshape(-1)
    return out / np.linalg.norm(out)


def test_logmel_key_matches_a_direct_computation_and_ignores_padding():
    logmel = LogMel(n_mels=32)
    clips = [_clip(k, k) for k in range(3)]
    T = max(len(c) for c in clips) + 4000
    wave = torch.zeros(3, T)
    mask = torch.zeros(3, T, dtype=torch.bool)
    for i, c in enumerate(clips):
        wave[i, :len(c)], mask[i, :len(c)] = torch.from_numpy(c), True
    got = logmel_features(wave, mask, logmel)
    assert got.shape == (3, 32 * 16)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(3))
    # padding to the batch's length changes only the frames that straddle the clip's end
    for i, c in enumerate(clips):
        assert float(got[i] @ torch.from_numpy(_direct_logmel(c)).float()) > 0.99
    # and on the same padded input it is exactly the computation by hand
    for i, c in enumerate(clips):
        n = int(logmel.frames(torch.tensor(len(c))))
        mel = logmel(wave[i:i + 1] * mask[i:i + 1])[0, :n].numpy().T
        pos = np.clip((np.arange(16) + 0.5) * n / 16 - 0.5, 0, n - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        want = mel[:, lo] * (1 - (pos - lo)) + mel[:, hi] * (pos - lo)
        want = (want - want.mean()).reshape(-1)
        np.testing.assert_allclose(got[i].numpy(), want / np.linalg.norm(want), atol=1e-5)
    # another saying of the same sound is nearer than any other sound
    other = logmel_features(torch.from_numpy(_clip(1, 99))[None], None, logmel)
    assert int((other @ got.T).argmax()) == 1


@pytest.fixture
def audio_model(tmp_path):
    cfg = tiny_config()
    cfg.retrieval = RetrievalConfig(k=1, max_tokens=6, copy=True, audio=16)
    cfg.decoder.max_len = 64
    torch.manual_seed(0)
    return build_model(cfg).eval()


def test_clips_retrieve_the_caption_of_the_nearest_training_clip(audio_model, tmp_path):
    from test_baselines import LABELS, _glyph, _write as write_images

    model = audio_model
    audio_tar = _write(tmp_path / "audio.tar", [(f"a{k}", _clip(k, k), SOUNDS[k]) for k in range(4)])
    image_tar = write_images(tmp_path / "img.tar", [(f"t{i}", _glyph(i % 4, i), LABELS[i % 4]) for i in range(4)])
    data = DataConfig(workers=0)
    assert build_datastore(model, [audio_tar], data=data, progress=False) == {"audio": 4}
    assert build_datastore(model, [image_tar], data=data, progress=False) == {"image": 4}
    assert model.memory.store("audio").texts == SOUNDS and len(model.memory.store("image").texts) == 4

    # a new saying of each sound retrieves that sound's caption: the copy ids are its datastore entry's tokens
    waves = torch.zeros(4, SR)
    mask = torch.zeros(4, SR, dtype=torch.bool)
    for k in range(4):
        c = torch.from_numpy(_clip(k, 50 + k))
        waves[k, :len(c)], mask[k, :len(c)] = c, True
    media = {"audio": waves, "audio_mask": mask}
    fused = model.fuse(model.encode(media), media=media)
    ids = model.memory.store("audio").ids
    want = ids.masked_fill(ids == model.memory.pad_id, -1)
    assert torch.equal(fused["copy_ids"], want)
    with pytest.raises(ValueError, match="needs the waveforms"):
        model.fuse(model.encode(media))
    # training may exclude a clip's own entry: then the next nearest is taken
    assert model.memory.nearest(model.audio_retrieval_key(waves, mask), exclude=["a0", None, None, None],
                                modality="audio")[0, 0] != 0

    # both datastores are saved with the model and read back by load
    model.save(tmp_path / "m")
    assert set(json.loads((tmp_path / "m" / "memory.json").read_text())) == {"pad_id", "texts", "names", "audio"}
    back = load(tmp_path / "m")
    assert back.memory.store("audio").texts == SOUNDS
    torch.testing.assert_close(back.fuse(back.encode(media), media=media)["copy_ids"], fused["copy_ids"])
    # a model folder whose memory has no clips' datastore (saved before audio retrieval) fails clearly
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(tmp_path / "m" / "memory.safetensors"))
    image_only = {k: v for k, v in tensors.items() if not k.startswith("audio.")}
    save_file(image_only, str(tmp_path / "m" / "memory.safetensors"))
    with pytest.raises(FileNotFoundError, match="no audio datastore"):
        back.memory.load(tmp_path / "m")


def test_audio_retrieval_needs_an_audio_encoder_and_training_clips():
    from mmstory.config import TrainConfig
    from mmstory.config import ConfigError
    from mmstory.train import check_run_config

    cfg = tiny_config(audio=False)
    cfg.retrieval = RetrievalConfig(k=1, audio=16)
    with pytest.raises(ValueError, match="model.retrieval.audio needs an audio encoder"):
        build_model(cfg)
    run = TrainConfig()
    run.model.retrieval = RetrievalConfig(k=1, audio=16)
    run.freeze = ["encoders.image"]
    run.data.train = {"image": "train"}
    with pytest.raises(ConfigError, match="data.train.audio"):
        check_run_config(run)


def test_logmel_nn_baseline_equals_a_direct_computation(tmp_path):
    """evaluate's log-mel NN answers and captions for clips are those of the training clip nearest by the log-mel
    key computed here from the waveforms themselves; the report puts them in a log-mel NN column."""
    train = [(f"t{i}", _clip(i % 4, i), SOUNDS[i % 4]) for i in range(8)]
    val = [(f"v{i}", _clip((i * 3) % 4, 100 + i), SOUNDS[(i * 3) % 4]) for i in range(5)]
    train_tar, val_tar = _write(tmp_path / "train.tar", train), _write(tmp_path / "val.tar", val)
    cfg = tiny_config()
    cfg.decoder.max_len = 64
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    data = DataConfig(workers=0)
    ref = reference_bank(model, [train_tar], data=data, batch_size=3, progress=False, modality="audio")
    assert ref.modality == "audio" and set(ref.features) == {"logmel_nn", "embedding_nn"}
    res = evaluate(model, [val_tar], decode=DecodeOptions(max_new_tokens=3), batch_size=4, data=data, meteor=False,
                   reference=[ref], progress=False)
    got = res["metrics"]["baselines"]["logmel_nn"]

    logmel = model.encoders["audio"].logmel
    key = lambda rows: torch.cat([logmel_features(torch.from_numpy(w)[None], None, logmel) for _, w, _ in rows])
    nearest = (key(val) @ key(train).T).argmax(dim=1).tolist()
    named = [train[j][2] == label for j, (_, _, label) in zip(nearest, val)]
    assert got["caption"]["label_accuracy"] == pytest.approx(sum(named) / len(val))
    assert got["qa"]["per_type"]["what"] == pytest.approx(sum(named) / len(val))
    assert sum(named) >= 4  # the toy sounds are told apart by their log-mel
    table = "\n".join(comparison_table(res["metrics"]))
    assert "log-mel NN" in table and "pixel NN" not in table


def test_media_dropout_hides_the_media_of_some_training_rows_only(audio_model):
    """retrieval.media_dropout: in training, a hidden row's decoder memory masks every image / audio token (only the
    retrieved caption is left to read), the other rows keep theirs; the rows come from the torch RNG; evaluation
    hides nothing."""
    from mmstory.config import RetrievalConfig

    model = audio_model
    model.config.retrieval = RetrievalConfig(k=1, max_tokens=6, copy=True, audio=16, media_dropout=0.5)
    from test_baselines import LABELS
    model.memory.fill(torch.nn.functional.normalize(torch.randn(4, model.encoders["image"].pooled_width), dim=-1),
                      LABELS, [f"t{i}" for i in range(4)], model.tokenizer)
    images = torch.randn(8, 3, 32, 32)
    media = {"image": images}
    n_image = model.encode(media)["image"].tokens.shape[1]
    model.train()
    torch.manual_seed(3)
    fused = model.fuse(model.encode(media), media=media)
    hidden = ~fused["mask"][:, :n_image].any(dim=1)
    assert 0 < int(hidden.sum()) < 8  # p 0.5 over 8 rows, seeded: some of each
    assert fused["mask"][~hidden, :n_image].all() and fused["mask"][:, n_image:].any(dim=1).all()
    torch.manual_seed(3)  # the same seed draws the same rows, whatever the images
    other = {"image": images.flip(0)}
    again = model.fuse(model.encode(other), media=other)
    assert torch.equal(~again["mask"][:, :n_image].any(dim=1), hidden)
    model.eval()
    assert model.fuse(model.encode(media), media=media)["mask"][:, :n_image].all()
    with pytest.raises(ValueError, match="media_dropout"):
        RetrievalConfig(k=1, media_dropout=1.0)


@pytest.mark.parametrize("fusion", ["concat", "weighted", "cross_attention"])
def test_media_dropout_trains_with_every_fusion(fusion):
    """A row with every media token hidden still gives a finite loss and finite gradients, whatever the fusion
    (the cross-attention latents then read no media token at all)."""
    from conftest import make_batch

    cfg = tiny_config(fusion=fusion, fusion_args={"num_latents": 4} if fusion == "cross_attention" else None)
    cfg.retrieval = RetrievalConfig(k=1, max_tokens=6, copy=True, media_dropout=0.9)
    cfg.decoder.max_len = 64
    torch.manual_seed(0)
    model = build_model(cfg).train()
    model.memory.fill(torch.nn.functional.normalize(torch.randn(4, model.encoders["image"].pooled_width), dim=-1),
                      ["a", "b", "c", "d"], list("abcd"), model.tokenizer)
    out = model(make_batch(model, B=4, audio=False))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
