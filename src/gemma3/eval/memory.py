"""`gemma3 memory`'s measurements beside the formulas of model/memory.py: the KV bytes a model's cache
really holds after a prompt, and KV memory against context length (the report's Figs. 5/6)."""

from __future__ import annotations

import torch

from ..model.memory import PRESETS, kv_bytes_full, kv_bytes_windowed


def measure_kv(model, ctx: int, kv_dtype: str | None) -> int:
    """Bytes of K/V storage a `ctx`-token prompt (random token ids) leaves in a fresh cache."""
    cache = model.new_cache(1, max_len=ctx, kv_dtype=kv_dtype)
    ids = torch.randint(3, model.config.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model.forward_hidden(ids, cache)
    return cache.nbytes()


def plot_kv_vs_context(path, models=("1b", "4b", "12b", "27b"), dtype="bf16"):
    """Paper Fig. 5/6: KV memory vs context length, global-only vs the 5:1 interleave."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctxs = [1024 * 2 ** i for i in range(8)]  # 1K … 128K
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(models):
        cfg = PRESETS[name]
        color = f"C{i}"
        ax.plot([c / 1024 for c in ctxs], [kv_bytes_full(cfg, c, dtype) / 2**30 for c in ctxs],
                color=color, linestyle="--", marker="o", label=f"{name} global only")
        ax.plot([c / 1024 for c in ctxs], [kv_bytes_windowed(cfg, c, dtype) / 2**30 for c in ctxs],
                color=color, marker="s", label=f"{name} 5:1, window {cfg.sliding_window}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (K tokens)")
    ax.set_ylabel(f"KV cache (GiB, {dtype})")
    ax.set_title("KV cache memory vs context (Gemma 3 Fig. 5/6)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
