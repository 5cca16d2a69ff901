"""Memory model of the paper's Table 3 and of our KV cache.

The report's "+KV" column assumes a full-length cache on every layer (bf16, 32,768 tokens, GB =
1e9 bytes). Gemma 3's own design needs far less: local layers hold only `window` tokens. Both are
computed here from the configs, next to what llama.cpp allocates by default (a full-length f16
cache on every layer, sliding-window layers included).
"""

from __future__ import annotations

import math

from .cache import GROW_CHUNK
from .config import PRESETS, Gemma3Config

# SigLIP-So400m encoder + projector, frozen and shared by the multimodal 4B/12B/27B (report Table 1).
VISION_PARAMS = 417_000_000

# Bytes per parameter of each weight format. int4 blocks of 32 carry one fp16 scale per block
# (18 bytes / 32 weights, the Q4_0 layout); per-channel int4 scales are negligible.
FORMAT_BYTES = {"bf16": 2.0, "int4": 0.5, "int4-b32": 18 / 32, "sfp8": 1.0}

# The report's Table 3 (GB): weights alone and weights + KV cache at 32,768 tokens.
PAPER_TABLE3 = {
    "1b": {"bf16": (2.0, 2.9), "int4": (0.5, 1.4), "int4-b32": (0.7, 1.6), "sfp8": (1.0, 1.9)},
    "4b": {"bf16": (8.0, 12.7), "int4": (2.6, 7.3), "int4-b32": (2.9, 7.6), "sfp8": (4.4, 9.1)},
    "12b": {"bf16": (24.0, 38.9), "int4": (6.6, 21.5), "int4-b32": (7.1, 22.0), "sfp8": (12.4, 27.3)},
    "27b": {"bf16": (54.0, 72.7), "int4": (14.1, 32.8), "int4-b32": (15.3, 34.0), "sfp8": (27.4, 46.1)},
}
PAPER_CTX = 32_768

KV_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "f16": 2, "int8": 1}


def total_params(cfg: Gemma3Config, multimodal: bool) -> int:
    return cfg.num_params() + (VISION_PARAMS if multimodal else 0)


def weight_bytes(cfg: Gemma3Config, fmt: str, multimodal: bool) -> float:
    return total_params(cfg, multimodal) * FORMAT_BYTES[fmt]


def kv_token_bytes(cfg: Gemma3Config, dtype: str = "bf16") -> int:
    """K and V of one token in one layer; int8 adds one fp32 scale per token, head and K/V."""
    per = 2 * cfg.num_kv_heads * cfg.head_dim * KV_DTYPE_BYTES[dtype]
    if dtype == "int8":
        per += 2 * cfg.num_kv_heads * 4
    return per


def kv_bytes_full(cfg: Gemma3Config, ctx: int, dtype: str = "bf16") -> int:
    """Full-length cache on every layer: the paper's Table 3 assumption (and llama.cpp's default)."""
    return cfg.num_layers * ctx * kv_token_bytes(cfg, dtype)


def kv_bytes_windowed(cfg: Gemma3Config, ctx: int, dtype: str = "bf16") -> int:
    """What Gemma 3 needs: `window` slots on local layers, `ctx` on global ones."""
    local = len(cfg.local_layers) * min(cfg.sliding_window, ctx)
    return (local + len(cfg.global_layers) * ctx) * kv_token_bytes(cfg, dtype)


def kv_bytes_planned(cfg: Gemma3Config, tokens: int, max_len: int, dtype: str = "bf16") -> int:
    """Exactly what `KVCache` allocates after `tokens` tokens: rings of min(window, max_len) slots,
    global buffers grown in GROW_CHUNK steps up to max_len."""
    ring = min(cfg.sliding_window, max_len)
    grown = min(max_len, math.ceil(tokens / GROW_CHUNK) * GROW_CHUNK)
    return (len(cfg.local_layers) * ring + len(cfg.global_layers) * grown) * kv_token_bytes(cfg, dtype)


def kv_bytes_llama_cpp_default(cfg: Gemma3Config, ctx: int) -> int:
    """llama.cpp's default: an f16 cache of n_ctx cells on every layer (its SWA cache is full size)."""
    return kv_bytes_full(cfg, ctx, "f16")


def table3() -> list[dict]:
    """Our Table 3 beside the paper's. Weights include the vision encoder for 4B+ (the report's
    sizes are of the multimodal checkpoints); KV follows the paper's full-length assumption, and
    `kv_windowed_gb` is what a window-sized cache really needs."""
    rows = []
    for name, paper in PAPER_TABLE3.items():
        cfg = PRESETS[name]
        multimodal = name != "1b"
        kv_full = kv_bytes_full(cfg, PAPER_CTX) / 1e9
        kv_win = kv_bytes_windowed(cfg, PAPER_CTX) / 1e9
        for fmt, (p_w, p_kv) in paper.items():
            w = weight_bytes(cfg, fmt, multimodal) / 1e9
            rows.append({
                "model": name, "format": fmt,
                "weights_gb": w, "paper_weights_gb": p_w, "weights_rel_diff": w / p_w - 1,
                "with_kv_gb": w + kv_full, "paper_with_kv_gb": p_kv, "with_kv_rel_diff": (w + kv_full) / p_kv - 1,
                "kv_full_gb": kv_full, "kv_windowed_gb": kv_win, "with_windowed_kv_gb": w + kv_win,
            })
    return rows


# Kept free on each device for what the plan does not count: the CUDA context and cuBLAS/NCCL
# workspaces (~1-2 GiB), activations of one prefill chunk, allocator fragmentation.
DEVICE_RESERVE = 0.10


def tp_plan(cfg: Gemma3Config, world: int, ctx: int, fmt: str = "bf16", kv_dtype: str = "bf16",
            device_gib: float | None = None) -> dict:
    """Per-rank memory of tensor-parallel inference (tp.py) for one sequence of `ctx` tokens:
    the rank's weight shard (its heads, MLP slice and vocabulary slice; norms replicated) and its
    window-sized KV cache (its KV heads, or the replicated one), and whether that fits a device of
    `device_gib` GiB with DEVICE_RESERVE of it kept free, and how many such sequences would (each
    its own cache, as the server keeps them). Text decoder only (TP runs no vision)."""
    from .tp import Shard

    shard = Shard.plan(cfg, world)
    local = shard.local_config(cfg).replace(vocab_size=shard.vocab)
    weights = local.num_params() * FORMAT_BYTES[fmt]
    kv = kv_bytes_windowed(local, ctx, kv_dtype)
    plan = {"model": cfg.name, "tp": world, "ctx": ctx, "format": fmt, "kv_dtype": kv_dtype,
            "heads_per_rank": shard.heads, "kv_heads_per_rank": shard.kv_heads, "kv_replicated": shard.kv_replicated,
            "weights_bytes_per_rank": weights, "kv_bytes_per_rank": kv, "total_bytes_per_rank": weights + kv}
    if device_gib is not None:
        usable = device_gib * 2**30 * (1 - DEVICE_RESERVE)
        plan |= {"device_gib": device_gib, "fits": weights + kv <= usable,
                 "sequences_that_fit": max(0, int((usable - weights) // kv))}
    return plan
