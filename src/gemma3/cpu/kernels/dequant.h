// Decoded values: weight rows of any layout to fp32 (bit-exact with formats/ggml.py) or bf16, the weight
// shape checks, and the `dequant` and `lookup` ops (whole weights, embedding rows). Separate: the
// products never decode to floats; this is the path for tables, prefill tiles and tests.
#pragma once

#include "interleaved.h"

namespace {

// ---- decoded values (dequantization) ---------------------------------------------------------

// Writes the 32 values of one sub-block as fp32 (exactly formats/ggml.py's arithmetic: s * q, then - min)
// or as bf16 rounded to nearest even.
template <class T, bool BF16>
INLINE void store_sub(__m256i q, float s_lo, float s_hi, float mn, void* out) {
    __m512 v[2];
    for (int h = 0; h < 2; h++) {
        __m128i q16 = h ? _mm256_extracti128_si256(q, 1) : _mm256_castsi256_si128(q);
        v[h] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q16)), _mm512_set1_ps(h ? s_hi : s_lo));
        if (T::HAS_MIN) v[h] = _mm512_sub_ps(v[h], _mm512_set1_ps(mn));
    }
    if (!BF16) {
        _mm512_storeu_ps((float*)out, v[0]);
        _mm512_storeu_ps((float*)out + 16, v[1]);
        return;
    }
#if defined(__AVX512BF16__)
    // One instruction rounds all 32 to nearest even, like torch's float -> bfloat16.
    _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]));
#else
    for (int h = 0; h < 2; h++) {  // like torch's float -> bfloat16 (the values are finite)
        __m512i bits = _mm512_castps_si512(v[h]);
        __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        bits = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
        _mm256_storeu_si256((__m256i*)((uint16_t*)out + 16 * h), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
    }
#endif
}

template <class T, bool BF16>
void dequant_rows(const uint8_t* W, int64_t rb, int64_t K, int64_t n0, int64_t n1, void* out, int64_t ldo) {
    const int64_t esz = BF16 ? 2 : 4;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t* row = W + n * rb;
        char* o = (char*)out + (n - n0) * ldo * esz;
        for (int64_t b = 0; b < K / T::VALS; b++)
            T::decode(row + b * T::BYTES, [&](int sub, __m256i q, float s_lo, float s_hi, float mn) __attribute__((always_inline)) {
                store_sub<T, BF16>(q, s_lo, s_hi, mn, o + (b * T::VALS + 32 * sub) * esz);
            });
    }
}

// Rows r0..r1 of the 16-row group at G decoded into `out` (row r0 first, rows ldo values apart),
// as formats/ggml.py decodes the GGUF format: per 32-value sub-block, its eight quads of all 16
// rows decoded at once (the products' decoders), then each row's 32 values gathered from them.
template <class X, bool BF16>
void x16_decode(const uint8_t* G, int64_t K, int r0, int r1, void* out, int64_t ldo) {
    const int64_t esz = BF16 ? 2 : 4;
    const __m256i quads = _mm256_setr_epi32(0, 64, 128, 192, 256, 320, 384, 448);  // row r's: 4-byte lane r of each
    for (int64_t sb = 0; sb < K / X::VALS; sb++) {
        const uint8_t* blk = G + sb * X::BYTES;
        for (int i = 0; i < X::VALS / 32; i++) {
            alignas(64) int8_t q[8 * 64];  // signed values: stored - OFFSET
            for (int k = 0; k < 8; k++)
                _mm512_storeu_si512(q + 64 * k, _mm512_sub_epi8(X::quad(blk, i, k), _mm512_set1_epi8((char)X::OFFSET)));
            __m512 s[2];
            X::scales(blk, i, s);
            if (!X::TWO_SCALES) s[1] = s[0];
            alignas(64) float lo[16], hi[16], mn[16];
            _mm512_storeu_ps(lo, s[0]);
            _mm512_storeu_ps(hi, s[1]);
            _mm512_storeu_ps(mn, X::mins(blk, i));
            for (int r = r0; r < r1; r++) {
                const __m256i v = _mm256_i32gather_epi32((const int*)(q + 4 * r), quads, 1);
                store_sub<X, BF16>(v, lo[r], hi[r], mn[r], (char*)out + ((r - r0) * ldo + sb * X::VALS + 32 * i) * esz);
            }
        }
    }
}

// Rows n0..n1 of a weight in any layout (W: all its rows) decoded into `out` (rows ldo values apart).
template <bool BF16>
void decode_rows(const uint8_t* W, int64_t type, int64_t K, int64_t n0, int64_t n1, void* out, int64_t ldo) {
    const int64_t esz = BF16 ? 2 : 4;
    const bool x16 = interleaved(type, [&](auto x) {
        using X = decltype(x);
        for (int64_t n = n0; n < n1;) {  // group by group
            const int64_t g = n / 16, end = std::min<int64_t>(n1 - 16 * g, 16);
            x16_decode<X, BF16>(W + g * group_bytes<X>(K), K, (int)(n - 16 * g), (int)end, (char*)out + (n - n0) * ldo * esz, ldo);
            n = 16 * g + end;
        }
    });
    if (!x16) dispatch(type, [&](auto fmt) {
        using T = decltype(fmt);
        dequant_rows<T, BF16>(W, row_bytes<T>(K), K, n0, n1, out, ldo);
        return 0;
    });
}

void check_weight(const torch::Tensor& w, int64_t N, int64_t rb) {
    TORCH_CHECK(w.dtype() == torch::kUInt8 && w.is_contiguous(), "weight blocks must be contiguous uint8");
    TORCH_CHECK(w.numel() == N * rb, "weight has ", w.numel(), " bytes, expected ", N * rb);
}

void check_layout(const torch::Tensor& w, int64_t type, int64_t N, int64_t K) {
    check_weight(w, N, weight_row_bytes(type, K));
    TORCH_CHECK(!interleaved(type, [](auto) {}) || N % 16 == 0, "interleaved weights hold whole groups of 16 rows, not ", N);
}

}  // namespace

// Dequantized [N, K] weight in `out` (float32: bit-exact with formats/ggml.py; bfloat16: rounded to nearest).
void dequant(torch::Tensor w, int64_t type, torch::Tensor out) {
    TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), "out must be a contiguous [N, K] tensor");
    const int64_t N = out.size(0), K = out.size(1);
    const bool bf16 = out.scalar_type() == torch::kBFloat16;
    TORCH_CHECK(bf16 || out.scalar_type() == torch::kFloat32, "out must be float32 or bfloat16");
    check_layout(w, type, N, K);
    const uint8_t* W = w.data_ptr<uint8_t>();
    char* o = (char*)out.data_ptr();
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
        if (bf16) decode_rows<true>(W, type, K, n0, n1, o + n0 * K * 2, K);
        else decode_rows<false>(W, type, K, n0, n1, o + n0 * K * 4, K);
    });
}

// Rows `ids` of a table of N rows (any layout) as float32 [len(ids), K] in `out`: embedding lookups.
void lookup(torch::Tensor w, int64_t type, int64_t N, torch::Tensor ids, torch::Tensor out) {
    TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.scalar_type() == torch::kFloat32,
                "out must be a contiguous float32 [len(ids), K] tensor");
    TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == torch::kInt64 && ids.is_contiguous() && ids.numel() == out.size(0),
                "ids must be a contiguous int64 vector of out's row count");
    const int64_t K = out.size(1);
    check_layout(w, type, N, K);
    const int64_t* id = ids.data_ptr<int64_t>();
    for (int64_t i = 0; i < ids.numel(); i++)
        TORCH_CHECK(id[i] >= 0 && id[i] < N, "token id ", id[i], " is not in [0, ", N, ")");
    const uint8_t* W = w.data_ptr<uint8_t>();
    at::parallel_for(0, ids.numel(), 64, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; i++) decode_rows<false>(W, type, K, id[i], id[i] + 1, out.data_ptr<float>() + i * K, K);
    });
}
