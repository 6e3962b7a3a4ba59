"""int8 weights for CPU inference: every ``nn.Linear`` of a model (towers, fusion, retrieval reader, decoder,
and the vocabulary head) becomes an ``Int8Linear``.

Scheme: weights symmetric int8 per output channel (scale = max |w| / 127 of each row), activations quantized
to 8 bits per tensor at run time ("dynamic": no calibration data), accumulated in int32 and rescaled to float
-- the scheme of ``torch.ao.quantization.quantize_dynamic``. On x86 the matmul is FBGEMM's
``quantized::linear_dynamic`` (AVX2, and VNNI on AVX512 CPUs), the kernel ``quantize_dynamic`` calls.

Why this and not torchao: torchao (0.18, the successor of ``torch.ao.quantization``) computes
``Int8DynamicActivationInt8WeightConfig`` on the CPU through generic int8 matmuls that were slower than FBGEMM at
this codebase's sizes, and ``Int8WeightOnlyConfig`` dequantizes into a float matmul (no speed, only size);
measured in ``experiments/bench/quantize_kernels.py``. ``quantize_dynamic``'s own modules keep the weights in
FBGEMM's packed format, which only ``torch.save`` (pickle) can write. So the weights are kept here as plain
buffers -- an int8 matrix and a float scale per row -- that safetensors writes and reads, and are packed for
the kernel on first use. A saved quantized model loads without unpickling anything.

Convolutions (the frozen EfficientNet image tower) stay in float: int8 convolutions need static quantization
with calibration data and a traced graph, and the tower is a small part of a caption's time (see the table
in experiments/README.md).
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (int8 (out, in), scale (out,) float32), symmetric per row: w ~= q * scale[:, None]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


@functools.cache
def fbgemm_available() -> bool:
    """Whether this torch build has FBGEMM (x86); asked once, not on every forward."""
    return "fbgemm" in torch.backends.quantized.supported_engines


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights (``weight_int8`` (out, in), ``weight_scale`` (out,)) and a float bias.

    On the CPU the product runs in FBGEMM's dynamic int8 kernel (the input is quantized per call);
    elsewhere (CUDA, or a CPU build without FBGEMM) the weight is dequantized and a float matmul runs, so a
    quantized model still works there, only without the speed-up."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._packed = None  # FBGEMM's packed weight, built on first use from the buffers above

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8Linear":
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        q.weight_int8, q.weight_scale = quantize_rows(linear.weight)
        if linear.bias is not None:
            q.bias.data = linear.bias.detach().float().clone()
        return q.to(linear.weight.device)

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None  # new weights: pack again
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._packed = None  # moved or cast: pack again
        return super()._apply(fn, *args, **kwargs)

    def _pack(self):
        with warnings.catch_warnings():  # torch 2.14 deprecates quantized tensors; FBGEMM's prepack still takes one
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            qweight = torch._make_per_channel_quantized_tensor(
                self.weight_int8, self.weight_scale.double(), torch.zeros(self.out_features, dtype=torch.long), 0)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None if self.bias is None else self.bias.float())
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not fbgemm_available():
            return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        packed = self._packed if self._packed is not None else self._pack()
        flat = x.reshape(-1, self.in_features).float().contiguous()
        # reduce_range: 7-bit activations, as quantize_dynamic does for FBGEMM, so AVX2's 16-bit
        # multiply-add (vpmaddubsw) cannot saturate
        y = torch.ops.quantized.linear_dynamic(flat, packed, True)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def linear_names(model: nn.Module, skip: list[str] = ()) -> list[str]:
    """Names of the ``nn.Linear`` modules ``quantize_linear`` replaces (all but those under a ``skip`` prefix)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)
            and not any(name == s or name.startswith(s + ".") for s in skip)]


def quantize_linear(model: nn.Module, skip: list[str] = (), *, empty: bool = False) -> list[str]:
    """Replace each ``nn.Linear`` (but those under ``skip``) by an ``Int8Linear`` in place; returns their names.
    ``empty``: only the structure (the int8 weights are about to be loaded from a file)."""
    names = linear_names(model, skip)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if empty:
            q = Int8Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
            q = q.to(linear.weight.device)
        else:
            q = Int8Linear.from_float(linear)
        setattr(parent, child, q)
    return names


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the linear layers' weights as stored: float weights, or int8 + one float32 scale per row
    (biases excluded: they stay float either way). A weight tied to an embedding counts once per layer."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, Int8Linear):
            total += m.weight_int8.numel() + m.weight_scale.numel() * m.weight_scale.element_size()
    return total
