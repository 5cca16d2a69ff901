"""Prompt (prefix) caching that stays exact with sliding-window layers (SPEC §4).

A global layer's cache truncated to P tokens is exactly its state at P. A local layer's ring is
not: after the prompt it holds the *last* window, and the entries it overwrote cannot be
recomputed without re-running everything before them. So while a prompt is prefilled we snapshot
the rings at every `block` boundary; a later prompt that shares P tokens resumes from the last
boundary b <= P (global layers truncated to b, rings restored from the snapshot at b) and only
computes the tokens after b.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..model.cache import KVCache, RingKV


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    final: KVCache  # the cache after the whole prompt (global layers complete)
    rings: dict[int, list] = field(default_factory=dict)  # boundary -> cloned local layers

    def nbytes(self) -> int:
        return self.final.nbytes() + sum(r.nbytes() for rings in self.rings.values() for r in rings)


def _ring_snapshot(cache: KVCache) -> list[RingKV]:
    return [layer.clone() for layer in cache.layers if isinstance(layer, RingKV)]


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """LRU store of prefilled prompts for batch-1 caches of one model."""

    def __init__(self, model, max_bytes: int = 512 * 2**20, block: int | None = None, kv_dtype=None):
        self.model, self.max_bytes, self.kv_dtype = model, max_bytes, kv_dtype
        self.block = block or model.config.sliding_window
        self.entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self.hits = self.reused_tokens = 0

    def _restore(self, entry: _Entry, b: int, max_len: int) -> KVCache:
        cache = self.model.new_cache(1, max_len=max_len, kv_dtype=self.kv_dtype)
        rings = iter(entry.rings[b])
        for i, layer in enumerate(entry.final.layers):
            cache.layers[i] = next(rings).clone() if isinstance(layer, RingKV) else layer.truncated(b, max_len)
        cache.pos = b
        return cache

    def lookup(self, ids) -> tuple[_Entry | None, int]:
        """Best entry and resume boundary (< len(ids): the last token is always computed)."""
        best, best_b = None, 0
        for entry in self.entries.values():
            shared = min(_common_prefix(entry.tokens, ids), len(ids) - 1)
            b = max((x for x in entry.rings if x <= shared), default=0)
            if b > best_b:
                best, best_b = entry, b
        return best, best_b

    def prefill(self, ids, max_len: int) -> tuple[KVCache, torch.Tensor]:
        """A cache holding `ids` and the logits of the last token, reusing a stored prefix."""
        ids = list(ids)
        entry, b = self.lookup(ids)
        if entry is not None:
            self.entries.move_to_end(entry.tokens)
            self.hits += 1
            self.reused_tokens += b
            cache = self._restore(entry, b, max_len)
            rings = {x: r for x, r in entry.rings.items() if x <= b}
        else:
            cache, rings = self.model.new_cache(1, max_len=max_len, kv_dtype=self.kv_dtype), {}
        x = torch.tensor([ids])
        hidden = None
        with torch.inference_mode():
            while cache.pos < len(ids):
                end = min((cache.pos // self.block + 1) * self.block, len(ids))
                hidden = self.model.forward_hidden(x[:, cache.pos:end], cache)
                if end % self.block == 0 and end < len(ids):
                    rings[end] = _ring_snapshot(cache)
            logits = self.model.logits(hidden[:, -1:])[0, -1]
        self._store(_Entry(tuple(ids), cache, rings))
        return cache, logits

    def _store(self, entry: _Entry):
        # The stored cache is shared with the caller, who keeps decoding into it; keep a copy of
        # the state at the end of the prompt instead.
        final = KVCache.__new__(KVCache)
        final.max_len, final.pos = entry.final.max_len, entry.final.pos
        final.layers = [l.clone() if isinstance(l, RingKV) else l.truncated(l.length, l.length)
                        for l in entry.final.layers]
        entry.final = final
        entry.rings[final.pos] = _ring_snapshot(final)  # a longer prompt can resume at the very end
        self.entries.pop(entry.tokens, None)
        self.entries[entry.tokens] = entry
        while len(self.entries) > 1 and sum(e.nbytes() for e in self.entries.values()) > self.max_bytes:
            self.entries.popitem(last=False)

    def nbytes(self) -> int:
        return sum(e.nbytes() for e in self.entries.values())
