// Products of quantized weights with float activations: matmul_acts splits one or several
// products' rows over the threads and runs the format's kernel (dot_tiles.h, interleaved.h), and
// the ops built on it: qmatmul, qmatmul_many, mlp, and bf16_linear (bf16 tiles into oneMKL, for
// prefill). Separate from the kernels: this is the driver and the op boundary.
#pragma once

#include "argmax.h"
#include "dequant.h"

namespace {

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
// The interleaved kernels with int8 activations (prefill without AMX) take WIDE_MT rows at a time:
// with 32 registers, eight rows' accumulators fit beside the decoded quad, and each quad's decoding
// (nibbles, fifth and sixth bits) is shared by twice the products. AVX2's 16 registers hold four.
#ifdef __AVX512F__
constexpr int WIDE_MT = 8;
#else
constexpr int WIDE_MT = MT;
#endif

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

// Whether a product reads the int8 activations alone: int8 products of interleaved weights
// (others read the int16 ones).
inline bool int8_only_product(int64_t type, bool int8) { return int8 && interleaved(type, [](auto) {}); }

}  // namespace

// Acts is global, as it always was, and holds Act rows (anonymous namespace): GCC warns about
// that in a header (not in the main file); harmless, this is one translation unit.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsubobject-linkage"
// Quantized activation rows (the buffer owns the memory).
// int8_only: for int8 products with interleaved weights alone (quantize_row).
struct Acts {
    torch::Tensor buf;
    std::vector<Act> rows;
    bool int8_only;
    Acts(const float* x, int64_t M, int64_t K, bool int8_only = false) : rows(M), int8_only(int8_only) {
        TORCH_CHECK(K % 32 == 0, "row length ", K, " is not a multiple of 32");
        const int64_t nb = K / 32;
        // int8_only: hi, d, hsum and hsum16 alone, 48 of the 156 bytes per block (fewer fresh pages
        // to fault in: a 2048-row buffer is ~10 MB, allocated per product).
        buf = torch::empty({M, nb * (int8_only ? ACT_INT8_BYTES_PER_BLOCK : ACT_BYTES_PER_BLOCK)}, torch::kInt8);
        // Over the threads for many rows: a 512-row prefill's activations took ~0.2-0.7 ms per
        // product on one core (~7% of the 270M's prefill) while the other waited.
        at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
            for (int64_t m = m0; m < m1; m++) {
                int8_t* base = buf.data_ptr<int8_t>() + m * buf.size(1);
                if (int8_only)
                    rows[m] = Act{K, nb, nullptr, (float*)(base + K), nullptr, base, nullptr, nullptr,
                                  (int32_t*)(base + K + 4 * nb), (int32_t*)(base + K + 8 * nb)};
                else
                    rows[m] = Act{K, nb, (int16_t*)base, (float*)(base + 2 * K), (int32_t*)(base + 2 * K + 4 * nb),
                                  base + 2 * K + 8 * nb, base + 3 * K + 8 * nb, (int32_t*)(base + 4 * K + 8 * nb),
                                  (int32_t*)(base + 4 * K + 16 * nb), (int32_t*)(base + 4 * K + 20 * nb)};
                quantize_row(x + m * K, rows[m], int8_only);
            }
        });
    }
};
#pragma GCC diagnostic pop

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
// `int8`: interleaved weights take the activations rounded to int8 (Act's hi; others ignore it).
void matmul_acts(const Acts& acts, const std::vector<Product>& products, Best* best = nullptr, bool int8 = false) {
    const int64_t M = (int64_t)acts.rows.size(), K = acts.rows[0].K;
    std::vector<int64_t> start{0};
    for (const auto& p : products) {
        check_layout(p.w, p.type, p.N, K);
        TORCH_CHECK(!acts.int8_only || int8_only_product(p.type, int8),
                    "matmul_acts: int8-only activations for a product that reads the int16 ones");
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
    const BlockTerms terms(acts.rows.data(), M, int8);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && chunks > 1)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t r0 = c * chunk, r1 = std::min(total, r0 + chunk);
        for (size_t i = 0; i < products.size(); i++) {
            const int64_t n0 = std::max(r0, start[i]) - start[i], n1 = std::min(r1, start[i + 1]) - start[i];
            if (n0 >= n1) continue;
            const Product& p = products[i];
            const uint8_t* W = p.w.data_ptr<uint8_t>();
            // Many rows: the weight rows 64 at a time (~100 KB at 4B shapes, kept in the core's L2)
            // against every activation row, MT rows per read of them (8 spilled registers: the
            // int8 kernel ran at half the speed).
            const int64_t step = M > MT ? 64 : n1 - n0;
            const bool wide = int8_only_product(p.type, int8);
            for (int64_t s0 = n0; s0 < n1; s0 += step) {
                const int64_t s1 = std::min(n1, s0 + step);
                auto run = [&](int64_t m, auto rows) {
                    constexpr int R = decltype(rows)::value;
                    const Act* a = acts.rows.data() + m;
                    float* Y = p.Y + m * p.N;
                    if (!interleaved(p.type, [&](auto x) {
                            if (int8) x16_rows<decltype(x), R, true>(W, K, s0, s1, a, terms, m, Y, p.N);
                            else x16_rows<decltype(x), R, false>(W, K, s0, s1, a, terms, m, Y, p.N);
                        }))
                        dispatch(p.type, [&](auto fmt) {
                            using T = decltype(fmt);
                            dot_rows<T, R>(W, row_bytes<T>(K), s0, s1, a, Y, p.N);
                            return 0;
                        });
                };
                int64_t m = 0;
                if (wide)  // WIDE_MT rows per decoded weight quad first: the decoding is shared by more products
                    for (; m + WIDE_MT <= M; m += WIDE_MT) run(m, std::integral_constant<int, WIDE_MT>{});
                for (; m < M; m += MT) with_rows(std::min<int64_t>(MT, M - m), [&](auto rows) { run(m, rows); });
            }
            if (best) chunk_best[c] = best_of(p.Y, n0, n1);
        }
    }
    if (best) *best = first_best(chunk_best);
}

// x [M, K] float32 @ W[N, K]^T (GGUF blocks) -> [M, N] float32, int16 activations (int8 with
// `int8`, for interleaved weights: many-row products where there is no AMX for the bf16 GEMM).
torch::Tensor qmatmul(torch::Tensor x, torch::Tensor w, int64_t type, int64_t N, bool int8) {
    x = as_rows(x);
    Acts acts(x.data_ptr<float>(), x.size(0), x.size(1), int8_only_product(type, int8));
    auto y = torch::empty({x.size(0), N}, torch::kFloat32);
    matmul_acts(acts, {{w, type, N, y.data_ptr<float>()}}, nullptr, int8);
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

// g[i] = gelu_tanh(g[i]) * u[i]: torch's gelu(approximate="tanh"), 16 values at a time (scalar tanh
// took ~10% of a step).
INLINE void gelu_mul(float* g, const float* u, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(g + i, gelu_mul512(_mm512_loadu_ps(g + i), _mm512_loadu_ps(u + i)));
    const __mmask16 tail = (__mmask16)((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(g + i, tail, gelu_mul512(_mm512_maskz_loadu_ps(tail, g + i), _mm512_maskz_loadu_ps(tail, u + i)));
}

// g = gelu_tanh(g) * u in place, on every thread: prefill's MLP between its products (torch's
// gelu and mul took 17% of a 512-token prefill, two passes over [t, 2048] floats).
void gelu_mul_(torch::Tensor g, const torch::Tensor& u) {
    TORCH_CHECK(g.dtype() == torch::kFloat32 && u.dtype() == torch::kFloat32 && g.is_contiguous() &&
                u.is_contiguous() && g.numel() == u.numel(), "gelu_mul_ needs two contiguous float32 tensors of one size");
    float* gp = g.data_ptr<float>();
    const float* up = u.data_ptr<float>();
    const int64_t n = g.numel(), chunk = 16 * 1024;
    at::parallel_for(0, (n + chunk - 1) / chunk, 1, [&](int64_t c0, int64_t c1) {
        const int64_t i0 = c0 * chunk, i1 = std::min(n, c1 * chunk);
        gelu_mul(gp + i0, up + i0, i1 - i0);
    });
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
    gelu_mul(g, u, M * F);
    Acts hidden(g, M, F);
    auto y = torch::empty({M, N}, torch::kFloat32);
    matmul_acts(hidden, {{wd, td, N, y.data_ptr<float>()}});
    return y;
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
        at::parallel_for(0, nt, 64, [&](int64_t a, int64_t b) { decode_rows<true>(W, type, K, n0 + a, n0 + b, o + a * K, K); });
        // CblasRowMajor = 101, CblasNoTrans = 111, CblasTrans = 112
        cblas_gemm_bf16bf16f32(101, 111, 112, M, nt, K, 1.f, (const uint16_t*)xb.data_ptr(), K,
                               (const uint16_t*)buf.data_ptr(), K, 0.f, y.data_ptr<float>() + n0, N);
    }
    return y;
}
