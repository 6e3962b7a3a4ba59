"""Text encoders from transformers: any encoder model (BERT, MiniLM, RoBERTa, ...) from a local
folder or hub name, or from a config dict (random weights)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mmstory.encoders.base import Encoder, EncoderOutput, pretrained_error
from mmstory.encoders.package_weights import PREFIX, package_folder


class HFTextEncoder(Encoder):
    """tokens: last hidden state (B, L, hidden); pooled: masked mean of the tokens (B, hidden), the
    pooling sentence-transformers models such as all-MiniLM-L6-v2 are trained with.

    ``path``: a local folder (``config.json``, weights, tokenizer files), a hub name, or a folder that ships in
    a pip package (``package:all_minilm_l6_v2``, mmstory/encoders/package_weights.py: works offline). With
    ``pretrained=False`` only its config and tokenizer are read. ``config`` (a dict, plus
    ``tokenizer_path``) builds the architecture without ``path`` — that is how checkpoints rebuild it.
    """

    modality = "text"

    def __init__(self, *, path: str | None = None, pretrained: bool = True, config: dict | None = None,
                 tokenizer_path: str | None = None, base_dir: str | None = None):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        from mmstory.tokenizer import HFTokenizer

        if (path is None) == (config is None):
            raise ValueError("hf_text needs exactly one of 'path' (folder or hub name) or 'config' (dict)")
        if path is not None and path.startswith(PREFIX):
            path = package_folder(path)
        try:
            if config is not None:
                hf_config = AutoConfig.for_model(**config)
                self.model = AutoModel.from_config(hf_config)
            elif pretrained:
                self.model = AutoModel.from_pretrained(path)
            else:
                self.model = AutoModel.from_config(AutoConfig.from_pretrained(path))
        except Exception as e:
            if config is not None or not pretrained:
                raise
            raise pretrained_error("transformers", path, path, e) from e
        if tokenizer_path and base_dir and not Path(tokenizer_path).is_absolute():
            tokenizer_path = str(Path(base_dir) / tokenizer_path)
        self.tokenizer = HFTokenizer(tokenizer_path or path)
        self.width = self.pooled_width = self.model.config.hidden_size
        self.max_len = getattr(self.model.config, "max_position_embeddings", 512)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> EncoderOutput:
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        tokens = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return EncoderOutput(tokens, mask, pooled)

    def checkpoint_args(self, folder, key: str | None = None) -> dict:
        name = f"{key or 'text'}_tokenizer"  # a model's text and question encoders keep their tokenizers apart
        self.tokenizer.save(Path(folder) / name)
        config = json.loads(self.model.config.to_json_string())  # plain data for config.yaml
        return {"config": config, "tokenizer_path": name}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # transformers checkpoints each layer, in training mode only. Newer versions name the methods
        # activation_checkpointing_* (the gradient_checkpointing_* names warn).
        m = self.model
        new_names = hasattr(m, "activation_checkpointing_enable")
        if not enable:
            (m.activation_checkpointing_disable if new_names else m.gradient_checkpointing_disable)()
            return
        # Non-reentrant, as our own towers: it needs no input that requires grad.
        (m.activation_checkpointing_enable if new_names else m.gradient_checkpointing_enable)({"use_reentrant": False})
        # Some versions also hook the input embeddings so that their output requires grad (only reentrant
        # checkpointing needs it): a frozen tower would then build an autograd graph, and run backward, for nothing.
        if getattr(m, "_require_grads_hook", None) is not None:
            m.disable_input_require_grads()
