"""Dequantize GGUF/ggml tensor data natively in PyTorch.

Every quantized ggml type stores a row as a sequence of fixed-size blocks; a
block of ``type_size`` bytes holds ``block_size`` values. We view the raw bytes
as ``[n_blocks, type_size]``, slice out the fields of the ggml block struct and
decode all blocks at once with vectorised tensor ops.

The arithmetic mirrors ``gguf.quants`` (the reference Python implementation
shipped with llama.cpp) operation by operation, so results are bit-identical
to ``gguf.quants.dequantize``: scales are widened from f16 to f32 first, and
every product/difference is done in f32 in the same order. Changing the order
(e.g. computing ``d * (q - 8)`` in f16, or fusing ``d * q - m``) would change
the rounding of the last bit.

Bytes are read as little-endian, which is what GGUF files (and this module)
assume; hosts are assumed to be little-endian too.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType

# GGMLQuantizationType -> (values per block, bytes per block).
BLOCK_INFO: dict[GGMLQuantizationType, tuple[int, int]] = GGML_QUANT_SIZES

# Values per super-block of the k-quants (ggml's QK_K).
QK_K = 256


def _view_as(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret the bytes of the last dim of ``raw`` as ``dtype`` (last dim shrinks by itemsize).

    ``Tensor.view(dtype)`` needs the bytes aligned to the new itemsize; field
    slices of a block tensor usually are, so we only copy when they are not.
    """
    size = dtype.itemsize
    aligned = (
        raw.stride(-1) == 1
        and raw.storage_offset() % size == 0
        and all(s % size == 0 for s in raw.stride()[:-1])
    )
    if not aligned:
        raw = raw.clone(memory_format=torch.contiguous_format)  # fresh storage: offset 0, packed
    return raw.view(dtype)


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """A ggml_half field ([n_blocks, 2] bytes) widened to f32 ([n_blocks, 1]), exactly as numpy does."""
    return _view_as(raw, torch.float16).float()


def _unpack(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Split each byte of ``x [..., m]`` into ``8 // bits`` fields, lowest bits first.

    Returns ``[..., 8 // bits, m]`` with ``out[..., j, i] = (x[..., i] >> (j * bits)) & mask``,
    i.e. field j of every byte forms one contiguous run of values. That is how
    ggml packs nibbles/crumbs: the low parts of a byte run come first, then the
    next-higher parts of the same run.
    """
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8).view(-1, 1)
    return (x.unsqueeze(-2) >> shifts) & ((1 << bits) - 1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """block_q4_0-style qs [n, 16] -> 32 values: low nibbles are values 0..15, high nibbles 16..31."""
    return _unpack(qs, 4).reshape(qs.shape[0], -1)


def _high_bits_32(qh: torch.Tensor) -> torch.Tensor:
    """qh [n, 4] bytes, a little-endian uint32 whose bit i is the 5th bit of value i -> [n, 32]."""
    # _unpack gives [n, bit, byte]; value i = byte i // 8, bit i % 8, so bytes must be the outer dim.
    return _unpack(qh, 1).transpose(-1, -2).reshape(qh.shape[0], 32)


# ---- float types -------------------------------------------------------------


def _dequant_f32(blocks: torch.Tensor) -> torch.Tensor:
    return _view_as(blocks, torch.float32)


def _dequant_f16(blocks: torch.Tensor) -> torch.Tensor:
    return _view_as(blocks, torch.float16).float()


def _dequant_bf16(blocks: torch.Tensor) -> torch.Tensor:
    # bf16 -> f32 is a 16-bit left shift in both torch and gguf, so NaN payloads survive too.
    return _view_as(blocks, torch.bfloat16).float()


# ---- 32-value blocks -----------------------------------------------------------


def _dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # block_q8_0: d (f16), qs[32] (int8)
    d = _f16(blocks[:, :2])
    x = blocks[:, 2:].view(torch.int8).float()
    return x * d


def _dequant_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # block_q4_0: d (f16), qs[16] (two 4-bit values per byte, stored with +8 offset)
    d = _f16(blocks[:, :2])
    q = _nibbles(blocks[:, 2:]).to(torch.int8) - 8
    return d * q.float()


def _dequant_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # block_q4_1: d (f16), m (f16), qs[16]; value = d * q + m
    d = _f16(blocks[:, :2])
    m = _f16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 4:]).float()
    return (d * q) + m


def _dequant_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    # block_q5_0: d (f16), qh[4] (5th bit of each value), qs[16] (low nibbles); offset +16
    d = _f16(blocks[:, :2])
    qh = _high_bits_32(blocks[:, 2:6])
    ql = _nibbles(blocks[:, 6:])
    q = (ql | (qh << 4)).to(torch.int8) - 16
    return d * q.float()


def _dequant_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    # block_q5_1: d (f16), m (f16), qh[4], qs[16]; value = d * q + m
    d = _f16(blocks[:, :2])
    m = _f16(blocks[:, 2:4])
    qh = _high_bits_32(blocks[:, 4:8])
    ql = _nibbles(blocks[:, 8:])
    q = (ql | (qh << 4)).float()
    return (d * q) + m


# ---- k-quants: 256-value super-blocks split into sub-blocks ---------------------


def _dequant_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # block_q2_K: scales[16] (low nibble: scale, high nibble: min, per 16 values),
    # qs[64] (2-bit values), d (f16), dmin (f16)
    n = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    dl = (d * (scales & 0xF).float()).view(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
    # Each 32-byte half of qs holds 4 runs of 32 values (bit pairs 0-1, 2-3, 4-5, 6-7).
    q = _unpack(qs.reshape(n, 2, 32), 2).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _dequant_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # block_q3_K: hmask[32] (3rd bit, inverted), qs[64] (low 2 bits), scales[12] (16 x 6-bit), d (f16)
    n = blocks.shape[0]
    hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks[:, 108:110])
    # Scales: low 4 bits are the nibbles of bytes 0..7, high 2 bits the crumbs of bytes 8..11.
    low = _unpack(scales[:, :8], 4).reshape(n, 16)
    high = _unpack(scales[:, 8:], 2).reshape(n, 16)
    sc = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * sc).view(n, 16, 1)
    ql = _unpack(qs.reshape(n, 2, 32), 2).reshape(n, 16, 16)
    # Bit j of hmask byte i is the high bit of value j * 32 + i; a set bit means "no -4 offset".
    qh = _unpack(hmask, 1).reshape(n, 16, 16) ^ 1
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte scales of block_q4_K/q5_K into 8 six-bit scales and 8 six-bit mins.

    Byte layout (get_scale_min_k4 in ggml): bytes 0-3 hold scales 0-3 in their
    low 6 bits, bytes 4-7 mins 0-3; scales/mins 4-7 take their low 4 bits from
    the nibbles of bytes 8-11 and their high 2 bits from the top of bytes 0-3 / 4-7.
    """
    n = scales.shape[0]
    d, m, m_d = scales.reshape(n, 3, 4).unbind(1)
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _dequant_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # block_q4_K: d (f16), dmin (f16), scales[12], qs[128]; 8 sub-blocks of 32: value = d*sc*q - dmin*m
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, mn = _scale_min_k4(blocks[:, 4:16])
    dl = (d * sc.float()).view(n, 8, 1)
    ml = (dmin * mn.float()).view(n, 8, 1)
    # Each 32-byte chunk of qs holds two sub-blocks: low nibbles first, then high nibbles.
    q = _unpack(blocks[:, 16:].reshape(n, 4, 32), 4).reshape(n, 8, 32).float()
    return (dl * q - ml).reshape(n, QK_K)


def _dequant_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # block_q5_K: d (f16), dmin (f16), scales[12], qh[32] (5th bits), qs[128] (low nibbles)
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, mn = _scale_min_k4(blocks[:, 4:16])
    dl = (d * sc.float()).view(n, 8, 1)
    ml = (dmin * mn.float()).view(n, 8, 1)
    ql = _unpack(blocks[:, 48:].reshape(n, 4, 32), 4).reshape(n, 8, 32)
    # Bit j of qh byte i is the 5th bit of value i of sub-block j.
    qh = _unpack(blocks[:, 16:48], 1)
    q = (ql | (qh << 4)).float()
    return (dl * q - ml).reshape(n, QK_K)


def _dequant_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # block_q6_K: ql[128] (low nibbles), qh[64] (high 2 bits), scales[16] (int8), d (f16); offset +32
    n = blocks.shape[0]
    ql = _unpack(blocks[:, :128].reshape(n, 2, 64), 4).reshape(n, 8, 32)
    qh = _unpack(blocks[:, 128:192].reshape(n, 2, 32), 2).reshape(n, 8, 32)
    sc = blocks[:, 192:208].view(torch.int8).float()
    d = _f16(blocks[:, 208:210])
    dl = (d * sc).view(n, 16, 1)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (dl * q).reshape(n, QK_K)


def _dequant_q8_k(blocks: torch.Tensor) -> torch.Tensor:
    # block_q8_K: d (f32), qs[256] (int8), bsums[16] (int16, only used by dot products)
    d = _view_as(blocks[:, :4], torch.float32)
    q = blocks[:, 4 : 4 + QK_K].view(torch.int8).float()
    return d * q


_DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLQuantizationType.F32: _dequant_f32,
    GGMLQuantizationType.F16: _dequant_f16,
    GGMLQuantizationType.BF16: _dequant_bf16,
    GGMLQuantizationType.Q8_0: _dequant_q8_0,
    GGMLQuantizationType.Q4_0: _dequant_q4_0,
    GGMLQuantizationType.Q4_1: _dequant_q4_1,
    GGMLQuantizationType.Q5_0: _dequant_q5_0,
    GGMLQuantizationType.Q5_1: _dequant_q5_1,
    GGMLQuantizationType.Q2_K: _dequant_q2_k,
    GGMLQuantizationType.Q3_K: _dequant_q3_k,
    GGMLQuantizationType.Q4_K: _dequant_q4_k,
    GGMLQuantizationType.Q5_K: _dequant_q5_k,
    GGMLQuantizationType.Q6_K: _dequant_q6_k,
    GGMLQuantizationType.Q8_K: _dequant_q8_k,
}

SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(_DEQUANTIZERS)


def _qtype(ggml_type: int | GGMLQuantizationType) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType(ggml_type)
    except ValueError:
        raise ValueError(f"unknown GGML type {ggml_type!r}") from None


def tensor_nbytes(ggml_type: int | GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of ``shape`` (torch order, last dim contiguous) takes in ``ggml_type``.

    Raises ValueError if the last dim is not a whole number of blocks.
    """
    qtype = _qtype(ggml_type)
    block_size, type_size = BLOCK_INFO[qtype]
    cols = shape[-1] if shape else 1
    if cols % block_size:
        raise ValueError(f"{qtype.name} needs rows that are a multiple of {block_size} values, got shape {tuple(shape)}")
    return math.prod(shape) // block_size * type_size


def dequantize(data: torch.Tensor, ggml_type: int | GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode raw ggml bytes into a float32 tensor of ``shape``.

    ``data`` is a uint8 tensor with the tensor's bytes (any shape; it is read in
    order). ``shape`` is in PyTorch order, i.e. GGUF dims reversed, so the last
    dim is the contiguous one that is split into blocks.
    """
    if data.dtype != torch.uint8:
        raise TypeError(f"expected raw bytes as a uint8 tensor, got {data.dtype}")
    qtype = _qtype(ggml_type)
    decode = _DEQUANTIZERS.get(qtype)
    if decode is None:
        raise ValueError(f"dequantizing GGML type {qtype.name} is not supported")
    expected = tensor_nbytes(qtype, shape)
    if data.numel() != expected:
        raise ValueError(f"{qtype.name} tensor of shape {tuple(shape)} needs {expected} bytes, got {data.numel()}")
    type_size = BLOCK_INFO[qtype][1]
    return decode(data.reshape(-1, type_size)).reshape(shape)
