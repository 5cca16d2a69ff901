"""KV cache owned by the caller; every change to it goes through its own methods.

Local (sliding-window) layers keep a ring buffer of exactly `window` slots; global layers keep a
buffer that grows in chunks as the context fills, up to `max_len` (the report's 5:1 local:global design: only
global layers pay for the whole context). Keys are stored after RoPE, so the order of slots inside
the ring does not matter to attention: each slot carries its absolute position and the mask is
derived from positions alone.

Storage dtype is independent of the compute dtype: fp32, bf16, or int8 with one scale per
(token, head) — "per-token per-head" quantization, the usual choice for KV caches.

Who changes what (as mlx-lm's cache classes): the model appends a chunk (`LayerKV.update`) or one
token per row (`store`) and then moves the cache on (`KVCache.advance`); a backend whose kernels
write a token themselves asks for the slot and the storage first (`next_slot`, `view`) and records
the token afterwards (`commit`); the prefix cache copies and restores states (`snapshot`, `frozen`,
`resumed`); speculative decoding takes back rejected tokens (`mark`, `rewind`). Backend objects
tied to the storage (the CPU backend's one-call decode step) live in `backend_state`.
"""

from __future__ import annotations

import math
import mmap
from typing import Callable, NamedTuple

import torch

from .config import LOCAL, Gemma3Config

GROW_CHUNK = 1024  # global buffers grow by this many slots, so short prompts stay small
KV_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}


class KVView(NamedTuple):
    """A layer's storage as kernels read and write it: K/V [batch, heads, slots, head_dim] in the
    storage dtype, int8 scales [batch, heads, slots, 1] (None otherwise), and for a ring the
    position held by each slot ([window], -1 = empty; None for a global layer, whose slot i holds
    position i)."""

    keys: torch.Tensor
    values: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    ring_positions: torch.Tensor | None


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """torch.zeros, where a buffer of at least 256 kB in CPU memory comes from fresh anonymous
    pages: the OS hands those out zeroed and makes a page resident when it is first written, so a
    cache holds memory for the slots it has stored, not for the whole window and context at once
    (torch.zeros writes every byte: a 1B cache for 2304 tokens was ~31 MB resident before its
    first token). A page read before it is written maps the shared zero page: reads stay free.
    Freeing the tensor unmaps the buffer, which returns it to the OS at once."""
    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes < 1 << 18:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), dtype=dtype).view(shape)


class _Slots:
    """K or V storage [batch, heads, slots, head_dim] in the storage dtype."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor | None, compute_dtype):
        self.data, self.scale, self.compute_dtype = data, scale, compute_dtype

    @classmethod
    def empty(cls, batch, heads, size, head_dim, store_dtype, compute_dtype, device) -> "_Slots":
        data = _zeros((batch, heads, size, head_dim), store_dtype, device)
        scale = (_zeros((batch, heads, size, 1), torch.float32, device)
                 if store_dtype == torch.int8 else None)
        return cls(data, scale, compute_dtype)

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

    def resized(self, size: int, keep: int) -> "_Slots":
        """New storage of `size` slots holding the first `keep` slots of this one."""
        b, h, _, d = self.data.shape
        data = _zeros((b, h, size, d), self.data.dtype, self.data.device)
        data[:, :, :keep] = self.data[:, :, :keep]
        scale = None
        if self.scale is not None:
            scale = _zeros((b, h, size, 1), self.scale.dtype, self.scale.device)
            scale[:, :, :keep] = self.scale[:, :, :keep]
        return _Slots(data, scale, self.compute_dtype)

    def nbytes(self):
        return self.data.nbytes + (self.scale.nbytes if self.scale is not None else 0)


class RingKV:
    """Sliding-window layer: `window` slots; position p lives in slot p % window."""

    def __init__(self, k: _Slots, v: _Slots, positions: torch.Tensor):
        self._k, self._v, self._pos = k, v, positions

    @classmethod
    def empty(cls, batch, heads, head_dim, window, store_dtype, compute_dtype, device) -> "RingKV":
        slots = [_Slots.empty(batch, heads, window, head_dim, store_dtype, compute_dtype, device) for _ in "kv"]
        return cls(*slots, torch.full((window,), -1, dtype=torch.long, device=device))  # -1 = empty slot

    @property
    def window(self) -> int:
        return self._pos.numel()

    @property
    def positions(self) -> torch.Tensor:
        """The position each slot holds (-1 where empty); read-only by convention."""
        return self._pos

    @property
    def generation(self) -> int:
        return 0  # a ring never reallocates

    def update(self, k, v, positions):
        """Keys/values/positions to attend over (ring contents + the new chunk); then the newest
        `window` entries of the chunk are stored in the ring."""
        k_all = torch.cat([self._k.read(), k], dim=2)
        v_all = torch.cat([self._v.read(), v], dim=2)
        pos_all = torch.cat([self._pos, positions])
        self.store(k, v, positions)
        return k_all, v_all, pos_all

    def store(self, k, v, positions):
        """Stores the newest `window` entries of a chunk, without reading the ring back. A decode
        step may store its token before attending: the key it evicts is exactly one window behind,
        invisible to that query."""
        keep = positions[-self.window:]
        n = keep.numel()
        slots = keep % self.window
        self._k.write(slots, k[:, :, -n:])
        self._v.write(slots, v[:, :, -n:])
        self._pos.index_copy_(0, slots, keep)

    def key_positions(self) -> torch.Tensor:
        return self._pos

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot's keys and values in the compute dtype (empty slots are zeros)."""
        return self._k.read(), self._v.read()

    def view(self) -> KVView:
        return KVView(self._k.data, self._v.data, self._k.scale, self._v.scale, self._pos)

    def next_slot(self, position: int) -> int:
        return position % self.window

    def commit(self, n: int = 1):
        """A kernel stored tokens through view() (and recorded their positions in ring_positions)."""

    def saved(self, start: int, n: int) -> "RingKV":
        """A copy of the slots that positions start..start+n-1 will overwrite, for `restore`."""
        slots = torch.arange(start, start + n, device=self._pos.device) % self.window
        k, v = (_Slots(s.data[:, :, slots].clone(), None if s.scale is None else s.scale[:, :, slots].clone(),
                       s.compute_dtype) for s in (self._k, self._v))
        return RingKV(k, v, self._pos[slots].clone())

    def restore(self, saved: "RingKV", start: int, keep: int):
        """Puts back what `saved` (from saved(start, n)) held in the slots of positions start+keep
        onwards: a rejected token's slot held a key that later tokens still see."""
        n = saved.window
        if keep >= n:
            return
        slots = torch.arange(start + keep, start + n, device=self._pos.device) % self.window
        for mine, old in ((self._k, saved._k), (self._v, saved._v)):
            mine.data.index_copy_(2, slots, old.data[:, :, keep:])
            if mine.scale is not None:
                mine.scale.index_copy_(2, slots, old.scale[:, :, keep:])
        self._pos.index_copy_(0, slots, saved._pos[keep:])

    def forget(self):
        """Every slot empty again (the stale keys stay, masked as any empty slot is)."""
        self._pos.fill_(-1)

    def clone(self) -> "RingKV":
        k, v = (s.resized(s.size, s.size) for s in (self._k, self._v))
        return RingKV(k, v, self._pos.clone())

    def nbytes(self):
        return self._k.nbytes() + self._v.nbytes()

    @property
    def size(self) -> int:
        return self._k.size


class LinearKV:
    """Global layer: every position, in order; storage grows in GROW_CHUNK steps up to max_len."""

    def __init__(self, k: _Slots, v: _Slots, length: int, max_len: int):
        self._k, self._v, self._length, self._max_len = k, v, length, max_len
        self._generation = 0  # bumped whenever the storage is reallocated

    @classmethod
    def empty(cls, batch, heads, head_dim, max_len, store_dtype, compute_dtype, device) -> "LinearKV":
        slots = [_Slots.empty(batch, heads, 0, head_dim, store_dtype, compute_dtype, device) for _ in "kv"]
        return cls(*slots, 0, max_len)

    @property
    def length(self) -> int:
        return self._length

    @property
    def generation(self) -> int:
        return self._generation

    def reserve(self, needed: int):
        if needed > self._k.size:
            size = min(self._max_len, -(-needed // GROW_CHUNK) * GROW_CHUNK)
            self._k, self._v = self._k.resized(size, self._length), self._v.resized(size, self._length)
            self._generation += 1

    def store(self, k, v, positions=None):
        """Stores the chunk's keys/values after the ones already held (no read back)."""
        start, n = self._length, k.shape[2]
        self.reserve(start + n)
        slots = torch.arange(start, start + n, device=k.device)
        self._k.write(slots, k)
        self._v.write(slots, v)
        self._length = start + n

    def update(self, k, v, positions):
        self.store(k, v)
        return self._k.read(self._length), self._v.read(self._length), self.key_positions()

    def key_positions(self) -> torch.Tensor:
        return torch.arange(self._length, device=self._k.data.device)

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The held tokens' keys and values in the compute dtype."""
        return self._k.read(self._length), self._v.read(self._length)

    def view(self) -> KVView:
        return KVView(self._k.data, self._v.data, self._k.scale, self._v.scale, None)

    def next_slot(self, position: int) -> int:
        """The slot a kernel writes the token at `position` to (room reserved for it): slot i
        holds position i, so tokens of one sequence stored in one call take consecutive slots."""
        self.reserve(position + 1)
        return position

    def commit(self, n: int = 1):
        """A kernel stored `n` tokens through view() after the ones held."""
        self._length += n

    def rewind(self, length: int):
        """Forgets the positions from `length` on (their slots are written again later)."""
        self._length = min(self._length, length)

    def truncated(self, length: int, max_len: int) -> "LinearKV":
        """A copy holding the first `length` positions, able to grow to `max_len`."""
        size = min(max_len, -(-max(length, 1) // GROW_CHUNK) * GROW_CHUNK)
        return LinearKV(self._k.resized(size, length), self._v.resized(size, length), length, max_len)

    def nbytes(self):
        return self._k.nbytes() + self._v.nbytes()

    @property
    def size(self) -> int:
        return self._k.size


LayerKV = RingKV | LinearKV


class KVSnapshot(NamedTuple):
    """The ring layers of a cache at `pos` (global layers need no copy: truncating one to `pos`
    gives back its state there)."""

    pos: int
    rings: tuple[RingKV, ...]

    def nbytes(self) -> int:
        return sum(r.nbytes() for r in self.rings)


class KVMark(NamedTuple):
    """A cache's position and the ring slots the next tokens will overwrite (KVCache.mark)."""

    pos: int
    rings: tuple[RingKV, ...]


class KVCache:
    """One entry per layer plus the number of tokens already seen (`pos`)."""

    def __init__(self, layers: list[LayerKV], pos: int, max_len: int):
        self._layers, self._pos, self._max_len = tuple(layers), pos, max_len
        self._linear = [layer for layer in self._layers if isinstance(layer, LinearKV)]
        self._backend: dict[object, tuple[tuple[int, ...], object]] = {}
        self.adapter: int | None = None  # the LoRA adapter slot of its rows (model/adapters.py)

    @classmethod
    def empty(cls, config: Gemma3Config, batch_size: int = 1, max_len: int | None = None,
              dtype=torch.float32, device="cpu", kv_dtype: str | torch.dtype | None = None) -> "KVCache":
        max_len = max_len or config.max_context
        store = KV_DTYPES[kv_dtype] if isinstance(kv_dtype, str) else (kv_dtype or dtype)
        args = (batch_size, config.num_kv_heads, config.head_dim)
        layers = [RingKV.empty(*args, min(config.sliding_window, max_len), store, dtype, device) if t == LOCAL
                  else LinearKV.empty(*args, max_len, store, dtype, device) for t in config.layer_types]
        return cls(layers, 0, max_len)

    @property
    def layers(self) -> tuple[LayerKV, ...]:
        return self._layers

    @property
    def pos(self) -> int:
        return self._pos

    @property
    def max_len(self) -> int:
        return self._max_len

    def check_room(self, n: int):
        if self._pos + n > self._max_len:
            raise ValueError(f"context overflow: {self._pos + n} tokens > cache size {self._max_len}")

    def advance(self, n: int):
        """The layers hold `n` more tokens (the model stored them through update/store)."""
        self._pos += n

    def reserve_token(self):
        """Room for one more token in every layer, for a kernel that stores it itself (the slot of
        position `pos`: `pos % window` in a ring, `pos` in a global layer, which holds `pos` tokens)."""
        for layer in self._linear:
            layer.reserve(self._pos + 1)

    def commit(self):
        """Every layer holds the token a kernel stored through next_slots()/view()."""
        for layer in self._layers:
            layer.commit(1)
        self._pos += 1

    def backend_state(self, owner: object, build: Callable[["KVCache"], object] | None = None) -> object:
        """The object `owner` keeps with this cache (the CPU backend's one-call decode step holds
        the storage tensors): `build(self)`, built again whenever a layer's storage was reallocated
        (without `build`: what is held for the current storage, or None)."""
        key = tuple(layer.generation for layer in self._linear)
        held = self._backend.get(owner)
        if held is None or held[0] != key:
            if build is None:
                return None
            held = self._backend[owner] = (key, build(self))
        return held[1]

    def mark(self, n: int) -> KVMark:
        """What `rewind` needs to take back up to `n` tokens appended after this point (a
        speculative verify step): the ring slots they will overwrite."""
        if n > min((layer.window for layer in self._layers if isinstance(layer, RingKV)), default=n):
            raise ValueError(f"cannot take back {n} tokens: more than a ring holds")
        return KVMark(self._pos, tuple(l.saved(self._pos, n) for l in self._layers if isinstance(l, RingKV)))

    def rewind(self, mark: KVMark, keep: int):
        """Keeps the first `keep` tokens appended since `mark` and takes back the rest: global
        layers forget them, ring layers get back the keys they overwrote."""
        if not 0 <= keep <= self._pos - mark.pos:
            raise ValueError(f"cannot keep {keep} of the {self._pos - mark.pos} tokens appended since the mark")
        rings = iter(mark.rings)
        for layer in self._layers:
            if isinstance(layer, RingKV):
                layer.restore(next(rings), mark.pos, keep)
            else:
                layer.rewind(mark.pos + keep)
        self._pos = mark.pos + keep

    def clear(self):
        """Forgets every token and keeps the storage, as llama.cpp clears and reuses a context: its
        pages are already resident (a new cache's are made resident by their first write, ~6% of
        a 270M prefill of 512 tokens), and the slots are written again before they are read."""
        for layer in self._layers:
            if isinstance(layer, RingKV):
                layer.forget()
            else:
                layer.rewind(0)
        self._pos = 0

    def snapshot(self) -> KVSnapshot:
        return KVSnapshot(self._pos, tuple(layer.clone() for layer in self._layers if isinstance(layer, RingKV)))

    def frozen(self) -> "KVCache":
        """A copy of the state at `pos` (global layers cut to their length, able to grow no further)."""
        layers = [l.clone() if isinstance(l, RingKV) else l.truncated(l.length, l.length) for l in self._layers]
        return self._same_adapter(KVCache(layers, self._pos, self._max_len))

    def resumed(self, snapshot: KVSnapshot, max_len: int) -> "KVCache":
        """A new cache at `snapshot.pos`: rings from the snapshot, global layers from this cache
        (which must hold at least that many tokens) cut there, able to grow to `max_len`."""
        rings = iter(snapshot.rings)
        layers = [next(rings).clone() if isinstance(l, RingKV) else l.truncated(snapshot.pos, max_len)
                  for l in self._layers]
        return self._same_adapter(KVCache(layers, snapshot.pos, max_len))

    def _same_adapter(self, cache: "KVCache") -> "KVCache":
        return cache.use_adapter(self.adapter)  # keys computed under an adapter are only valid under it

    def use_adapter(self, slot: int | None) -> "KVCache":
        """Marks the rows of this cache as computed under LoRA adapter `slot` (None: the base)."""
        self.adapter = slot
        return self

    def nbytes(self) -> int:
        """Bytes of K/V storage currently allocated (measured, not estimated)."""
        return sum(layer.nbytes() for layer in self._layers)
