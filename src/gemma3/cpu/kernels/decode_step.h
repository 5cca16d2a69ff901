// One decode step of the Gemma 3 decoder in one call: QWeight, DecodeLayer, DecodeStack, the only
// file that knows the architecture. It mirrors Block.forward and Gemma3.forward in
// src/gemma3/model/decoder.py: RMSNorm (1 + w), q/k/v, QK-norm, RoPE, attention over the cache,
// o_proj, post-attention norm + residual, pre-FFW norm, GeGLU MLP, post-FFW norm + residual; the
// stack adds the scaled embedding lookup, the final norm and the tied LM head. Built by
// src/gemma3/cpu/fused.py (FastBlock, FastGemma3). Tests keep it bit-exact with the module path
// (tests/cpu/test_fused.py compares the one-call step with the Python modules).
#pragma once

#include "matmul.h"
#include "norms.h"
#include "attention.h"

// ---- one whole decoder layer of a decode step ------------------------------------------------------

// A GGMLLinear's weight as the kernels read it: its GGUF blocks, and for one-row products the
// repacked copy where it has one (GGMLLinear.weight_for).
struct QWeight {
    torch::Tensor blocks;
    int64_t type, N;
    c10::optional<torch::Tensor> packed;
    int64_t packed_type;
    const torch::Tensor& bytes(int64_t rows) const { return rows == 1 && packed.has_value() ? *packed : blocks; }
    int64_t kind(int64_t rows) const { return rows == 1 && packed.has_value() ? packed_type : type; }
    Product product(int64_t rows, float* Y) const { return {bytes(rows), kind(rows), N, Y}; }
};

// LoRA adapters beside one projection (src/gemma3/model/adapters.py), by adapter slot: A [r, in] and
// Bs = (scale * B)^T [r, out], fp32 (an empty A: that adapter leaves the projection alone). A row
// routed to slot s gets y += (A x) Bs. A rank-8 path reads ~1-2% of its quantized weight's bytes,
// so plain loops the compiler vectorizes are enough (16 partial sums keep the dot product in lanes).
struct LoRA {
    std::vector<torch::Tensor> A, Bs;

    bool adapts(const std::vector<int64_t>& slots) const {
        for (int64_t s : slots)
            if (s >= 0 && s < (int64_t)A.size() && A[s].numel() > 0) return true;
        return false;
    }

    void add(const float* x, int64_t rows, int64_t in, float* y, int64_t out, const std::vector<int64_t>& slots) const {
        for (int64_t r = 0; r < rows && r < (int64_t)slots.size(); r++) {
            const int64_t s = slots[r];
            if (s < 0 || s >= (int64_t)A.size() || A[s].numel() == 0) continue;
            const int64_t R = A[s].size(0);
            const float* a = A[s].data_ptr<float>();
            const float* bs = Bs[s].data_ptr<float>();
            const float* xr = x + r * in;
            float* yr = y + r * out;
            for (int64_t i = 0; i < R; i++) {
                const float* ai = a + i * in;
                float lanes[16] = {0};
                int64_t k = 0;
                for (; k + 16 <= in; k += 16)
                    for (int j = 0; j < 16; j++) lanes[j] += ai[k + j] * xr[k + j];
                float t = 0;
                for (int j = 0; j < 16; j++) t += lanes[j];
                for (; k < in; k++) t += ai[k] * xr[k];
                const float* bi = bs + i * out;
                for (int64_t o = 0; o < out; o++) yr[o] += t * bi[o];
            }
        }
    }
};

// Block.forward of model/decoder.py for one token per row, each row with its own cache (the arguments
// of decode_attention_list): cpu/fused.py's FastBlock builds one per layer and calls it once per decode step,
// instead of ~15 Python-level module calls and kernel launches.
struct DecodeLayer {
    QWeight q, k, v, o, gate, up, down;
    torch::Tensor in_norm, post_attn_norm, pre_ffw_norm, post_ffw_norm;  // w (rms_norm_rows adds 1)
    torch::Tensor q_norm, k_norm;                                         // w (qk_norm_rope adds 1)
    int64_t Hq, Hk, D, window;
    double scale, eps;
    LoRA lora[7];  // q, k, v, o, gate, up, down (set_lora); `adapters` routes each row to a slot (-1: none)

    void set_lora(int64_t which, std::vector<torch::Tensor> A, std::vector<torch::Tensor> Bs) {
        TORCH_CHECK(which >= 0 && which < 7 && A.size() == Bs.size(), "set_lora: projection 0..6, one Bs per A");
        lora[which] = {A, Bs};
    }

    torch::Tensor forward(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, std::vector<torch::Tensor> keys,
                          std::vector<torch::Tensor> values, std::vector<torch::Tensor> k_scales,
                          std::vector<torch::Tensor> v_scales, std::vector<torch::Tensor> key_pos,
                          std::vector<int64_t> slots, std::vector<int64_t> positions,
                          std::vector<int64_t> adapters) const {
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
            lora[0].add(h.data_ptr<float>(), B, d, qt.data_ptr<float>(), Hq * D, adapters);
            lora[1].add(h.data_ptr<float>(), B, d, kt.data_ptr<float>(), Hk * D, adapters);
            lora[2].add(h.data_ptr<float>(), B, d, vt.data_ptr<float>(), Hk * D, adapters);
            auto qk = qk_norm_rope(qt.view({B, Hq, D}), kt.view({B, Hk, D}), q_norm, k_norm, cos, sin, eps);
            auto att = decode_attention_list(qk[0], qk[1], vt.view({B, Hk, D}), keys, values, k_scales, v_scales,
                                             key_pos, slots, positions, window, scale);
            Acts att_acts(att.data_ptr<float>(), B, Hq * D);
            matmul_acts(att_acts, {o.product(B, op)});
            lora[3].add(att.data_ptr<float>(), B, Hq * D, op, d, adapters);
        }
        // x += post_attn_norm(o); h = pre_ffw_norm(x)
        auto x1 = torch::empty({B, d}, torch::kFloat32);
        rms_norm_rows(op, post_attn_norm.data_ptr<float>(), e, B, d, x1.data_ptr<float>(), x.data_ptr<float>());
        rms_norm_rows(x1.data_ptr<float>(), pre_ffw_norm.data_ptr<float>(), e, B, d, h.data_ptr<float>());
        auto m = lora[4].adapts(adapters) || lora[5].adapts(adapters) || lora[6].adapts(adapters)
                     ? adapted_mlp(h, adapters)
                     : mlp(h, gate.bytes(B), gate.kind(B), up.bytes(B), up.kind(B), down.bytes(B), down.kind(B), F, d);
        auto out = torch::empty({B, d}, torch::kFloat32);
        rms_norm_rows(m.data_ptr<float>(), post_ffw_norm.data_ptr<float>(), e, B, d, out.data_ptr<float>(),
                      x1.data_ptr<float>());
        return out;
    }

    // mlp() with the adapters' paths added to gate, up and down (the same products and GELU).
    torch::Tensor adapted_mlp(const torch::Tensor& h, const std::vector<int64_t>& adapters) const {
        const int64_t B = h.size(0), d = h.size(1), F = gate.N;
        Acts acts(h.data_ptr<float>(), B, d);
        auto gu = torch::empty({2, B, F}, torch::kFloat32);
        float* g = gu.data_ptr<float>();
        float* u = g + B * F;
        matmul_acts(acts, {gate.product(B, g), up.product(B, u)});
        lora[4].add(h.data_ptr<float>(), B, d, g, F, adapters);
        lora[5].add(h.data_ptr<float>(), B, d, u, F, adapters);
        gelu_mul(g, u, B * F);
        Acts hidden(g, B, F);
        auto y = torch::empty({B, down.N}, torch::kFloat32);
        matmul_acts(hidden, {down.product(B, y.data_ptr<float>())});
        lora[6].add(g, B, F, y.data_ptr<float>(), down.N, adapters);
        return y;
    }
};

// A whole one-token step for one sequence, holding that sequence's cache tensors (built once per
// cache by cpu/fused.py (FastGemma3)): the embedding lookup, every layer, the final norm and the LM head
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
    double embed_scale;      // sqrt(d) rounded to fp32, as Gemma3.embed does
    torch::Tensor out_norm;  // the final norm's w
    double eps;
    int64_t adapter;         // the cache's adapter slot (DecodeLayer::lora), -1: none

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
                                  {ring ? pos % windows[i] : pos}, {pos}, {adapter});
        }
        auto h = torch::empty({1, d}, torch::kFloat32);
        rms_norm_rows(x.data_ptr<float>(), out_norm.data_ptr<float>(), (float)eps, 1, d, h.data_ptr<float>());
        return h;
    }
};
