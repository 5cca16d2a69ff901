// Matrix multiplies that read GGUF weight blocks directly (no full dequantized copy of the model).
//
// Two paths, both checked against the pure-PyTorch reference in qlinear.py:
// - `qmatmul`: few activation rows (decode). Activations are quantized per block of 32 to int16
//   with an fp32 scale (~2^-15 relative error: logits match the fp32 reference to ~1e-4, where
//   llama.cpp's int8 activations cost a few percent). Each weight sub-block of 32 is decoded to 32
//   int8 q with value = s * q - min, widened to int16 and multiplied with AVX-512 VNNI vpdpwssd
//   (int16 pairs -> int32): one instruction per 32 weights, the weights read once from memory.
// - `bf16_linear`: many rows (prefill). A tile of weight rows is dequantized to bf16 and multiplied
//   with oneMKL's cblas_gemm_bf16bf16f32 (AMX/AVX512-BF16, fp32 accumulation and output).
// `dequant` exposes the block decoders themselves (bit-exact with quants.py in fp32).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <sys/mman.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__AVX512VNNI__)
#error "gemma3 kernels need AVX-512 F/BW/VL/VNNI (the Python side falls back to PyTorch without them)"
#endif

extern "C" void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int64_t m, int64_t n, int64_t k,
                                       float alpha, const uint16_t* a, int64_t lda, const uint16_t* b,
                                       int64_t ldb, float beta, float* c, int64_t ldc);  // oneMKL, in libtorch_cpu

namespace {

#define INLINE inline __attribute__((always_inline))

// Q4_0R, Q5_0R, Q8_0R, Q4_KR, Q6_KR, Q4_0X, Q5_0X and Q8_0X are ours, not GGML's: weights
// repacked for few-row products (repack_*).
enum GGMLType : int64_t {
    Q4_0 = 2, Q8_0 = 8, Q5_0 = 6, Q4_K = 12, Q6_K = 14, Q4_0R = 1002, Q5_0R = 1006, Q8_0R = 1008, Q4_KR = 1012, Q6_KR = 1014,
    Q4_0X = 1102, Q5_0X = 1106, Q8_0X = 1108
};

INLINE float h2f(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

// e^x for 16 floats (Cephes' expf: x = n ln2 + r, a degree-7 polynomial for e^r, then 2^n by
// scalef, which also gives 0 / inf out of range); within ~1 ulp of std::exp.
INLINE __m512 exp512(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

// g * gelu_tanh(v) for 16 values: 0.5 v (1 + tanh(z)) is v / (1 + e^(-2z)), z = c (v + 0.044715 v^3).
INLINE __m512 gelu_mul512(__m512 v, __m512 g) {
    const __m512 z = _mm512_mul_ps(_mm512_set1_ps(-2.f * 0.7978845608028654f),
                                   _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), v), _mm512_mul_ps(v, v), v));
    return _mm512_mul_ps(_mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(z))), g);
}

// Each format calls f(sub, q, s_lo, s_hi, min) for its 32-value sub-blocks in order: q holds 32
// int8 and the values are s * q - min, with s = s_lo for the first 16 values and s_hi for the rest.
// 32-value formats (Block32) expose quants(): the block's int8 values, its f16 scale being the
// block's first two bytes (which dot_tile32 gathers 16 blocks at a time).
template <class Fmt, int Bytes> struct Block32 {
    static constexpr int VALS = 32, BYTES = Bytes;
    static constexpr bool TWO_SCALES = false, HAS_MIN = false;
    template <class F> static INLINE void decode(const uint8_t* b, F&& f) {
        float d = h2f(b);
        f(0, Fmt::quants(b), d, d, 0.f);
    }
};

// 16 bytes of packed nibbles as 32 values 0..15: values 0-15 are the low nibbles, 16-31 the high ones.
INLINE __m256i nibbles32(const uint8_t* p) {
    __m128i qs = _mm_loadu_si128((const __m128i*)p);
    __m128i m4 = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qs, 4), m4), _mm_and_si128(qs, m4));
}

struct FmtQ8_0 : Block32<FmtQ8_0, 34> {
    static INLINE __m256i quants(const uint8_t* b) { return _mm256_loadu_si256((const __m256i*)(b + 2)); }
};

struct FmtQ5_0 : Block32<FmtQ5_0, 22> {
    static INLINE __m256i quants(const uint8_t* b) {
        uint32_t qh;
        std::memcpy(&qh, b + 2, 4);
        __m256i lo_hi = nibbles32(b + 6);
        // Bit i of qh is the 5th bit of value i; values are stored with a +16 offset, so value =
        // nibble - 16 where the bit is clear and nibble where it is set.
        return _mm256_mask_sub_epi8(lo_hi, ~(__mmask32)qh, lo_hi, _mm256_set1_epi8(16));
    }
};

struct FmtQ4_0 : Block32<FmtQ4_0, 18> {  // what `gemma3 quantize --to int4-block32` writes
    static INLINE __m256i quants(const uint8_t* b) {
        return _mm256_sub_epi8(nibbles32(b + 2), _mm256_set1_epi8(8));  // stored + 8
    }
};

// The repacked 128-value layouts (Q4_0R, Q5_0R, Q8_0R, Q4_KR, Q6_KR) keep the group's values as two
// 64-byte halves of unsigned bytes (`unsigned_quants`); their decoders hand the four 32-value
// quarters on as signed values q = u - offset, each with its scales for values 0-15 and 16-31
// and its min.
template <class F>
INLINE void quarters(__m512i q0, __m512i q1, const float* lo, const float* hi, const float* mn, F&& f) {
    f(0, _mm512_castsi512_si256(q0), lo[0], hi[0], mn[0]);
    f(1, _mm512_extracti64x4_epi64(q0, 1), lo[1], hi[1], mn[1]);
    f(2, _mm512_castsi512_si256(q1), lo[2], hi[2], mn[2]);
    f(3, _mm512_extracti64x4_epi64(q1, 1), lo[3], hi[3], mn[3]);
}

INLINE __m512i low_nibbles(__m512i x) { return _mm512_and_si512(x, _mm512_set1_epi8(0x0F)); }
INLINE __m512i high_nibbles(__m512i x) { return low_nibbles(_mm512_srli_epi16(x, 4)); }

// Q4_0, Q5_0 and Q8_0 repacked four blocks (128 values) at a time for one-row products
// (`repack_q4_0`, `repack_q5_0`, `repack_q8_0`; the same bytes as four GGUF blocks): the stored values u (value = d * (u -
// OFFSET)) first, then the four f16 scales at SCALES_AT. For dot_tile_g128, `scales` are the
// four blocks' d and `mins` what each block subtracts per unit of activation sum.
template <class Fmt, int OFFSET, int SCALES_AT> struct Packed32 {
    static constexpr int VALS = 128, BYTES = SCALES_AT + 8;
    static constexpr bool TWO_SCALES = false, HAS_MIN = false;
    template <class F> static INLINE void decode(const uint8_t* b, F&& f) {
        __m512i u0, u1;
        Fmt::unsigned_quants(b, u0, u1);
        const __m512i off = _mm512_set1_epi8(OFFSET);
        float d[4];
        const float zero[4] = {0.f, 0.f, 0.f, 0.f};
        _mm_storeu_ps(d, scales(b));
        quarters(_mm512_sub_epi8(u0, off), _mm512_sub_epi8(u1, off), d, d, zero, f);
    }
    static INLINE __m128 scales(const uint8_t* b) { return _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(b + SCALES_AT))); }
    static INLINE __m128 mins(const uint8_t*, __m128 scales) { return _mm_mul_ps(scales, _mm_set1_ps((float)OFFSET)); }
};

// Q4_0R: bytes 0-63 hold the stored nibbles (values + 8) of values 0-63 in their low nibbles and
// of values 64-127 in their high nibbles, so one 64-byte load gives 2 x 64 values in order.
struct FmtQ4_0R : Packed32<FmtQ4_0R, 8, 64> {
    static INLINE void unsigned_quants(const uint8_t* b, __m512i& u0, __m512i& u1) {
        const __m512i x = _mm512_loadu_si512(b);
        u0 = low_nibbles(x);
        u1 = high_nibbles(x);
    }
};

// Q5_0R: the low 4 bits as Q4_0R's nibbles, then the 128 fifth bits (one 64-bit mask per half).
struct FmtQ5_0R : Packed32<FmtQ5_0R, 16, 80> {
    static INLINE void unsigned_quants(const uint8_t* b, __m512i& u0, __m512i& u1) {
        uint64_t k0, k1;
        std::memcpy(&k0, b + 64, 8);
        std::memcpy(&k1, b + 72, 8);
        FmtQ4_0R::unsigned_quants(b, u0, u1);
        u0 = _mm512_mask_add_epi8(u0, k0, u0, _mm512_set1_epi8(0x10));  // nibble + 16 = the stored 5-bit value
        u1 = _mm512_mask_add_epi8(u1, k1, u1, _mm512_set1_epi8(0x10));
    }
};

// Q8_0R: the 128 values + 128 as unsigned bytes, which vpdpbusd takes as they are (the Q8_0
// kernel widens every value to int16 and converts each block's scale on its own: ~40% more
// instructions per block, and the LM head is compute-bound enough for it to show).
struct FmtQ8_0R : Packed32<FmtQ8_0R, 128, 128> {
    static INLINE void unsigned_quants(const uint8_t* b, __m512i& u0, __m512i& u1) {
        u0 = _mm512_loadu_si512(b);
        u1 = _mm512_loadu_si512(b + 64);
    }
};

// Q4_K repacked half a super-block (128 values, four sub-blocks) at a time for one-row products
// (`repack_q4_k`): bytes 0-63 hold values 0-63 in their low nibbles and 64-127 in their high
// nibbles (as Q5_0R), bytes 64-79 the four sub-block scales d * sc and bytes 80-95 the four mins
// dmin * m, as fp32 (both products are exact in fp32). 96 bytes where Q4_K takes 72, for about
// a third of the generic path's instructions.
struct FmtQ4_KR {
    static constexpr int VALS = 128, BYTES = 96;
    static constexpr bool TWO_SCALES = false, HAS_MIN = true;
    template <class F> static INLINE void decode(const uint8_t* b, F&& f) {
        __m512i u0, u1;
        unsigned_quants(b, u0, u1);
        float s[4], m[4];
        std::memcpy(s, b + 64, 16);
        std::memcpy(m, b + 80, 16);
        quarters(u0, u1, s, s, m, f);
    }
    static INLINE void unsigned_quants(const uint8_t* b, __m512i& u0, __m512i& u1) { FmtQ4_0R::unsigned_quants(b, u0, u1); }
    static INLINE __m128 scales(const uint8_t* b) { return _mm_loadu_ps((const float*)(b + 64)); }
    static INLINE __m128 mins(const uint8_t* b, __m128) { return _mm_loadu_ps((const float*)(b + 80)); }
};

// Q6_K repacked half a super-block (128 values, eight 16-value sub-blocks) at a time for one-row
// products (`repack_q6_k`): bytes 0-63 hold the low 4 bits of values 0-63 in their low nibbles and
// of 64-127 in their high nibbles (as Q5_0R), bytes 64-95 the fifth and sixth bits as four 64-bit
// masks (bit 4 of values 0-63, bit 5 of 0-63, bit 4 of 64-127, bit 5 of 64-127), bytes 96-103 the
// eight int8 sub-block scales and bytes 104-107 the super-block's d as fp32. Stored values u are
// 0..63 and value = d * sc * (u - 32), as in Q6_K. 108 bytes where Q6_K takes 105.
struct FmtQ6_KR {
    static constexpr int VALS = 128, BYTES = 108;
    static constexpr bool TWO_SCALES = true, HAS_MIN = false;
    template <class F> static INLINE void decode(const uint8_t* b, F&& f) {
        __m512i u0, u1;
        unsigned_quants(b, u0, u1);
        const __m512i q0 = _mm512_sub_epi8(u0, _mm512_set1_epi8(32)), q1 = _mm512_sub_epi8(u1, _mm512_set1_epi8(32));
        const int8_t* sc = (const int8_t*)(b + 96);
        float d, lo[4], hi[4];
        const float zero[4] = {0.f, 0.f, 0.f, 0.f};
        std::memcpy(&d, b + 104, 4);
        for (int i = 0; i < 4; i++) {
            lo[i] = d * sc[2 * i];
            hi[i] = d * sc[2 * i + 1];
        }
        quarters(q0, q1, lo, hi, zero, f);
    }
    static INLINE void unsigned_quants(const uint8_t* b, __m512i& u0, __m512i& u1) {
        const __m512i b4 = _mm512_set1_epi8(0x10), b5 = _mm512_set1_epi8(0x20);
        uint64_t k[4];
        std::memcpy(k, b + 64, 32);
        FmtQ4_0R::unsigned_quants(b, u0, u1);
        u0 = _mm512_mask_add_epi8(u0, k[0], u0, b4);
        u0 = _mm512_mask_add_epi8(u0, k[1], u0, b5);
        u1 = _mm512_mask_add_epi8(u1, k[2], u1, b4);
        u1 = _mm512_mask_add_epi8(u1, k[3], u1, b5);
    }
};

struct FmtQ4_K {
    static constexpr int VALS = 256, BYTES = 144;
    static constexpr bool TWO_SCALES = false, HAS_MIN = true;
    template <class F> static INLINE void decode(const uint8_t* b, F&& f) {
        float d = h2f(b), dmin = h2f(b + 2);
        const uint8_t* s = b + 4;  // 8 six-bit scales and mins (get_scale_min_k4 in ggml)
        const uint8_t* qs = b + 16;
        __m256i m4 = _mm256_set1_epi8(0x0F);
        for (int j = 0; j < 4; j++) {
            __m256i q = _mm256_loadu_si256((const __m256i*)(qs + 32 * j));
            for (int h = 0; h < 2; h++) {
                int i = 2 * j + h;
                int sc = i < 4 ? s[i] & 63 : (s[i + 4] & 0xF) | ((s[i - 4] >> 6) << 4);
                int mn = i < 4 ? s[i + 4] & 63 : (s[i + 4] >> 4) | ((s[i] >> 6) << 4);
                float ds = d * (float)sc;
                f(i, _mm256_and_si256(h ? _mm256_srli_epi16(q, 4) : q, m4), ds, ds, dmin * (float)mn);
            }
        }
    }
};

struct FmtQ6_K {
    static constexpr int VALS = 256, BYTES = 210;
    static constexpr bool TWO_SCALES = true, HAS_MIN = false;
    template <class F> static INLINE void decode(const uint8_t* b, F&& f) {
        const int8_t* sc = (const int8_t*)(b + 192);
        float d = h2f(b + 208);
        const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30), off = _mm256_set1_epi8(32);
        for (int h = 0; h < 2; h++) {
            __m256i l0 = _mm256_loadu_si256((const __m256i*)(b + 64 * h));
            __m256i l1 = _mm256_loadu_si256((const __m256i*)(b + 64 * h + 32));
            __m256i qh = _mm256_loadu_si256((const __m256i*)(b + 128 + 32 * h));
            const int8_t* s = sc + 8 * h;
            // Sub-blocks: low nibbles of ql[0:32], ql[32:64], then high nibbles; qh bit pairs 0..3;
            // stored with a +32 offset.
            __m256i u0 = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30));
            __m256i u1 = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30));
            __m256i u2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(qh, m30));
            __m256i u3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                         _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
            f(4 * h + 0, _mm256_sub_epi8(u0, off), d * s[0], d * s[1], 0.f);
            f(4 * h + 1, _mm256_sub_epi8(u1, off), d * s[2], d * s[3], 0.f);
            f(4 * h + 2, _mm256_sub_epi8(u2, off), d * s[4], d * s[5], 0.f);
            f(4 * h + 3, _mm256_sub_epi8(u3, off), d * s[6], d * s[7], 0.f);
        }
    }
};

template <class F> auto dispatch(int64_t type, F&& f) {
    switch (type) {
        case Q4_0: return f(FmtQ4_0{});
        case Q8_0: return f(FmtQ8_0{});
        case Q5_0: return f(FmtQ5_0{});
        case Q4_K: return f(FmtQ4_K{});
        case Q6_K: return f(FmtQ6_K{});
        case Q5_0R: return f(FmtQ5_0R{});
        case Q4_KR: return f(FmtQ4_KR{});
        case Q4_0R: return f(FmtQ4_0R{});
        case Q8_0R: return f(FmtQ8_0R{});
        case Q6_KR: return f(FmtQ6_KR{});
    }
    TORCH_CHECK(false, "gemma3 kernels: unsupported GGML type ", type);
}

template <class T> int64_t row_bytes(int64_t K) {
    TORCH_CHECK(K % T::VALS == 0, "row length ", K, " is not a multiple of the block size ", T::VALS);
    return K / T::VALS * T::BYTES;
}

// ---- int16 activations -----------------------------------------------------------------------

// One activation row: a[K] int16 with one scale d per block of 32 (x ~= d * a), the sums of a
// per block and per half block (for formats with a min or an offset; Q6_K's scales cover 16
// values), and a split into int8 halves a = 256 * hi + lo (for vpdpbusd, which multiplies unsigned
// by signed bytes: two of them give the int16 product).
struct Act {
    int64_t K, nb;
    int16_t* a;
    float* d;
    int32_t* bsum;
    int8_t *hi, *lo;
    int32_t* bsum16;
};
constexpr int64_t ACT_BYTES_PER_BLOCK = 64 + 4 + 4 + 64 + 8;
// |a| <= 127 * 256 + 127, so that hi = round(a / 256) fits an int8 (~2^-15 relative precision).
constexpr float ACT_MAX = 32639.f;

void quantize_row(const float* x, Act& act) {
    for (int64_t j = 0; j < act.nb; j++) {
        __m512 v0 = _mm512_loadu_ps(x + 32 * j), v1 = _mm512_loadu_ps(x + 32 * j + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float id = amax > 0.f ? ACT_MAX / amax : 0.f;
        __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));  // round to nearest even
        __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
        _mm256_storeu_si256((__m256i*)(act.a + 32 * j), _mm512_cvtsepi32_epi16(i0));
        _mm256_storeu_si256((__m256i*)(act.a + 32 * j + 16), _mm512_cvtsepi32_epi16(i1));
        act.d[j] = amax / ACT_MAX;
        act.bsum16[2 * j] = _mm512_reduce_add_epi32(i0);
        act.bsum16[2 * j + 1] = _mm512_reduce_add_epi32(i1);
        act.bsum[j] = act.bsum16[2 * j] + act.bsum16[2 * j + 1];
        for (int h = 0; h < 2; h++) {
            const __m512i v = h ? i1 : i0;
            const __m512i hi = _mm512_srai_epi32(_mm512_add_epi32(v, _mm512_set1_epi32(128)), 8);
            const __m512i lo = _mm512_sub_epi32(v, _mm512_slli_epi32(hi, 8));
            _mm_storeu_si128((__m128i*)(act.hi + 32 * j + 16 * h), _mm512_cvtepi32_epi8(hi));
            _mm_storeu_si128((__m128i*)(act.lo + 32 * j + 16 * h), _mm512_cvtepi32_epi8(lo));
        }
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
                __m512i t0 = _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u0, h0), 8);
                __m512i t1 = _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u1, h1), 8);
                t0 = _mm512_dpbusd_epi32(t0, u0, l0);  // values 0-63 of the group
                t1 = _mm512_dpbusd_epi32(t1, u1, l1);  // values 64-127
                G(a, g).add(p, t0, t1, acc[r][m], off[r][m]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MT; m++) Y[m * ldy + n + r] = _mm512_reduce_add_ps(acc[r][m]) - G::total(off[r][m]);
}


// ---- Q4_0X, Q5_0X and Q8_0X: sixteen rows interleaved --------------------------------------------
//
// Layouts for few-row products with the rows, not the values, across the lanes (llama.cpp's
// repacked CPU layouts do the same): each vpdpbusd lane is one of 16 rows and multiplies four of
// its values by four activation values broadcast to every lane. The scales of 16 rows then come in
// one vector, nothing is summed across lanes, and a group's bytes are read front to back.
// - Q5_0X: ~30% fewer instructions than Q5_0R; on the 270M model the Q5_0 weights (q, k, gate, up)
//   were the layers' compute-bound part, and a step ran ~0.2-0.3 ms faster.
// - Q8_0X: the 270M's LM head (178 MB) streams from memory at the speed of a bare read of its
//   bytes, 5.0 ms where Q8_0R's four-row tiles took 6.2 (the hardware fetches the rows' strided
//   136-byte groups less well than one stream); the whole step 8.4 -> 7.95 ms.
// - Q4_0X: the same for our own Q4_0 files (`gemma3 quantize --to int4-block32`), head included.
// (Q6_K and Q4_K versions, 31% and 17% faster warm, changed nothing in the step when a core read
// one stream; not retried with four.) Rows come in whole groups of 16 (N % 16 == 0) and a row is not
// contiguous: `lookup` decodes table rows from their group. The bytes are the GGUF format's, rearranged.
//
// Per 16 rows and 32-value block, with four-value quads q = 0..7 and lane 4r + i for value i of a
// quad of row r, values stored + OFFSET (unsigned for vpdpbusd; the offset is taken off through the
// activation block sums), and the 16 rows' f16 scales at SCALES_AT:
// - Q4_0X, 288 bytes (Q4_0's 18 per row): 4 x 64 bytes of 4-bit values, byte 64c + lane holding
//   quad 2c in its low nibble and 2c + 1 in its high (Nibbles16);
// - Q5_0X, 352 bytes (Q5_0's 22 per row): the low 4 bits as Q4_0X's, then 8 x 8 bytes: a 64-bit
//   mask per quad whose bit `lane` is that value's fifth bit;
// - Q8_0X, 544 bytes (Q8_0's 34 per row): 8 x 64 bytes, quad q at byte 64q + lane.
struct Nibbles16 {
    static INLINE __m512i quad(const uint8_t* d, int q) {
        const __m512i raw = _mm512_loadu_si512(d + 64 * (q / 2));
        return q % 2 ? high_nibbles(raw) : low_nibbles(raw);
    }
    static int lane(int r, int j) { return 4 * r + j % 4; }  // of value j of row r, in quad j / 4
    // Value j of row r (decoding tables and tests: one at a time).
    static int get(const uint8_t* d, int r, int j) { return (d[64 * (j / 8) + lane(r, j)] >> (4 * (j / 4 % 2))) & 0x0F; }
    // Value j of a GGUF block's 16 nibble bytes qs (values 0-15 low nibbles, 16-31 high), into a zeroed d.
    static void put(const uint8_t* qs, int r, int j, uint8_t* d) {
        const int nib = j < 16 ? qs[j] & 0x0F : qs[j - 16] >> 4;
        d[64 * (j / 8) + lane(r, j)] |= nib << (4 * (j / 4 % 2));
    }
};

struct X16Q4_0 {
    static constexpr int64_t SRC = Q4_0, BYTES = 288, SCALES_AT = 256, OFFSET = 8;
    static INLINE __m512i quad(const uint8_t* d, int q) { return Nibbles16::quad(d, q); }
    // Row r's 32 stored values in the block at d.
    static __m256i stored32(const uint8_t* d, int r) {
        alignas(32) uint8_t v[32];
        for (int j = 0; j < 32; j++) v[j] = (uint8_t)Nibbles16::get(d, r, j);
        return _mm256_load_si256((const __m256i*)v);
    }
    // Row r's block from Q4_0 block `src` (f16 scale, 16 nibble bytes), into a zeroed `dst`.
    static void pack(const uint8_t* src, int r, uint8_t* dst) {
        std::memcpy(dst + SCALES_AT + 2 * r, src, 2);
        for (int j = 0; j < 32; j++) Nibbles16::put(src + 2, r, j, dst);
    }
};

struct X16Q5_0 {
    static constexpr int64_t SRC = Q5_0, BYTES = 352, SCALES_AT = 320, OFFSET = 16;
    static INLINE __m512i quad(const uint8_t* d, int q) {
        const __m512i u = Nibbles16::quad(d, q);
        __mmask64 fifth;
        std::memcpy(&fifth, d + 256 + 8 * q, 8);
        return _mm512_mask_add_epi8(u, fifth, u, _mm512_set1_epi8(0x10));
    }
    static __m256i stored32(const uint8_t* d, int r) {
        alignas(32) uint8_t v[32];
        for (int j = 0; j < 32; j++) {
            const int lane = Nibbles16::lane(r, j);
            v[j] = (uint8_t)(Nibbles16::get(d, r, j) + 16 * ((d[256 + 8 * (j / 4) + lane / 8] >> (lane % 8)) & 1));
        }
        return _mm256_load_si256((const __m256i*)v);
    }
    // Row r's block from Q5_0 block `src` (f16 scale, 32 fifth bits, 16 nibble bytes).
    static void pack(const uint8_t* src, int r, uint8_t* dst) {
        uint32_t qh;
        std::memcpy(&qh, src + 2, 4);
        std::memcpy(dst + SCALES_AT + 2 * r, src, 2);
        for (int j = 0; j < 32; j++) {
            const int lane = Nibbles16::lane(r, j);
            Nibbles16::put(src + 6, r, j, dst);
            dst[256 + 8 * (j / 4) + lane / 8] |= ((qh >> j) & 1u) << (lane % 8);
        }
    }
};

struct X16Q8_0 {
    static constexpr int64_t SRC = Q8_0, BYTES = 544, SCALES_AT = 512, OFFSET = 128;
    static INLINE __m512i quad(const uint8_t* d, int q) { return _mm512_loadu_si512(d + 64 * q); }
    // Row r's quads: the 4-byte lane r of each 64 bytes.
    static INLINE __m256i quads() { return _mm256_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112); }
    static INLINE __m256i stored32(const uint8_t* d, int r) { return _mm256_i32gather_epi32((const int*)(d + 4 * r), quads(), 4); }
    static void pack(const uint8_t* src, int r, uint8_t* dst) {
        std::memcpy(dst + SCALES_AT + 2 * r, src, 2);
        const __m256i stored = _mm256_xor_si256(FmtQ8_0::quants(src), _mm256_set1_epi8((char)0x80));  // + 128
        _mm256_i32scatter_epi32((int*)(dst + 4 * r), quads(), stored, 4);
    }
};

// Bytes of one 16-row group of K values.
template <class X> constexpr int64_t group_bytes(int64_t K) { return K / 32 * X::BYTES; }

// f(X16Q4_0{}), f(X16Q5_0{}) or f(X16Q8_0{}) for an interleaved type; false for any other.
template <class F> bool interleaved(int64_t type, F&& f) {
    if (type == Q4_0X) return f(X16Q4_0{}), true;
    if (type == Q5_0X) return f(X16Q5_0{}), true;
    if (type == Q8_0X) return f(X16Q8_0{}), true;
    return false;
}

// Y[m, 16 rows of group s] for S groups G[s] (outputs at Y[s]) and MT activation rows: each
// group's weights decoded once for all rows; the S groups are read block by block in lockstep.
template <class X, int S, int MT>
INLINE void x16_groups(const uint8_t* const* G, int64_t K, const Act* acts, float* const* Y, int64_t ldy) {
    __m512 acc[S][MT];
    for (int s = 0; s < S; s++)
        for (int m = 0; m < MT; m++) acc[s][m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < K / 32; b++) {
#pragma GCC unroll 8
        for (int s = 0; s < S; s++) {
            const uint8_t* d = G[s] + b * X::BYTES;
            // Blocks ahead: 8 for one stream (2 or 4 left the cores waiting), 4 per stream for
            // four (2 or 8 were slower).
            constexpr int ahead = S == 1 ? 8 : 4;
            for (int l = 0; l < X::BYTES; l += 64) _mm_prefetch((const char*)d + ahead * X::BYTES + l, _MM_HINT_T1);
            __m512i sh[MT], sl[MT];  // the products with the activations' high and low bytes
            for (int m = 0; m < MT; m++) sh[m] = sl[m] = _mm512_setzero_si512();
#pragma GCC unroll 8
            for (int q = 0; q < 8; q++) {
                const __m512i u = X::quad(d, q);
#pragma GCC unroll 4
                for (int m = 0; m < MT; m++) {
                    const int32_t* ah = (const int32_t*)(acts[m].hi + 32 * b);  // the activation quads
                    const int32_t* al = (const int32_t*)(acts[m].lo + 32 * b);
                    sh[m] = _mm512_dpbusd_epi32(sh[m], u, _mm512_set1_epi32(ah[q]));
                    sl[m] = _mm512_dpbusd_epi32(sl[m], u, _mm512_set1_epi32(al[q]));
                }
            }
            const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(d + X::SCALES_AT)));
            for (int m = 0; m < MT; m++) {
                const __m512i t = _mm512_sub_epi32(_mm512_add_epi32(_mm512_slli_epi32(sh[m], 8), sl[m]),
                                                   _mm512_set1_epi32((int32_t)X::OFFSET * acts[m].bsum[b]));
                acc[s][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(sc, _mm512_set1_ps(acts[m].d[b])), acc[s][m]);
            }
        }
    }
    for (int s = 0; s < S; s++)
        for (int m = 0; m < MT; m++) _mm512_storeu_ps(Y[s] + m * ldy, acc[s][m]);
}

// Y[m, n0..n1) for MT activation rows; a range that starts or ends inside a group computes that
// group whole and keeps its rows in range. One activation row (a decode step) reads its whole
// groups as four streams, from the starts of the range's four quarters: one core's single stream
// left memory idle (the memory system works on more lines at once for several streams; a bare
// two-thread read of the LM head: 5.4 ms as one stream per core, 4.6 as four). The 270M step
// 8.15 -> 7.37 ms (A/B in one process, same tokens; three or six streams were no better).
template <class X, int MT>
void x16_rows(const uint8_t* W, int64_t K, int64_t n0, int64_t n1, const Act* acts, float* Y, int64_t ldy) {
    constexpr int S = MT == 1 ? 4 : 1;
    auto one = [&](int64_t g, float* out, int64_t ld) {  // group g alone
        const uint8_t* G = W + g * group_bytes<X>(K);
        x16_groups<X, 1, MT>(&G, K, acts, &out, ld);
    };
    auto partial = [&](int64_t g) {
        float part[MT * 16];
        one(g, part, 16);
        for (int m = 0; m < MT; m++)
            for (int64_t n = std::max(n0, g * 16); n < std::min(n1, g * 16 + 16); n++) Y[m * ldy + n] = part[m * 16 + n - g * 16];
    };
    const int64_t g0 = (n0 + 15) / 16, g1 = n1 / 16;  // the whole groups in range
    if (g0 > g1) return partial(n0 / 16);            // inside one group
    if (n0 % 16) partial(n0 / 16);
    if (n1 % 16) partial(g1);
    const int64_t per = (g1 - g0) / S;
    for (int64_t i = 0; i < per; i++) {
        const uint8_t* G[S];
        float* Ys[S];
        for (int s = 0; s < S; s++) {
            const int64_t g = g0 + s * per + i;
            G[s] = W + g * group_bytes<X>(K);
            Ys[s] = Y + g * 16;
        }
        x16_groups<X, S, MT>(G, K, acts, Ys, ldy);
    }
    for (int64_t g = g0 + S * per; g < g1; g++) one(g, Y + g * 16, ldy);
}

// Bytes per row of K values in a layout (GGML or repacked; an interleaved row's share of its
// group, the GGUF format's row).
int64_t weight_row_bytes(int64_t type, int64_t K) {
    interleaved(type, [&](auto x) { type = decltype(x)::SRC; });
    return dispatch(type, [&](auto fmt) { return row_bytes<decltype(fmt)>(K); });
}

// Rows [n0, n1) for MT activation rows: several weight rows at a time, then the tail, through
// the kernel of the format's layout (32-value blocks, the repacked 128-value groups, K-quants).
template <class T, int MT>
void dot_rows(const uint8_t* W, int64_t rb, int64_t n0, int64_t n1, const Act* acts, float* Y, int64_t ldy) {
    constexpr int R = MT <= 2 ? 4 : 2;
    int64_t n = n0;
    if constexpr (T::VALS == 32) {
        std::vector<float> cs(R * MT * (acts[0].K / 32));
        for (; n + R <= n1; n += R) dot_tile32<T, R, MT>(W, rb, n, acts, Y, ldy, cs.data());
        for (; n < n1; n++) dot_tile32<T, 1, MT>(W, rb, n, acts, Y, ldy, cs.data());
    } else if constexpr (T::VALS == 128) {
        for (; n + R <= n1; n += R) dot_tile_g128<T, R, MT>(W, rb, n, acts, Y, ldy);
        for (; n < n1; n++) dot_tile_g128<T, 1, MT>(W, rb, n, acts, Y, ldy);
    } else {
        for (; n + R <= n1; n += R) dot_tile<T, R, MT>(W, rb, n, acts, Y, ldy);
        for (; n < n1; n++) dot_tile<T, 1, MT>(W, rb, n, acts, Y, ldy);
    }
}

constexpr int MT = 4;  // activation rows sharing one decoded weight block

// f(std::integral_constant<int, mt>{}) for mt = 1..MT: the kernels take the row count as a
// compile-time constant (their accumulators live in registers).
template <class F> void with_rows(int64_t mt, F&& f) {
    switch (mt) {
        case 1: return f(std::integral_constant<int, 1>{});
        case 2: return f(std::integral_constant<int, 2>{});
        case 3: return f(std::integral_constant<int, 3>{});
        default: return f(std::integral_constant<int, MT>{});
    }
}

// ---- decoded values (dequantization) ---------------------------------------------------------

// Writes the 32 values of one sub-block as fp32 (exactly quants.py's arithmetic: s * q, then - min)
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

// Row r of the 16-row group at G, as quants.py decodes the GGUF format: d * (stored - OFFSET).
template <class X, bool BF16>
void x16_row(const uint8_t* G, int64_t K, int r, void* out) {
    for (int64_t b = 0; b < K / 32; b++) {
        const uint8_t* d = G + b * X::BYTES;
        const float s = h2f(d + X::SCALES_AT + 2 * r);
        const __m256i q = _mm256_sub_epi8(X::stored32(d, r), _mm256_set1_epi8((char)X::OFFSET));  // int8 again
        store_sub<FmtQ8_0, BF16>(q, s, s, 0.f, (char*)out + 32 * b * (BF16 ? 2 : 4));
    }
}

// Row n of a weight in any layout (W: all its rows) decoded into `out` (K values).
template <bool BF16>
void decode_row(const uint8_t* W, int64_t type, int64_t K, int64_t n, void* out) {
    const bool x16 = interleaved(type, [&](auto x) {
        using X = decltype(x);
        x16_row<X, BF16>(W + n / 16 * group_bytes<X>(K), K, (int)(n % 16), out);
    });
    if (!x16) dispatch(type, [&](auto fmt) {
        using T = decltype(fmt);
        dequant_rows<T, BF16>(W, row_bytes<T>(K), K, n, n + 1, out, K);
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

// Quantized activation rows (the buffer owns the memory).
struct Acts {
    torch::Tensor buf;
    std::vector<Act> rows;
    Acts(const float* x, int64_t M, int64_t K) : rows(M) {
        TORCH_CHECK(K % 32 == 0, "row length ", K, " is not a multiple of 32");
        const int64_t nb = K / 32;
        buf = torch::empty({M, nb * ACT_BYTES_PER_BLOCK}, torch::kInt8);
        for (int64_t m = 0; m < M; m++) {
            int8_t* base = buf.data_ptr<int8_t>() + m * buf.size(1);
            rows[m] = Act{K, nb, (int16_t*)base, (float*)(base + 2 * K), (int32_t*)(base + 2 * K + 4 * nb),
                          base + 2 * K + 8 * nb, base + 3 * K + 8 * nb, (int32_t*)(base + 4 * K + 8 * nb)};
            quantize_row(x + m * K, rows[m]);
        }
    }
};

INLINE __mmask16 tail16(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

// The largest value of row[i0, i1) and its first index, or the first NaN's index (nan = true).
struct Best {
    float value;
    int64_t index;
    bool nan;
};

Best best_of(const float* row, int64_t i0, int64_t i1) {
    __m512 best = _mm512_set1_ps(-INFINITY);
    __m512i best_i = _mm512_set1_epi32(-1), idx = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                                    _mm512_set1_epi32((int)i0));
    __mmask16 nan = 0;
    int64_t i = i0;
    for (; i < i1 && !nan; i += 16, idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16))) {
        const __mmask16 k = tail16(i1 - i);
        const __m512 v = _mm512_maskz_loadu_ps(k, row + i);
        nan = _mm512_mask_cmp_ps_mask(k, v, v, _CMP_UNORD_Q);
        const __mmask16 gt = _mm512_mask_cmp_ps_mask(k, v, best, _CMP_GT_OQ);  // strictly: keeps the first
        best = _mm512_mask_mov_ps(best, gt, v);
        best_i = _mm512_mask_mov_epi32(best_i, gt, idx);
    }
    if (nan) return {NAN, i - 16 + __builtin_ctz(nan), true};
    // Among lanes holding the maximum, the smallest index (-1 lanes never held a value).
    const float m = _mm512_reduce_max_ps(best);
    const __mmask16 at = _mm512_cmp_ps_mask(best, _mm512_set1_ps(m), _CMP_EQ_OQ) &
                         _mm512_cmp_epi32_mask(best_i, _mm512_set1_epi32(-1), _MM_CMPINT_NE);
    return {m, at ? (int64_t)_mm512_mask_reduce_min_epi32(at, best_i) : -1, false};
}

// The answer over consecutive slices' bests, in order: the first NaN, else the first slice
// holding the maximum; index -1 where every value is -inf.
Best first_best(const std::vector<Best>& parts) {
    Best best{-INFINITY, -1, false};
    for (const Best& p : parts) {
        if (p.nan) return p;
        if (p.index >= 0 && (best.index < 0 || p.value > best.value)) best = p;
    }
    return best;
}

// One product acts @ W^T -> Y [M, N] of a batch of products sharing the same activations.
struct Product {
    const torch::Tensor& w;
    int64_t type, N;
    float* Y;
};

// All products in one parallel region (one fork/join: on a busy machine every barrier can cost
// a scheduler time slice), their weight rows concatenated and split over the threads. With `best`
// (one product, one activation row): also its largest output (argmax_rows' answer), each chunk
// scanned right after it is written, while it is still in its core's caches (a separate scan
// after the 270M's LM head, which has streamed 178 MB through them since, took ~0.14 ms).
void matmul_acts(const Acts& acts, const std::vector<Product>& products, Best* best = nullptr) {
    const int64_t M = (int64_t)acts.rows.size(), K = acts.rows[0].K;
    std::vector<int64_t> start{0};
    for (const auto& p : products) {
        check_layout(p.w, p.type, p.N, K);
        start.push_back(start.back() + p.N);
    }
    // Dynamic scheduling over a few chunks per thread: a thread that gets preempted (other
    // processes on the machine) delays the step by one chunk, not by its whole static share. Not
    // more: each chunk starts with a stall on the rows that nobody prefetched, and the prefetches
    // past a chunk's end land in the L2 of whichever core runs the next one (32 chunks per thread
    // cost the 270M model's layers ~0.3 ms per token against 4).
    const int64_t total = start.back(), threads = at::get_num_threads();
    const int64_t chunk = std::max<int64_t>(16, total / (threads * 4) / 16 * 16);
    const int64_t chunks = (total + chunk - 1) / chunk;
    TORCH_CHECK(!best || (products.size() == 1 && M == 1), "matmul_acts: a best output needs one product of one row");
    std::vector<Best> chunk_best(best ? chunks : 0);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && chunks > 1)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t r0 = c * chunk, r1 = std::min(total, r0 + chunk);
        for (size_t i = 0; i < products.size(); i++) {
            const int64_t n0 = std::max(r0, start[i]) - start[i], n1 = std::min(r1, start[i + 1]) - start[i];
            if (n0 >= n1) continue;
            const Product& p = products[i];
            const uint8_t* W = p.w.data_ptr<uint8_t>();
            for (int64_t m = 0; m < M; m += MT)  // MT activation rows per read of the weights
                with_rows(std::min<int64_t>(MT, M - m), [&](auto rows) {
                    constexpr int R = decltype(rows)::value;
                    const Act* a = acts.rows.data() + m;
                    float* Y = p.Y + m * p.N;
                    if (!interleaved(p.type, [&](auto x) { x16_rows<decltype(x), R>(W, K, n0, n1, a, Y, p.N); }))
                        dispatch(p.type, [&](auto fmt) {
                            using T = decltype(fmt);
                            dot_rows<T, R>(W, row_bytes<T>(K), n0, n1, a, Y, p.N);
                            return 0;
                        });
                });
            if (best) chunk_best[c] = best_of(p.Y, n0, n1);
        }
    }
    if (best) *best = first_best(chunk_best);
}

torch::Tensor as_rows(const torch::Tensor& x) {
    TORCH_CHECK(x.dim() == 2 && x.dtype() == torch::kFloat32, "x must be a 2-D float32 tensor");
    return x.contiguous();
}

// x [M, K] float32 @ W[N, K]^T (GGUF blocks) -> [M, N] float32, int16 activations.
torch::Tensor qmatmul(torch::Tensor x, torch::Tensor w, int64_t type, int64_t N) {
    x = as_rows(x);
    Acts acts(x.data_ptr<float>(), x.size(0), x.size(1));
    auto y = torch::empty({x.size(0), N}, torch::kFloat32);
    matmul_acts(acts, {{w, type, N, y.data_ptr<float>()}});
    return y;
}

// Several weights applied to the same x (q/k/v): the activations are quantized once.
std::vector<torch::Tensor> qmatmul_many(torch::Tensor x, std::vector<torch::Tensor> ws, std::vector<int64_t> types,
                                        std::vector<int64_t> Ns) {
    x = as_rows(x);
    Acts acts(x.data_ptr<float>(), x.size(0), x.size(1));
    std::vector<torch::Tensor> ys;
    std::vector<Product> products;
    for (size_t i = 0; i < ws.size(); i++) ys.push_back(torch::empty({x.size(0), Ns[i]}, torch::kFloat32));
    for (size_t i = 0; i < ws.size(); i++) products.push_back({ws[i], types[i], Ns[i], ys[i].data_ptr<float>()});
    matmul_acts(acts, products);
    return ys;
}

// Gemma's MLP, down(gelu_tanh(gate(x)) * up(x)), in one call.
torch::Tensor mlp(torch::Tensor x, torch::Tensor wg, int64_t tg, torch::Tensor wu, int64_t tu, torch::Tensor wd,
                  int64_t td, int64_t F, int64_t N) {
    x = as_rows(x);
    const int64_t M = x.size(0);
    Acts acts(x.data_ptr<float>(), M, x.size(1));
    auto gu = torch::empty({2, M, F}, torch::kFloat32);
    float* g = gu.data_ptr<float>();
    float* u = g + M * F;
    matmul_acts(acts, {{wg, tg, F, g}, {wu, tu, F, u}});
    int64_t i = 0;  // torch's gelu(approximate="tanh"), 16 values at a time (scalar tanh took ~10% of a step)
    for (; i + 16 <= M * F; i += 16) _mm512_storeu_ps(g + i, gelu_mul512(_mm512_loadu_ps(g + i), _mm512_loadu_ps(u + i)));
    const __mmask16 tail = (__mmask16)((1u << (M * F - i)) - 1);
    _mm512_mask_storeu_ps(g + i, tail, gelu_mul512(_mm512_maskz_loadu_ps(tail, g + i), _mm512_maskz_loadu_ps(tail, u + i)));
    Acts hidden(g, M, F);
    auto y = torch::empty({M, N}, torch::kFloat32);
    matmul_acts(hidden, {{wd, td, N, y.data_ptr<float>()}});
    return y;
}

// Dequantized [N, K] weight in `out` (float32: bit-exact with quants.py; bfloat16: rounded to nearest).
void dequant(torch::Tensor w, int64_t type, torch::Tensor out) {
    TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), "out must be a contiguous [N, K] tensor");
    const int64_t N = out.size(0), K = out.size(1);
    const bool bf16 = out.scalar_type() == torch::kBFloat16;
    TORCH_CHECK(bf16 || out.scalar_type() == torch::kFloat32, "out must be float32 or bfloat16");
    check_layout(w, type, N, K);
    const uint8_t* W = w.data_ptr<uint8_t>();
    char* o = (char*)out.data_ptr();
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; n++)
            if (bf16) decode_row<true>(W, type, K, n, o + n * K * 2);
            else decode_row<false>(W, type, K, n, o + n * K * 4);
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
        for (int64_t i = i0; i < i1; i++) decode_row<false>(W, type, K, id[i], out.data_ptr<float>() + i * K);
    });
}

// x [M, K] float32 @ W[N, K]^T -> [M, N] float32 through bf16 tiles of `tile` weight rows.
torch::Tensor bf16_linear(torch::Tensor x, torch::Tensor w, int64_t type, int64_t N, int64_t tile) {
    TORCH_CHECK(x.dim() == 2 && x.dtype() == torch::kFloat32, "x must be a 2-D float32 tensor");
    const int64_t M = x.size(0), K = x.size(1);
    auto xb = x.to(torch::kBFloat16).contiguous();
    auto y = torch::empty({M, N}, torch::kFloat32);
    auto buf = torch::empty({std::min(tile, N), K}, torch::kBFloat16);
    check_layout(w, type, N, K);
    const uint8_t* W = w.data_ptr<uint8_t>();
    uint16_t* o = (uint16_t*)buf.data_ptr();
    for (int64_t n0 = 0; n0 < N; n0 += tile) {
        const int64_t nt = std::min(tile, N - n0);
        at::parallel_for(0, nt, 64, [&](int64_t a, int64_t b) {
            for (int64_t n = a; n < b; n++) decode_row<true>(W, type, K, n0 + n, o + n * K);
        });
        // CblasRowMajor = 101, CblasNoTrans = 111, CblasTrans = 112
        cblas_gemm_bf16bf16f32(101, 111, 112, M, nt, K, 1.f, (const uint16_t*)xb.data_ptr(), K,
                               (const uint16_t*)buf.data_ptr(), K, 0.f, y.data_ptr<float>() + n0, N);
    }
    return y;
}

// 128 values 0..15 as the repacked formats' 64 bytes: value i in the low nibble of byte i, value
// 64 + i in its high nibble.
void pack_nibbles(const uint8_t* u, uint8_t* dst) {
    for (int i = 0; i < 64; i++) dst[i] = u[i] | (u[64 + i] << 4);
}

// Lets go of the pages of `t` in this process (MADV_DONTNEED on the whole pages inside it), for a
// tensor read once from a private, unmodified file mapping (the GGUF's) and not needed again:
// resident memory drops by its size, and the page cache keeps the file. Never for other memory:
// anonymous pages would read back as zeros.
void drop_file_pages(torch::Tensor t) {
    const uintptr_t page = 4096, begin = (uintptr_t)t.data_ptr(), end = begin + t.numel() * t.element_size();
    const uintptr_t a = (begin + page - 1) / page * page, b = end / page * page;
    if (b > a) TORCH_CHECK(madvise((void*)a, b - a, MADV_DONTNEED) == 0, "drop_file_pages: madvise failed");
}

// `nbytes` uninitialised bytes on transparent 2 MB pages where the OS gives them (madvise, best
// effort: plain pages otherwise), for the weights a decode step streams: on 4 KB pages the
// hardware prefetchers stop at every page boundary and the cores miss their TLBs. The 270M
// model's step ran 10.3 -> 9.2 ms with its repacked weights on 2 MB pages (A/B in one process).
torch::Tensor huge_empty(int64_t nbytes) {
    TORCH_CHECK(nbytes >= 0, "huge_empty: negative size");
    const size_t huge = 2u << 20, len = (size_t)(nbytes + huge - 1) / huge * huge + huge;  // + room to align
    void* base = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, "huge_empty: mmap of ", len, " bytes failed");
    const uintptr_t start = ((uintptr_t)base + huge - 1) / huge * huge;
    madvise((void*)start, len - (start - (uintptr_t)base), MADV_HUGEPAGE);
    return torch::from_blob((void*)start, {nbytes}, [base, len](void*) { munmap(base, len); }, torch::kUInt8);
}

// Bytes per row of K values in a layout (GGML or repacked).
int64_t layout_row_bytes(int64_t type, int64_t K) { return weight_row_bytes(type, K); }

// Rows of GGUF blocks (Src) -> rows of a repacked layout (Dst), one unit at a time: four 32-value
// blocks make one 128-value group, a 256-value super-block two. Both layouts store a row's units
// in order and rows one after another, so unit u sits at u times its size on both sides, and
// `unit(src, dst)` converts one.
// Written into `dest` where given (a slice of huge_empty's memory, say), a new tensor otherwise.
template <class Src, class Dst, class F>
torch::Tensor repack(const char* name, const torch::Tensor& w, int64_t N, int64_t K, const c10::optional<torch::Tensor>& dest,
                     F&& unit) {
    constexpr int64_t VALS = Src::VALS > 128 ? Src::VALS : 128;
    TORCH_CHECK(K % VALS == 0, name, ": row length ", K, " is not a multiple of ", VALS);
    check_weight(w, N, K / Src::VALS * Src::BYTES);
    const int64_t out_bytes = N * (K / 128 * Dst::BYTES);
    torch::Tensor out = dest.has_value() ? *dest : torch::empty({N, K / 128 * Dst::BYTES}, torch::kUInt8);
    TORCH_CHECK(out.dtype() == torch::kUInt8 && out.is_contiguous() && out.numel() == out_bytes, name,
                ": out must be contiguous uint8 with ", out_bytes, " bytes");
    const uint8_t* in = w.data_ptr<uint8_t>();
    uint8_t* o = out.data_ptr<uint8_t>();
    constexpr int64_t src_bytes = VALS / Src::VALS * Src::BYTES, dst_bytes = VALS / 128 * Dst::BYTES;
    at::parallel_for(0, N * (K / VALS), 256, [&](int64_t u0, int64_t u1) {
        for (int64_t u = u0; u < u1; u++) unit(in + u * src_bytes, o + u * dst_bytes);
    });
    return out;
}

// Q4_0 rows [N, K / 32 * 18 bytes] -> Q4_0R rows [N, K / 128 * 72] (see FmtQ4_0R); K % 128 == 0.
torch::Tensor repack_q4_0(torch::Tensor w, int64_t N, int64_t K, c10::optional<torch::Tensor> out) {
    return repack<FmtQ4_0, FmtQ4_0R>("repack_q4_0", w, N, K, out, [](const uint8_t* src, uint8_t* dst) {
        uint8_t u[128];
        for (int b = 0; b < 4; b++) {
            const __m256i q = _mm256_add_epi8(FmtQ4_0::quants(src + b * FmtQ4_0::BYTES), _mm256_set1_epi8(8));
            _mm256_storeu_si256((__m256i*)(u + 32 * b), q);
            std::memcpy(dst + 64 + 2 * b, src + b * FmtQ4_0::BYTES, 2);
        }
        pack_nibbles(u, dst);
    });
}

// Q5_0 rows [N, K / 32 * 22 bytes] -> Q5_0R rows [N, K / 128 * 88] (see FmtQ5_0R); K % 128 == 0.
torch::Tensor repack_q5_0(torch::Tensor w, int64_t N, int64_t K, c10::optional<torch::Tensor> out) {
    return repack<FmtQ5_0, FmtQ5_0R>("repack_q5_0", w, N, K, out, [](const uint8_t* src, uint8_t* dst) {
        uint8_t u[128], bits[16] = {0};
        for (int b = 0; b < 4; b++) {
            const uint8_t* blk = src + b * FmtQ5_0::BYTES;
            uint32_t qh;
            std::memcpy(&qh, blk + 2, 4);
            for (int j = 0; j < 32; j++) {
                const int i = 32 * b + j;
                u[i] = j < 16 ? blk[6 + j] & 0x0F : blk[6 + j - 16] >> 4;
                bits[i / 8] |= ((qh >> j) & 1u) << (i % 8);
            }
            std::memcpy(dst + 80 + 2 * b, blk, 2);
        }
        pack_nibbles(u, dst);
        std::memcpy(dst + 64, bits, 16);
    });
}

// GGUF rows (Q4_0, Q5_0, Q8_0) [N, K / 32 * block bytes] -> their interleaved layout (X16Q*),
// the same size; N % 16 == 0, K % 32 == 0. Into `out` where given, a new tensor otherwise.
template <class X>
torch::Tensor repack_x16(const char* name, const torch::Tensor& w, int64_t N, int64_t K, const c10::optional<torch::Tensor>& out) {
    TORCH_CHECK(K % 32 == 0, name, ": row length ", K, " is not a multiple of 32");
    TORCH_CHECK(N % 16 == 0, name, ": ", N, " rows is not a multiple of 16");
    const int64_t nb = K / 32, rb = weight_row_bytes(X::SRC, K), src_bytes = rb / nb;
    check_weight(w, N, rb);
    torch::Tensor o = out.has_value() ? *out : torch::empty({N, rb}, torch::kUInt8);
    TORCH_CHECK(o.dtype() == torch::kUInt8 && o.is_contiguous() && o.numel() == N * rb, name,
                ": out must be contiguous uint8 with ", N * rb, " bytes");
    const uint8_t* in = w.data_ptr<uint8_t>();
    uint8_t* op = o.data_ptr<uint8_t>();
    at::parallel_for(0, N / 16 * nb, 16, [&](int64_t u0, int64_t u1) {
        for (int64_t u = u0; u < u1; u++) {  // group u / nb, block u % nb
            uint8_t* dst = op + u * X::BYTES;
            std::memset(dst, 0, X::BYTES);
            for (int r = 0; r < 16; r++) X::pack(in + (u / nb * 16 + r) * rb + u % nb * src_bytes, r, dst);
        }
    });
    return o;
}

torch::Tensor repack_q4_0x(torch::Tensor w, int64_t N, int64_t K, c10::optional<torch::Tensor> out) {
    return repack_x16<X16Q4_0>("repack_q4_0x", w, N, K, out);
}

torch::Tensor repack_q5_0x(torch::Tensor w, int64_t N, int64_t K, c10::optional<torch::Tensor> out) {
    return repack_x16<X16Q5_0>("repack_q5_0x", w, N, K, out);
}

torch::Tensor repack_q8_0x(torch::Tensor w, int64_t N, int64_t K, c10::optional<torch::Tensor> out) {
    return repack_x16<X16Q8_0>("repack_q8_0x", w, N, K, out);
}

// Q8_0 rows [N, K / 32 * 34 bytes] -> Q8_0R rows [N, K / 128 * 136] (see FmtQ8_0R); K % 128 == 0.
torch::Tensor repack_q8_0(torch::Tensor w, int64_t N, int64_t K, c10::optional<torch::Tensor> out) {
    return repack<FmtQ8_0, FmtQ8_0R>("repack_q8_0", w, N, K, out, [](const uint8_t* src, uint8_t* dst) {
        for (int b = 0; b < 4; b++) {
            const __m256i q = FmtQ8_0::quants(src + b * FmtQ8_0::BYTES);
            _mm256_storeu_si256((__m256i*)(dst + 32 * b), _mm256_xor_si256(q, _mm256_set1_epi8((char)0x80)));  // + 128
            std::memcpy(dst + 128 + 2 * b, src + b * FmtQ8_0::BYTES, 2);
        }
    });
}

// Q4_K rows [N, K / 256 * 144 bytes] -> Q4_KR rows [N, K / 128 * 96] (see FmtQ4_KR); K % 256 == 0.
torch::Tensor repack_q4_k(torch::Tensor w, int64_t N, int64_t K, c10::optional<torch::Tensor> out) {
    return repack<FmtQ4_K, FmtQ4_KR>("repack_q4_k", w, N, K, out, [](const uint8_t* src, uint8_t* dst) {
        uint8_t u[256];
        float scale[8], min[8];
        FmtQ4_K::decode(src, [&](int i, __m256i q, float s, float, float m) {
            _mm256_storeu_si256((__m256i*)(u + 32 * i), q);  // sub-block i: values 32i .. 32i + 31
            scale[i] = s;
            min[i] = m;
        });
        for (int h = 0; h < 2; h++, dst += FmtQ4_KR::BYTES) {
            pack_nibbles(u + 128 * h, dst);
            std::memcpy(dst + 64, scale + 4 * h, 16);
            std::memcpy(dst + 80, min + 4 * h, 16);
        }
    });
}

// Q6_K rows [N, K / 256 * 210 bytes] -> Q6_KR rows [N, K / 128 * 108] (see FmtQ6_KR); K % 256 == 0.
torch::Tensor repack_q6_k(torch::Tensor w, int64_t N, int64_t K, c10::optional<torch::Tensor> out) {
    return repack<FmtQ6_K, FmtQ6_KR>("repack_q6_k", w, N, K, out, [](const uint8_t* src, uint8_t* dst) {
        int8_t q[256];  // value - 32 offset removed: -32 .. 31
        FmtQ6_K::decode(src, [&](int i, __m256i v, float, float, float) { _mm256_storeu_si256((__m256i*)(q + 32 * i), v); });
        const float d = h2f(src + 208);
        for (int h = 0; h < 2; h++, dst += FmtQ6_KR::BYTES) {
            uint8_t u[128];
            uint64_t bits[4] = {0, 0, 0, 0};
            for (int i = 0; i < 128; i++) {
                u[i] = (uint8_t)(q[128 * h + i] + 32);
                bits[2 * (i / 64)] |= (uint64_t)((u[i] >> 4) & 1) << (i % 64);
                bits[2 * (i / 64) + 1] |= (uint64_t)((u[i] >> 5) & 1) << (i % 64);
                u[i] &= 0x0F;
            }
            pack_nibbles(u, dst);
            std::memcpy(dst + 64, bits, 32);
            std::memcpy(dst + 96, src + 192 + 8 * h, 8);  // the eight int8 scales of this half
            std::memcpy(dst + 104, &d, 4);
        }
    });
}

// ---- decode-step helpers (one query token per row; see fastpath.py) --------------------------------

// RMSNorm over head_dim with weight (1 + w), then RoPE (rotate-half convention), for q [B, Hq, D]
// and k [B, Hk, D]; cos/sin [D] for one position shared by every row, or [B, D] for one position
// per row (sequences of a continuous batch). Returns new contiguous tensors.
std::vector<torch::Tensor> qk_norm_rope(torch::Tensor q, torch::Tensor k, torch::Tensor qw, torch::Tensor kw,
                                        torch::Tensor cos, torch::Tensor sin, double eps) {
    const int64_t D = q.size(-1), half = D / 2, B = q.size(0);
    TORCH_CHECK(cos.numel() == sin.numel() && (cos.numel() == D || cos.numel() == B * D),
                "cos/sin must hold head_dim values, or head_dim values per row");
    const bool per_row = cos.numel() != D;
    auto c = cos.contiguous().to(torch::kFloat32), s_ = sin.contiguous().to(torch::kFloat32);
    const float *cp = c.data_ptr<float>(), *sp = s_.data_ptr<float>();
    std::vector<torch::Tensor> outs;
    std::vector<float> tmp(D);
    for (auto [x, w] : {std::make_pair(q, qw), std::make_pair(k, kw)}) {
        auto xc = x.contiguous().to(torch::kFloat32);
        auto wc = w.contiguous().to(torch::kFloat32);
        auto y = torch::empty_like(xc);
        const float* xp = xc.data_ptr<float>();
        const float* wp = wc.data_ptr<float>();
        float* yp = y.data_ptr<float>();
        const int64_t heads = xc.numel() / D / B;
        for (int64_t r = 0; r < xc.numel() / D; r++) {
            const float* xr = xp + r * D;
            const float* cr = cp + (per_row ? r / heads * D : 0);
            const float* sr = sp + (per_row ? r / heads * D : 0);
            float ss = 0.f;
#pragma omp simd reduction(+ : ss)
            for (int64_t i = 0; i < D; i++) ss += xr[i] * xr[i];
            const float inv = 1.f / std::sqrt(ss / (float)D + (float)eps);
            for (int64_t i = 0; i < D; i++) tmp[i] = xr[i] * inv * (1.f + wp[i]);
            float* yr = yp + r * D;
            for (int64_t i = 0; i < half; i++) {
                yr[i] = tmp[i] * cr[i] - tmp[i + half] * sr[i];
                yr[i + half] = tmp[i + half] * cr[i + half] + tmp[i] * sr[i + half];
            }
        }
        outs.push_back(y);
    }
    return outs;
}

// y = rms_norm(x) * (1 + w) row by row, Gemma's RMSNorm (w stored zero-centred, as RMSNorm in
// model/decoder.py); with `residual`, y = residual + that.
void rms_norm_rows(const float* x, const float* w, float eps, int64_t rows, int64_t D, float* y,
                   const float* residual = nullptr) {
    for (int64_t r = 0; r < rows; r++) {
        const float* xr = x + r * D;
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < D; i++) ss += xr[i] * xr[i];
        const float inv = 1.f / std::sqrt(ss / (float)D + eps);
        for (int64_t i = 0; i < D; i++) y[r * D + i] = (residual ? residual[r * D + i] : 0.f) + xr[i] * inv * (1.f + w[i]);
    }
}

// Gemma's RMSNorm over the last dim, scaled by (1 + w) (fp32 in, fp32 out).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32, "fp32 only");
    x = x.contiguous();
    const int64_t D = x.size(-1), rows = x.numel() / D;
    auto y = torch::empty_like(x);
    const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
        rms_norm_rows(xp + r0 * D, wp, (float)eps, r1 - r0, D, yp + r0 * D);
    });
    return y;
}

// 16 K or V elements as floats (fewer at the end of a row: `k` masks them): fp32, bf16 (the upper
// half of an fp32) or int8 (times the row's scale, applied by the caller once per row).
INLINE __m512 kv_load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
INLINE __m512 kv_load16(const at::BFloat16* p, __mmask16 k) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
INLINE __m512 kv_load16(const int8_t* p, __mmask16 k) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, p)));
}

// One row's view of its cache for one query token: where its K/V live (storage dtype T), their
// strides, the int8 scales (null otherwise) and the slots the query may see.
template <typename T>
struct CacheRow {
    const T *K, *V;
    int64_t k_head, k_slot, v_head, v_slot;  // element strides
    const float *ks, *vs;                    // [Hk, S_alloc] per-slot scales, or null
    int64_t s_head;
    const std::vector<int64_t>* visible;
};

template <typename T>
CacheRow<T> cache_row(const torch::Tensor& keys, const torch::Tensor& values, int64_t b, const float* ks,
                      const float* vs, const std::vector<int64_t>* visible) {
    // Scales are [B, Hk, S_alloc, 1] contiguous: slot stride 1, head stride S_alloc.
    const int64_t s_head = keys.size(2), s_batch = keys.size(1) * s_head;
    return {reinterpret_cast<const T*>(keys.data_ptr()) + b * keys.stride(0),
            reinterpret_cast<const T*>(values.data_ptr()) + b * values.stride(0),
            keys.stride(1), keys.stride(2), values.stride(1), values.stride(2),
            ks ? ks + b * s_batch : nullptr, vs ? vs + b * s_batch : nullptr, s_head, visible};
}

// The slots a query at `pos` sees: 0 <= key_pos <= pos and, with a window W > 0, key_pos > pos - W.
std::vector<int64_t> visible_slots(const int64_t* kpos, int64_t n, int64_t pos, int64_t window) {
    std::vector<int64_t> visible;
    for (int64_t j = 0; j < n; j++) {
        const int64_t p = kpos[j];
        if (p >= 0 && p <= pos && (window <= 0 || p > pos - window)) visible.push_back(j);
    }
    TORCH_CHECK(!visible.empty(), "decode_attention: no visible key");
    return visible;
}

// Flash-decoding over the visible slots of each row: each (row, KV head, split) task scores its
// keys for all query heads of the group, then the splits are merged with their running max and
// sum. The cache is read in its storage dtype: an int8 key row contributes dot(q, k_q) * k_scale,
// an int8 value row e * v_scale * v_q, so no dequantized copy of the cache is ever made ("fused
// dequant"). q [B, Hq, D] fp32 contiguous; returns [B, Hq, D].
template <typename T>
torch::Tensor attend_rows(const torch::Tensor& q, const std::vector<CacheRow<T>>& rows, int64_t Hk, double scale) {
    const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), group = Hq / Hk;
    int64_t min_nv = INT64_MAX, max_nv = 0;
    for (const auto& r : rows) {
        min_nv = std::min<int64_t>(min_nv, r.visible->size());
        max_nv = std::max<int64_t>(max_nv, r.visible->size());
    }
    // Even one row with one KV head keeps every thread busy; a split may be empty for a short row.
    const int64_t threads = at::get_num_threads();
    const int64_t splits = std::max<int64_t>(1, std::min<int64_t>((threads + B * Hk - 1) / (B * Hk), min_nv / 64));
    const int64_t tasks = B * Hk * splits;
    // Per task and query head: running max, sum of exp, and the unnormalised output.
    auto part = torch::empty({tasks, group, D + 2}, torch::kFloat32);
    float* pp = part.data_ptr<float>();
    const float* qp = q.data_ptr<float>();
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
        std::vector<float> sc(group * ((max_nv + splits - 1) / splits + 1));
        for (int64_t t = t0; t < t1; t++) {
            const int64_t b = t / (Hk * splits), h = (t / splits) % Hk, sp = t % splits;
            const CacheRow<T>& r = rows[b];
            const int64_t nv = r.visible->size(), j0 = nv * sp / splits, j1 = nv * (sp + 1) / splits, n = j1 - j0;
            const int64_t* slots = r.visible->data() + j0;
            const T* kb = r.K + h * r.k_head;
            const T* vb = r.V + h * r.v_head;
            const float* ksb = r.ks ? r.ks + h * r.s_head : nullptr;
            const float* vsb = r.vs ? r.vs + h * r.s_head : nullptr;
            const float* qg = qp + (b * Hq + h * group) * D;  // the group's query heads, consecutive
            float* og = pp + t * group * (D + 2);
            // Scores: each key row is read once (into L1) for all query heads of its KV group.
            for (int64_t j = 0; j < n; j++) {
                const T* kr = kb + slots[j] * r.k_slot;
                const float row_scale = (float)scale * (ksb ? ksb[slots[j]] : 1.f);
                for (int64_t g = 0; g < group; g++) {
                    const float* qr = qg + g * D;
                    __m512 dot[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
                    int64_t i = 0;
                    for (; i + 64 <= D; i += 64)  // four independent FMA chains
#pragma GCC unroll 4
                        for (int c = 0; c < 4; c++)
                            dot[c] = _mm512_fmadd_ps(_mm512_loadu_ps(qr + i + 16 * c), kv_load16(kr + i + 16 * c, 0xFFFF), dot[c]);
                    for (; i < D; i += 16) {
                        const __mmask16 k = tail16(D - i);
                        dot[0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, qr + i), kv_load16(kr + i, k), dot[0]);
                    }
                    sc[g * n + j] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(dot[0], dot[1]), _mm512_add_ps(dot[2], dot[3]))) * row_scale;
                }
            }
            for (int64_t g = 0; g < group; g++) {
                float* s = sc.data() + g * n;
                float m = -INFINITY;
                for (int64_t j = 0; j < n; j++) m = std::max(m, s[j]);
                __m512 sum = _mm512_setzero_ps();
                for (int64_t j = 0; j < n; j += 16) {
                    const __mmask16 k = tail16(n - j);
                    const __m512 e = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), _mm512_set1_ps(m))));
                    _mm512_mask_storeu_ps(s + j, k, e);
                    sum = _mm512_add_ps(sum, e);
                }
                float* out = og + g * (D + 2);
                out[D] = m;
                out[D + 1] = _mm512_reduce_add_ps(sum);
                if (vsb)  // int8 values: fold each row's scale into its weight
                    for (int64_t j = 0; j < n; j++) s[j] *= vsb[slots[j]];
                // Weighted sum of value rows, 128 output floats at a time held in registers.
                int64_t i0 = 0;
                for (; i0 + 128 <= D; i0 += 128) {
                    __m512 acc[8];
                    for (int c = 0; c < 8; c++) acc[c] = _mm512_setzero_ps();
                    for (int64_t j = 0; j < n; j++) {
                        const T* vr = vb + slots[j] * r.v_slot + i0;
                        const __m512 e = _mm512_set1_ps(s[j]);
#pragma GCC unroll 8
                        for (int c = 0; c < 8; c++) acc[c] = _mm512_fmadd_ps(e, kv_load16(vr + 16 * c, 0xFFFF), acc[c]);
                    }
                    for (int c = 0; c < 8; c++) _mm512_storeu_ps(out + i0 + 16 * c, acc[c]);
                }
                for (; i0 < D; i0 += 16) {  // head_dim not a multiple of 128 (small test models)
                    const __mmask16 k = tail16(D - i0);
                    __m512 acc = _mm512_setzero_ps();
                    for (int64_t j = 0; j < n; j++)
                        acc = _mm512_fmadd_ps(_mm512_set1_ps(s[j]), kv_load16(vb + slots[j] * r.v_slot + i0, k), acc);
                    _mm512_mask_storeu_ps(out + i0, k, acc);
                }
            }
        }
    });
    auto y = torch::empty({B, Hq, D}, torch::kFloat32);
    float* yp = y.data_ptr<float>();
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hk; h++)
            for (int64_t g = 0; g < group; g++) {
                float m = -INFINITY, l = 0.f;
                for (int64_t sp = 0; sp < splits; sp++) m = std::max(m, pp[(((b * Hk + h) * splits + sp) * group + g) * (D + 2) + D]);
                float* yr = yp + (b * Hq + h * group + g) * D;
                for (int64_t i = 0; i < D; i++) yr[i] = 0.f;
                for (int64_t sp = 0; sp < splits; sp++) {
                    const float* o = pp + (((b * Hk + h) * splits + sp) * group + g) * (D + 2);
                    if (o[D + 1] == 0.f) continue;  // an empty split (its max is -inf)
                    const float w = std::exp(o[D] - m);
                    l += w * o[D + 1];
                    for (int64_t i = 0; i < D; i++) yr[i] += w * o[i];
                }
                for (int64_t i = 0; i < D; i++) yr[i] /= l;
            }
    return y;
}

void check_kv(const torch::Tensor& keys, const torch::Tensor& values, const c10::optional<torch::Tensor>& k_scale,
              const c10::optional<torch::Tensor>& v_scale) {
    TORCH_CHECK(keys.dtype() == values.dtype(), "K and V must share a dtype");
    TORCH_CHECK(keys.stride(3) == 1 && values.stride(3) == 1, "K/V rows must be contiguous");
    const auto dt = keys.scalar_type();
    TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kInt8,
                "K/V must be float32, bfloat16 or int8");
    if (dt != torch::kInt8) return;
    TORCH_CHECK(k_scale.has_value() && v_scale.has_value(), "int8 K/V need their scales");
    for (const auto& s : {*k_scale, *v_scale}) {
        TORCH_CHECK(s.dtype() == torch::kFloat32 && s.is_contiguous() && s.size(2) == keys.size(2),
                    "scales must be contiguous float32 [B, Hk, S, 1]");
    }
}

// Calls f(T{}) with T the C++ type of the K/V storage dtype.
template <typename F>
auto dispatch_kv(const torch::Tensor& keys, F f) {
    const auto dt = keys.scalar_type();
    if (dt == torch::kFloat32) return f(float{});
    if (dt == torch::kBFloat16) return f(at::BFloat16{});
    return f(int8_t{});
}

const float* opt_ptr(const c10::optional<torch::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

// Attention of one query token per row over one cache [B, Hk, S, D] whose rows share positions:
// fp32, bf16, or int8 with per-slot scales ([B, Hk, S, 1] float32, given for int8 only). Slots whose
// position is hidden (empty, in the future, or a window or more behind) are skipped.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor keys, torch::Tensor values, torch::Tensor key_pos,
                               int64_t pos, int64_t window, double scale, c10::optional<torch::Tensor> k_scale,
                               c10::optional<torch::Tensor> v_scale) {
    check_kv(keys, values, k_scale, v_scale);
    q = q.contiguous().to(torch::kFloat32);
    auto kp = key_pos.contiguous().to(torch::kInt64);
    const auto visible = visible_slots(kp.data_ptr<int64_t>(), std::min<int64_t>(keys.size(2), kp.numel()), pos, window);
    return dispatch_kv(keys, [&](auto tag) {
        using T = decltype(tag);
        std::vector<CacheRow<T>> rows;
        for (int64_t b = 0; b < q.size(0); b++)
            rows.push_back(cache_row<T>(keys, values, b, opt_ptr(k_scale), opt_ptr(v_scale), &visible));
        return attend_rows<T>(q, rows, keys.size(1), scale);
    });
}

// Stores x [Hk, D] (fp32) at `slot` of a [1, Hk, S, D] cache in its dtype: int8 as round(x / s)
// with s = max|x| / 127 per head, exactly as cache.Slots.write does.
void store_slot(const float* x, torch::Tensor& dst, const c10::optional<torch::Tensor>& scale, int64_t slot) {
    const int64_t Hk = dst.size(1), D = dst.size(3);
    for (int64_t h = 0; h < Hk; h++) {
        const float* xr = x + h * D;
        const int64_t off = h * dst.stride(1) + slot * dst.stride(2);
        if (dst.scalar_type() == torch::kFloat32) {
            std::memcpy(dst.data_ptr<float>() + off, xr, D * sizeof(float));
        } else if (dst.scalar_type() == torch::kBFloat16) {
            at::BFloat16* o = dst.data_ptr<at::BFloat16>() + off;
            for (int64_t i = 0; i < D; i++) o[i] = at::BFloat16(xr[i]);
        } else {
            float amax = 0.f;
            for (int64_t i = 0; i < D; i++) amax = std::max(amax, std::fabs(xr[i]));
            const float s = std::max(amax, 1e-12f) / 127.f;
            int8_t* o = dst.data_ptr<int8_t>() + off;
            for (int64_t i = 0; i < D; i++) o[i] = (int8_t)std::nearbyint(xr[i] / s);
            scale->data_ptr<float>()[h * dst.size(2) + slot] = s;
        }
    }
}

// One decode step of attention for B sequences that each own a cache (continuous batching): row b
// of q [B, Hq, D] / k, v [B, Hk, D] goes with keys[b], values[b] ([1, Hk, S_b, D]). Its new key and
// value are stored at slots[b] first. Ring caches (sliding-window layers) pass key_pos[b], the
// slot positions, and get key_pos[b][slot] = positions[b]; linear caches (global layers) pass no
// key_pos and hold positions 0..slot in slots 0..slot. One call per layer instead of B.
torch::Tensor decode_attention_list(torch::Tensor q, torch::Tensor k, torch::Tensor v, std::vector<torch::Tensor> keys,
                                    std::vector<torch::Tensor> values, std::vector<torch::Tensor> k_scales,
                                    std::vector<torch::Tensor> v_scales, std::vector<torch::Tensor> key_pos,
                                    std::vector<int64_t> slots, std::vector<int64_t> positions, int64_t window,
                                    double scale) {
    const int64_t B = q.size(0);
    const bool int8 = !keys.empty() && keys[0].scalar_type() == torch::kInt8, ring = !key_pos.empty();
    TORCH_CHECK((int64_t)keys.size() == B && (int64_t)values.size() == B && (int64_t)slots.size() == B &&
                    (int64_t)positions.size() == B && (!ring || (int64_t)key_pos.size() == B) &&
                    (int64_t)k_scales.size() == (int8 ? B : 0) && (int64_t)v_scales.size() == (int8 ? B : 0),
                "decode_attention_list: one cache, slot and position per row");
    q = q.contiguous().to(torch::kFloat32);
    k = k.contiguous().to(torch::kFloat32);
    v = v.contiguous().to(torch::kFloat32);
    const int64_t Hk = keys[0].size(1), D = q.size(2);
    std::vector<std::vector<int64_t>> visible(B);
    for (int64_t b = 0; b < B; b++) {
        auto ksc = int8 ? c10::optional<torch::Tensor>(k_scales[b]) : c10::nullopt;
        auto vsc = int8 ? c10::optional<torch::Tensor>(v_scales[b]) : c10::nullopt;
        check_kv(keys[b], values[b], ksc, vsc);
        TORCH_CHECK(keys[b].scalar_type() == keys[0].scalar_type() && keys[b].size(0) == 1 && keys[b].size(1) == Hk &&
                        keys[b].size(3) == D && values[b].sizes() == keys[b].sizes(),
                    "decode_attention_list: every cache must be [1, Hk, S, D] of one dtype");
        TORCH_CHECK(slots[b] >= 0 && slots[b] < keys[b].size(2), "decode_attention_list: slot out of range");
        store_slot(k.data_ptr<float>() + b * Hk * D, keys[b], ksc, slots[b]);
        store_slot(v.data_ptr<float>() + b * Hk * D, values[b], vsc, slots[b]);
        if (ring) {
            TORCH_CHECK(key_pos[b].scalar_type() == torch::kInt64 && key_pos[b].is_contiguous() &&
                            key_pos[b].numel() == keys[b].size(2), "key_pos must be contiguous int64 [S]");
            int64_t* kp = key_pos[b].data_ptr<int64_t>();
            kp[slots[b]] = positions[b];
            visible[b] = visible_slots(kp, key_pos[b].numel(), positions[b], window);
        } else {
            visible[b].resize(slots[b] + 1);
            for (int64_t j = 0; j <= slots[b]; j++) visible[b][j] = j;
        }
    }
    return dispatch_kv(keys[0], [&](auto tag) {
        using T = decltype(tag);
        std::vector<CacheRow<T>> rows;
        for (int64_t b = 0; b < B; b++)
            rows.push_back(cache_row<T>(keys[b], values[b], 0, int8 ? k_scales[b].data_ptr<float>() : nullptr,
                                        int8 ? v_scales[b].data_ptr<float>() : nullptr, &visible[b]));
        return attend_rows<T>(q, rows, Hk, scale);
    });
}

// ---- one whole decoder layer of a decode step ------------------------------------------------------

// A QuantLinear's weight as the kernels read it: its GGUF blocks, and for one-row products the
// repacked copy where it has one (QuantLinear.weight_for).
struct QWeight {
    torch::Tensor blocks;
    int64_t type, N;
    c10::optional<torch::Tensor> packed;
    int64_t packed_type;
    const torch::Tensor& bytes(int64_t rows) const { return rows == 1 && packed.has_value() ? *packed : blocks; }
    int64_t kind(int64_t rows) const { return rows == 1 && packed.has_value() ? packed_type : type; }
    Product product(int64_t rows, float* Y) const { return {bytes(rows), kind(rows), N, Y}; }
};

// Block.forward of model.py for one token per row, each row with its own cache (the arguments
// of decode_attention_list): FastBlock builds one per layer and calls it once per decode step,
// instead of ~15 Python-level module calls and kernel launches.
struct DecodeLayer {
    QWeight q, k, v, o, gate, up, down;
    torch::Tensor in_norm, post_attn_norm, pre_ffw_norm, post_ffw_norm;  // w (rms_norm_rows adds 1)
    torch::Tensor q_norm, k_norm;                                         // w (qk_norm_rope adds 1)
    int64_t Hq, Hk, D, window;
    double scale, eps;

    torch::Tensor forward(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, std::vector<torch::Tensor> keys,
                          std::vector<torch::Tensor> values, std::vector<torch::Tensor> k_scales,
                          std::vector<torch::Tensor> v_scales, std::vector<torch::Tensor> key_pos,
                          std::vector<int64_t> slots, std::vector<int64_t> positions) const {
        x = as_rows(x);
        const int64_t B = x.size(0), d = x.size(1), F = gate.N;
        const float e = (float)eps;
        auto h = torch::empty({B, d}, torch::kFloat32);
        rms_norm_rows(x.data_ptr<float>(), in_norm.data_ptr<float>(), e, B, d, h.data_ptr<float>());
        auto o_out = torch::empty({B, d}, torch::kFloat32);
        float* op = o_out.data_ptr<float>();
        {
            Acts acts(h.data_ptr<float>(), B, d);
            auto qt = torch::empty({B, Hq * D}, torch::kFloat32), kt = torch::empty({B, Hk * D}, torch::kFloat32),
                 vt = torch::empty({B, Hk * D}, torch::kFloat32);
            matmul_acts(acts, {q.product(B, qt.data_ptr<float>()), k.product(B, kt.data_ptr<float>()),
                               v.product(B, vt.data_ptr<float>())});
            auto qk = qk_norm_rope(qt.view({B, Hq, D}), kt.view({B, Hk, D}), q_norm, k_norm, cos, sin, eps);
            auto att = decode_attention_list(qk[0], qk[1], vt.view({B, Hk, D}), keys, values, k_scales, v_scales,
                                             key_pos, slots, positions, window, scale);
            Acts att_acts(att.data_ptr<float>(), B, Hq * D);
            matmul_acts(att_acts, {o.product(B, op)});
        }
        // x += post_attn_norm(o); h = pre_ffw_norm(x)
        auto x1 = torch::empty({B, d}, torch::kFloat32);
        rms_norm_rows(op, post_attn_norm.data_ptr<float>(), e, B, d, x1.data_ptr<float>(), x.data_ptr<float>());
        rms_norm_rows(x1.data_ptr<float>(), pre_ffw_norm.data_ptr<float>(), e, B, d, h.data_ptr<float>());
        auto m = mlp(h, gate.bytes(B), gate.kind(B), up.bytes(B), up.kind(B), down.bytes(B), down.kind(B), F, d);
        auto out = torch::empty({B, d}, torch::kFloat32);
        rms_norm_rows(m.data_ptr<float>(), post_ffw_norm.data_ptr<float>(), e, B, d, out.data_ptr<float>(),
                      x1.data_ptr<float>());
        return out;
    }
};

// A whole one-token step for one sequence, holding that sequence's cache tensors (built once per
// cache by fastpath.FastGemma3): the embedding lookup, every layer, the final norm and the LM head
// in one call. Per-layer calls cost ~25 us each in Python and argument conversion, and every
// Python op between kernels runs cold (a step streams ~250 MB through the caches): the embedding,
// RoPE rows, final norm and head calls around the layers took ~0.3 ms of a ~9.5 ms step. Layer i's
// new key/value go to slot pos % window[i] of a ring (sliding-window layer) or slot pos of a linear
// cache (window 0: global layer).
struct DecodeStack {
    std::vector<DecodeLayer> layers;
    std::vector<torch::Tensor> keys, values;
    std::vector<c10::optional<torch::Tensor>> k_scales, v_scales, key_pos;  // int8 scales; ring positions
    std::vector<int64_t> windows;
    QWeight table;           // the tied embedding / LM head: vocab rows of d values
    double embed_scale;      // sqrt(d) rounded to fp32, as model.embed does
    torch::Tensor out_norm;  // the final norm's w
    double eps;

    // model.forward for token `token` at `pos`: logits [1, vocab], or with `logits` false the
    // final-normed hidden state [1, d] (model.forward_hidden). The same arithmetic as the modules:
    // the table row decoded exactly then scaled, DecodeLayer per layer, rms_norm_rows, qmatmul.
    torch::Tensor step(int64_t token, torch::Tensor cos_local, torch::Tensor sin_local, torch::Tensor cos_global,
                       torch::Tensor sin_global, int64_t pos, bool logits) const {
        auto h = hidden(token, cos_local, sin_local, cos_global, sin_global, pos);
        return logits ? head(h) : h;
    }

    // The same step's greedy next token, argmax(logits) as argmax_rows finds it, scanned inside the
    // LM head's product: the logits are not returned.
    int64_t next_token(int64_t token, torch::Tensor cos_local, torch::Tensor sin_local, torch::Tensor cos_global,
                       torch::Tensor sin_global, int64_t pos) const {
        Best best;
        head(hidden(token, cos_local, sin_local, cos_global, sin_global, pos), &best);
        return best.index < 0 ? 0 : best.index;  // all -inf: index 0, as torch
    }

    // Logits [1, vocab] of the final-normed hidden state h (and with `best`, their argmax).
    torch::Tensor head(const torch::Tensor& h, Best* best = nullptr) const {
        Acts acts(h.data_ptr<float>(), 1, h.size(1));
        auto y = torch::empty({1, table.N}, torch::kFloat32);
        matmul_acts(acts, {table.product(1, y.data_ptr<float>())}, best);
        return y;
    }

    // Embedding, layers and final norm: the final-normed hidden state [1, d].
    torch::Tensor hidden(int64_t token, torch::Tensor cos_local, torch::Tensor sin_local, torch::Tensor cos_global,
                         torch::Tensor sin_global, int64_t pos) const {
        TORCH_CHECK(keys.size() == layers.size() && values.size() == layers.size() && windows.size() == layers.size() &&
                        k_scales.size() == layers.size() && v_scales.size() == layers.size() &&
                        key_pos.size() == layers.size(), "DecodeStack: one cache entry per layer");
        const int64_t d = out_norm.numel();
        auto x = torch::empty({1, d}, torch::kFloat32);
        lookup(table.blocks, table.type, table.N, torch::full({1}, token, torch::kInt64), x);  // refuses bad ids
        float* xp = x.data_ptr<float>();
        for (int64_t i = 0; i < d; i++) xp[i] *= (float)embed_scale;
        const std::vector<torch::Tensor> none;
        for (size_t i = 0; i < layers.size(); i++) {
            const bool ring = windows[i] > 0;
            auto one = [](const c10::optional<torch::Tensor>& t) {
                return t.has_value() ? std::vector<torch::Tensor>{*t} : std::vector<torch::Tensor>{};
            };
            x = layers[i].forward(x, ring ? cos_local : cos_global, ring ? sin_local : sin_global, {keys[i]},
                                  {values[i]}, one(k_scales[i]), one(v_scales[i]), ring ? one(key_pos[i]) : none,
                                  {ring ? pos % windows[i] : pos}, {pos});
        }
        auto h = torch::empty({1, d}, torch::kFloat32);
        rms_norm_rows(x.data_ptr<float>(), out_norm.data_ptr<float>(), (float)eps, 1, d, h.data_ptr<float>());
        return h;
    }
};

// Index of the largest value of each row of x [B, V] float32 (the first one on ties, and the first
// NaN if there is one: torch.max(dim)'s answers). One pass, 16 lanes each keeping its best value
// and index, over a slice of the row per thread (a 262k vocabulary's logits come straight from
// the LM head spread over both cores' caches: ~0.2 ms of a step on one thread).
torch::Tensor argmax_rows(torch::Tensor x) {
    x = as_rows(x);
    const int64_t B = x.size(0), V = x.size(1);
    TORCH_CHECK(V > 0, "argmax_rows: empty rows");
    TORCH_CHECK(V < INT32_MAX, "argmax_rows: rows longer than 2^31 - 1");
    auto out = torch::empty({B}, torch::kInt64);
    const int64_t threads = V >= (1 << 16) ? at::get_num_threads() : 1;
    std::vector<Best> parts(threads);
    for (int64_t b = 0; b < B; b++) {
        const float* row = x.data_ptr<float>() + b * V;
        at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
            for (int64_t t = t0; t < t1; t++) parts[t] = best_of(row, V * t / threads, V * (t + 1) / threads);
        });
        const Best best = first_best(parts);
        out.data_ptr<int64_t>()[b] = best.index < 0 ? 0 : best.index;  // all -inf: index 0, as torch
    }
    return out;
}

// The kernels release the GIL: a server's event loop thread keeps running while the engine thread
// is inside a long matmul, instead of both taking turns at Python's switch interval.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    const auto nogil = py::call_guard<py::gil_scoped_release>();
    m.def("argmax_rows", &argmax_rows, "index of each row's largest value (first on ties, NaN first), as torch.max(dim)", nogil);
    m.def("qmatmul", &qmatmul, "x @ W^T with W in GGUF blocks, int8 (VNNI) activations", nogil);
    m.def("qmatmul_many", &qmatmul_many, "several x @ W^T sharing one activation quantization", nogil);
    m.def("mlp", &mlp, "down(gelu_tanh(gate(x)) * up(x)) with GGUF weights", nogil);
    m.def("dequant", &dequant, "GGUF blocks -> float32/bfloat16 rows", nogil);
    m.def("lookup", &lookup, "rows `ids` of a table (any layout) -> float32 rows: embedding lookups", nogil);
    m.def("repack_q5_0", &repack_q5_0, "Q5_0 rows -> Q5_0R rows (four blocks per group, for one-row products)", nogil, py::arg("w"), py::arg("N"),
          py::arg("K"), py::arg("out") = py::none());
    m.def("repack_q4_0x", &repack_q4_0x, "Q4_0 rows -> Q4_0X (16 rows interleaved, for few-row products)", nogil, py::arg("w"),
          py::arg("N"), py::arg("K"), py::arg("out") = py::none());
    m.def("repack_q5_0x", &repack_q5_0x, "Q5_0 rows -> Q5_0X (16 rows interleaved, for few-row products)", nogil, py::arg("w"),
          py::arg("N"), py::arg("K"), py::arg("out") = py::none());
    m.def("repack_q8_0x", &repack_q8_0x, "Q8_0 rows -> Q8_0X (16 rows interleaved, for few-row products)", nogil, py::arg("w"),
          py::arg("N"), py::arg("K"), py::arg("out") = py::none());
    m.def("repack_q4_0", &repack_q4_0, "Q4_0 rows -> Q4_0R rows (four blocks per group, for one-row products)", nogil, py::arg("w"), py::arg("N"),
          py::arg("K"), py::arg("out") = py::none());
    m.def("repack_q8_0", &repack_q8_0, "Q8_0 rows -> Q8_0R rows (four blocks per group, for one-row products)", nogil, py::arg("w"), py::arg("N"),
          py::arg("K"), py::arg("out") = py::none());
    m.def("huge_empty", &huge_empty, "uninitialised uint8 bytes on transparent 2 MB pages where the OS gives them", nogil);
    m.def("layout_row_bytes", &layout_row_bytes, "bytes per row of K values in a GGML or repacked layout");
    m.def("drop_file_pages", &drop_file_pages, "madvise(DONTNEED) a tensor read once from a private file mapping", nogil);
    m.def("repack_q4_k", &repack_q4_k, "Q4_K rows -> Q4_KR rows (half super-blocks, for one-row products)", nogil, py::arg("w"), py::arg("N"),
          py::arg("K"), py::arg("out") = py::none());
    m.def("repack_q6_k", &repack_q6_k, "Q6_K rows -> Q6_KR rows (half super-blocks, for one-row products)", nogil, py::arg("w"), py::arg("N"),
          py::arg("K"), py::arg("out") = py::none());
    m.def("bf16_linear", &bf16_linear, "x @ W^T with W dequantized to bf16 tile by tile (oneMKL GEMM)", nogil);
    m.def("rms_norm", &rms_norm, "Gemma's RMSNorm, scaled by (1 + w)", nogil);
    m.def("qk_norm_rope", &qk_norm_rope, "QK-norm (1 + w) and RoPE for one position (shared or per row)", nogil);
    m.def("decode_attention_list", &decode_attention_list,
          "decode attention for B sequences with their own caches (stores the new K/V first)", nogil);
    m.def("decode_attention", &decode_attention, "attention of one query token per row over a KV cache (fp32/bf16/int8)",
          nogil, py::arg("q"), py::arg("keys"), py::arg("values"), py::arg("key_pos"), py::arg("pos"),
          py::arg("window"), py::arg("scale"), py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none());
    py::class_<QWeight>(m, "QWeight")
        .def(py::init<torch::Tensor, int64_t, int64_t, c10::optional<torch::Tensor>, int64_t>());
    py::class_<DecodeLayer>(m, "DecodeLayer")
        .def(py::init<QWeight, QWeight, QWeight, QWeight, QWeight, QWeight, QWeight, torch::Tensor, torch::Tensor,
                      torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t, int64_t, int64_t,
                      double, double>())
        .def("forward", &DecodeLayer::forward, "Block.forward for one token per row, each row with its own cache",
             nogil);
    py::class_<DecodeStack>(m, "DecodeStack")
        .def(py::init<std::vector<DecodeLayer>, std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                      std::vector<c10::optional<torch::Tensor>>, std::vector<c10::optional<torch::Tensor>>,
                      std::vector<c10::optional<torch::Tensor>>, std::vector<int64_t>, QWeight, double, torch::Tensor,
                      double>())
        .def("step", &DecodeStack::step, "a one-token step over the held cache: embedding, layers, final norm (and LM head)",
             nogil)
        .def("next_token", &DecodeStack::next_token, "the step's greedy next token (argmax inside the LM head)", nogil);
}
