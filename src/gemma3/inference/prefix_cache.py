"""Prompt (prefix) caching that stays exact with sliding-window layers.

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

from ..model.cache import KVCache, KVSnapshot


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    final: KVCache  # the state after the whole prompt (global layers complete)
    rings: dict[int, KVSnapshot] = field(default_factory=dict)  # boundary -> the ring layers there

    def nbytes(self) -> int:
        return self.final.nbytes() + sum(s.nbytes() for s in self.rings.values())


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
            cache = entry.final.resumed(entry.rings[b], max_len)
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
                    rings[end] = cache.snapshot()
            logits = self.model.logits(hidden[:, -1:])[0, -1]
        # The caller keeps decoding into `cache`: store a copy of the state at the end of the prompt.
        final = cache.frozen()
        rings[final.pos] = final.snapshot()  # a longer prompt can resume at the very end
        self._store(_Entry(tuple(ids), final, rings))
        return cache, logits

    def _store(self, entry: _Entry):
        self.entries.pop(entry.tokens, None)
        self.entries[entry.tokens] = entry
        while len(self.entries) > 1 and sum(e.nbytes() for e in self.entries.values()) > self.max_bytes:
            self.entries.popitem(last=False)

    def nbytes(self) -> int:
        return sum(e.nbytes() for e in self.entries.values())
