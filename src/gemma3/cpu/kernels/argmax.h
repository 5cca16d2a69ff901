// The largest value of a row and its first index (torch.max(dim)'s answers, NaN first): Best and
// its merge, used by matmul_acts to scan the LM head's logits while they are in cache, and the
// `argmax_rows` op. Separate: it is the greedy sampler's kernel, not part of a product.
#pragma once

#include "common.h"

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
