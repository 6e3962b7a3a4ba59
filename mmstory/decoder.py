"""The one autoregressive text decoder every generative task shares (captioning, QA, audio captioning).

Causal self-attention over the text, cross-attention to the fused tokens, an LM head tied to the token
embedding. Tasks differ only by their prompt prefix ("caption:", "question: ... answer:").

Two call modes, both through ``forward``:
- training: right-padded ``tokens`` (B, T), no positions, no cache -> plain causal attention (padding
  sits after the real tokens, so it never reaches them) and the fast SDPA kernels;
- generation: left-padded prompts with explicit ``positions`` and ``key_mask`` and a KV cache, so a
  batch of prompts of different lengths decodes together, one new token per step.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mmstory.encoders.base import pretrained_error
from mmstory.layers import CrossBlock, KVCache, init_weights, unless_all_true


LAST = (slice(None), -1)  # ``select`` for every row's last position


class CopyHead(nn.Module):
    """log(g * softmax(logits) + (1 - g) * copy): ``copy`` puts the attention of each hidden state over its
    row's memory tokens onto the token ids they stand for; g = sigmoid(gate(hidden))."""

    def __init__(self, dim: int, memory_dim: int):
        super().__init__()
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(memory_dim, dim, bias=False)
        self.gate = nn.Linear(dim, 1)

    def forward(self, h: torch.Tensor, logits: torch.Tensor, memory: torch.Tensor, ids: torch.Tensor,
                keep: torch.Tensor) -> torch.Tensor:
        """h (N, D), logits (N, V), memory (N, C, Dm), ids (N, C), keep (N, C) -> log-probabilities (N, V)."""
        scores = torch.einsum("nd,ncd->nc", self.q(h), self.k(memory)).float() / h.shape[-1] ** 0.5
        attn = scores.masked_fill(~keep, float("-inf")).softmax(-1).nan_to_num(0.0)  # a row with no ids: 0
        copy = torch.zeros_like(logits, dtype=torch.float32).scatter_add(1, ids.clamp(min=0), attn * keep)
        g = torch.sigmoid(self.gate(h).float())
        g = torch.where(keep.any(-1, keepdim=True), g, torch.ones_like(g))
        return torch.log((g * logits.float().softmax(-1) + (1 - g) * copy).clamp_min(1e-12))


class TextDecoder(nn.Module):
    def __init__(self, *, vocab_size: int, dim: int = 256, depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0,
                 max_len: int = 64, memory_dim: int | None = None, dropout: float = 0.0, copy: bool = False):
        super().__init__()
        self.args = dict(vocab_size=vocab_size, dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                         max_len=max_len, memory_dim=memory_dim, dropout=dropout, copy=copy)
        self.max_len = max_len
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(CrossBlock(dim, heads, memory_dim=memory_dim, mlp_ratio=mlp_ratio, dropout=dropout)
                                    for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        init_weights(self)
        self.lm_head.weight = self.tok.weight  # tied, as in GPT-2
        self.grad_checkpointing = False
        # copy: a pointer over memory tokens that stand for token ids (retrieved captions), mixed with the
        # vocabulary distribution by a learned gate (See et al.'s pointer-generator, 2017)
        self.copy = CopyHead(dim, memory_dim or dim) if copy else None

    def new_cache(self) -> list[tuple[KVCache, KVCache]]:
        """One (self-attention, cross-attention) cache pair per block."""
        return [(KVCache(), KVCache()) for _ in self.blocks]

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                cache: list[tuple[KVCache, KVCache]] | None = None, select: torch.Tensor | None = None,
                copy_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V), or logits at the positions ``select`` indexes only: a (B, T)
        bool mask -> (N, V) in row-major order (training scores targets only), ``LAST`` -> (B, V) (decoding
        needs the next token only). The vocabulary head is the largest matmul of a step for a large
        vocabulary, so it runs only where its output is used.

        ``copy_ids`` (B, C): with a copy head, the last C memory tokens stand for these token ids (-1: none);
        the output is then the log of the gated mixture of the vocabulary and copy distributions, a normalised
        log-probability that cross-entropy and decoding take as they take logits."""
        hidden = self.features(tokens, memory, memory_mask, positions=positions, key_mask=key_mask, cache=cache)
        h = hidden if select is None else hidden[select]
        logits = self.lm_head(h)
        if copy_ids is None or self.copy is None:
            return logits
        B, T = tokens.shape
        if select is None:
            rows = torch.arange(B, device=h.device).repeat_interleave(T)
        elif select is LAST:
            rows = torch.arange(B, device=h.device)
        else:
            rows = select.nonzero(as_tuple=True)[0]
        C = copy_ids.shape[1]
        keep = copy_ids >= 0
        if memory_mask is not None:
            keep = keep & memory_mask[:, -C:]
        out = self.copy(h.reshape(-1, h.shape[-1]), logits.reshape(-1, logits.shape[-1]), memory[:, -C:][rows],
                        copy_ids[rows], keep[rows])
        return out.view_as(logits)

    def features(self, tokens: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None, *,
                 positions: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                 cache: list[tuple[KVCache, KVCache]] | None = None) -> torch.Tensor:
        """tokens (B, T) -> final hidden states (B, T, D), before the vocabulary head.

        memory (B, M, Dm) fused tokens with memory_mask (B, M). For generation: positions (B, T) of the new
        tokens, key_mask (B, S) marking real tokens among all positions so far (cached + new, left padding
        False), and ``cache`` from ``new_cache()``.
        """
        B, T = tokens.shape
        past = cache[0][0].length if cache is not None else 0
        if positions is None:  # training: the bound is known on the host (no device sync)
            if past + T > self.max_len:
                raise ValueError(f"decoder position {past + T - 1} exceeds max_len {self.max_len}")
            positions = torch.arange(past, past + T, device=tokens.device).expand(B, T)
        elif int(positions.max()) >= self.max_len:
            raise ValueError(f"decoder position {int(positions.max())} exceeds max_len {self.max_len}")
        attn_mask = None
        if key_mask is not None:  # explicit mask: causal over absolute index & not left padding
            S = key_mask.shape[1]
            causal = torch.arange(S, device=tokens.device)[None, :] <= torch.arange(past, past + T, device=tokens.device)[:, None]
            attn_mask = key_mask[:, None, None, :] & causal[None, None]  # (B, 1, T, S)
        memory_mask = unless_all_true(memory_mask)  # once here, not in every layer's cross-attention
        x = self.drop(self.tok(tokens) + self.pos(positions))
        for i, block in enumerate(self.blocks):
            layer_cache = cache[i] if cache is not None else None
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, memory, memory_mask=memory_mask, is_causal=True,
                                                      use_reentrant=False)
            else:
                x = block(x, memory, memory_mask=memory_mask, attn_mask=attn_mask, is_causal=attn_mask is None,
                          cache=layer_cache, max_len=self.max_len)
        return self.ln_f(x)

    def checkpoint_args(self, folder) -> dict:
        return dict(self.args)

    @classmethod
    def from_gpt2(cls, path: str, *, memory_dim: int | None = None, dropout: float = 0.0) -> "TextDecoder":
        """Initialise from a transformers GPT-2-family causal LM (local folder or hub name).

        Self-attention, MLP, norms and embeddings are copied (GPT-2's Conv1D weights are transposed to
        Linear); the new cross-attention layers start with a zero output projection, so the decoder
        initially computes exactly the pretrained LM and learns to look at the fused tokens.
        """
        from transformers import AutoModelForCausalLM

        try:
            hf = AutoModelForCausalLM.from_pretrained(path)
        except Exception as e:
            raise pretrained_error("transformers", path, path, e) from e
        c = hf.config
        if c.model_type != "gpt2":
            raise ValueError(f"decoder init supports GPT-2-family checkpoints; '{path}' is '{c.model_type}'")
        if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT-2 checkpoint '{path}' uses activation '{c.activation_function}'; only the tanh GELU maps exactly")
        dec = cls(vocab_size=c.vocab_size, dim=c.n_embd, depth=c.n_layer, heads=c.n_head,
                  mlp_ratio=(c.n_inner or 4 * c.n_embd) / c.n_embd, max_len=c.n_positions, memory_dim=memory_dim,
                  dropout=dropout)
        sd = hf.state_dict()
        new = {"tok.weight": sd["transformer.wte.weight"], "pos.weight": sd["transformer.wpe.weight"],
               "ln_f.weight": sd["transformer.ln_f.weight"], "ln_f.bias": sd["transformer.ln_f.bias"]}
        names = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
                 "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
        for i in range(c.n_layer):
            for src, dst in names.items():
                w, b = sd[f"transformer.h.{i}.{src}.weight"], sd[f"transformer.h.{i}.{src}.bias"]
                # Conv1D stores (in, out); nn.Linear wants (out, in). LayerNorm weights are 1-D.
                new[f"blocks.{i}.{dst}.weight"] = w.t() if w.dim() == 2 else w
                new[f"blocks.{i}.{dst}.bias"] = b
        missing, unexpected = dec.load_state_dict(new, strict=False)
        assert not unexpected, unexpected
        assert all(".cross." in k or "ln_cross" in k or k == "lm_head.weight" for k in missing), missing
        for block in dec.blocks:
            nn.init.zeros_(block.cross.proj.weight)
            nn.init.zeros_(block.cross.proj.bias)
        dec.args["memory_dim"] = memory_dim
        return dec
