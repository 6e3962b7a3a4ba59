"""Shared Transformer layers used by the ViT, text, audio, fusion and decoder code.

Shapes: B batch, T query length, S key length (cache included), D width, H heads, hd = D // H.
Masks are bool with True = "real token / may attend". All attention goes through
``F.scaled_dot_product_attention`` so PyTorch picks the fastest kernel; we pass no mask at all when
none is needed (a causal or unpadded batch), since an explicit mask rules out the flash kernel.

The layout (pre-LayerNorm, fused qkv, tanh-GELU MLP, learned positions) matches GPT-2, so a GPT-2
checkpoint maps onto ``CrossBlock`` weights one to one (see ``decoder.py``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


class KVCache:
    """Preallocated keys/values for one attention layer: ``k, v`` of shape (B, H, max_len, hd).

    ``length`` is how many positions are filled. Cross-attention caches store the projected memory
    once (``length`` = memory length) and are never appended to.
    """

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, T, hd = k.shape
        if self.k is None:
            self.k = k.new_zeros(B, H, max_len, hd)
            self.v = v.new_zeros(B, H, max_len, hd)
        if self.length + T > self.k.shape[2]:
            raise ValueError(f"KV cache overflow: {self.length + T} positions > max_len {self.k.shape[2]}")
        self.k[:, :, self.length:self.length + T] = k
        self.v[:, :, self.length:self.length + T] = v
        self.length += T
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search keeps the surviving beams)."""
        if self.k is not None:
            self.k = self.k.index_select(0, index)
            self.v = self.v.index_select(0, index)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
              is_causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, except in bf16 training on the CPU, where it takes the math kernel:
    there the CPU flash kernel's backward is several times slower at this codebase's sizes (measured, 2-core
    AVX512-BF16 CPU, (B, H, T, hd) = (64, 3, 48, 64): backward 24.3 ms flash vs 5.2 ms math; forward 2.7 vs
    6.0 ms, so inference keeps the flash kernel; in fp32 flash is faster both ways)."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                  dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p)


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, T, D = x.shape  # (B, T, D) -> (B, H, T, hd)
    return x.view(B, T, n_heads, D // n_heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    B, H, T, hd = x.shape  # (B, H, T, hd) -> (B, T, D)
    return x.transpose(1, 2).reshape(B, T, H * hd)


def unless_all_true(mask: torch.Tensor | None) -> torch.Tensor | None:
    """None when every entry of a bool mask is True, so attention runs unmasked (faster kernels). The
    check reads the mask on the host; under torch.compile it is skipped (a graph break) and the mask
    kept. Call it once before a stack of layers that share the mask: each call is a host sync."""
    if mask is None or (not torch.compiler.is_compiling() and bool(mask.all())):
        return None
    return mask


def key_padding_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) bool -> (B, 1, 1, S) for SDPA; None when every key is real (``unless_all_true``)."""
    mask = unless_all_true(mask)
    return None if mask is None else mask[:, None, None, :]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, *, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, *, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None, max_len: int = 0) -> torch.Tensor:
        """x (B, T, D); attn_mask broadcastable to (B, H, T, S) bool. With a cache, new keys are
        appended and attention covers all cached positions (the caller builds the mask)."""
        q, k, v = (_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        if cache is not None:
            k, v = cache.append(k, v, max_len)
        drop = self.dropout if self.training else 0.0
        y = attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None, dropout_p=drop)
        return self.proj(_merge(y))


class CrossAttention(nn.Module):
    """Queries from x (width ``dim``) attend to a memory of width ``memory_dim``."""

    def __init__(self, dim: int, heads: int, *, memory_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(memory_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, *, memory_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, D), memory (B, M, Dm), memory_mask (B, M) bool. The cache keeps the projected
        memory so generation projects it once, not once per step."""
        q = _heads(self.q(x), self.heads)
        if cache is not None and cache.k is not None:
            k, v = cache.k, cache.v
        else:
            k, v = (_heads(t, self.heads) for t in self.kv(memory).chunk(2, dim=-1))
            if cache is not None:  # stored contiguous: CPU SDPA reads strided views ~2x slower
                k, v = k.contiguous(), v.contiguous()
                cache.k, cache.v, cache.length = k, v, k.shape[2]
        drop = self.dropout if self.training else 0.0
        y = attention(q, k, v, attn_mask=key_padding_mask(memory_mask), dropout_p=drop)
        return self.proj(_merge(y))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, *, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm Transformer block: self-attention + MLP (encoders)."""

    def __init__(self, dim: int, heads: int, *, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout=dropout)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout=dropout)

    def forward(self, x: torch.Tensor, *, attn_mask: torch.Tensor | None = None, is_causal: bool = False
                ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask, is_causal=is_causal)
        return x + self.mlp(self.ln_2(x))


class CrossBlock(nn.Module):
    """Pre-norm block with self-attention, cross-attention to a memory, and an MLP (decoder, fusion)."""

    def __init__(self, dim: int, heads: int, *, memory_dim: int | None = None, mlp_ratio: float = 4.0,
                 dropout: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout=dropout)
        self.ln_cross = nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, heads, memory_dim=memory_dim, dropout=dropout)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout=dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, *, memory_mask: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                cache: tuple[KVCache, KVCache] | None = None, max_len: int = 0) -> torch.Tensor:
        self_cache, cross_cache = cache if cache is not None else (None, None)
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask, is_causal=is_causal, cache=self_cache, max_len=max_len)
        x = x + self.cross(self.ln_cross(x), memory, memory_mask=memory_mask, cache=cross_cache)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of ``Block`` with a final LayerNorm; bidirectional with key padding (encoders)."""

    def __init__(self, dim: int, depth: int, heads: int, *, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio=mlp_ratio, dropout=dropout) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D), mask (B, N) bool -> (B, N, D)."""
        attn_mask = key_padding_mask(mask)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask=attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask)
        return self.ln_f(x)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2 style initialisation for modules we build from scratch."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
