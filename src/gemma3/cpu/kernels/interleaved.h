// The 16-row interleaved layouts (Q4_0X, Q5_0X, Q8_0X) and their product kernels: rows across the
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

}  // namespace
