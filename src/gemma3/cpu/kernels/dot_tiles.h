// Products with the row layouts, one tile of weight rows at a time: the int16 activations (Act,
// quantize_row) and the dot-product tiles for 32-value blocks, K-quants and the repacked 128-value
// groups. Separate from matmul.h, which splits a product over threads and picks these tiles.
#pragma once

#include "formats.h"

namespace {

// ---- int16 activations -----------------------------------------------------------------------

// One activation row: a[K] int16 with one scale d per block of 32 (x ~= d * a), the sums of a
// per block and per half block (for formats with a min or an offset; Q6_K's scales cover 16
// values), and a split into int8 halves a = 256 * hi + lo (for vpdpbusd, which multiplies unsigned
// by signed bytes: two of them give the int16 product). hi alone is the row rounded to int8
// (x ~= 256 d * hi, as llama.cpp's Q8_0 activations), with its sums per block and half block:
// what many-row products take, at half the instructions.
struct Act {
    int64_t K, nb;
    int16_t* a;
    float* d;
    int32_t* bsum;
    int8_t *hi, *lo;
    int32_t *bsum16, *hsum, *hsum16;
};
constexpr int64_t ACT_BYTES_PER_BLOCK = 64 + 4 + 4 + 64 + 8 + 4 + 8;
constexpr int64_t ACT_INT8_BYTES_PER_BLOCK = 32 + 4 + 4 + 8;  // hi, d, hsum, hsum16 (quantize_row's int8_only)
// |a| <= 127 * 256 + 127, so that hi = round(a / 256) fits an int8 (~2^-15 relative precision).
constexpr float ACT_MAX = 32639.f;

// int8_only: hi, its sums and d alone (what the interleaved kernels' int8 products read), the
// int16 row, lo and their sums left unwritten: ~half the work of a many-row prefill's quantization.
void quantize_row(const float* x, Act& act, bool int8_only = false) {
    for (int64_t j = 0; j < act.nb; j++) {
        __m512 v0 = _mm512_loadu_ps(x + 32 * j), v1 = _mm512_loadu_ps(x + 32 * j + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float id = amax > 0.f ? ACT_MAX / amax : 0.f;
        __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));  // round to nearest even
        __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
        act.d[j] = amax / ACT_MAX;
        if (!int8_only) {
            _mm256_storeu_si256((__m256i*)(act.a + 32 * j), _mm512_cvtsepi32_epi16(i0));
            _mm256_storeu_si256((__m256i*)(act.a + 32 * j + 16), _mm512_cvtsepi32_epi16(i1));
            act.bsum16[2 * j] = _mm512_reduce_add_epi32(i0);
            act.bsum16[2 * j + 1] = _mm512_reduce_add_epi32(i1);
            act.bsum[j] = act.bsum16[2 * j] + act.bsum16[2 * j + 1];
        }
        for (int h = 0; h < 2; h++) {
            const __m512i v = h ? i1 : i0;
            const __m512i hi = _mm512_srai_epi32(_mm512_add_epi32(v, _mm512_set1_epi32(128)), 8);
            _mm_storeu_si128((__m128i*)(act.hi + 32 * j + 16 * h), _mm512_cvtepi32_epi8(hi));
            if (!int8_only)
                _mm_storeu_si128((__m128i*)(act.lo + 32 * j + 16 * h), _mm512_cvtepi32_epi8(_mm512_sub_epi32(v, _mm512_slli_epi32(hi, 8))));
            act.hsum16[2 * j + h] = _mm512_reduce_add_epi32(hi);
        }
        act.hsum[j] = act.hsum16[2 * j] + act.hsum16[2 * j + 1];
    }
}

// Y[m, n] for R weight rows starting at n and MT activation rows; R * MT independent accumulators
// (all indices compile-time, so they live in registers) hide the FMA latency.
template <class T, int R, int MT>
INLINE void dot_tile(const uint8_t* W, int64_t rb, int64_t n, const Act* acts, float* Y, int64_t ldy) {
    const int64_t nblk = acts[0].K / T::VALS;
    __m512 acc[R][MT];
    float accmin[R][MT];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MT; m++) {
            acc[r][m] = _mm512_setzero_ps();
            accmin[r][m] = 0.f;
        }
    for (int64_t b = 0; b < nblk; b++) {
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            T::decode(W + (n + r) * rb + b * T::BYTES, [&](int sub, __m256i q, float s_lo, float s_hi, float mn) __attribute__((always_inline)) {
                const int64_t j = b * (T::VALS / 32) + sub;
                const __m512i w = _mm512_cvtepi8_epi16(q);
                // Lanes 0-7 of the vpdpwssd result hold values 0-15, lanes 8-15 values 16-31.
                const __m512 s = T::TWO_SCALES ? _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s_lo), _mm512_set1_ps(s_hi))
                                               : _mm512_set1_ps(s_lo);
#pragma GCC unroll 8
                for (int m = 0; m < MT; m++) {
                    const Act& a = acts[m];
                    __m512i dot = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(a.a + 32 * j));
                    acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s, _mm512_set1_ps(a.d[j])), acc[r][m]);
                    if (T::HAS_MIN) accmin[r][m] += mn * a.d[j] * (float)a.bsum[j];
                }
            });
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MT; m++) Y[m * ldy + n + r] = _mm512_reduce_add_ps(acc[r][m]) - accmin[r][m];
}

// The same for 32-value formats, leaner: the block scales of each weight row are gathered 16 at a
// time and multiplied by the activation scales up front, so the inner loop per block and row is a
// widening, one vpdpwssd, a conversion and an FMA with a broadcast from memory.
template <class T, int R, int MT>
INLINE void dot_tile32(const uint8_t* W, int64_t rb, int64_t n, const Act* acts, float* Y, int64_t ldy, float* cs) {
    const int64_t nblk = acts[0].K / 32;
    const __m512i offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(T::BYTES));
    for (int r = 0; r < R; r++) {
        const uint8_t* row = W + (n + r) * rb;
        for (int64_t j0 = 0; j0 < nblk; j0 += 16) {
            const __mmask16 k = (__mmask16)((1u << std::min<int64_t>(16, nblk - j0)) - 1);
            __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, offsets, row + j0 * T::BYTES, 1);
            __m512 ws = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
            for (int m = 0; m < MT; m++)
                _mm512_mask_storeu_ps(cs + (r * MT + m) * nblk + j0, k,
                                      _mm512_mul_ps(ws, _mm512_maskz_loadu_ps(k, acts[m].d + j0)));
        }
    }
    __m512 acc[R][MT];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MT; m++) acc[r][m] = _mm512_setzero_ps();
    // Software prefetch of the tile after the next (rows are contiguous): the hardware prefetcher
    // alone leaves a core well below its share of DRAM bandwidth. Into the L2 (T1), not the L1:
    // an L1 prefetch holds one of the core's few line-fill buffers until its line arrives, and
    // stalls the loads behind it; the LM head ran 9.5 -> 7.9 ms per token (A/B in one process).
    const char* ahead = (const char*)(W + (n + 2 * R) * rb);
    const int64_t lines = (R * rb + 63) / 64, per_block = (lines + nblk - 1) / nblk;
    for (int64_t b = 0; b < nblk; b++) {
        for (int64_t l = 0; l < per_block; l++) _mm_prefetch(ahead + (b * per_block + l) * 64, _MM_HINT_T1);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const __m512i w = _mm512_cvtepi8_epi16(T::quants(W + (n + r) * rb + b * T::BYTES));
#pragma GCC unroll 8
            for (int m = 0; m < MT; m++) {
                __m512i dot = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(acts[m].a + 32 * b));
                acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(cs[(r * MT + m) * nblk + b]), acc[r][m]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MT; m++) Y[m * ldy + n + r] = _mm512_reduce_add_ps(acc[r][m]);
}

// What the repacked layouts' kernel below (dot_tile_g128) needs from the activations for one
// 128-value group, and how a format's scales turn the group's two integer dot products into
// floats. Lanes of a vpdpbusd result hold four consecutive values: lanes 0-7 are the first
// 32-value block, 8-15 the second.
const __m512i LANES_FIRST = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
const __m512i LANES_SECOND = _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);

INLINE float hsum128(__m128 o) {
    o = _mm_hadd_ps(o, o);
    return _mm_cvtss_f32(_mm_hadd_ps(o, o));
}

// Q5_0R and Q4_KR: one scale per 32-value block and a per-block min (Q5_0's +16 offset, Q4_K's
// dmin * m) taken off through the activation block sums.
template <class Fmt> struct Group32 {
    using Off = __m128;
    __m128 da, bs;  // activation scales, block sums times them
    Group32(const Act& a, int64_t g)
        : da(_mm_loadu_ps(a.d + 4 * g)),
          bs(_mm_mul_ps(_mm_cvtepi32_ps(_mm_loadu_si128((const __m128i*)(a.bsum + 4 * g))), da)) {}
    INLINE void add(const uint8_t* p, __m512i t0, __m512i t1, __m512& acc, Off& off) const {
        const __m128 ws = Fmt::scales(p);
        const __m512 cs4 = _mm512_castps128_ps512(_mm_mul_ps(ws, da));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t0), _mm512_permutexvar_ps(LANES_FIRST, cs4), acc);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t1), _mm512_permutexvar_ps(LANES_SECOND, cs4), acc);
        off = _mm_fmadd_ps(Fmt::mins(p, ws), bs, off);
    }
    static INLINE float total(Off o) { return hsum128(o); }
};

// Q6_KR: one scale per 16-value sub-block (four lanes), values stored +32, taken off through
// the activations' half-block sums.
struct Group16 {
    using Off = __m256;
    __m512 da0, da1;  // each lane's activation scale, values 0-63 and 64-127
    __m256 bs;        // 32 * half-block sums * activation scale, for the eight sub-blocks
    Group16(const Act& a, int64_t g) {
        const __m128 da = _mm_loadu_ps(a.d + 4 * g);
        da0 = _mm512_permutexvar_ps(LANES_FIRST, _mm512_castps128_ps512(da));
        da1 = _mm512_permutexvar_ps(LANES_SECOND, _mm512_castps128_ps512(da));
        const __m256 da8 = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(da), _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
        const __m256 sums = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i*)(a.bsum16 + 8 * g)));
        bs = _mm256_mul_ps(_mm256_mul_ps(sums, da8), _mm256_set1_ps(32.f));
    }
    INLINE void add(const uint8_t* p, __m512i t0, __m512i t1, __m512& acc, Off& off) const {
        float d;
        std::memcpy(&d, p + 104, 4);
        const __m256 sc = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 96)))),
                                        _mm256_set1_ps(d));
        const __m512 sc16 = _mm512_castps256_ps512(sc);
        const __m512i first = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
        const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(4));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t0), _mm512_mul_ps(_mm512_permutexvar_ps(first, sc16), da0), acc);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t1), _mm512_mul_ps(_mm512_permutexvar_ps(second, sc16), da1), acc);
        off = _mm256_fmadd_ps(sc, bs, off);
    }
    static INLINE float total(Off o) { return hsum128(_mm_add_ps(_mm256_castps256_ps128(o), _mm256_extractf128_ps(o, 1))); }
};

template <class Fmt> struct GroupOf { using type = Group32<Fmt>; };
template <> struct GroupOf<FmtQ6_KR> { using type = Group16; };

// One activation row times R rows of a repacked 128-value format (Q5_0R, Q4_KR, Q6_KR), the decode
// step's case. Per 128 weights and row: one load, a few masks for the unsigned stored values, and
// per 64 values two vpdpbusd (unsigned weights times the activations' int8 halves: exactly the
// int16 dot product) then one FMA with the blocks' scales; the stored values' offset (Q5_0, Q6_K)
// or the blocks' mins (Q4_K) are taken off at the end through activation block sums. About a third
// of the instructions of the generic path, which widens every block to int16.
template <class Fmt, int R, int MT>
INLINE void dot_tile_g128(const uint8_t* W, int64_t rb, int64_t n, const Act* acts, float* Y, int64_t ldy) {
    using G = typename GroupOf<Fmt>::type;
    const int64_t ng = acts[0].K / 128;
    __m512 acc[R][MT];
    typename G::Off off[R][MT];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MT; m++) {
            acc[r][m] = _mm512_setzero_ps();
            std::memset(&off[r][m], 0, sizeof(off[r][m]));
        }
    const char* ahead = (const char*)(W + (n + 2 * R) * rb);  // the tile after the next, as in dot_tile32
    const int64_t lines = (R * rb + 63) / 64, per_group = (lines + ng - 1) / ng;
    for (int64_t g = 0; g < ng; g++) {
        for (int64_t l = 0; l < per_group; l++) _mm_prefetch(ahead + (g * per_group + l) * 64, _MM_HINT_T1);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const uint8_t* p = W + (n + r) * rb + g * Fmt::BYTES;
            __m512i u0, u1;
            Fmt::unsigned_quants(p, u0, u1);
#pragma GCC unroll 4
            // The weights decoded once for every activation row. The activation loads and G(a, g)
            // do not depend on r: the compiler hoists them (A/B equal to a one-row kernel that
            // loaded them once per group).
            for (int m = 0; m < MT; m++) {
                const Act& a = acts[m];
                const __m512i h0 = _mm512_loadu_si512(a.hi + 128 * g), l0 = _mm512_loadu_si512(a.lo + 128 * g);
                const __m512i h1 = _mm512_loadu_si512(a.hi + 128 * g + 64), l1 = _mm512_loadu_si512(a.lo + 128 * g + 64);
                __m512i t0 = _mm512_slli_epi32(dpbusd_bits<Fmt::BITS>(_mm512_setzero_si512(), u0, h0), 8);
                __m512i t1 = _mm512_slli_epi32(dpbusd_bits<Fmt::BITS>(_mm512_setzero_si512(), u1, h1), 8);
                t0 = dpbusd_bits<Fmt::BITS>(t0, u0, l0);  // values 0-63 of the group
                t1 = dpbusd_bits<Fmt::BITS>(t1, u1, l1);  // values 64-127
                G(a, g).add(p, t0, t1, acc[r][m], off[r][m]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MT; m++) Y[m * ldy + n + r] = _mm512_reduce_add_ps(acc[r][m]) - G::total(off[r][m]);
}

}  // namespace
