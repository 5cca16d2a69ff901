// GGUF rows -> our layouts, once at load: the repack<> skeleton and every repack_* op (the
// 128-value row layouts and the 16-row interleaved ones), and layout_row_bytes for Python.
// Separate: it writes the layouts that formats.h and interleaved.h read, off the hot path.
#pragma once

#include "dequant.h"

// 128 values 0..15 as the repacked formats' 64 bytes: value i in the low nibble of byte i, value
// 64 + i in its high nibble.
void pack_nibbles(const uint8_t* u, uint8_t* dst) {
    for (int i = 0; i < 64; i++) dst[i] = u[i] | (u[64 + i] << 4);
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

// GGUF rows (Q4_0, Q5_0, Q8_0, Q4_K, Q6_K) [N, K / VALS * block bytes] -> their interleaved layout
// (X16*), the same size but Q4_KX's; N % 16 == 0, K % VALS == 0. Into `out` where given, a new
// tensor otherwise.
template <class X>
torch::Tensor repack_x16(const char* name, const torch::Tensor& w, int64_t N, int64_t K, const c10::optional<torch::Tensor>& out) {
    TORCH_CHECK(K % X::VALS == 0, name, ": row length ", K, " is not a multiple of ", X::VALS);
    TORCH_CHECK(N % 16 == 0, name, ": ", N, " rows is not a multiple of 16");
    const int64_t nb = K / X::VALS, rb = weight_row_bytes(X::SRC, K), src_bytes = rb / nb, ob = group_bytes<X>(K) / 16;
    check_weight(w, N, rb);
    torch::Tensor o = out.has_value() ? *out : torch::empty({N, ob}, torch::kUInt8);
    TORCH_CHECK(o.dtype() == torch::kUInt8 && o.is_contiguous() && o.numel() == N * ob, name,
                ": out must be contiguous uint8 with ", N * ob, " bytes");
    const uint8_t* in = w.data_ptr<uint8_t>();
    uint8_t* op = o.data_ptr<uint8_t>();
    at::parallel_for(0, N / 16 * nb, 16, [&](int64_t u0, int64_t u1) {
        for (int64_t u = u0; u < u1; u++)  // group u / nb, block u % nb
            X::pack16(in + u / nb * 16 * rb + u % nb * src_bytes, rb, op + u * X::BYTES);
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

torch::Tensor repack_q4_kx(torch::Tensor w, int64_t N, int64_t K, c10::optional<torch::Tensor> out) {
    return repack_x16<X16Q4_K>("repack_q4_kx", w, N, K, out);
}

torch::Tensor repack_q6_kx(torch::Tensor w, int64_t N, int64_t K, c10::optional<torch::Tensor> out) {
    return repack_x16<X16Q6_K>("repack_q6_kx", w, N, K, out);
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

// Q4_K rows [N, K / 256 * 144 bytes] -> Q4_KR rows [N, K / 128 * 76] (see FmtQ4_KR); K % 256 == 0.
// Whole vectors of nibbles at a time: repacking is most of a load (a 4B model's 1.5 GB of Q4_K).
torch::Tensor repack_q4_k(torch::Tensor w, int64_t N, int64_t K, c10::optional<torch::Tensor> out) {
    return repack<FmtQ4_K, FmtQ4_KR>("repack_q4_k", w, N, K, out, [](const uint8_t* src, uint8_t* dst) {
        uint8_t sm[16];  // the eight scales, then the eight mins
        q4k_scales_mins(src + 4, sm);
        const __m256i m4 = _mm256_set1_epi8(0x0F);
        for (int h = 0; h < 2; h++, dst += FmtQ4_KR::BYTES) {
            // Q4_K's bytes 32j..32j+31 hold sub-block 2j in their low nibbles and 2j + 1 in their
            // high ones; this half's four sub-blocks are in a (j = 2h) and b (j = 2h + 1).
            const __m256i a = _mm256_loadu_si256((const __m256i*)(src + 16 + 64 * h));
            const __m256i b = _mm256_loadu_si256((const __m256i*)(src + 16 + 64 * h + 32));
            const __m256i first = _mm256_or_si256(_mm256_and_si256(a, m4), _mm256_slli_epi16(_mm256_and_si256(b, m4), 4));
            const __m256i second = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), m4), _mm256_andnot_si256(m4, b));
            _mm256_storeu_si256((__m256i*)dst, first);  // values 0-31 | 64-95
            _mm256_storeu_si256((__m256i*)(dst + 32), second);  // values 32-63 | 96-127
            std::memcpy(dst + 64, sm + 4 * h, 4);  // this half's four scales
            std::memcpy(dst + 68, sm + 8 + 4 * h, 4);  // and mins
            std::memcpy(dst + 72, src, 4);  // d and dmin
        }
    });
}

// Q6_K rows [N, K / 256 * 210 bytes] -> Q6_KR rows [N, K / 128 * 108] (see FmtQ6_KR); K % 256 == 0.
torch::Tensor repack_q6_k(torch::Tensor w, int64_t N, int64_t K, c10::optional<torch::Tensor> out) {
    return repack<FmtQ6_K, FmtQ6_KR>("repack_q6_k", w, N, K, out, [](const uint8_t* src, uint8_t* dst) {
        __m256i u[8];  // the stored values 0..63 of each sub-block
        FmtQ6_K::decode(src, [&](int i, __m256i v, float, float, float) { u[i] = _mm256_add_epi8(v, _mm256_set1_epi8(32)); });
        const float d = h2f(src + 208);
        const __m256i m4 = _mm256_set1_epi8(0x0F);
        for (int h = 0; h < 2; h++, dst += FmtQ6_KR::BYTES) {
            const __m256i* q = u + 4 * h;
            // Low nibbles: values 0-63 (sub-blocks 0, 1) low, 64-127 (2, 3) high (values < 16: the
            // 16-bit shift carries nothing into the next byte).
            for (int k = 0; k < 2; k++)
                _mm256_storeu_si256((__m256i*)(dst + 32 * k), _mm256_or_si256(_mm256_and_si256(q[k], m4),
                                                                             _mm256_slli_epi16(_mm256_and_si256(q[k + 2], m4), 4)));
            // Bits 4 and 5 of each value moved to its byte's sign bit (a 16-bit shift moves no bit of a
            // byte into the other's sign bit) and collected: bit 4 of 0-63, bit 5 of 0-63, then 64-127.
            uint32_t bits[8];
            for (int k = 0; k < 4; k++) {
                bits[4 * (k / 2) + k % 2] = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(q[k], 3));
                bits[4 * (k / 2) + 2 + k % 2] = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(q[k], 2));
            }
            const uint64_t masks[4] = {bits[0] | (uint64_t)bits[1] << 32, bits[2] | (uint64_t)bits[3] << 32,
                                       bits[4] | (uint64_t)bits[5] << 32, bits[6] | (uint64_t)bits[7] << 32};
            std::memcpy(dst + 64, masks, 32);
            std::memcpy(dst + 96, src + 192 + 8 * h, 8);  // the eight int8 scales of this half
            std::memcpy(dst + 104, &d, 4);
        }
    });
}
