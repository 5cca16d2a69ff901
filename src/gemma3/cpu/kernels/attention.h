// Decode attention over a KV cache read in its storage dtype (fp32, bf16, int8 with per-slot
// scales): flash-decoding over the visible slots (attend_rows), the `decode_attention` op, and
// `decode_attention_list`, which first stores each row's new K/V in its own cache. Separate: the
// cache's layout and the softmax live here and nowhere else.
#pragma once

#include "common.h"

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
//
// A row's splits depend on its own visible keys only (one per 64, at most 32), never on the batch
// or the thread count: the same row gives the same bits alone or beside others (a seeded request
// samples the same text under any load). They were sized to keep the threads busy for the batch
// at hand, and a 700-token row alone and in a batch of two differed by 3e-3 in its logits.
template <typename T>
torch::Tensor attend_rows(const torch::Tensor& q, const std::vector<CacheRow<T>>& rows, int64_t Hk, double scale) {
    const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), group = Hq / Hk;
    std::vector<int64_t> first(B + 1, 0);  // row b's tasks are [first[b], first[b + 1]), Hk * splits of them
    int64_t longest = 0;                   // the most keys one split scores
    for (int64_t b = 0; b < B; b++) {
        const int64_t nv = rows[b].visible->size(), splits = std::clamp<int64_t>(nv / 64, 1, 32);
        first[b + 1] = first[b] + Hk * splits;
        longest = std::max(longest, (nv + splits - 1) / splits);
    }
    const int64_t tasks = first[B];
    // Per task and query head: running max, sum of exp, and the unnormalised output.
    auto part = torch::empty({tasks, group, D + 2}, torch::kFloat32);
    float* pp = part.data_ptr<float>();
    const float* qp = q.data_ptr<float>();
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
        std::vector<float> sc(group * (longest + 1));
        for (int64_t t = t0; t < t1; t++) {
            const int64_t b = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
            const int64_t splits = (first[b + 1] - first[b]) / Hk, h = (t - first[b]) / splits, sp = (t - first[b]) % splits;
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
    for (int64_t b = 0; b < B; b++) {
        const int64_t splits = (first[b + 1] - first[b]) / Hk;
        for (int64_t h = 0; h < Hk; h++)
            for (int64_t g = 0; g < group; g++) {
                const float* ph = pp + (first[b] + h * splits) * group * (D + 2);  // split 0 of (b, h)
                float m = -INFINITY, l = 0.f;
                for (int64_t sp = 0; sp < splits; sp++) m = std::max(m, ph[(sp * group + g) * (D + 2) + D]);
                float* yr = yp + (b * Hq + h * group + g) * D;
                for (int64_t i = 0; i < D; i++) yr[i] = 0.f;
                for (int64_t sp = 0; sp < splits; sp++) {
                    const float* o = ph + (sp * group + g) * (D + 2);
                    if (o[D + 1] == 0.f) continue;  // an empty split (its max is -inf)
                    const float w = std::exp(o[D] - m);
                    l += w * o[D + 1];
                    for (int64_t i = 0; i < D; i++) yr[i] += w * o[i];
                }
                for (int64_t i = 0; i < D; i++) yr[i] /= l;
            }
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
// with s = max|x| / 127 per head, exactly as model/cache.py (_Slots.write) does.
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
//
// Rows may also be consecutive tokens of one sequence sharing one cache (a speculative verify
// step, inference/speculative.py, alone or beside other sequences' rows): then each row is
// stored and attended before the next is stored, because a later row's key overwrites a ring
// slot an earlier row still sees. A row attended alone gives the same bits as in a batch
// (attend_rows), so every row's output is the one-token step's.
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
    // Verify rows may sit beside other sequences' rows (speculative decoding in a continuous
    // batch): a cache's rows must be adjacent, at consecutive positions; then every row of the
    // step is stored and attended in order.
    bool shared = false;
    for (int64_t b = 1; b < B; b++) {
        int64_t a = b - 1;
        while (a >= 0 && keys[a].data_ptr() != keys[b].data_ptr()) a--;
        if (a < 0) continue;
        TORCH_CHECK(a == b - 1 && positions[b] == positions[a] + 1,
                    "decode_attention_list: rows sharing a cache must be adjacent, at consecutive positions");
        shared = true;
    }
    if (shared) {
        std::vector<torch::Tensor> outs;
        for (int64_t b = 0; b < B; b++) {
            auto one = [&](const std::vector<torch::Tensor>& t) {
                return t.empty() ? std::vector<torch::Tensor>{} : std::vector<torch::Tensor>{t[b]};
            };
            outs.push_back(decode_attention_list(q.narrow(0, b, 1), k.narrow(0, b, 1), v.narrow(0, b, 1),
                                                 {keys[b]}, {values[b]}, one(k_scales), one(v_scales), one(key_pos),
                                                 {slots[b]}, {positions[b]}, window, scale));
        }
        return torch::cat(outs);
    }
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
