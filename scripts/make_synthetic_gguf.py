"""A random-weight Gemma 3 GGUF at a preset's exact shapes, quantized by llama.cpp's own quantizer.

Only the 270M has real weights here, so speed and memory at the sizes people run are measured on
files with the real tensor shapes and llama.cpp's own quant mix (Q4_K_M: mostly Q4_K and Q6_K at
4B; Q5_0/Q8_0/Q4_K/Q6_K with fallbacks at 1B):

    .venv/bin/python scripts/make_synthetic_gguf.py 4b OUT_DIR [--ftype Q4_K_M] [--llama-python PY]

The config is our preset's (gemma3.model.config), the tokenizer metadata is copied key for key
from the embedded 270M file (every size shares the vocabulary). Weights are N(0, 0.02), norms
stored as llama.cpp stores them (1 + w with w = 0): numerically meaningless, exact in shape and
type. The F16 intermediate is written one tensor at a time (12B: 24 GB of F16 never in memory)
and deleted afterwards unless --keep-f16. The quantizer runs under --llama-python (an interpreter
with llama-cpp-python; default this one).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFWriter

from gemma3.formats.checkpoint import ours_to_gguf
from gemma3.formats.gguf import read_gguf
from gemma3.inference.load import embedded_gguf_path
from gemma3.model.config import preset

QUANTIZE = """
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""


def write_f16(size: str, path: Path):
    cfg = preset(size)
    src = read_gguf(embedded_gguf_path())
    w = GGUFWriter(str(path), "gemma3")
    w.add_name(f"Gemma 3 {size} synthetic")
    w.add_context_length(cfg.max_context)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_global_base)
    w.add_sliding_window(cfg.sliding_window)
    if cfg.rope_global_scale != 1.0:
        w.add_string("gemma3.rope.scaling.type", "linear")
        w.add_float32("gemma3.rope.scaling.factor", cfg.rope_global_scale)
    md = src.metadata
    w.add_tokenizer_model(md["tokenizer.ggml.model"])
    w.add_tokenizer_pre(md["tokenizer.ggml.pre"])
    w.add_token_list(md["tokenizer.ggml.tokens"])
    w.add_token_scores(md["tokenizer.ggml.scores"])
    w.add_token_types(md["tokenizer.ggml.token_type"])
    for key, value in md.items():  # the special ids and flags, with their stored types
        if key.startswith("tokenizer.ggml.") and isinstance(value, (bool, int)):
            (w.add_bool if isinstance(value, bool) else w.add_uint32)(key, value)
    w.add_file_type(1)  # MOSTLY_F16
    # The embedded file's vocabulary (262,144) for every size: the 4B+ checkpoints pad theirs to
    # 262,208 for image tokens, which llama.cpp's text files do not carry either.
    shapes = {"embed_tokens.weight": (len(md["tokenizer.ggml.tokens"]), cfg.hidden_size), "norm.weight": (cfg.hidden_size,)}
    d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (cfg.num_heads * hd, d), p + "self_attn.k_proj.weight": (cfg.num_kv_heads * hd, d),
                   p + "self_attn.v_proj.weight": (cfg.num_kv_heads * hd, d), p + "self_attn.o_proj.weight": (d, cfg.num_heads * hd),
                   p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                   p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "pre_feedforward_layernorm.weight": (d,), p + "post_feedforward_layernorm.weight": (d,),
                   p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f)}
    for name, shape in shapes.items():  # declared first, then written one at a time
        dtype = np.dtype(np.float32 if len(shape) == 1 else np.float16)
        w.add_tensor_info(ours_to_gguf(name), shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for n, shape in enumerate(shapes.values()):
        if len(shape) == 1:
            w.write_tensor_data(np.ones(shape, dtype=np.float32))  # 1 + w, w = 0
        else:
            w.write_tensor_data((rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16))
        print(f"\r{n + 1}/{len(shapes)} tensors", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    w.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("size", choices=("1b", "4b", "12b", "27b"))
    ap.add_argument("out_dir")
    ap.add_argument("--ftype", default="Q4_K_M", help="llama.cpp file type (default Q4_K_M)")
    ap.add_argument("--llama-python", default=sys.executable, help="interpreter with llama-cpp-python")
    ap.add_argument("--keep-f16", action="store_true")
    args = ap.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    f16 = out_dir / f"gemma-3-{args.size}-synthetic-f16.gguf"
    out = out_dir / f"gemma-3-{args.size}-synthetic-{args.ftype.lower()}.gguf"
    if not f16.exists():
        write_f16(args.size, f16)
    rc = subprocess.run([args.llama_python, "-c", QUANTIZE, str(f16), str(out), args.ftype.upper()]).returncode
    if rc:
        sys.exit(f"llama.cpp's quantizer failed with code {rc}")
    if not args.keep_f16:
        f16.unlink()
    print(out)


if __name__ == "__main__":
    main()
