"""Tiny random Gemma 3 models for logic tests."""

import torch

from gemma3.model.config import Gemma3Config, layer_pattern
from gemma3.model.decoder import Gemma3


def tiny_config(layers=7, local_per_global=5, heads=4, kv_heads=2, head_dim=16, hidden=64, window=8,
                qscalar=None, rope_scale=1.0, vocab=257, ctx=4096) -> Gemma3Config:
    return Gemma3Config(
        vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, intermediate_size=2 * hidden, sliding_window=window, max_context=ctx,
        layer_types=layer_pattern(layers, local_per_global),
        query_pre_attn_scalar=int(qscalar or head_dim), rope_global_scale=rope_scale, name="tiny",
    )


def random_model(cfg: Gemma3Config, seed=0, dtype=torch.float32) -> Gemma3:
    """Random weights with non-trivial norms (zero-centred weights would hide a (1 + w) bug)."""
    torch.manual_seed(seed)
    model = Gemma3(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.08))
    return model.to(dtype).eval()
