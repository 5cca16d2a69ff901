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
    adapter: int | None  # the LoRA adapter slot its keys were computed under (model/adapters.py)
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

    def __init__(self, model, max_bytes: int = 512 * 2**20, block: int | None = None, kv_dtype=None,
                 piece: int | None = None):
        self.model, self.max_bytes, self.kv_dtype = model, max_bytes, kv_dtype
        self.block = block or model.config.sliding_window
        self.piece = piece  # Prefill's
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()  # by (adapter, tokens)
        self.hits = self.reused_tokens = 0

    def lookup(self, ids, adapter: int | None = None) -> tuple[_Entry | None, int]:
        """Best entry and resume boundary (< len(ids): the last token is always computed), among the
        prompts computed under the same adapter (another one's keys differ)."""
        best, best_b = None, 0
        for entry in self.entries.values():
            if entry.adapter != adapter:
                continue
            shared = min(_common_prefix(entry.tokens, ids), len(ids) - 1)
            b = max((x for x in entry.rings if x <= shared), default=0)
            if b > best_b:
                best, best_b = entry, b
        return best, best_b

    def prefill(self, ids, max_len: int, adapter: int | None = None) -> tuple[KVCache, torch.Tensor]:
        """A cache holding `ids` and the logits of the last token, reusing a stored prefix."""
        job = self.start(ids, max_len, adapter)
        return job.cache, job.step()

    def start(self, ids, max_len: int, adapter: int | None = None) -> "Prefill":
        """A Prefill of `ids` (its rows under LoRA adapter slot `adapter`) that resumes after the
        longest stored prefix and stores its own states when it completes."""
        ids = list(ids)
        entry, b = self.lookup(ids, adapter)
        if entry is None:
            cache = self.model.new_cache(1, max_len=max_len, kv_dtype=self.kv_dtype)
            if adapter is not None:  # else the cache's own None: the default adapter, if any
                cache.use_adapter(adapter)
            return Prefill(self.model, ids, cache, self.block, {}, self._finished, self.piece)
        self.entries.move_to_end((entry.adapter, entry.tokens))
        self.hits += 1
        self.reused_tokens += b
        rings = {x: r for x, r in entry.rings.items() if x <= b}
        return Prefill(self.model, ids, entry.final.resumed(entry.rings[b], max_len), self.block, rings,
                       self._finished, self.piece)

    def _finished(self, ids: list[int], cache: KVCache, rings: dict[int, KVSnapshot]):
        # The caller keeps decoding into `cache`: store a copy of the state at the end of the prompt.
        final = cache.frozen()
        rings[final.pos] = final.snapshot()  # a longer prompt can resume at the very end
        self._store(_Entry(tuple(ids), cache.adapter, final, rings))

    def _store(self, entry: _Entry):
        key = (entry.adapter, entry.tokens)
        self.entries.pop(key, None)
        self.entries[key] = entry
        while len(self.entries) > 1 and sum(e.nbytes() for e in self.entries.values()) > self.max_bytes:
            self.entries.popitem(last=False)

    def nbytes(self) -> int:
        return sum(e.nbytes() for e in self.entries.values())


# The server computes prompts in pieces of this many positions, aligned to multiples of it (and
# cut at every `block` boundary). The pieces depend only on the prompt, never on how busy the
# server is or where a prefix-cache hit resumes: a GEMM over 64 rows and one over 512 round
# differently, so load-dependent chunks gave the same prompt different first-token logits (up to
# 0.27 apart). Small, because a piece is what a busy turn computes.
PIECE = 64


class Prefill:
    """A prompt being computed into its cache a piece at a time: `step(n)` runs the pieces that
    cover the next n tokens (all when None) and returns the last token's logits once the prompt is
    done. The server interleaves steps with decode steps, so one long prompt does not stall the
    running sequences.

    Pieces are the position-aligned `piece`-token spans (default: whole blocks; the server's are
    PIECE), also cut at every `block` boundary (a sliding window's length at most, so a piece plus
    the ring it attends to covers its window); with `rings` given, the local layers are
    snapshotted at every block boundary and `on_done(ids, cache, rings)` is called at the end (the
    prefix cache's store)."""

    def __init__(self, model, ids: list[int], cache: KVCache, block: int,
                 rings: dict[int, KVSnapshot] | None = None, on_done=None, piece: int | None = None):
        self.model, self.ids, self.cache, self.block = model, ids, cache, block
        self.piece = piece or block
        self.rings, self.on_done = rings, on_done
        self._x = torch.tensor([ids])

    @property
    def left(self) -> int:
        """Prompt tokens not computed yet."""
        return len(self.ids) - self.cache.pos

    def step(self, n: int | None = None) -> torch.Tensor | None:
        cache, ids, block, piece = self.cache, self.ids, self.block, self.piece
        stop = len(ids) if n is None else min(len(ids), cache.pos + max(n, 1))
        logits = None
        with torch.inference_mode():
            while cache.pos < stop:
                end = min((cache.pos // piece + 1) * piece, (cache.pos // block + 1) * block, len(ids))
                chunk = self._x[:, cache.pos:end]
                if end == len(ids):  # the last chunk: the model's own last-token logits
                    logits = self.model(chunk, cache, last_only=True)[0, -1]
                else:
                    self.model.forward_hidden(chunk, cache)
                if self.rings is not None and end % block == 0 and end < len(ids):
                    self.rings[end] = cache.snapshot()
        if logits is None:
            return None
        self._x = None
        if self.on_done is not None:
            self.on_done(ids, cache, self.rings)
        return logits
