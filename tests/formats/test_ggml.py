"""gemma3.quants must decode every supported ggml type bit-exactly like gguf.quants (the numpy reference)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from gemma3.formats.ggml import SUPPORTED_TYPES, dequantize
from gemma3.formats.gguf import read_gguf

# Byte offsets of the f16 scale fields (d, m / dmin) inside each ggml block struct.
F16_FIELDS = {
    T.F16: [],
    T.BF16: [],
    T.F32: [],
    T.Q8_0: [0],
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q2_K: [80, 82],
    T.Q3_K: [108],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
}
REFERENCE_TYPES = sorted(F16_FIELDS)  # everything gguf.quants can dequantize that we support
SHAPES_IN_BLOCKS = [(1, 1), (1, 7), (3, 5), (16, 2)]  # (rows, blocks per row)


def random_blocks(qtype: T, rows: int, blocks_per_row: int, rng: np.random.Generator, finite: bool) -> np.ndarray:
    """Random raw bytes [rows, bytes per row]; with finite=True the f16 scales are normal-ish finite values."""
    type_size = GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (rows * blocks_per_row, type_size), dtype=np.uint8)
    if finite:
        for offset in F16_FIELDS[qtype]:
            scales = (rng.standard_normal(len(raw)) * 0.05).astype(np.float16)
            raw[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, blocks_per_row * type_size)


def reference(raw: np.ndarray, qtype: T) -> torch.Tensor:
    with np.errstate(invalid="ignore", over="ignore"):
        return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32))


def ours(raw: np.ndarray, qtype: T) -> torch.Tensor:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    shape = (raw.shape[0], raw.shape[1] // type_size * block_size)
    return dequantize(torch.from_numpy(raw.copy()), qtype, shape)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    assert torch.equal(actual.view(torch.int32), expected.view(torch.int32))


def assert_same_bits_or_both_nan(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """NaN payloads depend on operand order inside the CPU, so for NaNs only NaN-ness must agree."""
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    assert torch.equal(actual[~nan].view(torch.int32), expected[~nan].view(torch.int32))


@pytest.mark.parametrize("rows,blocks_per_row", SHAPES_IN_BLOCKS)
@pytest.mark.parametrize("qtype", REFERENCE_TYPES, ids=lambda t: t.name)
def test_random_blocks_bit_exact(qtype, rows, blocks_per_row):
    rng = np.random.default_rng([int(qtype), rows, blocks_per_row])
    raw = random_blocks(qtype, rows, blocks_per_row, rng, finite=True)
    assert_same_bits(ours(raw, qtype), reference(raw, qtype))


@pytest.mark.parametrize("qtype", REFERENCE_TYPES, ids=lambda t: t.name)
def test_random_bytes_with_nan_and_inf_scales(qtype):
    rng = np.random.default_rng(int(qtype))
    raw = random_blocks(qtype, 64, 40, rng, finite=False)
    assert_same_bits_or_both_nan(ours(raw, qtype), reference(raw, qtype))


def test_q8_k_is_d_times_q():
    # gguf.quants has no Q8_K decoder; ggml's dequantize_row_q8_K is y = d * qs.
    rng = np.random.default_rng(0)
    d = rng.standard_normal((6, 1)).astype(np.float32)
    qs = rng.integers(-128, 128, (6, 256), dtype=np.int8)
    bsums = qs.reshape(6, 16, 16).sum(-1).astype(np.int16)
    raw = np.concatenate([d.view(np.uint8), qs.view(np.uint8), bsums.view(np.uint8)], axis=1).reshape(2, -1)
    assert_same_bits(ours(raw, T.Q8_K), torch.from_numpy((qs.astype(np.float32) * d).reshape(2, 768)))


def test_all_required_types_supported():
    required = {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K}
    assert required | {T.Q2_K, T.Q3_K, T.Q8_K} <= SUPPORTED_TYPES


def test_accepts_int_type_and_3d_shape():
    raw = random_blocks(T.Q4_K, 6, 2, np.random.default_rng(1), finite=True)
    expected = reference(raw, T.Q4_K).reshape(2, 3, 512)
    assert_same_bits(dequantize(torch.from_numpy(raw), int(T.Q4_K), (2, 3, 512)), expected)


def test_unaligned_bytes_are_copied_not_rejected():
    # A byte slice starting at an odd address cannot be viewed as f16/f32 in place.
    for qtype in (T.Q8_0, T.F32, T.F16):
        raw = random_blocks(qtype, 2, 8, np.random.default_rng(2), finite=True)
        padded = torch.from_numpy(np.concatenate([[0], raw.ravel()]).astype(np.uint8))
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        got = dequantize(padded[1:], qtype, (2, 8 * block_size))
        assert_same_bits_or_both_nan(got, reference(raw, qtype))


def test_empty_tensor():
    assert dequantize(torch.empty(0, dtype=torch.uint8), T.Q6_K, (0, 256)).shape == (0, 256)


def test_unsupported_type_is_named():
    with pytest.raises(ValueError, match="IQ2_XS"):
        dequantize(torch.zeros(66, dtype=torch.uint8), T.IQ2_XS, (256,))
    with pytest.raises(ValueError, match="unknown GGML type 9999"):
        dequantize(torch.zeros(4, dtype=torch.uint8), 9999, (1,))


def test_wrong_byte_count_names_expected_and_got():
    with pytest.raises(ValueError, match="needs 68 bytes, got 67"):
        dequantize(torch.zeros(67, dtype=torch.uint8), T.Q8_0, (2, 32))


def test_row_not_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        dequantize(torch.zeros(210, dtype=torch.uint8), T.Q6_K, (1, 128))


def test_rejects_non_byte_tensor():
    with pytest.raises(TypeError, match="uint8"):
        dequantize(torch.zeros(8, dtype=torch.float32), T.F32, (8,))


from gemma3.inference.load import embedded_gguf_path as gemma_270m_path

EMBEDDING_ROWS = 2048  # of 262144: enough to cover the Q8_0 path without 1.3 GB of temporaries


def test_real_gemma_270m_tensors_bit_exact():
    gf = read_gguf(gemma_270m_path())
    types = set()
    for name, qt in gf.tensors.items():
        data, shape = qt.data, qt.shape
        if name == "token_embd.weight":
            rows = torch.cat([torch.arange(EMBEDDING_ROWS), torch.arange(shape[0] - EMBEDDING_ROWS, shape[0])])
            data = data.view(shape[0], -1)[rows].reshape(-1)
            shape = (len(rows), shape[1])
        raw = data.numpy().reshape(shape[0] if len(shape) > 1 else 1, -1)
        assert_same_bits(dequantize(data, qt.ggml_type, shape), reference(raw, qt.ggml_type).reshape(shape))
        types.add(qt.ggml_type)
    assert types == {T.F32, T.Q8_0, T.Q5_0, T.Q4_K, T.Q6_K}
