// The AVX-512 intrinsics the kernels use, for CPUs without AVX-512 (x86-64-v3: AVX2, FMA, F16C,
// and AVX-VNNI where the CPU has it): a 512-bit vector is two 256-bit halves, a mask an integer as
// in AVX-512. common.h includes this only when the compiler targets no AVX-512, so the kernels
// stay one source and the AVX-512 build is untouched. Every emulation gives the AVX-512
// instruction's exact result, bit for bit (the tests hold both builds to the same answers):
// integer products are widened where an AVX2 shortcut would saturate, and float reductions add in
// GCC's own order for the AVX-512 ones.
//
// GCC's immintrin.h declares the AVX-512 names whatever the target, but refuses to inline them
// into code for a CPU without it; so the emulations live in namespace avx2 under the same names,
// and the macros at the end send the kernels' calls (and the types) there.
#pragma once

#include <immintrin.h>

#include <climits>
#include <cstdint>
#include <cstring>

#define INLINE inline __attribute__((always_inline))  // as common.h defines it
#undef _mm512_setr_epi32  // a macro in GCC's header: it would rename the definition below

namespace avx2 {

struct m512 {
    __m256 lo, hi;
};
struct m512i {
    __m256i lo, hi;
};

// ---- masks: bit i of an integer -> all ones in lane i ------------------------------------------

INLINE __m256i lanes8(unsigned k) {  // 8 lanes of 32 bits
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)k), bit), bit);
}

// 32 lanes of 8 bits from the 32 bits of k starting at byte `first` of `bytes` (k in each 128-bit
// lane): byte i / 8 of k copied to byte i, then its bit i % 8 tested.
INLINE __m256i lanes32(__m256i bytes, char first) {
    const char a = first, b = first + 1, c = first + 2, d = first + 3;
    const __m256i byte = _mm256_setr_epi8(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b,
                                          c, c, c, c, c, c, c, c, d, d, d, d, d, d, d, d);
    const __m256i bit = _mm256_set1_epi64x((int64_t)0x8040201008040201);
    return _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(bytes, byte), bit), bit);
}
INLINE __m256i lanes32(uint32_t k) { return lanes32(_mm256_set1_epi32((int)k), 0); }

INLINE __m256 lanes8_ps(unsigned k) { return _mm256_castsi256_ps(lanes8(k)); }

// ---- whole vectors ------------------------------------------------------------------------------

#define AVX2_BINARY(T, name, op) \
    INLINE T name(T a, T b) { return {op(a.lo, b.lo), op(a.hi, b.hi)}; }
AVX2_BINARY(m512, _mm512_add_ps, _mm256_add_ps)
AVX2_BINARY(m512, _mm512_sub_ps, _mm256_sub_ps)
AVX2_BINARY(m512, _mm512_mul_ps, _mm256_mul_ps)
AVX2_BINARY(m512, _mm512_div_ps, _mm256_div_ps)
AVX2_BINARY(m512, _mm512_max_ps, _mm256_max_ps)
AVX2_BINARY(m512i, _mm512_add_epi32, _mm256_add_epi32)
AVX2_BINARY(m512i, _mm512_sub_epi32, _mm256_sub_epi32)
AVX2_BINARY(m512i, _mm512_mullo_epi32, _mm256_mullo_epi32)
AVX2_BINARY(m512i, _mm512_sub_epi8, _mm256_sub_epi8)
AVX2_BINARY(m512i, _mm512_and_si512, _mm256_and_si256)
#undef AVX2_BINARY

INLINE m512 _mm512_fmadd_ps(m512 a, m512 b, m512 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
INLINE m512 _mm512_fnmadd_ps(m512 a, m512 b, m512 c) { return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)}; }
INLINE m512 _mm512_abs_ps(m512 a) {
    const __m256 bits = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    return {_mm256_and_ps(a.lo, bits), _mm256_and_ps(a.hi, bits)};
}
// Rounding to an integer (imm's scale bits 7:4 are zero in the kernels: vroundps's encoding).
INLINE m512 _mm512_roundscale_ps(m512 a, int imm) { return {_mm256_round_ps(a.lo, imm), _mm256_round_ps(a.hi, imm)}; }
// a * 2^n for integral n, rounded once as vscalefps does: |n| is clamped to 160 (beyond it the
// result is 0 or inf for exp512's a in [0.5, 2) all the same) and 2^n applied as two normal
// powers of two, the first product exact.
INLINE __m256 scalef8(__m256 a, __m256 n) {
    const __m256i e = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(n, _mm256_set1_ps(-160.f)), _mm256_set1_ps(160.f)));
    const __m256i half = _mm256_srai_epi32(e, 1), rest = _mm256_sub_epi32(e, half);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
    const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(rest, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(a, p1), p2);
}
INLINE m512 _mm512_scalef_ps(m512 a, m512 n) { return {scalef8(a.lo, n.lo), scalef8(a.hi, n.hi)}; }

INLINE m512i _mm512_slli_epi32(m512i a, unsigned n) { return {_mm256_slli_epi32(a.lo, (int)n), _mm256_slli_epi32(a.hi, (int)n)}; }
INLINE m512i _mm512_srli_epi32(m512i a, unsigned n) { return {_mm256_srli_epi32(a.lo, (int)n), _mm256_srli_epi32(a.hi, (int)n)}; }
INLINE m512i _mm512_srai_epi32(m512i a, unsigned n) { return {_mm256_srai_epi32(a.lo, (int)n), _mm256_srai_epi32(a.hi, (int)n)}; }
INLINE m512i _mm512_srli_epi16(m512i a, unsigned n) { return {_mm256_srli_epi16(a.lo, (int)n), _mm256_srli_epi16(a.hi, (int)n)}; }

INLINE m512 _mm512_set1_ps(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
INLINE m512i _mm512_set1_epi32(int x) { return {_mm256_set1_epi32(x), _mm256_set1_epi32(x)}; }
INLINE m512i _mm512_set1_epi8(char x) { return {_mm256_set1_epi8(x), _mm256_set1_epi8(x)}; }
INLINE m512 _mm512_setzero_ps() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
INLINE m512i _mm512_setzero_si512() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
INLINE m512i _mm512_setr_epi32(int e0, int e1, int e2, int e3, int e4, int e5, int e6, int e7, int e8, int e9,
                               int e10, int e11, int e12, int e13, int e14, int e15) {
    return {_mm256_setr_epi32(e0, e1, e2, e3, e4, e5, e6, e7), _mm256_setr_epi32(e8, e9, e10, e11, e12, e13, e14, e15)};
}

INLINE m512 _mm512_loadu_ps(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
INLINE m512i _mm512_loadu_si512(const void* p) {
    return {_mm256_loadu_si256((const __m256i*)p), _mm256_loadu_si256((const __m256i*)p + 1)};
}
INLINE void _mm512_storeu_ps(float* p, m512 a) {
    _mm256_storeu_ps(p, a.lo);
    _mm256_storeu_ps(p + 8, a.hi);
}
INLINE void _mm512_storeu_si512(void* p, m512i a) {
    _mm256_storeu_si256((__m256i*)p, a.lo);
    _mm256_storeu_si256((__m256i*)p + 1, a.hi);
}

// ---- casts and conversions ----------------------------------------------------------------------

INLINE m512i _mm512_castps_si512(m512 a) { return {_mm256_castps_si256(a.lo), _mm256_castps_si256(a.hi)}; }
INLINE m512 _mm512_castsi512_ps(m512i a) { return {_mm256_castsi256_ps(a.lo), _mm256_castsi256_ps(a.hi)}; }
INLINE m512 _mm512_castps128_ps512(__m128 a) { return {_mm256_castps128_ps256(a), _mm256_undefined_ps()}; }
INLINE m512 _mm512_castps256_ps512(__m256 a) { return {a, _mm256_undefined_ps()}; }
INLINE __m256i _mm512_castsi512_si256(m512i a) { return a.lo; }
INLINE __m256i _mm512_extracti64x4_epi64(m512i a, int imm) { return imm & 1 ? a.hi : a.lo; }

INLINE m512 _mm512_cvtepi32_ps(m512i a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
INLINE m512i _mm512_cvtps_epi32(m512 a) { return {_mm256_cvtps_epi32(a.lo), _mm256_cvtps_epi32(a.hi)}; }
INLINE m512 _mm512_cvtph_ps(__m256i a) {
    return {_mm256_cvtph_ps(_mm256_castsi256_si128(a)), _mm256_cvtph_ps(_mm256_extracti128_si256(a, 1))};
}
INLINE m512i _mm512_cvtepi8_epi16(__m256i a) {
    return {_mm256_cvtepi8_epi16(_mm256_castsi256_si128(a)), _mm256_cvtepi8_epi16(_mm256_extracti128_si256(a, 1))};
}
INLINE m512i _mm512_cvtepu16_epi32(__m256i a) {
    return {_mm256_cvtepu16_epi32(_mm256_castsi256_si128(a)), _mm256_cvtepu16_epi32(_mm256_extracti128_si256(a, 1))};
}
INLINE m512i _mm512_cvtepi8_epi32(__m128i a) { return {_mm256_cvtepi8_epi32(a), _mm256_cvtepi8_epi32(_mm_srli_si128(a, 8))}; }
// The packs work within 128-bit lanes: [a0 b0 a1 b1] -> [a0 a1 b0 b1].
INLINE __m256i in_order(__m256i x) { return _mm256_permute4x64_epi64(x, _MM_SHUFFLE(3, 1, 2, 0)); }
INLINE __m256i _mm512_cvtsepi32_epi16(m512i a) { return in_order(_mm256_packs_epi32(a.lo, a.hi)); }
INLINE __m256i _mm512_cvtepi32_epi16(m512i a) {  // truncating: the low 16 bits, which packus keeps as they are
    const __m256i low = _mm256_set1_epi32(0xFFFF);
    return in_order(_mm256_packus_epi32(_mm256_and_si256(a.lo, low), _mm256_and_si256(a.hi, low)));
}
INLINE __m128i _mm512_cvtepi32_epi8(m512i a) {  // truncating
    const __m256i low = _mm256_set1_epi32(0xFF);
    const __m256i w = in_order(_mm256_packus_epi32(_mm256_and_si256(a.lo, low), _mm256_and_si256(a.hi, low)));
    return _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
}

// ---- integer dot products -----------------------------------------------------------------------

// src + the sums of four u8 x s8 products per 32-bit lane, without saturation (vpdpbusd).
INLINE __m256i dpbusd8(__m256i src, __m256i u, __m256i s) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(src, u, s);
#else
    // Even and odd bytes widened to int16 (vpmaddubsw would saturate the pair sums), then
    // vpmaddwd's exact pair sums.
    const __m256i u_even = _mm256_and_si256(u, _mm256_set1_epi16(0x00FF)), u_odd = _mm256_srli_epi16(u, 8);
    const __m256i s_even = _mm256_srai_epi16(_mm256_slli_epi16(s, 8), 8), s_odd = _mm256_srai_epi16(s, 8);
    return _mm256_add_epi32(src, _mm256_add_epi32(_mm256_madd_epi16(u_even, s_even), _mm256_madd_epi16(u_odd, s_odd)));
#endif
}
INLINE m512i _mm512_dpbusd_epi32(m512i src, m512i u, m512i s) { return {dpbusd8(src.lo, u.lo, s.lo), dpbusd8(src.hi, u.hi, s.hi)}; }
// The same where every u is below 128 (weights of at most 7 bits: every interleaved format but
// Q8_0X): vpmaddubsw's pair sums, at most 2 * 127 * 128 in magnitude, cannot saturate, so two
// instructions give the exact sums where the widening above takes eight.
INLINE __m256i dpbusd8_u7(__m256i src, __m256i u, __m256i s) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(src, u, s);
#else
    return _mm256_add_epi32(src, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}
INLINE m512i dpbusd_u7(m512i src, m512i u, m512i s) { return {dpbusd8_u7(src.lo, u.lo, s.lo), dpbusd8_u7(src.hi, u.hi, s.hi)}; }

// src + the sums of two s16 x s16 products per 32-bit lane (vpdpwssd; vpmaddwd is the same sums).
INLINE __m256i dpwssd8(__m256i src, __m256i a, __m256i b) {
#if defined(__AVXVNNI__)
    return _mm256_dpwssd_avx_epi32(src, a, b);
#else
    return _mm256_add_epi32(src, _mm256_madd_epi16(a, b));
#endif
}
INLINE m512i _mm512_dpwssd_epi32(m512i src, m512i a, m512i b) { return {dpwssd8(src.lo, a.lo, b.lo), dpwssd8(src.hi, a.hi, b.hi)}; }

// ---- lanes across the halves ----------------------------------------------------------------------

// Lane i of the result is lane idx[i] % 16 of a.
INLINE __m256 permute8(__m256i idx, m512 a) {
    const __m256 from_hi = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // bit 3 of the index as the sign
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(a.lo, idx), _mm256_permutevar8x32_ps(a.hi, idx), from_hi);
}
INLINE m512 _mm512_permutexvar_ps(m512i idx, m512 a) { return {permute8(idx.lo, a), permute8(idx.hi, a)}; }

// The reductions in the order of GCC's own (upper half + lower half, then within 128 bits), so
// that float sums round the same.
INLINE float _mm512_reduce_add_ps(m512 a) {
    const __m256 t = _mm256_add_ps(a.hi, a.lo);
    const __m128 q = _mm_add_ps(_mm256_extractf128_ps(t, 1), _mm256_castps256_ps128(t));
    const __m128 p = _mm_add_ps(q, _mm_shuffle_ps(q, q, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(p) + _mm_cvtss_f32(_mm_shuffle_ps(p, p, 1));
}
INLINE float _mm512_reduce_max_ps(m512 a) {
    const __m256 t = _mm256_max_ps(a.hi, a.lo);
    const __m128 q = _mm_max_ps(_mm256_extractf128_ps(t, 1), _mm256_castps256_ps128(t));
    const __m128 p = _mm_max_ps(q, _mm_shuffle_ps(q, q, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(_mm_max_ps(p, _mm_shuffle_ps(p, p, _MM_SHUFFLE(0, 1, 0, 1))));
}
INLINE int _mm512_reduce_add_epi32(m512i a) {
    const __m256i t = _mm256_add_epi32(a.lo, a.hi);
    __m128i q = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    q = _mm_add_epi32(q, _mm_shuffle_epi32(q, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtsi128_si32(_mm_add_epi32(q, _mm_shuffle_epi32(q, _MM_SHUFFLE(2, 3, 0, 1))));
}
INLINE int _mm512_mask_reduce_min_epi32(__mmask16 k, m512i a) {
    const __m256i big = _mm256_set1_epi32(INT_MAX);
    const __m256i t = _mm256_min_epi32(_mm256_blendv_epi8(big, a.lo, lanes8(k)), _mm256_blendv_epi8(big, a.hi, lanes8(k >> 8)));
    __m128i q = _mm_min_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    q = _mm_min_epi32(q, _mm_shuffle_epi32(q, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtsi128_si32(_mm_min_epi32(q, _mm_shuffle_epi32(q, _MM_SHUFFLE(2, 3, 0, 1))));
}

// ---- masked operations ------------------------------------------------------------------------------

INLINE m512 _mm512_maskz_loadu_ps(__mmask16 k, const float* p) {  // vmaskmovps: masked-off lanes are not read
    return {_mm256_maskload_ps(p, lanes8(k)), _mm256_maskload_ps(p + 8, lanes8(k >> 8))};
}
INLINE void _mm512_mask_storeu_ps(float* p, __mmask16 k, m512 a) {
    _mm256_maskstore_ps(p, lanes8(k), a.lo);
    _mm256_maskstore_ps(p + 8, lanes8(k >> 8), a.hi);
}
INLINE m512 _mm512_mask_mov_ps(m512 src, __mmask16 k, m512 a) {
    return {_mm256_blendv_ps(src.lo, a.lo, lanes8_ps(k)), _mm256_blendv_ps(src.hi, a.hi, lanes8_ps(k >> 8))};
}
INLINE m512 _mm512_mask_blend_ps(__mmask16 k, m512 a, m512 b) { return _mm512_mask_mov_ps(a, k, b); }
INLINE m512 _mm512_maskz_mov_ps(__mmask16 k, m512 a) { return _mm512_mask_mov_ps(_mm512_setzero_ps(), k, a); }
INLINE m512i _mm512_mask_mov_epi32(m512i src, __mmask16 k, m512i a) {
    return {_mm256_blendv_epi8(src.lo, a.lo, lanes8(k)), _mm256_blendv_epi8(src.hi, a.hi, lanes8(k >> 8))};
}
// src + (a + b - src) where k is set: the kernels' src is a, and the compiler folds this to a + (b
// where k is set), cheaper than a blend. One broadcast of k serves both halves.
INLINE __m256i masked_add8(__m256i m, __m256i src, __m256i a, __m256i b) {
    return _mm256_add_epi8(src, _mm256_and_si256(m, _mm256_sub_epi8(_mm256_add_epi8(a, b), src)));
}
INLINE m512i _mm512_mask_add_epi8(m512i src, __mmask64 k, m512i a, m512i b) {
    const __m256i bytes = _mm256_set1_epi64x((int64_t)k);
    return {masked_add8(lanes32(bytes, 0), src.lo, a.lo, b.lo), masked_add8(lanes32(bytes, 4), src.hi, a.hi, b.hi)};
}
INLINE __m256i _mm256_mask_sub_epi8(__m256i src, __mmask32 k, __m256i a, __m256i b) {
    return _mm256_blendv_epi8(src, _mm256_sub_epi8(a, b), lanes32(k));
}

INLINE __mmask16 _mm512_cmp_ps_mask(m512 a, m512 b, const int pred) {
    return (__mmask16)(_mm256_movemask_ps(_mm256_cmp_ps(a.lo, b.lo, pred)) |
                       _mm256_movemask_ps(_mm256_cmp_ps(a.hi, b.hi, pred)) << 8);
}
INLINE __mmask16 _mm512_mask_cmp_ps_mask(__mmask16 k, m512 a, m512 b, const int pred) { return k & _mm512_cmp_ps_mask(a, b, pred); }
// _MM_CMPINT_*: EQ, LT, LE, FALSE, then their negations.
INLINE unsigned cmp8_epi32(__m256i a, __m256i b, int pred) {
    const __m256i eq = _mm256_cmpeq_epi32(a, b), lt = _mm256_cmpgt_epi32(b, a);
    const __m256i m = (pred & 3) == 0 ? eq : (pred & 3) == 1 ? lt : (pred & 3) == 2 ? _mm256_or_si256(lt, eq) : _mm256_setzero_si256();
    const unsigned bits = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(m));
    return pred & 4 ? ~bits & 0xFF : bits;
}
INLINE __mmask16 _mm512_cmp_epi32_mask(m512i a, m512i b, const int pred) {
    return (__mmask16)(cmp8_epi32(a.lo, b.lo, pred) | cmp8_epi32(a.hi, b.hi, pred) << 8);
}

INLINE m512i _mm512_mask_i32gather_epi32(m512i src, __mmask16 k, m512i idx, const void* base, const int scale) {
    return {_mm256_mask_i32gather_epi32(src.lo, (const int*)base, idx.lo, lanes8(k), scale),
            _mm256_mask_i32gather_epi32(src.hi, (const int*)base, idx.hi, lanes8(k >> 8), scale)};
}
INLINE void _mm256_i32scatter_epi32(void* base, __m256i idx, __m256i a, const int scale) {
    alignas(32) int at[8], v[8];
    _mm256_store_si256((__m256i*)at, idx);
    _mm256_store_si256((__m256i*)v, a);
    for (int i = 0; i < 8; i++) std::memcpy((char*)base + (int64_t)at[i] * scale, &v[i], 4);
}

// Masked loads of narrow elements (AVX2 has none): the whole vector where every lane is wanted,
// else lane by lane, so that nothing past the wanted ones is read.
INLINE __m256i _mm256_maskz_loadu_epi16(__mmask16 k, const void* p) {
    if (k == 0xFFFF) return _mm256_loadu_si256((const __m256i*)p);
    alignas(32) uint16_t v[16] = {};
    for (int i = 0; i < 16; i++)
        if (k >> i & 1) std::memcpy(&v[i], (const uint16_t*)p + i, 2);
    return _mm256_load_si256((const __m256i*)v);
}
INLINE __m128i _mm_maskz_loadu_epi8(__mmask16 k, const void* p) {
    if (k == 0xFFFF) return _mm_loadu_si128((const __m128i*)p);
    alignas(16) uint8_t v[16] = {};
    for (int i = 0; i < 16; i++)
        if (k >> i & 1) v[i] = ((const uint8_t*)p)[i];
    return _mm_load_si128((const __m128i*)v);
}

}  // namespace avx2

#define __m512 avx2::m512
#define __m512i avx2::m512i
#define _mm256_i32scatter_epi32 avx2::_mm256_i32scatter_epi32
#define _mm256_mask_sub_epi8 avx2::_mm256_mask_sub_epi8
#define _mm256_maskz_loadu_epi16 avx2::_mm256_maskz_loadu_epi16
#define _mm512_abs_ps avx2::_mm512_abs_ps
#define _mm512_add_epi32 avx2::_mm512_add_epi32
#define _mm512_add_ps avx2::_mm512_add_ps
#define _mm512_and_si512 avx2::_mm512_and_si512
#define _mm512_castps128_ps512 avx2::_mm512_castps128_ps512
#define _mm512_castps256_ps512 avx2::_mm512_castps256_ps512
#define _mm512_castps_si512 avx2::_mm512_castps_si512
#define _mm512_castsi512_ps avx2::_mm512_castsi512_ps
#define _mm512_castsi512_si256 avx2::_mm512_castsi512_si256
#define _mm512_cmp_epi32_mask avx2::_mm512_cmp_epi32_mask
#define _mm512_cmp_ps_mask avx2::_mm512_cmp_ps_mask
#define _mm512_cvtepi32_epi16 avx2::_mm512_cvtepi32_epi16
#define _mm512_cvtepi32_epi8 avx2::_mm512_cvtepi32_epi8
#define _mm512_cvtepi32_ps avx2::_mm512_cvtepi32_ps
#define _mm512_cvtepi8_epi16 avx2::_mm512_cvtepi8_epi16
#define _mm512_cvtepi8_epi32 avx2::_mm512_cvtepi8_epi32
#define _mm512_cvtepu16_epi32 avx2::_mm512_cvtepu16_epi32
#define _mm512_cvtph_ps avx2::_mm512_cvtph_ps
#define _mm512_cvtps_epi32 avx2::_mm512_cvtps_epi32
#define _mm512_cvtsepi32_epi16 avx2::_mm512_cvtsepi32_epi16
#define _mm512_div_ps avx2::_mm512_div_ps
#define _mm512_dpbusd_epi32 avx2::_mm512_dpbusd_epi32
#define dpbusd_u7 avx2::dpbusd_u7
#define _mm512_dpwssd_epi32 avx2::_mm512_dpwssd_epi32
#define _mm512_extracti64x4_epi64 avx2::_mm512_extracti64x4_epi64
#define _mm512_fmadd_ps avx2::_mm512_fmadd_ps
#define _mm512_fnmadd_ps avx2::_mm512_fnmadd_ps
#define _mm512_loadu_ps avx2::_mm512_loadu_ps
#define _mm512_loadu_si512 avx2::_mm512_loadu_si512
#define _mm512_mask_add_epi8 avx2::_mm512_mask_add_epi8
#define _mm512_mask_blend_ps avx2::_mm512_mask_blend_ps
#define _mm512_mask_cmp_ps_mask avx2::_mm512_mask_cmp_ps_mask
#define _mm512_mask_i32gather_epi32 avx2::_mm512_mask_i32gather_epi32
#define _mm512_mask_mov_epi32 avx2::_mm512_mask_mov_epi32
#define _mm512_mask_mov_ps avx2::_mm512_mask_mov_ps
#define _mm512_mask_reduce_min_epi32 avx2::_mm512_mask_reduce_min_epi32
#define _mm512_mask_storeu_ps avx2::_mm512_mask_storeu_ps
#define _mm512_maskz_loadu_ps avx2::_mm512_maskz_loadu_ps
#define _mm512_maskz_mov_ps avx2::_mm512_maskz_mov_ps
#define _mm512_max_ps avx2::_mm512_max_ps
#define _mm512_mul_ps avx2::_mm512_mul_ps
#define _mm512_mullo_epi32 avx2::_mm512_mullo_epi32
#define _mm512_permutexvar_ps avx2::_mm512_permutexvar_ps
#define _mm512_reduce_add_epi32 avx2::_mm512_reduce_add_epi32
#define _mm512_reduce_add_ps avx2::_mm512_reduce_add_ps
#define _mm512_reduce_max_ps avx2::_mm512_reduce_max_ps
#define _mm512_roundscale_ps avx2::_mm512_roundscale_ps
#define _mm512_scalef_ps avx2::_mm512_scalef_ps
#define _mm512_set1_epi32 avx2::_mm512_set1_epi32
#define _mm512_set1_epi8 avx2::_mm512_set1_epi8
#define _mm512_set1_ps avx2::_mm512_set1_ps
#define _mm512_setr_epi32 avx2::_mm512_setr_epi32
#define _mm512_setzero_ps avx2::_mm512_setzero_ps
#define _mm512_setzero_si512 avx2::_mm512_setzero_si512
#define _mm512_slli_epi32 avx2::_mm512_slli_epi32
#define _mm512_srai_epi32 avx2::_mm512_srai_epi32
#define _mm512_srli_epi16 avx2::_mm512_srli_epi16
#define _mm512_srli_epi32 avx2::_mm512_srli_epi32
#define _mm512_storeu_ps avx2::_mm512_storeu_ps
#define _mm512_storeu_si512 avx2::_mm512_storeu_si512
#define _mm512_sub_epi32 avx2::_mm512_sub_epi32
#define _mm512_sub_epi8 avx2::_mm512_sub_epi8
#define _mm512_sub_ps avx2::_mm512_sub_ps
#define _mm_maskz_loadu_epi8 avx2::_mm_maskz_loadu_epi8
