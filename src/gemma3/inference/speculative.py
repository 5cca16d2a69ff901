"""Speculative decoding: a cheap guess of the next tokens (prompt lookup or a smaller draft model),
scored by the model in one verify step (model.verify: the guess's tokens as the rows of one decode step), the longest
agreeing prefix kept and the rest taken back from the KV cache (KVCache.mark / rewind).

Prompt lookup (Saxena 2023, as transformers' `prompt_lookup_num_tokens` and llama.cpp's
lookup decoding) drafts by finding the last n-gram of the text so far earlier in the prompt or
the output and proposing what followed it: free when a task repeats its input (editing code,
quoting a document), useless on free prose. A verify step of k+1 rows costs more than a
one-token step, so the drafter backs off after misses (it stops proposing for a doubling number
of steps) and proposes only as far as recent acceptance pays for.

A draft model (any smaller Gemma 3 with the same vocabulary) drafts k tokens one step at a time
with its own KV cache, which is rewound with the target's on rejection.

Exactness. Greedy: every verify row's logits are bit-identical to the one-token step's
(model.verify), so the kept tokens are plain greedy decoding's, token for token. Sampling:
speculative sampling (Leviathan et al. 2023, Chen et al. 2023) accepts a drafted token d with
probability min(1, p(d)/q(d)) and otherwise draws from the residual max(0, p - q), renormalised,
so each token is drawn from the target's distribution p. A draft model samples its tokens from
its own distribution q (the same sampling settings on its logits); prompt lookup is
deterministic (q one-hot), so acceptance is "with probability p(d)" and the residual is p
without d.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .sampling import SamplingParams, distribution, draw, sample

MAX_BACKOFF = 32  # steps without drafting after many misses in a row
# A verify step of n rows costs more than a one-token step, less than n of them (the 270M on the
# CPU kernels, one thread of a loaded EPYC: 1 row 42 ms, 2 rows 57, 4 rows 68, 8 rows 117), so a
# draft pays only when at least this many of its tokens are accepted; fewer count as a miss.
# Matches shorter than MIN_MATCH tokens rarely continue right on prose.
PAYING = 2
MIN_MATCH = 2


@dataclass
class SpeculativeStats:
    """Counts of one generation: verify steps, drafted and accepted tokens, plain steps."""

    verify_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    plain_steps: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens generated per forward (verify steps give accepted + 1)."""
        steps = self.verify_steps + self.plain_steps
        return (self.accepted + steps) / steps if steps else 0.0

    def summary(self) -> str:
        return (f"speculative: {self.accepted}/{self.drafted} drafted tokens accepted ({self.acceptance:.0%}), "
                f"{self.tokens_per_step:.2f} tokens per step ({self.verify_steps} verify, {self.plain_steps} plain)")


@dataclass
class PromptLookup:
    """Drafts up to `k` tokens by matching the last `ngram` tokens (down to MIN_MATCH) earlier in
    the sequence; after drafts that did not pay (fewer than PAYING tokens accepted) it skips 1, 2,
    4, ... steps."""

    ngram: int = 3
    k: int = 7  # at most 7: verify steps of up to 8 rows take the decode kernels (cpu.linear.MAX_VNNI_ROWS)
    stats: SpeculativeStats = field(default_factory=SpeculativeStats)
    _misses: int = 0
    _skip: int = 0

    def __post_init__(self):
        if self.ngram < 1 or not 1 <= self.k <= 7:
            raise ValueError(f"lookup needs ngram >= 1 and 1 <= k <= 7, got ngram {self.ngram}, k {self.k}")

    q = None  # deterministic drafts: no draft distributions

    def start(self, model, max_len: int, params: SamplingParams, generator: torch.Generator):
        """A new generation (the back-off starts afresh; the counts go on accumulating)."""
        self._misses = self._skip = 0

    def propose(self, history: Sequence[int], limit: int) -> list[int]:
        if self._skip:
            self._skip -= 1
            return []
        limit = min(limit, self.k)
        if limit <= 0:
            return []
        for n in range(min(self.ngram, len(history) - 1), min(self.ngram, MIN_MATCH) - 1, -1):
            found = find_continuation(history, n, limit)
            if found:
                return found
        return []

    def record(self, drafted: int, accepted: int):
        self.stats.verify_steps += 1
        self.stats.drafted += drafted
        self.stats.accepted += accepted
        if accepted >= min(PAYING, drafted):
            self._misses = 0
        else:
            self._misses += 1
            self._skip = min(2 ** (self._misses - 1), MAX_BACKOFF)


class DraftModel:
    """Drafts `k` tokens with `model`, a smaller Gemma 3 with the target's vocabulary: greedily
    when the target decodes greedily, else sampled with the same settings (its distributions kept
    in `q` for the acceptance test). Its KV cache follows the target's: tokens it has not seen
    yet (the last accepted ones) are fed before drafting, and the drafted tokens the target
    rejects are taken back (KVCache.mark / rewind), so it never reprocesses the sequence.

    One instance per sequence (it holds the sequence's draft cache); several may share `model`,
    and `draft_together` drafts for them in batched steps (the server's continuous batch)."""

    def __init__(self, model, k: int = 4):
        if not 1 <= k <= 7:
            raise ValueError(f"a draft model drafts 1 to 7 tokens per step, got k {k}")
        self.model, self.k = model, k
        self.stats = SpeculativeStats()
        self.cache = self.q = self._mark = None

    def start(self, target, max_len: int, params: SamplingParams, generator: torch.Generator):
        """A new generation of at most `max_len` tokens (prompt included) for `target`."""
        check_vocabulary(self.model, target)
        self.cache = self.model.new_cache(1, max_len=max_len)
        self.params, self.generator = params, generator

    def propose(self, history: Sequence[int], limit: int) -> list[int]:
        return draft_together([self], [history], [limit])[0]

    def _begin(self, history: Sequence[int], limit: int) -> list[int]:
        """Brings the cache up to the last token and marks it; the tokens the first draft step
        feeds (the last token, after it at most one accepted one the draft has not seen)."""
        cache = self.cache
        if len(history) - cache.pos > 2:  # the prompt (or tokens after plain steps): in one forward, kept
            self.model(torch.tensor([list(history[cache.pos:-1])], device=self.model.device), cache, last_only=True)
        fresh = list(history[cache.pos:])
        self._fresh = len(fresh)
        self._mark = cache.mark(len(fresh) + limit - 1)
        self.q = None if self.params.greedy else []
        return fresh

    def _pick(self, logits: torch.Tensor, seen: list[int]) -> int:
        if self.params.greedy:
            return sample(logits, self.params, None, seen)
        self.q.append(distribution(logits, self.params, seen))
        return draw(self.q[-1], self.generator)

    def record(self, drafted: int, accepted: int):
        """Keeps the fed tokens and the drafted ones the target accepted (the last drafted token
        was never fed: when all are accepted the next proposal feeds it)."""
        self.stats.verify_steps += 1
        self.stats.drafted += drafted
        self.stats.accepted += accepted
        self.cache.rewind(self._mark, self._fresh + min(accepted, drafted - 1))


def check_vocabulary(draft, target):
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({draft.config.vocab_size} tokens) is not the "
                         f"model's ({target.config.vocab_size}): a draft model must share its tokenizer")


def draft_together(drafters: list[DraftModel], histories: list[Sequence[int]], limits: list[int]) -> list[list[int]]:
    """Each drafter's proposal (at most min(limit, its k) tokens) after its history; drafters of
    one draft model, each with its own cache, step together: one batched draft forward per
    drafted position (the first feeds each sequence's unseen tokens as rows of that step)."""
    model = drafters[0].model
    out: list[list[int]] = [[] for _ in drafters]
    wants = {i: min(limit, d.k) for i, (d, limit) in enumerate(zip(drafters, limits)) if min(limit, d.k) > 0}
    feed = {i: drafters[i]._begin(histories[i], n) for i, n in wants.items()}
    for step in range(max(wants.values(), default=0)):
        rows = [i for i, n in wants.items() if n > step]
        tokens = [t for i in rows for t in (feed[i] if step == 0 else out[i][-1:])]
        counts = [len(feed[i]) for i in rows] if step == 0 else None
        logits = model.decode(torch.tensor(tokens, device=model.device), [drafters[i].cache for i in rows],
                              counts).cpu()
        ends = torch.tensor(counts).cumsum(0) - 1 if counts else torch.arange(len(rows))
        for i, row in zip(rows, ends.tolist()):
            out[i].append(drafters[i]._pick(logits[row], list(histories[i]) + out[i]))
    return out


def find_continuation(history: Sequence[int], n: int, limit: int) -> list[int]:
    """Up to `limit` tokens that followed the latest earlier occurrence of the last `n` tokens."""
    tail = list(history[-n:])
    last = len(history) - n
    for start in range(last - 1, -1, -1):  # latest first: recent text predicts best
        if history[start] == tail[0] and list(history[start:start + n]) == tail:
            return list(history[start + n:start + n + limit])
    return []


def accept(logits: torch.Tensor, draft: list[int], params: SamplingParams, generator: torch.Generator,
           history: list[int], q: list[torch.Tensor] | None = None) -> tuple[int, int]:
    """(drafted tokens accepted, the token after them) from verify logits [len(draft) + 1, vocab]:
    row i scores the token after draft[:i]. `q[i]`: the distribution draft[i] was drawn from
    (None: drafted deterministically)."""
    for i, d in enumerate(draft):
        seen = history + draft[:i]
        if params.greedy:
            token = sample(logits[i], params, None, seen)
            if token != d:
                return i, token
            continue
        p = distribution(logits[i], params, seen)
        ratio = float(p[d]) if q is None else float(p[d]) / float(q[i][d])
        if float(torch.rand((), generator=generator)) >= ratio:
            if q is None:
                residual = p.clone()
                residual[d] = 0.0
            else:
                residual = (p - q[i]).clamp_min(0.0)
                if not float(residual.sum()) > 0:  # p == q up to rounding: the residual is empty
                    residual = p
            return i, draw(residual, generator)
    return len(draft), sample(logits[-1], params, generator, history + draft)


def speculative_steps(model, cache, first: int, history: list[int], params: SamplingParams,
                      generator: torch.Generator, max_tokens: int, drafter: PromptLookup | DraftModel) -> Iterator[int]:
    """After `first` (already sampled, not yet in the cache) up to `max_tokens` - 1 more tokens,
    drafted by `drafter` and verified; yields `first` too. `history` holds the prompt and is
    extended with every yielded token."""
    drafter.start(model, cache.max_len, params, generator)
    token, n = first, 0
    while True:
        yield token
        history.append(token)
        n += 1
        if n == max_tokens:
            return
        draft = drafter.propose(history, min(max_tokens - n - 1, cache.max_len - cache.pos - 1))
        if not draft:
            drafter.stats.plain_steps += 1
            step = torch.tensor([[token]], device=model.device)
            if params.plain_greedy:
                token = int(model.greedy_next(step, cache))
            else:
                token = sample(model(step, cache, last_only=True)[0, -1].cpu(), params, generator, history)
            continue
        mark = cache.mark(len(draft) + 1)
        logits = model.verify(torch.tensor([token] + draft, device=model.device), cache).cpu()
        kept, token = accept(logits, draft, params, generator, history, drafter.q)
        cache.rewind(mark, kept + 1)
        drafter.record(len(draft), kept)
        for d in draft[:kept]:
            yield d
            history.append(d)
            n += 1
            if n == max_tokens:
                return
