// Matrix multiplies that read GGUF weight blocks directly (no full dequantized copy of the model).
//
// Two paths, both checked against the pure-PyTorch reference in cpu/linear.py:
// - `qmatmul`: few activation rows (decode). Activations are quantized per block of 32 to int16
//   with an fp32 scale (~2^-15 relative error: logits match the fp32 reference to ~1e-4, where
//   llama.cpp's int8 activations cost a few percent). Each weight sub-block of 32 is decoded to 32
//   int8 q with value = s * q - min, widened to int16 and multiplied with AVX-512 VNNI vpdpwssd
//   (int16 pairs -> int32): one instruction per 32 weights, the weights read once from memory.
// - `bf16_linear`: many rows (prefill). A tile of weight rows is dequantized to bf16 and multiplied
//   with oneMKL's cblas_gemm_bf16bf16f32 (AMX/AVX512-BF16, fp32 accumulation and output).
// `dequant` exposes the block decoders themselves (bit-exact with formats/ggml.py in fp32).
//
// One translation unit (a "unity" build): the responsibility headers below are included here in
// dependency order and this is the only file compiled, so the compiler sees all kernels at once
// (the same inlining and code as one big file, one ~30 s build). Each header also includes the
// ones it builds on. kernels/__init__.py compiles this file alone and hashes every header into
// the build cache key.
#include "common.h"
#include "formats.h"
#include "dot_tiles.h"
#include "interleaved.h"
#include "dequant.h"
#include "argmax.h"
#include "matmul.h"
#include "memory.h"
#include "repack.h"
#include "norms.h"
#include "attention.h"
#include "decode_step.h"
#include "tokenizer.h"

// The kernels release the GIL: a server's event loop thread keeps running while the engine thread
// is inside a long matmul, instead of both taking turns at Python's switch interval.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    const auto nogil = py::call_guard<py::gil_scoped_release>();
    py::class_<SpmVocab>(m, "SpmVocab", "a SentencePiece-BPE vocabulary for encode() without the GIL")
        .def(py::init<const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, std::vector<int64_t>>(),
             py::arg("blob"), py::arg("offsets"), py::arg("scores"), py::arg("byte_ids"))
        .def("id_of", &SpmVocab::id_of, "id of a piece's UTF-8 text (the last of duplicates), -1 if none")
        .def("encode", &SpmVocab::encode, "token ids of one escaped text fragment", nogil);
    py::class_<TextSet>(m, "TextSet", "a set of texts (special tokens) to find in a text without the GIL")
        .def(py::init<const std::vector<std::string>&>(), py::arg("texts"))
        .def("occurring", &TextSet::occurring, "indices of the texts occurring in a text, ascending", nogil);
    m.def("argmax_rows", &argmax_rows, "index of each row's largest value (first on ties, NaN first), as torch.max(dim)", nogil);
    m.def("qmatmul", &qmatmul, "x @ W^T with W in GGUF blocks or a repacked layout, int16 activations (int8 for interleaved weights with int8=True)",
          nogil, py::arg("x"), py::arg("w"), py::arg("type"), py::arg("N"), py::arg("int8") = false);
    m.def("qmatmul_many", &qmatmul_many, "several x @ W^T sharing one activation quantization", nogil);
    m.def("gelu_mul_", &gelu_mul_, "g = gelu_tanh(g) * u in place (float32, contiguous)", nogil);
    m.def("mlp", &mlp, "down(gelu_tanh(gate(x)) * up(x)) with GGUF weights", nogil);
    m.def("dequant", &dequant, "GGUF blocks -> float32/bfloat16 rows", nogil);
    m.def("lookup", &lookup, "rows `ids` of a table (any layout) -> float32 rows: embedding lookups", nogil);
    m.def("repack_q5_0", &repack_q5_0, "Q5_0 rows -> Q5_0R rows (four blocks per group, for one-row products)", nogil, py::arg("w"), py::arg("N"),
          py::arg("K"), py::arg("out") = py::none());
    m.def("repack_q4_0x", &repack_q4_0x, "Q4_0 rows -> Q4_0X (16 rows interleaved, for few-row products)", nogil, py::arg("w"),
          py::arg("N"), py::arg("K"), py::arg("out") = py::none());
    m.def("repack_q5_0x", &repack_q5_0x, "Q5_0 rows -> Q5_0X (16 rows interleaved, for few-row products)", nogil, py::arg("w"),
          py::arg("N"), py::arg("K"), py::arg("out") = py::none());
    m.def("repack_q8_0x", &repack_q8_0x, "Q8_0 rows -> Q8_0X (16 rows interleaved, for few-row products)", nogil, py::arg("w"),
          py::arg("N"), py::arg("K"), py::arg("out") = py::none());
    m.def("repack_q4_kx", &repack_q4_kx, "Q4_K rows -> Q4_KX (16 rows interleaved, for few-row products)", nogil, py::arg("w"),
          py::arg("N"), py::arg("K"), py::arg("out") = py::none());
    m.def("repack_q6_kx", &repack_q6_kx, "Q6_K rows -> Q6_KX (16 rows interleaved, for few-row products)", nogil, py::arg("w"),
          py::arg("N"), py::arg("K"), py::arg("out") = py::none());
    m.def("repack_q4_0", &repack_q4_0, "Q4_0 rows -> Q4_0R rows (four blocks per group, for one-row products)", nogil, py::arg("w"), py::arg("N"),
          py::arg("K"), py::arg("out") = py::none());
    m.def("repack_q8_0", &repack_q8_0, "Q8_0 rows -> Q8_0R rows (four blocks per group, for one-row products)", nogil, py::arg("w"), py::arg("N"),
          py::arg("K"), py::arg("out") = py::none());
    m.def("huge_empty", &huge_empty, "uninitialised uint8 bytes on transparent 2 MB pages where the OS gives them", nogil);
    m.def("layout_row_bytes", &layout_row_bytes, "bytes per row of K values in a GGML or repacked layout");
    m.def("map_file", &map_file, "an open file's first bytes as uint8 on a 2 MB boundary, shared or private", nogil);
    m.def("remap_private", &remap_private, "a shared map_file tensor's file mapped again over it, private", nogil);
    m.def("drop_file_pages", &drop_file_pages, "madvise(DONTNEED) a tensor read once from a private file mapping", nogil);
    m.def("repack_q4_k", &repack_q4_k, "Q4_K rows -> Q4_KR rows (half super-blocks, for one-row products)", nogil, py::arg("w"), py::arg("N"),
          py::arg("K"), py::arg("out") = py::none());
    m.def("repack_q6_k", &repack_q6_k, "Q6_K rows -> Q6_KR rows (half super-blocks, for one-row products)", nogil, py::arg("w"), py::arg("N"),
          py::arg("K"), py::arg("out") = py::none());
    m.def("bf16_linear", &bf16_linear, "x @ W^T with W dequantized to bf16 tile by tile (oneMKL GEMM)", nogil);
    m.def("rms_norm", &rms_norm, "Gemma's RMSNorm, scaled by (1 + w)", nogil);
    m.def("qk_norm_rope", &qk_norm_rope, "QK-norm (1 + w) and RoPE for one position (shared or per row)", nogil);
    m.def("decode_attention_list", &decode_attention_list,
          "decode attention for B sequences with their own caches (stores the new K/V first)", nogil);
    m.def("decode_attention", &decode_attention, "attention of one query token per row over a KV cache (fp32/bf16/int8)",
          nogil, py::arg("q"), py::arg("keys"), py::arg("values"), py::arg("key_pos"), py::arg("pos"),
          py::arg("window"), py::arg("scale"), py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none());
    py::class_<QWeight>(m, "QWeight")
        .def(py::init<torch::Tensor, int64_t, int64_t, c10::optional<torch::Tensor>, int64_t>());
    py::class_<DecodeLayer>(m, "DecodeLayer")
        .def(py::init<QWeight, QWeight, QWeight, QWeight, QWeight, QWeight, QWeight, torch::Tensor, torch::Tensor,
                      torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t, int64_t, int64_t,
                      double, double>())
        .def("forward", &DecodeLayer::forward, "Block.forward for one token per row, each row with its own cache",
             nogil)
        .def("set_lora", &DecodeLayer::set_lora, "LoRA adapters of projection 0..6 (q k v o gate up down), by slot");
    py::class_<DecodeStack>(m, "DecodeStack")
        .def(py::init<std::vector<DecodeLayer>, std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                      std::vector<c10::optional<torch::Tensor>>, std::vector<c10::optional<torch::Tensor>>,
                      std::vector<c10::optional<torch::Tensor>>, std::vector<int64_t>, QWeight, double, torch::Tensor,
                      double, int64_t>())
        .def("step", &DecodeStack::step, "a one-token step over the held cache: embedding, layers, final norm (and LM head)",
             nogil)
        .def("next_token", &DecodeStack::next_token, "the step's greedy next token (argmax inside the LM head)", nogil);
}
