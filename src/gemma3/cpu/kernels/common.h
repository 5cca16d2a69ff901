// What every kernel file starts from: the includes, the instruction-set guard, oneMKL's bf16 GEMM, INLINE,
// the type codes (GGML's and our repacked layouts'), f16 -> f32, the vector exp and GELU, and two
// small row helpers. Separate so the responsibility headers share one base; bindings.cpp includes
// it first (the whole extension is one translation unit: see bindings.cpp).
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <sys/mman.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

// Written for AVX-512 F/BW/VL/VNNI; built for AVX2 + FMA + F16C, the AVX-512 intrinsics are
// emulated (avx2.h). The Python side picks the build for the CPU, and falls back to PyTorch where
// neither fits.
#if defined(__AVX512F__)
#if !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__AVX512VNNI__)
#error "gemma3 kernels: an AVX-512 build needs AVX-512 F/BW/VL/VNNI"
#endif
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "avx2.h"
#else
#error "gemma3 kernels need AVX-512 F/BW/VL/VNNI or AVX2 + FMA + F16C"
#endif

extern "C" void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int64_t m, int64_t n, int64_t k,
                                       float alpha, const uint16_t* a, int64_t lda, const uint16_t* b,
                                       int64_t ldb, float beta, float* c, int64_t ldc);  // oneMKL, in libtorch_cpu

namespace {

#define INLINE inline __attribute__((always_inline))

// vpdpbusd where the unsigned bytes have at most BITS bits: avx2.h emulates BITS < 8 in fewer
// instructions (dpbusd_u7).
template <int BITS> INLINE __m512i dpbusd_bits(__m512i src, __m512i u, __m512i s) {
#if !defined(__AVX512F__)
    if constexpr (BITS < 8) return dpbusd_u7(src, u, s);
#endif
    return _mm512_dpbusd_epi32(src, u, s);
}

// Q4_0R, Q5_0R, Q8_0R, Q4_KR, Q6_KR, Q4_0X, Q5_0X, Q8_0X, Q4_KX and Q6_KX are ours, not GGML's: weights
// repacked for few-row products (repack_*).
enum GGMLType : int64_t {
    Q4_0 = 2, Q8_0 = 8, Q5_0 = 6, Q4_K = 12, Q6_K = 14, Q4_0R = 1002, Q5_0R = 1006, Q8_0R = 1008, Q4_KR = 1012, Q6_KR = 1014,
    Q4_0X = 1102, Q5_0X = 1106, Q8_0X = 1108, Q4_KX = 1112, Q6_KX = 1114
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

}  // namespace

// The mask of the first min(left, 16) lanes (a row's tail).
INLINE __mmask16 tail16(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

torch::Tensor as_rows(const torch::Tensor& x) {
    TORCH_CHECK(x.dim() == 2 && x.dtype() == torch::kFloat32, "x must be a 2-D float32 tensor");
    return x.contiguous();
}
