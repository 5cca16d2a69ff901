"""Weight formats: quantize / dequantize a 2-D weight [rows, cols] in PyTorch.

The paper's formats (report §5, Table 3) plus the GGUF block types llama.cpp runs:

| name | layout per row | bits/weight | error bound per weight (s = the scale that applies) |
|---|---|---|---|
| `int8-channel` | int8 q, one f32 scale per row, s = max\\|row\\| / 127 | 8 (+32/row) | s/2 |
| `int4-channel` | int4 q packed 2/byte, one f32 scale per row, s = max\\|row\\| / 7 | 4 (+32/row) | s/2 |
| `int4-block32` | = GGUF Q4_0: blocks of 32, f16 d = signed max / -8, q ∈ [-8, 7] | 4.5 | see `Q4_0` |
| `sfp8` | gemma.cpp SFP codes (`sfp8.py`), one f32 scale per tensor | 8 | relative 2^-4 + 2^-6 (2^-3 + 2^-6 below 2^-7·s) |
| `q8_0` `q4_1` `q5_0` `q5_1` `f16` `bf16` `f32` | GGUF types, quantized by the `gguf` package | 8.5 / 5 / 5.5 / 6 / 16 / 16 / 32 | |

Every format stores a weight as `Quantized(data uint8 [rows, row_bytes], scale)`; rows are
independent (a block never crosses a row), so an embedding lookup decodes only the rows it needs.
`int4-block32` is written here in PyTorch, byte-identical to `gguf.quants.quantize(x, Q4_0)`
(llama.cpp's reference `quantize_row_q4_0_ref`), so its files run in llama.cpp unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..formats import ggml as quants
from ..formats.ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType
from . import sfp8


class QuantError(ValueError):
    """An unknown format or recipe, or a weight a format cannot hold. One-line message."""


@dataclass
class Quantized:
    """A weight of `shape` [rows, cols] in format `fmt`: `data` uint8 [rows, row_bytes]; `scale`
    float32 [rows] (per row), [] (per tensor) or None (scales live inside the GGUF blocks)."""

    fmt: str
    shape: tuple[int, int]
    data: torch.Tensor
    scale: torch.Tensor | None = None

    def rows(self, index: torch.Tensor | slice) -> "Quantized":
        """The rows `index` (1-D tensor or slice) of the weight, still quantized."""
        scale = self.scale[index] if self.scale is not None and self.scale.dim() == 1 else self.scale
        data = self.data[index]
        return Quantized(self.fmt, (data.shape[0], self.shape[1]), data, scale)

    @property
    def nbytes(self) -> int:
        return self.data.numel() + (0 if self.scale is None else self.scale.numel() * 4)


class Format:
    name: str
    ggml_type: GGMLQuantizationType | None = None  # the GGUF type with the same bytes, if any
    block: int = 1  # row length must be a multiple of this
    per_tensor_scale: bool = False  # True: one scale from the whole tensor, so rows are not quantized apart

    def check(self, shape: tuple[int, ...], what: str = "weight"):
        if len(shape) != 2 or shape[1] % self.block:
            raise QuantError(f"{self.name} cannot hold {what} of shape {tuple(shape)}: rows must be a multiple of "
                             f"{self.block} values")

    def quantize(self, w: torch.Tensor) -> Quantized:
        raise NotImplementedError

    def dequantize(self, q: Quantized) -> torch.Tensor:
        raise NotImplementedError


def _safe(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale == 0, torch.ones_like(scale), scale)  # all-zero rows: q = 0, any scale


class Int8Channel(Format):
    """Symmetric int8, one scale per output channel (row)."""

    name = "int8-channel"

    def quantize(self, w):
        scale = w.abs().amax(dim=1) / 127
        q = torch.round(w / _safe(scale)[:, None]).clamp(-127, 127).to(torch.int8)
        return Quantized(self.name, tuple(w.shape), q.view(torch.uint8), scale)

    def dequantize(self, q):
        return q.data.view(torch.int8).float() * q.scale[:, None]


class Int4Channel(Format):
    """Symmetric int4 in [-7, 7], one scale per output channel (row); two values per byte,
    value 2j in the low nibble and 2j+1 in the high one, stored with a +8 offset."""

    name = "int4-channel"
    block = 2

    def quantize(self, w):
        scale = w.abs().amax(dim=1) / 7
        q = (torch.round(w / _safe(scale)[:, None]).clamp(-7, 7) + 8).to(torch.uint8)
        return Quantized(self.name, tuple(w.shape), q[:, 0::2] | (q[:, 1::2] << 4), scale)

    def dequantize(self, q):
        nibbles = torch.stack([q.data & 0x0F, q.data >> 4], dim=-1).reshape(q.data.shape[0], -1)
        return (nibbles.float() - 8) * q.scale[:, None]


class Q4_0(Format):
    """Blocks of 32: d = (the value of largest magnitude) / -8 stored as f16, q = trunc(x/d + 8.5)
    clipped to [0, 15] — llama.cpp's `quantize_row_q4_0_ref`, operation for operation in float32.

    Error bound: |x - d16·(q-8)| ≤ |d|/2 + 8·|d - d16| for every value, except those of the sign
    opposite to the block's extreme with x/d > 7.5, which clip to q-8 = 7: there it is ≤ |d| + 8·|d - d16|.
    """

    name = "int4-block32"
    ggml_type = GGMLQuantizationType.Q4_0
    block = 32

    def quantize(self, w):
        rows = w.shape[0]
        blocks = w.reshape(-1, 32)
        extreme = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))  # first index on ties, as numpy
        d = extreme / -8
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.trunc(blocks * inv + 8.5).clamp(0, 15).to(torch.uint8)
        qs = q[:, :16] | (q[:, 16:] << 4)
        d16 = d.half().view(torch.uint8)  # little-endian f16 bytes, as the block stores them
        return Quantized(self.name, tuple(w.shape), torch.cat([d16, qs], dim=1).reshape(rows, -1))

    def dequantize(self, q):
        return quants.dequantize(q.data.reshape(-1), self.ggml_type, q.shape)


class GGUFType(Format):
    """A GGUF block type quantized by the `gguf` package (numpy), decoded by our `quants`."""

    def __init__(self, name: str, ggml_type: GGMLQuantizationType):
        self.name, self.ggml_type = name, ggml_type
        self.block = GGML_QUANT_SIZES[ggml_type][0]

    def quantize(self, w):
        from gguf import quants as gq

        raw = gq.quantize(w.numpy(), self.ggml_type)
        data = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(w.shape[0], -1))
        return Quantized(self.name, tuple(w.shape), data)

    def dequantize(self, q):
        return quants.dequantize(q.data.reshape(-1), self.ggml_type, q.shape)


class SFP8(Format):
    name = "sfp8"
    per_tensor_scale = True

    def quantize(self, w):
        codes, scale = sfp8.quantize(w)
        return Quantized(self.name, tuple(w.shape), codes, scale)

    def dequantize(self, q):
        return sfp8.dequantize(q.data, q.scale)


FORMATS: dict[str, Format] = {f.name: f for f in (
    Int8Channel(), Int4Channel(), Q4_0(), SFP8(),
    GGUFType("q8_0", GGMLQuantizationType.Q8_0), GGUFType("q4_1", GGMLQuantizationType.Q4_1),
    GGUFType("q5_0", GGMLQuantizationType.Q5_0), GGUFType("q5_1", GGMLQuantizationType.Q5_1),
    GGUFType("f16", GGMLQuantizationType.F16), GGUFType("bf16", GGMLQuantizationType.BF16),
    GGUFType("f32", GGMLQuantizationType.F32),
)}
ALIASES = {"q4_0": "int4-block32"}  # the same bytes under llama.cpp's name


def get_format(name: str) -> Format:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in FORMATS:
        raise QuantError(f"unknown format {name!r}; choose one of {', '.join(list(FORMATS) + list(ALIASES))}")
    return FORMATS[key]


# Rows are quantized this many at a time: a format's temporaries are several float copies of its
# input, which for the 270M's 262k × 640 embedding meant ~2.5 GB at the peak of a quantization.
ROWS_PER_SLICE = 8192


def quantize(w: torch.Tensor, fmt: str) -> Quantized:
    f = get_format(fmt)
    f.check(tuple(w.shape))
    w = w.detach()
    if f.per_tensor_scale or w.shape[0] <= ROWS_PER_SLICE:
        return f.quantize(w.float().contiguous())
    # Rows are independent (module docstring), so the slices' bytes are the whole tensor's.
    parts = [f.quantize(w[s:s + ROWS_PER_SLICE].float().contiguous()) for s in range(0, w.shape[0], ROWS_PER_SLICE)]
    scale = None if parts[0].scale is None else torch.cat([p.scale for p in parts])
    return Quantized(f.name, tuple(w.shape), torch.cat([p.data for p in parts]), scale)


def dequantize(q: Quantized) -> torch.Tensor:
    return get_format(q.fmt).dequantize(q)


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, fmt):
        shape = w.shape
        return dequantize(quantize(w.reshape(-1, shape[-1]), fmt)).reshape(shape).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None  # straight-through estimator: d(round)/dx taken as 1


def fake_quant(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """dequantize(quantize(w)) in the forward pass, identity in the backward pass (QAT, paper §5).
    `w` is any tensor whose last dim is a row of the format."""
    return _FakeQuant.apply(w, fmt)
