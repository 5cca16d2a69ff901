"""KV cache owned by the caller (SPEC §4).

Local (sliding-window) layers keep a ring buffer of exactly `window` slots; global layers keep a
buffer that grows in chunks as the context fills, up to `max_len`. Keys are stored after RoPE, so
the order of slots inside the ring does not matter to attention: each slot carries its absolute
position and the mask is derived from positions alone.
"""

from __future__ import annotations

import torch

from .config import LOCAL, Gemma3Config

GROW_CHUNK = 1024  # global buffers grow by this many slots, so short prompts stay small


class RingKV:
    """Sliding-window layer: `window` slots; position p lives in slot p % window."""

    def __init__(self, batch, heads, head_dim, window, dtype, device):
        self.window = window
        self.k = torch.zeros(batch, heads, window, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((window,), -1, dtype=torch.long, device=device)  # -1 = empty slot

    def update(self, k, v, positions):
        """Returns keys/values/positions to attend over (ring contents + the new chunk), then
        stores the newest `window` entries of the chunk in the ring."""
        k_all = torch.cat([self.k, k], dim=2)
        v_all = torch.cat([self.v, v], dim=2)
        pos_all = torch.cat([self.pos, positions])
        keep = positions[-self.window:]
        slots = keep % self.window
        n = keep.numel()
        self.k.index_copy_(2, slots, k[:, :, -n:])
        self.v.index_copy_(2, slots, v[:, :, -n:])
        self.pos.index_copy_(0, slots, keep)
        return k_all, v_all, pos_all

    def nbytes(self):
        return self.k.nbytes + self.v.nbytes


class LinearKV:
    """Global layer: every position, in order; storage grows in GROW_CHUNK steps up to max_len."""

    def __init__(self, batch, heads, head_dim, max_len, dtype, device):
        self.max_len = max_len
        self.shape = (batch, heads, 0, head_dim)
        self.k = torch.zeros(self.shape, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def _reserve(self, needed):
        if needed <= self.k.shape[2]:
            return
        size = min(self.max_len, -(-needed // GROW_CHUNK) * GROW_CHUNK)
        b, h, _, d = self.shape
        k = self.k.new_zeros(b, h, size, d)
        v = self.v.new_zeros(b, h, size, d)
        k[:, :, : self.length] = self.k[:, :, : self.length]
        v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v

    def update(self, k, v, positions):
        start, n = self.length, k.shape[2]
        self._reserve(start + n)
        self.k[:, :, start : start + n] = k
        self.v[:, :, start : start + n] = v
        self.length = start + n
        pos_all = torch.arange(self.length, device=positions.device)
        return self.k[:, :, : self.length], self.v[:, :, : self.length], pos_all

    def nbytes(self):
        return self.k.nbytes + self.v.nbytes


class KVCache:
    """One entry per layer plus the number of tokens already seen (`pos`)."""

    def __init__(self, config: Gemma3Config, batch_size: int = 1, max_len: int | None = None,
                 dtype=torch.float32, device="cpu"):
        self.max_len = max_len or config.max_context
        args = (batch_size, config.num_kv_heads, config.head_dim)
        self.layers = [
            RingKV(*args, min(config.sliding_window, self.max_len), dtype, device) if t == LOCAL
            else LinearKV(*args, self.max_len, dtype, device)
            for t in config.layer_types
        ]
        self.pos = 0

    def nbytes(self) -> int:
        """Bytes of K/V storage currently allocated (measured, not estimated)."""
        return sum(layer.nbytes() for layer in self.layers)
