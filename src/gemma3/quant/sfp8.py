"""SFP8, gemma.cpp's "switched floating point" 8-bit weights (paper §5, "SFP8"; gemma.cpp
`compression/sfp-inl.h`, `SfpCodec`).

One byte per weight: bit 7 is the sign, and the other 7 bits `c` switch between two float
encodings so that one format covers a 24-bit dynamic range without subnormals:

    c = 0          zero (0x80, "-0", is reserved; decoders read it as -0.0)
    c in [1, 64)   small: e = c >> 2, m = c & 3  →  (1 + m/4) · 2^(e - 23)    (2 mantissa bits)
    c in [64, 128) large: e = c >> 3, m = c & 7  →  (1 + m/8) · 2^(e - 15)    (3 mantissa bits)

so magnitudes run from 1.25·2^-23 to 1.875 (= 1.111b · 2^0). Values ≥ 2^-7 keep 3 mantissa
bits, smaller ones 2. Because the encoder first truncates to 6 mantissa bits (below), its error
bound is half a step plus that truncation: relative 2^-4 + 2^-6 above 2^-7, 2^-3 + 2^-6 below.

The encoder is a port of `SfpCodec::EncBytes` on the bf16 bytes of the input, including its
quirks, so our codes are gemma.cpp's codes: f32 inputs are *truncated* to bf16 first (`Enc4F`),
the lowest bf16 mantissa bit is dropped, then the kept mantissa bits are rounded to nearest-even;
|x| < 2^-23 flushes to zero and 1.0·2^-23 becomes 1.25·2^-23 (its code would be zero's).

Per-tensor scaling is gemma.cpp's `ScaleWeights`: a tensor with max |x| > 1.875 is divided by
max |x| / 1.875, any other keeps scale 1. (Scaling small tensors *up* to use the whole range was
tried: on Gemma 3 270M it changes the relative weight error by < 2%, because weights below 2^-7,
which get only 2 mantissa bits, carry little of the norm. So we keep gemma.cpp's rule and its codes.)
"""

from __future__ import annotations

import functools

import torch

MAX = 1.875  # gemma.cpp SfpStream::kMax: 1.111b · 2^0


def _decode_table() -> torch.Tensor:
    """The value of each of the 256 codes (gemma.cpp's `F32FromSFP8`; 0x80 → -0.0)."""
    values = []
    for code in range(128):
        if code == 0:
            values.append(0.0)
        elif code < 64:
            values.append((1 + (code & 3) / 4) * 2.0 ** ((code >> 2) - 23))
        else:
            values.append((1 + (code & 7) / 8) * 2.0 ** ((code >> 3) - 15))
    table = torch.tensor(values, dtype=torch.float32)
    return torch.cat([table, -table])


VALUES = _decode_table()


def decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes → float32 values (exact: every SFP8 value is a float32)."""
    return VALUES.to(codes.device)[codes.long()]


def encode(x: torch.Tensor) -> torch.Tensor:
    """float values with |x| ≤ 1.875 → uint8 codes, exactly as gemma.cpp's `SfpCodec::Enc`."""
    x = x.float()
    if not bool(torch.isfinite(x).all()) or bool((x.abs() > MAX).any()):
        raise ValueError(f"SFP8 encodes finite values with |x| <= {MAX}; scale the tensor first")
    flat = x.reshape(-1).view(torch.int32)
    step = 1 << 22  # bounds the int64 index temporaries
    table = _code_of_bf16().to(flat.device)
    codes = [table[((flat[i:i + step] >> 16) & 0xFFFF).long()] for i in range(0, flat.numel(), step)]
    return torch.cat(codes).reshape(x.shape) if codes else torch.empty(x.shape, dtype=torch.uint8)


def _encode_bits(bits: torch.Tensor) -> torch.Tensor:
    """`SfpCodec::EncBytes` on the bf16 that truncating float32 `bits` (viewed as int32) gives."""
    hi = (bits >> 24) & 0xFF  # the two bytes of the truncated bf16
    lo = (bits >> 16) & 0xFF
    biased_e = ((hi << 1) & 0xFF) | (lo >> 7)
    m6 = ((lo << 1) & 0xFF) >> 2  # top 6 of the 7 bf16 mantissa bits
    # Round at 3 bits for exponents >= -7 and at 2 below; 1.1111b·2^-8 and up already rounds to 2^-7.
    large_before = (biased_e > 127 - 8) | ((biased_e == 127 - 8) & (m6 > 0x3B))
    m_shl4 = torch.where(large_before, m6 << 1, m6)
    rounded = m_shl4 + ((m_shl4 >> 4) & 1) + 7  # round to nearest, ties to even, at bit 4
    carry_bit = torch.where(large_before, 0x80, 0x40)
    carry_clear = rounded & ~carry_bit
    biased_e = biased_e + (carry_clear != rounded).int()
    is_zero = biased_e < 127 - 23
    is_large = biased_e > 127 - 8  # decided after rounding, as the decoder will see it
    m = carry_clear >> 4
    m = torch.where(biased_e == 127 - 23, m.clamp(min=1), m)  # 1.0·2^-23 would encode as zero
    e = biased_e + torch.where(is_large, 15 - 127, 23 - 127)
    em = m | (torch.where(is_large, e << 1, e) << 2)
    code = (hi & 0x80) | (em & 0x7F)
    return torch.where(is_zero, 0, code).to(torch.uint8)


@functools.cache
def _code_of_bf16() -> torch.Tensor:
    """The code depends only on the truncated bf16, so every encoding is one look-up in this table
    (entries for |x| > 1.875, inf and NaN are never read: encode rejects those inputs). Built on
    first use, not at import: its torch ops would add ~15 MB to every process's resident memory."""
    return _encode_bits((torch.arange(1 << 16, dtype=torch.int64) << 16).to(torch.int32))


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, per-tensor float32 scale) with w ≈ decode(codes) · scale."""
    w = w.float()
    absmax = w.abs().max()
    if absmax <= MAX:
        return encode(w), torch.ones((), device=w.device)
    scale = absmax / MAX
    # gemma.cpp: multiply by a float32 1/scale computed in double, clamp since kMax may still be exceeded.
    inv = torch.tensor(1.0 / float(scale), dtype=torch.float32)
    return encode((w * inv).clamp(-MAX, MAX)), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return decode(codes) * scale
