"""Audio encoder: a log-mel front end computed in torch, then a Transformer over frame patches.

The mel filterbank comes from transformers' audio utilities (Slaney scale, as librosa/Whisper), so we
need neither torchaudio nor librosa; the STFT runs in torch, on the model's device, inside autograd.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from mmstory.encoders.base import Encoder, EncoderOutput
from mmstory.layers import MLP, Transformer, init_weights


class LogMel(nn.Module):
    """Waveform (B, T) at ``sample_rate`` -> normalised log-mel (B, frames, n_mels).

    Whisper's normalisation: log10, floor at (max - 8), then (x + 4) / 4, which keeps values near [-1, 1].
    """

    def __init__(self, *, sample_rate: int = 16000, n_fft: int = 400, hop_length: int = 160, n_mels: int = 64,
                 f_min: float = 0.0, f_max: float | None = None):
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        self.n_fft, self.hop_length = n_fft, hop_length
        fb = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=f_min,
                             max_frequency=f_max or sample_rate / 2, sampling_rate=sample_rate,
                             norm="slaney", mel_scale="slaney")
        self.register_buffer("fb", torch.tensor(fb, dtype=torch.float32).T.contiguous(), persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def frames(self, n_samples: torch.Tensor) -> torch.Tensor:
        """Number of STFT frames (center=True) covering ``n_samples`` samples."""
        return n_samples // self.hop_length + 1

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        short = self.n_fft // 2 + 1 - wave.shape[-1]
        if short > 0:  # stft's centring reflects n_fft // 2 samples at each end: a shorter clip is zero-padded
            wave = nn.functional.pad(wave, (0, short))
        spec = torch.stft(wave.float(), self.n_fft, self.hop_length, window=self.window, center=True,
                          return_complex=True).abs().pow(2)  # (B, F, frames)
        mel = torch.matmul(self.fb, spec).clamp(min=1e-10).log10()  # (B, n_mels, frames)
        mel = torch.maximum(mel, mel.amax(dim=(1, 2), keepdim=True) - 8.0)
        return ((mel + 4.0) / 4.0).transpose(1, 2)


class AudioTransformerEncoder(Encoder):
    """Log-mel frames, ``frames_per_token`` consecutive frames per token, class token, Transformer.

    Input wave (B, T) float and mask (B, T) bool (True = real sample; padding is zeroed first so its
    content cannot leak in). tokens (B, 1 + N, width), mask (B, 1 + N), pooled = class token.
    """

    modality = "audio"

    def __init__(self, *, sample_rate: int = 16000, n_fft: int = 400, hop_length: int = 160, n_mels: int = 64,
                 frames_per_token: int = 4, max_seconds: float = 10.0, width: int = 256, depth: int = 4,
                 heads: int = 4, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.width = self.pooled_width = width
        self.sample_rate, self.max_seconds, self.frames_per_token = sample_rate, max_seconds, frames_per_token
        self.preprocess = {"sample_rate": sample_rate}
        self.logmel = LogMel(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels)
        max_frames = int(max_seconds * sample_rate) // hop_length + 1
        self.patch = nn.Linear(frames_per_token * n_mels, width)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.zeros(1, 1 + math.ceil(max_frames / frames_per_token), width))
        self.transformer = Transformer(width, depth, heads, mlp_ratio=mlp_ratio, dropout=dropout)
        init_weights(self)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, wave: torch.Tensor, mask: torch.Tensor | None = None) -> EncoderOutput:
        B, T = wave.shape
        if T > self.max_seconds * self.sample_rate:
            raise ValueError(f"audio of {T / self.sample_rate:.2f} s exceeds max_seconds={self.max_seconds}")
        if mask is None:
            mask = torch.ones_like(wave, dtype=torch.bool)
        mel = self.logmel(wave * mask)  # (B, F, n_mels)
        F_, n_mels = mel.shape[1:]
        k = self.frames_per_token
        mel = nn.functional.pad(mel, (0, 0, 0, (-F_) % k))
        x = self.patch(mel.reshape(B, -1, k * n_mels))  # (B, N, width)
        valid_frames = self.logmel.frames(mask.sum(1))  # (B,)
        token_mask = torch.arange(x.shape[1], device=x.device)[None, :] * k < valid_frames[:, None]
        x = torch.cat([self.cls.expand(B, -1, -1), x], dim=1) + self.pos[:, : x.shape[1] + 1]
        mask = torch.cat([token_mask.new_ones(B, 1), token_mask], dim=1)
        x = self.transformer(x, mask)
        return EncoderOutput(x, mask, x[:, 0])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def resizable_mlps(self) -> list[MLP]:
        return [m for m in self.transformer.modules() if isinstance(m, MLP)]
