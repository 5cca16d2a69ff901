// The 16-row interleaved layouts (Q4_0X, Q5_0X, Q8_0X, Q4_KX, Q6_KX) and their product kernels: rows across the
// lanes, not values. Separate from the row layouts of formats.h / dot_tiles.h because a row is
// not contiguous here (decoders and repacking go through the group), and the kernels differ.
// Also weight_row_bytes: a row's bytes in any layout, interleaved or not.
#pragma once

#include "dot_tiles.h"

namespace {

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
// - Q4_KX and Q6_KX (below): the K-quants of larger models.
// Rows come in whole groups of 16 (N % 16 == 0) and a row is not contiguous: `lookup` decodes
// table rows from their group. The bytes are the GGUF format's, rearranged.
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
};

// What every interleaved format gives the kernels, per block of VALS values (BYTES for 16 rows):
// quad(blk, i, q), the stored values (unsigned) of quad q of its 32-value sub-block i, 16 rows x 4;
// scales(blk, i, s), the 16 rows' scales of sub-block i (s[0] for values 0-15 and s[1] for 16-31
// where TWO_SCALES); with HAS_MIN, mins(blk, i), what a row subtracts per unit of activation; and
// values are scale * (stored - OFFSET) - min. pack16(src, rb, dst) writes a group block from its
// 16 rows' GGUF blocks (below).
template <int64_t Src, int64_t Bytes, int64_t Offset> struct X16Block32 {
    static constexpr int64_t SRC = Src, VALS = 32, BYTES = Bytes, SCALES_AT = Bytes - 32, OFFSET = Offset;
    static constexpr int BITS = __builtin_ctzll(Offset) + 1;  // stored values are v + OFFSET = v + 2^(BITS - 1)
    static constexpr bool TWO_SCALES = false, HAS_MIN = false;
    static INLINE void scales(const uint8_t* blk, int, __m512* s) {
        s[0] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + SCALES_AT)));
    }
    static INLINE __m512 mins(const uint8_t*, int) { return _mm512_setzero_ps(); }
};

// ---- Repacking: sixteen GGUF rows' blocks -> one group block, every byte written once --------
//
// X::pack16(src, rb, dst) reads row r's block at src + r * rb. Plain AVX2 (native in both builds,
// nothing emulated), four rows at a time with in-register transposes: repacking is most of a
// load, and writing row by row into a zeroed block ran 2-3x slower.

// Rows r0..r0+3's 32 values 0..15 each (v[j], bytes) as their Nibbles16 bytes in the 256 at dst:
// quad q's four values to byte 64 (q / 2) + 4r + i, low nibble for even q, high for odd.
INLINE void put_nibbles16x4(const __m256i* v, int r0, uint8_t* dst) {
    __m128i p[4];  // per row, dword c: values 8c..8c+3 | values 8c+4..8c+7 << 4
    for (int j = 0; j < 4; j++) {
        const __m256i u = _mm256_or_si256(v[j], _mm256_slli_epi16(_mm256_srli_epi64(v[j], 32), 4));
        p[j] = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(u, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6)));
    }
    const __m128i t0 = _mm_unpacklo_epi32(p[0], p[1]), t1 = _mm_unpacklo_epi32(p[2], p[3]);
    const __m128i t2 = _mm_unpackhi_epi32(p[0], p[1]), t3 = _mm_unpackhi_epi32(p[2], p[3]);
    _mm_storeu_si128((__m128i*)(dst + 4 * r0), _mm_unpacklo_epi64(t0, t1));
    _mm_storeu_si128((__m128i*)(dst + 64 + 4 * r0), _mm_unpackhi_epi64(t0, t1));
    _mm_storeu_si128((__m128i*)(dst + 128 + 4 * r0), _mm_unpacklo_epi64(t2, t3));
    _mm_storeu_si128((__m128i*)(dst + 192 + 4 * r0), _mm_unpackhi_epi64(t2, t3));
}

// Sixteen rows' flag bits (bits[r], bit k for value k of 32) as eight 64-bit masks, quad q's at
// dst + q * stride with bit 4r + i for value 4q + i of row r: two rows' nibbles per byte (pdep),
// then an 8 x 8 byte transpose.
INLINE void put_masks16(const uint32_t* bits, uint8_t* dst, int64_t stride) {
    constexpr uint64_t LOW = 0x0F0F0F0F0F0F0F0Full, HIGH = 0xF0F0F0F0F0F0F0F0ull;
    __m128i t[4];
    for (int k = 0; k < 4; k++) {  // row pairs 2k and 2k + 1: byte q = their quad-q nibbles
        const uint64_t a = _pdep_u64(bits[4 * k], LOW) | _pdep_u64(bits[4 * k + 1], HIGH);
        const uint64_t b = _pdep_u64(bits[4 * k + 2], LOW) | _pdep_u64(bits[4 * k + 3], HIGH);
        t[k] = _mm_unpacklo_epi8(_mm_cvtsi64_si128((long long)a), _mm_cvtsi64_si128((long long)b));
    }
    const __m128i u0 = _mm_unpacklo_epi16(t[0], t[1]), u1 = _mm_unpackhi_epi16(t[0], t[1]);  // pairs 0-3: quads 0-3, 4-7
    const __m128i u2 = _mm_unpacklo_epi16(t[2], t[3]), u3 = _mm_unpackhi_epi16(t[2], t[3]);  // pairs 4-7
    const __m128i m[4] = {_mm_unpacklo_epi32(u0, u2), _mm_unpackhi_epi32(u0, u2), _mm_unpacklo_epi32(u1, u3),
                          _mm_unpackhi_epi32(u1, u3)};  // quads 2k and 2k + 1
    for (int k = 0; k < 4; k++) {
        _mm_storel_epi64((__m128i*)(dst + 2 * k * stride), m[k]);
        _mm_storel_epi64((__m128i*)(dst + (2 * k + 1) * stride), _mm_srli_si128(m[k], 8));
    }
}

// 16 rows of 16 bytes (row r at src + r * rb) transposed: byte j of row r to dst[16j + r]. Four
// rounds of the same byte interleave (row i with row i + 8) make the transpose.
INLINE void transpose16x16(const uint8_t* src, int64_t rb, uint8_t* dst) {
    __m128i a[16], b[16];
    for (int r = 0; r < 16; r++) a[r] = _mm_loadu_si128((const __m128i*)(src + r * rb));
    for (int round = 0; round < 4; round++) {
        for (int i = 0; i < 8; i++) {
            b[2 * i] = _mm_unpacklo_epi8(a[i], a[i + 8]);
            b[2 * i + 1] = _mm_unpackhi_epi8(a[i], a[i + 8]);
        }
        for (int r = 0; r < 16; r++) a[r] = b[r];
    }
    for (int j = 0; j < 16; j++) _mm_storeu_si128((__m128i*)(dst + 16 * j), a[j]);
}

// Two bytes at `at` of each of the 16 rows' blocks (an f16 scale), to dst + 2r.
INLINE void put_f16x16(const uint8_t* src, int64_t rb, int at, uint8_t* dst) {
    for (int r = 0; r < 16; r++) std::memcpy(dst + 2 * r, src + r * rb + at, 2);
}

struct X16Q4_0 : X16Block32<Q4_0, 288, 8> {
    static INLINE __m512i quad(const uint8_t* d, int, int q) { return Nibbles16::quad(d, q); }
    // Q4_0 blocks: f16 scale, 16 bytes of values 0-15 in low nibbles and 16-31 in high ones.
    static void pack16(const uint8_t* src, int64_t rb, uint8_t* dst) {
        for (int r0 = 0; r0 < 16; r0 += 4) {
            __m256i v[4];
            for (int j = 0; j < 4; j++) v[j] = nibbles32(src + (r0 + j) * rb + 2);
            put_nibbles16x4(v, r0, dst);
        }
        put_f16x16(src, rb, 0, dst + SCALES_AT);
    }
};

struct X16Q5_0 : X16Block32<Q5_0, 352, 16> {
    static INLINE __m512i quad(const uint8_t* d, int, int q) {
        const __m512i u = Nibbles16::quad(d, q);
        __mmask64 fifth;
        std::memcpy(&fifth, d + 256 + 8 * q, 8);
        return _mm512_mask_add_epi8(u, fifth, u, _mm512_set1_epi8(0x10));
    }
    // Q5_0 blocks: f16 scale, 32 fifth bits, 16 nibble bytes as Q4_0's.
    static void pack16(const uint8_t* src, int64_t rb, uint8_t* dst) {
        uint32_t fifth[16];
        for (int r0 = 0; r0 < 16; r0 += 4) {
            __m256i v[4];
            for (int j = 0; j < 4; j++) v[j] = nibbles32(src + (r0 + j) * rb + 6);
            put_nibbles16x4(v, r0, dst);
        }
        for (int r = 0; r < 16; r++) std::memcpy(fifth + r, src + r * rb + 2, 4);
        put_masks16(fifth, dst + 256, 8);
        put_f16x16(src, rb, 0, dst + SCALES_AT);
    }
};

struct X16Q8_0 : X16Block32<Q8_0, 544, 128> {
    static INLINE __m512i quad(const uint8_t* d, int, int q) { return _mm512_loadu_si512(d + 64 * q); }
    // Q8_0 blocks: f16 scale, 32 int8 values (stored + 128). Four rows' eight quads transposed.
    static void pack16(const uint8_t* src, int64_t rb, uint8_t* dst) {
        for (int r0 = 0; r0 < 16; r0 += 4) {
            __m256i w[4];
            for (int j = 0; j < 4; j++)
                w[j] = _mm256_xor_si256(FmtQ8_0::quants(src + (r0 + j) * rb), _mm256_set1_epi8((char)0x80));
            const __m256i t0 = _mm256_unpacklo_epi32(w[0], w[1]), t1 = _mm256_unpackhi_epi32(w[0], w[1]);
            const __m256i t2 = _mm256_unpacklo_epi32(w[2], w[3]), t3 = _mm256_unpackhi_epi32(w[2], w[3]);
            const __m256i q[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2),
                                  _mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3)};  // quads k | k + 4
            for (int k = 0; k < 4; k++) {
                _mm_storeu_si128((__m128i*)(dst + 64 * k + 4 * r0), _mm256_castsi256_si128(q[k]));
                _mm_storeu_si128((__m128i*)(dst + 64 * (k + 4) + 4 * r0), _mm256_extracti128_si256(q[k], 1));
            }
        }
        put_f16x16(src, rb, 0, dst + SCALES_AT);
    }
};

// Int8 lanes of 16 bytes as 16 floats (the K-quants' per-row sub-block scales and mins).
INLINE __m512 bytes16(const uint8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }

// ---- Q4_KX and Q6_KX: the K-quants, sixteen rows interleaved ------------------------------------
//
// Per 16 rows and 256-value super-block, the eight 32-value sub-blocks' values first, each as a
// Q4_0X block's 256 nibble bytes (Nibbles16), then the rows' scales:
// - Q4_KX, 2368 bytes (Q4_K's 144 per row, 2304, plus the 6-bit scales unpacked): at 2048 + 16i + r
//   row r's integer scale sc of sub-block i, at 2176 + 16i + r its min m, at 2304 + 2r the super-block's
//   d and at 2336 + 2r its dmin (f16); values d * sc * q - dmin * m, as in Q4_K.
// - Q6_KX, 3360 bytes (Q6_K's 210 per row): the low 4 bits as nibbles, then per sub-block i and
//   quad q two 64-bit masks at 2048 + 128i + 16q (bit `lane` = bit 4 of that value) and + 8 (bit 5),
//   at 3072 + 16j + r row r's int8 scale of 16-value sub-block j, at 3328 + 2r its d (f16); stored
//   values 0..63, value d * sc * (u - 32), as in Q6_K.
// For decode at 4B shapes, where the layers (not the LM head) are the step: the scales of 16
// rows in one vector and nothing summed across lanes, where the row layouts (Q4_KR) spend about
// as many instructions on each 32-value block's scales as on its products; and without AMX, prefill
// multiplies these groups by several activation rows per read (no bf16 GEMM to hand over to).
struct X16Q4_K {
    static constexpr int64_t SRC = Q4_K, VALS = 256, BYTES = 2368, OFFSET = 0;
    static constexpr int BITS = 4;
    static constexpr bool TWO_SCALES = false, HAS_MIN = true;
    static INLINE __m512i quad(const uint8_t* blk, int i, int q) { return Nibbles16::quad(blk + 256 * i, q); }
    static INLINE void scales(const uint8_t* blk, int i, __m512* s) {
        s[0] = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + 2304))), bytes16(blk + 2048 + 16 * i));
    }
    static INLINE __m512 mins(const uint8_t* blk, int i) {
        return _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + 2336))), bytes16(blk + 2176 + 16 * i));
    }
    // Q4_K blocks: f16 d and dmin, 12 bytes of 6-bit scales and mins, 128 bytes of values (bytes
    // 32j..32j+31 hold sub-block 2j in their low nibbles and 2j + 1 in their high ones).
    static void pack16(const uint8_t* src, int64_t rb, uint8_t* dst) {
        const __m256i m4 = _mm256_set1_epi8(0x0F);
        for (int r0 = 0; r0 < 16; r0 += 4) {
            __m256i q[4][4], v[4];
            for (int j = 0; j < 4; j++)
                for (int k = 0; k < 4; k++) q[j][k] = _mm256_loadu_si256((const __m256i*)(src + (r0 + j) * rb + 16 + 32 * k));
            for (int i = 0; i < 8; i++) {
                for (int j = 0; j < 4; j++) v[j] = _mm256_and_si256(i % 2 ? _mm256_srli_epi16(q[j][i / 2], 4) : q[j][i / 2], m4);
                put_nibbles16x4(v, r0, dst + 256 * i);
            }
        }
        alignas(16) uint8_t sm[16][16];  // per row: the eight scales, then the eight mins
        for (int r = 0; r < 16; r++) q4k_scales_mins(src + r * rb + 4, sm[r]);
        transpose16x16(&sm[0][0], 16, dst + 2048);  // scale i of row r at 2048 + 16i + r, min at 2176 + 16i + r
        put_f16x16(src, rb, 0, dst + 2304);
        put_f16x16(src, rb, 2, dst + 2336);
    }
};

struct X16Q6_K {
    static constexpr int64_t SRC = Q6_K, VALS = 256, BYTES = 3360, OFFSET = 32;
    static constexpr int BITS = 6;
    static constexpr bool TWO_SCALES = true, HAS_MIN = false;
    static INLINE __m512i quad(const uint8_t* blk, int i, int q) {
        __mmask64 b4, b5;
        std::memcpy(&b4, blk + 2048 + 128 * i + 16 * q, 8);
        std::memcpy(&b5, blk + 2048 + 128 * i + 16 * q + 8, 8);
        __m512i u = Nibbles16::quad(blk + 256 * i, q);
        u = _mm512_mask_add_epi8(u, b4, u, _mm512_set1_epi8(0x10));
        return _mm512_mask_add_epi8(u, b5, u, _mm512_set1_epi8(0x20));
    }
    static INLINE void scales(const uint8_t* blk, int i, __m512* s) {
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + 3328)));
        s[0] = _mm512_mul_ps(d, bytes16(blk + 3072 + 32 * i));
        s[1] = _mm512_mul_ps(d, bytes16(blk + 3072 + 32 * i + 16));
    }
    static INLINE __m512 mins(const uint8_t*, int) { return _mm512_setzero_ps(); }
    // Q6_K blocks: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, f16 d.
    static void pack16(const uint8_t* src, int64_t rb, uint8_t* dst) {
        uint32_t bit4[8][16], bit5[8][16];  // per sub-block and row: bits 4 and 5 of its 32 values
        for (int r0 = 0; r0 < 16; r0 += 4) {
            __m256i u[4][8], v[4];  // stored values 0..63
            for (int j = 0; j < 4; j++)
                FmtQ6_K::decode(src + (r0 + j) * rb,
                                [&](int i, __m256i q, float, float, float) { u[j][i] = _mm256_add_epi8(q, _mm256_set1_epi8(32)); });
            for (int i = 0; i < 8; i++) {
                for (int j = 0; j < 4; j++) {
                    v[j] = _mm256_and_si256(u[j][i], _mm256_set1_epi8(0x0F));
                    // Bits 4 and 5 to each byte's sign bit (no bit crosses into the other byte's sign).
                    bit4[i][r0 + j] = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(u[j][i], 3));
                    bit5[i][r0 + j] = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(u[j][i], 2));
                }
                put_nibbles16x4(v, r0, dst + 256 * i);
            }
        }
        for (int i = 0; i < 8; i++) {
            put_masks16(bit4[i], dst + 2048 + 128 * i, 16);
            put_masks16(bit5[i], dst + 2048 + 128 * i + 8, 16);
        }
        transpose16x16(src + 192, rb, dst + 3072);  // scale j of row r at 3072 + 16j + r
        put_f16x16(src, rb, 208, dst + 3328);
    }
};

// Bytes of one 16-row group of K values.
template <class X> constexpr int64_t group_bytes(int64_t K) { return K / X::VALS * X::BYTES; }

// f(X16Q4_0{}) ... f(X16Q6_K{}) for an interleaved type; false for any other.
template <class F> bool interleaved(int64_t type, F&& f) {
    if (type == Q4_0X) return f(X16Q4_0{}), true;
    if (type == Q5_0X) return f(X16Q5_0{}), true;
    if (type == Q8_0X) return f(X16Q8_0{}), true;
    if (type == Q4_KX) return f(X16Q4_K{}), true;
    if (type == Q6_KX) return f(X16Q6_K{}), true;
    return false;
}

// The integer products of sub-block i (the activations' block b) of the S groups with the MT
// activation rows: t[s][h][m], lane r = the sum over the sub-block's values (a half's, for two-scale
// formats) of row r's stored value times the activation (int16; with INT8, its high byte: Act),
// the offset not yet taken off.
#if defined(__AVX512F__) || defined(__AVXVNNI__)
// vpdpbusd on the activations' high and low bytes apart, t = 256 * high + low (INT8: one
// vpdpbusd per quad and row instead of two). Each activation quad is broadcast once for the S
// groups (a decode row's four streams): 4B decode 8.2 -> 9.0-9.3 tok/s against a broadcast per group.
template <class X, int S, int MT, bool INT8, int HALVES>
INLINE void sub_dots(const uint8_t* const* blk, int i, int64_t b, const Act* acts, __m512i (&t)[S][HALVES][MT]) {
    __m512i sh[S][HALVES][MT], sl[S][HALVES][MT];  // the products with the activations' high and low bytes
    for (int s = 0; s < S; s++)
        for (int h = 0; h < HALVES; h++)
            for (int m = 0; m < MT; m++) sh[s][h][m] = sl[s][h][m] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int q = 0; q < 8; q++) {
        const int h = HALVES == 2 ? q / 4 : 0;  // quads 0-3 are values 0-15
        __m512i ah[MT], al[MT];
#pragma GCC unroll 8
        for (int m = 0; m < MT; m++) {
            ah[m] = _mm512_set1_epi32(((const int32_t*)(acts[m].hi + 32 * b))[q]);
            if (!INT8) al[m] = _mm512_set1_epi32(((const int32_t*)(acts[m].lo + 32 * b))[q]);
        }
#pragma GCC unroll 4
        for (int s = 0; s < S; s++) {
            const __m512i u = X::quad(blk[s], i, q);
#pragma GCC unroll 8
            for (int m = 0; m < MT; m++) {
                sh[s][h][m] = dpbusd_bits<X::BITS>(sh[s][h][m], u, ah[m]);
                if (!INT8) sl[s][h][m] = dpbusd_bits<X::BITS>(sl[s][h][m], u, al[m]);
            }
        }
    }
    for (int s = 0; s < S; s++)
        for (int h = 0; h < HALVES; h++)
            for (int m = 0; m < MT; m++) t[s][h][m] = INT8 ? sh[s][h][m] : _mm512_add_epi32(_mm512_slli_epi32(sh[s][h][m], 8), sl[s][h][m]);
}
#else
// AVX2 without VNNI, where each emulated vpdpbusd takes 3 instructions per 256 bits for weights of
// at most 7 bits (dpbusd_u7) and 8 for Q8_0X's: vpmaddwd on 16-bit values instead, each lane's
// stored bytes [v0 v1 v2 v3] spread to [v0 v1] and [v2 v3] (two vpshufb per quad, shared by the MT
// rows) and multiplied with the activations' int16 pairs [a0 a1] and [a2 a3] as they lie in
// memory (broadcast loads): the whole int16 activation in one product where vpdpbusd takes its
// bytes apart, 4 instructions per 256 bits and row for every format. The same integers: a
// product is at most 255 * 32639 in magnitude, a block's 32 of them fit 31 bits. INT8 with 7-bit
// weights keeps dpbusd_u7 (3 instructions); Q8_0X's int8 activations are widened.
INLINE __m256i quad_pairs(__m256i u, bool high) {  // -1: a zero byte
    const __m256i v01 = _mm256_setr_epi8(0, -1, 1, -1, 4, -1, 5, -1, 8, -1, 9, -1, 12, -1, 13, -1,
                                         0, -1, 1, -1, 4, -1, 5, -1, 8, -1, 9, -1, 12, -1, 13, -1);
    const __m256i v23 = _mm256_setr_epi8(2, -1, 3, -1, 6, -1, 7, -1, 10, -1, 11, -1, 14, -1, 15, -1,
                                         2, -1, 3, -1, 6, -1, 7, -1, 10, -1, 11, -1, 14, -1, 15, -1);
    return _mm256_shuffle_epi8(u, high ? v23 : v01);
}
template <class X, int S, int MT, bool INT8, int HALVES>
INLINE void sub_dots(const uint8_t* const* blk, int i, int64_t b, const Act* acts, __m512i (&t)[S][HALVES][MT]) {
    // The quads one at a time (not unrolled, a half's sums d in registers): with 16 registers,
    // the eight quads unrolled as for AVX-512 spilled more values than the products it ran.
    constexpr int QUADS = 8 / HALVES;  // per half: quads 0-3 are values 0-15
#pragma GCC unroll 2
    for (int h = 0; h < HALVES; h++) {
        __m512i d[S][MT];
        for (int s = 0; s < S; s++)
            for (int m = 0; m < MT; m++) d[s][m] = _mm512_setzero_si512();
#pragma GCC unroll 1
        for (int q = QUADS * h; q < QUADS * (h + 1); q++) {
            if constexpr (INT8 && X::BITS < 8) {
                __m512i ah[MT];
                for (int m = 0; m < MT; m++) ah[m] = _mm512_set1_epi32(((const int32_t*)(acts[m].hi + 32 * b))[q]);
#pragma GCC unroll 4
                for (int s = 0; s < S; s++) {
                    const __m512i u = X::quad(blk[s], i, q);
                    for (int m = 0; m < MT; m++) d[s][m] = dpbusd_u7(d[s][m], u, ah[m]);
                }
                continue;
            }
#pragma GCC unroll 4
            for (int s = 0; s < S; s++) {
                const __m512i u = X::quad(blk[s], i, q);
                const __m256i lo01 = quad_pairs(u.lo, false), lo23 = quad_pairs(u.lo, true);  // rows 0-7
                const __m256i hi01 = quad_pairs(u.hi, false), hi23 = quad_pairs(u.hi, true);  // rows 8-15
#pragma GCC unroll 4
                for (int m = 0; m < MT; m++) {
                    __m256i a01, a23;  // activations 0, 1 and 2, 3 of the quad, in every lane
                    if constexpr (INT8) {
                        const __m128i a = _mm_cvtepi8_epi16(_mm_cvtsi32_si128(((const int32_t*)(acts[m].hi + 32 * b))[q]));
                        a01 = _mm256_broadcastd_epi32(a);
                        a23 = _mm256_broadcastd_epi32(_mm_srli_si128(a, 4));
                    } else {
                        const int32_t* a = (const int32_t*)(acts[m].a + 32 * b + 4 * q);
                        a01 = _mm256_set1_epi32(a[0]);
                        a23 = _mm256_set1_epi32(a[1]);
                    }
                    d[s][m].lo = _mm256_add_epi32(d[s][m].lo, _mm256_add_epi32(_mm256_madd_epi16(lo01, a01), _mm256_madd_epi16(lo23, a23)));
                    d[s][m].hi = _mm256_add_epi32(d[s][m].hi, _mm256_add_epi32(_mm256_madd_epi16(hi01, a01), _mm256_madd_epi16(hi23, a23)));
                }
            }
        }
        for (int s = 0; s < S; s++)
            for (int m = 0; m < MT; m++) t[s][h][m] = d[s][m];
    }
}
#endif

// The activation rows' per-block scalars that the kernels' epilogue takes, block by block and
// row by row within a block ([b][m], M rows apart): one base pointer for a tile of rows and each
// value a broadcast from memory. Read through each row's Act, they cost the 8-row int8 kernel a
// pointer reloaded from the stack, an int -> float conversion and a multiply per row and block.
// scale: the products' scale (int8: 256 d, hi's); minus: scale times the block sum (formats with
// a min); sum / half: the block and half-block sums (formats with an offset), of hi with int8.
struct BlockTerms {
    int64_t M;
    std::vector<float> scale, minus;
    std::vector<int32_t> sum, half;
    BlockTerms(const Act* rows, int64_t M, bool int8) : M(M) {
        const int64_t nb = rows[0].nb;
        scale.resize(nb * M), minus.resize(nb * M), sum.resize(nb * M), half.resize(2 * nb * M);
        // Over the threads in runs of 64 rows (whole cache lines of every block's entries); a few
        // rows inline: a parallel_for call even for one row cost the 270M's decode ~5% (A/B runs).
        auto fill = [&](int64_t m0, int64_t m1) {
            for (int64_t m = m0; m < m1; m++) {
                const Act& a = rows[m];
                const int32_t *s = int8 ? a.hsum : a.bsum, *s16 = int8 ? a.hsum16 : a.bsum16;
                for (int64_t b = 0; b < nb; b++) {
                    const float d = int8 ? 256.f * a.d[b] : a.d[b];
                    scale[b * M + m] = d, minus[b * M + m] = d * (float)s[b], sum[b * M + m] = s[b];
                    half[2 * b * M + m] = s16[2 * b], half[(2 * b + 1) * M + m] = s16[2 * b + 1];
                }
            }
        };
        if (M > 64) at::parallel_for(0, M, 64, fill);
        else fill(0, M);
    }
};
// Y[m, 16 rows of group s] for S groups G[s] (outputs at Y[s]) and MT activation rows: each
// group's weights decoded once for all rows; the S groups are read block by block in lockstep.
// Per 32-value sub-block, integer dot products per half (two-scale formats) or whole (sub_dots),
// the stored values' offset taken off in integers through the activation sums, then one FMA
// with the scales; a format's mins through the activation block sums. INT8: the activations'
// high bytes alone (Act: int8 activations).
// `ahead`: how many 32-value blocks ahead of the one being read each stream prefetches.
template <class X, int S, int MT, bool INT8>
INLINE void x16_groups(const uint8_t* const* G, int64_t K, const Act* acts, const BlockTerms& terms, int64_t m0,
                       float* const* Y, int64_t ldy, int64_t ahead_blocks) {
    const int64_t ahead = ahead_blocks * X::BYTES * 32 / X::VALS, M = terms.M;
    const float* const scales0 = terms.scale.data() + m0;
    const float* const minus0 = terms.minus.data() + m0;
    constexpr int SUBS = X::VALS / 32, HALVES = X::TWO_SCALES ? 2 : 1;
    const int32_t* const sums0 = (HALVES == 2 ? terms.half.data() : terms.sum.data()) + m0;
    __m512 acc[S][MT];
    for (int s = 0; s < S; s++)
        for (int m = 0; m < MT; m++) acc[s][m] = _mm512_setzero_ps();
    for (int64_t sb = 0; sb < K / X::VALS; sb++) {
        const uint8_t* blk[S];
        for (int s = 0; s < S; s++) {
            blk[s] = G[s] + sb * X::BYTES;
            for (int64_t l = 0; l < X::BYTES; l += 64) _mm_prefetch((const char*)blk[s] + ahead + l, _MM_HINT_T1);
        }
        for (int i = 0; i < SUBS; i++) {
            const int64_t b = sb * SUBS + i;  // the activations' 32-value block
            __m512i dots[S][HALVES][MT];
            sub_dots<X, S, MT, INT8, HALVES>(blk, i, b, acts, dots);
#pragma GCC unroll 4
            for (int s = 0; s < S; s++) {
                __m512 sc[HALVES];
                X::scales(blk[s], i, sc);
                const __m512 mn = X::mins(blk[s], i);
#pragma GCC unroll 8
                for (int m = 0; m < MT; m++) {
                    const __m512 da = _mm512_set1_ps(scales0[b * M + m]);
                    for (int h = 0; h < HALVES; h++) {
                        __m512i t = dots[s][h][m];
                        if (X::OFFSET)  // t - OFFSET * sum, OFFSET a power of two
                            t = _mm512_sub_epi32(t, _mm512_slli_epi32(_mm512_set1_epi32(sums0[(HALVES * b + h) * M + m]),
                                                                      __builtin_ctzll(X::OFFSET)));
                        acc[s][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(sc[h], da), acc[s][m]);
                    }
                    if (X::HAS_MIN) acc[s][m] = _mm512_fnmadd_ps(mn, _mm512_set1_ps(minus0[b * M + m]), acc[s][m]);
                }
            }
        }
    }
    for (int s = 0; s < S; s++)
        for (int m = 0; m < MT; m++) _mm512_storeu_ps(Y[s] + m * ldy, acc[s][m]);
}

// How a decode step (one activation row) reads the weights, by CPU vendor (measured A/B in one
// process, same tokens):
// - Intel: four streams per core, from the starts of the range's four quarters, each prefetching
//   4 blocks ahead. One stream per core left memory idle there (a bare two-thread read of the LM
//   head: 5.4 ms as one stream per core, 4.6 as four); the 270M step 8.15 -> 7.37 ms.
// - AMD (Zen 4): one stream per core, prefetching 16 blocks ahead. Four streams kept the 4B's
//   layers at ~22 GB/s of a 34 GB/s bare read: its decode 8.75 -> 12.4 tok/s (2 streams: 9.8;
//   8 or 32 blocks ahead: 11.2 / 11.8); the 270M and 1B unchanged or faster.
// GEMMA3_STREAMS=1|4 picks either on any CPU (read once), to measure or test both here.
struct StreamPlan {
    int streams;
    int64_t ahead;
};
inline const StreamPlan decode_streams = [] {
    __builtin_cpu_init();
    const char* env = getenv("GEMMA3_STREAMS");
    const bool one = env ? atoi(env) == 1 : __builtin_cpu_is("amd");
    return one ? StreamPlan{1, 16} : StreamPlan{4, 4};
}();

// Y[m, n0..n1) for MT activation rows; a range that starts or ends inside a group computes that
// group whole and keeps its rows in range. One activation row (a decode step) reads its whole
// groups as decode_streams says; several rows read one group at a time, 8 blocks ahead (2 or 4
// left the cores waiting).
template <class X, int MT, bool INT8, int S>
void x16_rows_with(const uint8_t* W, int64_t K, int64_t n0, int64_t n1, const Act* acts, const BlockTerms& terms,
                   int64_t m0, float* Y, int64_t ldy) {
    const int64_t ahead = MT == 1 ? decode_streams.ahead : 8, ahead_one = MT == 1 && S == 1 ? ahead : 8;
    auto one = [&](int64_t g, float* out, int64_t ld) {  // group g alone
        const uint8_t* G = W + g * group_bytes<X>(K);
        x16_groups<X, 1, MT, INT8>(&G, K, acts, terms, m0, &out, ld, ahead_one);
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
        x16_groups<X, S, MT, INT8>(G, K, acts, terms, m0, Ys, ldy, ahead);
    }
    for (int64_t g = g0 + S * per; g < g1; g++) one(g, Y + g * 16, ldy);
}

template <class X, int MT, bool INT8>
void x16_rows(const uint8_t* W, int64_t K, int64_t n0, int64_t n1, const Act* acts, const BlockTerms& terms, int64_t m0,
              float* Y, int64_t ldy) {
    if constexpr (MT == 1)
        if (decode_streams.streams == 4) return x16_rows_with<X, MT, INT8, 4>(W, K, n0, n1, acts, terms, m0, Y, ldy);
    x16_rows_with<X, MT, INT8, 1>(W, K, n0, n1, acts, terms, m0, Y, ldy);
}

// Bytes per row of K values in a layout (GGML or repacked; an interleaved row's share of its
// group: the GGUF format's row, but Q4_KX's, whose scales are unpacked).
int64_t weight_row_bytes(int64_t type, int64_t K) {
    int64_t bytes = -1;
    if (interleaved(type, [&](auto x) {
            using X = decltype(x);
            TORCH_CHECK(K % X::VALS == 0, "row length ", K, " is not a multiple of the block size ", X::VALS);
            bytes = group_bytes<X>(K) / 16;
        }))
        return bytes;
    return dispatch(type, [&](auto fmt) { return row_bytes<decltype(fmt)>(K); });
}

}  // namespace
