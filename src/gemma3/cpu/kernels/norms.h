// Gemma's RMSNorm with weight (1 + w) (rms_norm_rows, the `rms_norm` op) and QK-norm + RoPE for
// one decode position (`qk_norm_rope`). Separate: plain fp32 row ops of the decode step, shared
// by the attention path and decode_step.h.
#pragma once

#include "common.h"

// Sum of x[i]^2 in one fixed order (16 lanes, then the lanes' tree, then the tail), the same bits
// on every build: a compiler-vectorized reduction sums in its vector width's order, which
// differs between the AVX-512 and AVX2 builds (and between -march targets).
INLINE float sum_squares(const float* x, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    float ss = _mm512_reduce_add_ps(acc);
    for (; i < n; i++) ss += x[i] * x[i];
    return ss;
}

// ---- decode-step helpers (one query token per row; see cpu/fused.py) --------------------------------

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
            const float inv = 1.f / std::sqrt(sum_squares(xr, D) / (float)D + (float)eps);
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
        const float inv = 1.f / std::sqrt(sum_squares(xr, D) / (float)D + eps);
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
