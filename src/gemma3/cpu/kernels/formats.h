// The weight formats as the kernels read them: GGML's blocks (Q8_0, Q5_0, Q4_0, Q4_K, Q6_K) and our
// row-repacked 128-value layouts (Q4_0R, Q5_0R, Q8_0R, Q4_KR, Q6_KR), each decoding its sub-blocks
// to int8, plus dispatch() from a type code to its format and row_bytes. Separate: every kernel
// (products, decoders, repacking) is written against these decoders, not against raw bytes.
#pragma once

#include "common.h"

namespace {

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
    static constexpr int BITS = __builtin_ctz(OFFSET) + 1;  // stored values are v + OFFSET = v + 2^(BITS - 1)
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

// Four bytes as four floats (Q4_KR's integer sub-block scales and mins).
INLINE __m128 bytes4(const uint8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(v)));
}

// Q4_K repacked half a super-block (128 values, four sub-blocks) at a time for one-row products
// (`repack_q4_k`): bytes 0-63 hold values 0-63 in their low nibbles and 64-127 in their high
// nibbles (as Q5_0R), bytes 64-67 the four sub-blocks' 6-bit scales sc and bytes 68-71 their
// mins m as whole bytes, bytes 72-73 and 74-75 the super-block's d and dmin (f16); the values are
// d * sc * q - dmin * m, as in Q4_K (the same fp32 products). 76 bytes where Q4_K takes 72 (the
// 6-bit scales unpacked): decode is a stream of these bytes, so their size is its speed (fp32
// scales and mins, 96 bytes, read a third more and ran a 4B model's step a fifth slower).
struct FmtQ4_KR {
    static constexpr int BITS = 4;  // of a stored value
    static constexpr int VALS = 128, BYTES = 76;
    static constexpr bool TWO_SCALES = false, HAS_MIN = true;
    template <class F> static INLINE void decode(const uint8_t* b, F&& f) {
        __m512i u0, u1;
        unsigned_quants(b, u0, u1);
        float s[4], m[4];
        _mm_storeu_ps(s, scales(b));
        _mm_storeu_ps(m, mins(b, _mm_setzero_ps()));
        quarters(u0, u1, s, s, m, f);
    }
    static INLINE void unsigned_quants(const uint8_t* b, __m512i& u0, __m512i& u1) { FmtQ4_0R::unsigned_quants(b, u0, u1); }
    static INLINE __m128 scales(const uint8_t* b) { return _mm_mul_ps(_mm_set1_ps(h2f(b + 72)), bytes4(b + 64)); }
    static INLINE __m128 mins(const uint8_t* b, __m128) { return _mm_mul_ps(_mm_set1_ps(h2f(b + 74)), bytes4(b + 68)); }
};

// Q6_K repacked half a super-block (128 values, eight 16-value sub-blocks) at a time for one-row
// products (`repack_q6_k`): bytes 0-63 hold the low 4 bits of values 0-63 in their low nibbles and
// of 64-127 in their high nibbles (as Q5_0R), bytes 64-95 the fifth and sixth bits as four 64-bit
// masks (bit 4 of values 0-63, bit 5 of 0-63, bit 4 of 64-127, bit 5 of 64-127), bytes 96-103 the
// eight int8 sub-block scales and bytes 104-107 the super-block's d as fp32. Stored values u are
// 0..63 and value = d * sc * (u - 32), as in Q6_K. 108 bytes where Q6_K takes 105.
struct FmtQ6_KR {
    static constexpr int BITS = 6;  // of a stored value
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

// A Q4_K super-block's 12 packed bytes s -> its eight sub-blocks' 6-bit scales, then their eight
// mins, a byte each (ggml's get_scale_min_k4, done on 32-bit words for all eight at once).
INLINE void q4k_scales_mins(const uint8_t* s, uint8_t* out) {
    constexpr uint32_t K1 = 0x3f3f3f3f, K2 = 0x0f0f0f0f, K3 = 0x03030303;
    uint32_t u[3], o[4];
    std::memcpy(u, s, 12);
    o[0] = u[0] & K1;
    o[1] = (u[2] & K2) | (((u[0] >> 6) & K3) << 4);
    o[2] = u[1] & K1;
    o[3] = ((u[2] >> 4) & K2) | (((u[1] >> 6) & K3) << 4);
    std::memcpy(out, o, 16);
}

struct FmtQ4_K {
    static constexpr int VALS = 256, BYTES = 144;
    static constexpr bool TWO_SCALES = false, HAS_MIN = true;
    template <class F> static INLINE void decode(const uint8_t* b, F&& f) {
        float d = h2f(b), dmin = h2f(b + 2);
        uint8_t sm[16];  // the eight scales, then the eight mins
        q4k_scales_mins(b + 4, sm);
        const uint8_t* qs = b + 16;
        __m256i m4 = _mm256_set1_epi8(0x0F);
        for (int j = 0; j < 4; j++) {
            __m256i q = _mm256_loadu_si256((const __m256i*)(qs + 32 * j));
            for (int h = 0; h < 2; h++) {
                int i = 2 * j + h;
                float ds = d * (float)sm[i];
                f(i, _mm256_and_si256(h ? _mm256_srli_epi16(q, 4) : q, m4), ds, ds, dmin * (float)sm[8 + i]);
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

}  // namespace
