"""KV cache owned by the caller (SPEC §4).

Local (sliding-window) layers keep a ring buffer of exactly `window` slots; global layers keep a
buffer that grows in chunks as the context fills, up to `max_len`. Keys are stored after RoPE, so
the order of slots inside the ring does not matter to attention: each slot carries its absolute
position and the mask is derived from positions alone.

Storage dtype is independent of the compute dtype: fp32, bf16, or int8 with one scale per
(token, head) — "per-token per-head" quantization, the usual choice for KV caches.
"""

from __future__ import annotations

import torch

from .config import LOCAL, Gemma3Config

GROW_CHUNK = 1024  # global buffers grow by this many slots, so short prompts stay small
KV_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}


class Slots:
    """K or V storage [batch, heads, slots, head_dim] in the storage dtype."""

    def __init__(self, batch, heads, size, head_dim, store_dtype, compute_dtype, device):
        self.compute_dtype = compute_dtype
        self.data = torch.zeros(batch, heads, size, head_dim, dtype=store_dtype, device=device)
        self.scale = (torch.zeros(batch, heads, size, 1, dtype=torch.float32, device=device)
                      if store_dtype == torch.int8 else None)

    @property
    def size(self):
        return self.data.shape[2]

    def write(self, slots: torch.Tensor, x: torch.Tensor):
        if self.scale is None:
            self.data.index_copy_(2, slots, x.to(self.data.dtype))
            return
        scale = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127.0
        self.data.index_copy_(2, slots, torch.round(x.float() / scale).to(torch.int8))
        self.scale.index_copy_(2, slots, scale)

    def read(self, n: int | None = None) -> torch.Tensor:
        data = self.data if n is None else self.data[:, :, :n]
        if self.scale is None:
            return data.to(self.compute_dtype)
        scale = self.scale if n is None else self.scale[:, :, :n]
        return (data.to(torch.float32) * scale).to(self.compute_dtype)

    def resize(self, size: int, keep: int):
        """New storage of `size` slots holding the first `keep` slots of the old one."""
        new = Slots.__new__(Slots)
        new.compute_dtype = self.compute_dtype
        b, h, _, d = self.data.shape
        new.data = self.data.new_zeros(b, h, size, d)
        new.data[:, :, :keep] = self.data[:, :, :keep]
        new.scale = None
        if self.scale is not None:
            new.scale = self.scale.new_zeros(b, h, size, 1)
            new.scale[:, :, :keep] = self.scale[:, :, :keep]
        return new

    def clone(self):
        return self.resize(self.size, self.size)

    def nbytes(self):
        return self.data.nbytes + (self.scale.nbytes if self.scale is not None else 0)


class RingKV:
    """Sliding-window layer: `window` slots; position p lives in slot p % window."""

    def __init__(self, batch, heads, head_dim, window, store_dtype, compute_dtype, device):
        self.window = window
        self.k = Slots(batch, heads, window, head_dim, store_dtype, compute_dtype, device)
        self.v = Slots(batch, heads, window, head_dim, store_dtype, compute_dtype, device)
        self.pos = torch.full((window,), -1, dtype=torch.long, device=device)  # -1 = empty slot

    def update(self, k, v, positions):
        """Returns keys/values/positions to attend over (ring contents + the new chunk), then
        stores the newest `window` entries of the chunk in the ring."""
        k_all = torch.cat([self.k.read(), k], dim=2)
        v_all = torch.cat([self.v.read(), v], dim=2)
        pos_all = torch.cat([self.pos, positions])
        keep = positions[-self.window:]
        n = keep.numel()
        slots = keep % self.window
        self.k.write(slots, k[:, :, -n:])
        self.v.write(slots, v[:, :, -n:])
        self.pos.index_copy_(0, slots, keep)
        return k_all, v_all, pos_all

    def clone(self):
        new = RingKV.__new__(RingKV)
        new.window, new.k, new.v, new.pos = self.window, self.k.clone(), self.v.clone(), self.pos.clone()
        return new

    def nbytes(self):
        return self.k.nbytes() + self.v.nbytes()


class LinearKV:
    """Global layer: every position, in order; storage grows in GROW_CHUNK steps up to max_len."""

    def __init__(self, batch, heads, head_dim, max_len, store_dtype, compute_dtype, device):
        self.max_len = max_len
        self.k = Slots(batch, heads, 0, head_dim, store_dtype, compute_dtype, device)
        self.v = Slots(batch, heads, 0, head_dim, store_dtype, compute_dtype, device)
        self.length = 0

    def reserve(self, needed):
        if needed > self.k.size:
            size = min(self.max_len, -(-needed // GROW_CHUNK) * GROW_CHUNK)
            self.k, self.v = self.k.resize(size, self.length), self.v.resize(size, self.length)

    def append(self, k, v):
        """Stores the chunk's keys/values after the ones already held (no read back)."""
        start, n = self.length, k.shape[2]
        self.reserve(start + n)
        slots = torch.arange(start, start + n, device=k.device)
        self.k.write(slots, k)
        self.v.write(slots, v)
        self.length = start + n

    def update(self, k, v, positions):
        self.append(k, v)
        pos_all = torch.arange(self.length, device=positions.device)
        return self.k.read(self.length), self.v.read(self.length), pos_all

    def truncated(self, length: int, max_len: int):
        """A copy holding the first `length` positions, able to grow to `max_len`."""
        new = LinearKV.__new__(LinearKV)
        new.max_len, new.length = max_len, length
        size = min(max_len, -(-max(length, 1) // GROW_CHUNK) * GROW_CHUNK)
        new.k, new.v = self.k.resize(size, length), self.v.resize(size, length)
        return new

    def nbytes(self):
        return self.k.nbytes() + self.v.nbytes()


class KVCache:
    """One entry per layer plus the number of tokens already seen (`pos`)."""

    def __init__(self, config: Gemma3Config, batch_size: int = 1, max_len: int | None = None,
                 dtype=torch.float32, device="cpu", kv_dtype: str | torch.dtype | None = None):
        self.max_len = max_len or config.max_context
        store = KV_DTYPES[kv_dtype] if isinstance(kv_dtype, str) else (kv_dtype or dtype)
        args = (batch_size, config.num_kv_heads, config.head_dim)
        self.layers = [
            RingKV(*args, min(config.sliding_window, self.max_len), store, dtype, device) if t == LOCAL
            else LinearKV(*args, self.max_len, store, dtype, device)
            for t in config.layer_types
        ]
        self.pos = 0

    def nbytes(self) -> int:
        """Bytes of K/V storage currently allocated (measured, not estimated)."""
        return sum(layer.nbytes() for layer in self.layers)
