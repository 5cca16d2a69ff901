"""Continuous batching: one thread owns the model and runs the loop

    admit waiting requests → advance their prefills by one chunk (via the prefix cache) → one
    batched `model.decode` over every active sequence → sample each with its own params and
    generator → emit text → retire finished

so a new request joins at the next decode step instead of waiting for the batch to drain (the
Orca/vLLM scheduling idea, without paging: each sequence keeps its own KVCache and dropping the
object frees it). Prompts are prefilled in chunks between decode steps (vLLM's chunked prefill):
while others decode, prefill chunks get at most PREFILL_SHARE of the time decode steps take, so
a 30k-token prompt slows the running sequences by that fraction instead of stopping them for its
whole prefill. Requests come in through a bounded deque; results go back to the asyncio side
as events on the request's own asyncio.Queue (`loop.call_soon_threadsafe`).

A request with `speculative` options drafts by prompt lookup or with the server's draft model
(`--draft-model`; the draft models of all such sequences step together, each with its own draft
cache). A sequence with a draft puts its last token and the draft as rows of the same batched
decode step as everyone else's one token (model.decode with per-sequence row counts: each row is
the one-token step's row, so greedy output is the plain request's), then gives back the rejected
tokens from its cache and its draft cache.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..inference.constrain import Guide, apply_masks, fill_masks, lazy_exact, sample_guided, sample_lazily
from ..inference.generate import StopMatcher, prefill
from ..inference.multimodal import embed_prompt, encode_image
from ..inference.prefix_cache import PIECE, Prefill, PrefixCache
from ..inference.sampling import SamplingParams, sample
from ..inference.score import TokenScore, prompt_scores
from ..inference.speculative import DraftModel, PromptLookup, accept, check_vocabulary, draft_together
from .arenas import release_free_memory
from .metrics import Metrics

# While sequences are decoding, prefill work may take this much time per second of decode steps.
PREFILL_SHARE = 0.35
# Prompt tokens per prefill turn while sequences decode (small: a turn is the longest stall it
# causes) and while nothing else runs (what a newly arrived request may wait for). Either way the
# prompt is computed in the same position-aligned pieces (prefix_cache.PIECE), so its logits do
# not depend on the load.
BUSY_CHUNK, IDLE_CHUNK = 64, 128
# A loop that has not come round for this long is wedged (a turn is one decode step, one prefill
# chunk or one job: well under a second for the models served on CPU; an image encode, seconds).
WEDGED_S = 60.0


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class Delta:
    text: str
    logprobs: list[TokenLogprob]


@dataclass
class Done:
    text: str  # the last piece of text (held-back text once no stop string can match any more)
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob]


@dataclass
class PromptScores:
    scores: list[TokenScore]  # one per prompt token, sent before any generated text


@dataclass
class Failed:
    message: str


@dataclass
class Request:
    ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop: list[str]
    stop_ids: frozenset[int]
    keep_ids: frozenset[int] = frozenset()  # control tokens written into the text (FunctionGemma's call markers)
    top_logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled token's plus the k best
    images: list = field(default_factory=list)  # decoded PIL images; `ids` holds their soft tokens
    prompt_top: int | None = None  # None: no prompt scores; k >= 0: each prompt token's logprob and k best
    speculative: object | None = None  # schemas.Speculative: draft by prompt lookup (ngram, k) or the draft model (k)
    adapter: int | None = None  # the LoRA adapter slot its sequence uses (model/adapters.py); None: the default
    guide: Guide | None = None  # structured output: the grammar state every sampled token must keep valid
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: bool = False  # set from the asyncio side (client gone); the engine drops the sequence
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self):
        self.cancelled = True

    def emit(self, event):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is gone, nobody is listening
            self.cancelled = True


class _Sequence:
    """Per-request decode state: its cache, sampling generator, and its stop matcher (which holds
    back text that could still grow into a stop string)."""

    def __init__(self, req: Request, cache, tokenizer, model=None, draft=None, draft_k: int = 4):
        self.req, self.cache, self.guide = req, cache, req.guide
        self.generator = req.params.generator()
        self.history = list(req.ids)
        self.matcher = StopMatcher(tokenizer, req.stop, req.stop_ids, req.keep_ids)
        self.n = 0
        self.last = None
        spec = req.speculative
        self.drafter = None
        if spec is not None and spec.method == "lookup":
            self.drafter = PromptLookup(ngram=spec.ngram, k=spec.k or PromptLookup.k)
        elif spec is not None:  # its draft cache: dropped with the sequence, like its cache
            self.drafter = DraftModel(draft, k=spec.k or draft_k)
            self.drafter.start(model, cache.max_len, req.params, self.generator)

    def room(self) -> int:
        """Drafted tokens that could still be used: the token after them must fit too."""
        return min(self.req.max_tokens - self.n - 1, self.cache.max_len - self.cache.pos - 1)

    def advance(self, token: int, logprob: TokenLogprob | None) -> bool:
        """Emit what `token` adds; True when the sequence is finished."""
        req, self.n, self.last = self.req, self.n + 1, token
        self.history.append(token)
        if self.guide is not None:
            self.guide.advance(token)
        # A stop token's logprob is dropped (its text is not sent), except after a scored prompt: a
        # harness finds the prompt's logprobs by position, counting one generated entry after them.
        kept = token not in req.stop_ids or req.prompt_top is not None
        lps = [logprob] if logprob is not None and kept else []
        text, stopped = self.matcher.feed(token)
        if stopped:
            return self._finish(text, "stop", lps)
        if self.n >= req.max_tokens:
            return self._finish(text + self.matcher.flush(), "length", lps)
        if text or lps:
            req.emit(Delta(text, lps))
        return False

    def _finish(self, text: str, reason: str, lps) -> bool:
        self.req.emit(Done(text, reason, len(self.req.ids), self.n, lps))
        return True


def _logprob(logits: torch.Tensor, token: int, k: int | None) -> TokenLogprob | None:
    if k is None:
        return None
    lp = torch.log_softmax(logits.float(), -1)
    top = torch.topk(lp, k) if k else None
    return TokenLogprob(token, float(lp[token]),
                        [] if top is None else list(zip(top.indices.tolist(), top.values.tolist())))


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64,
                 prefix_cache_bytes: int = 256 * 2**20, metrics: Metrics | None = None,
                 vision=None, pan_and_scan=None, draft=None, draft_k: int = 4):
        self.model, self.tokenizer = model, tokenizer
        if draft is not None:
            check_vocabulary(draft, model)
        # The draft model of `speculative: {"method": "draft"}` requests (None: they are refused)
        # and the tokens it drafts per step when a request gives no k.
        self.draft, self.draft_k = draft, draft_k
        self.vision, self.pan_and_scan = vision, pan_and_scan  # vision None: a text-only server
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefix_cache = PrefixCache(model, max_bytes=prefix_cache_bytes, piece=PIECE) \
            if prefix_cache_bytes else None
        self.block = model.config.sliding_window  # chunks never cross a window boundary
        self.credit = 0.0  # seconds of prefill work the decode steps so far have paid for
        self.metrics = metrics or Metrics()
        self.waiting: deque[Request] = deque()
        self.prefilling: list[tuple[Request, Prefill]] = []
        self.active: list[_Sequence] = []
        self.jobs: deque[tuple[Callable, Future]] = deque()
        # Grammar masks of constrained rows are computed here while the model runs the decode step.
        self.masker = ThreadPoolExecutor(1, thread_name_prefix="gemma3-masks")
        self.cond = threading.Condition()
        self.stopping = False
        self.running = False  # True while run() is looping, on whichever thread
        self.beat = time.monotonic()  # when the loop last came round (idle, it wakes every second)
        self.finished = threading.Event()

    # ---------------------------------------------------------------- asyncio side

    def start(self):
        """Run the loop on a new thread. `gemma3 serve` calls run() on the main thread instead: the
        OpenMP thread pool belongs to the thread that starts a parallel region, and once a second
        thread has its own pool (2 workers + 2 masters on a 2-core machine) libgomp stops spinning
        between regions, which made every decode step in the server ~2x slower than the same step
        on the thread that loaded the model."""
        threading.Thread(target=self.run, name="gemma3-engine", daemon=True).start()

    def _check_room(self, queue, what: str):
        """Refuses new work (caller holds self.cond) once stopping, or with `queue` at --max-queue."""
        if self.stopping:
            raise ShuttingDown("the server is shutting down")
        if len(queue) >= self.max_queue:
            raise QueueFull(f"the server is busy: {len(queue)} {what} are already queued "
                            f"(--max-queue {self.max_queue}); retry later")

    def submit(self, req: Request):
        if req.speculative is not None and req.speculative.method == "draft" and self.draft is None:
            raise ValueError("speculative method 'draft' needs a draft model (serve --draft-model FILE)")
        with self.cond:
            self._check_room(self.waiting, "requests")
            self.waiting.append(req)
            self.metrics.queue_depth = len(self.waiting)
            self.cond.notify()

    def call(self, fn: Callable) -> Future:
        """fn(model) on the engine thread, between two steps: work such as embeddings that needs the
        model but not a batch slot. The model is not safe to run from two threads at once."""
        future = Future()
        with self.cond:
            self._check_room(self.jobs, "jobs")
            self.jobs.append((fn, future))
            self.cond.notify()
        return future

    def healthy(self, wedged_s: float = WEDGED_S) -> str | None:
        """None when the loop is running and came round within `wedged_s`; else why not. A live
        process whose loop is stuck (a hung step) is not healthy: /health and Ray's check say so."""
        if not self.running:
            return "the engine is not running"
        late = time.monotonic() - self.beat
        if late > wedged_s:
            return f"the engine loop has not come round for {late:.0f} s (wedged)"
        return None

    def stop(self, timeout: float = 30.0):
        """Cancel what is queued or running and wait for the loop to return."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.finished.wait(timeout)

    # ---------------------------------------------------------------- engine thread

    def run(self):
        """The loop, on the calling thread, until stop()."""
        self.running = True
        try:
            self._loop()
        finally:
            self.running = False
            self.finished.set()

    def _loop(self):
        torch.set_grad_enabled(False)
        while True:
            self.beat = time.monotonic()
            with self.cond:
                if not self._busy():
                    release_free_memory()  # going idle: nothing is in flight
                while not self._busy():
                    self.cond.wait(1.0)  # a bounded wait lets the main thread run signal handlers
                    self.beat = time.monotonic()
                if self.stopping:
                    break
            self._run_jobs()
            self._admit()
            self._step()
        for seq in self.active:
            seq.req.emit(Failed("the server is shutting down"))
        for req, _ in self.prefilling:
            req.emit(Failed("the server is shutting down"))
        self.prefilling = []
        with self.cond:
            for req in self.waiting:
                req.emit(Failed("the server is shutting down"))
            self.waiting.clear()
            for _, future in self.jobs:
                future.set_exception(ShuttingDown("the server is shutting down"))
            self.jobs.clear()
        self.active = []
        self._gauges()

    def _busy(self) -> bool:
        return self.stopping or bool(self.waiting or self.active or self.prefilling or self.jobs)

    def _run_jobs(self):
        """One job per turn of the loop, so queued jobs cannot starve the decoding sequences."""
        with self.cond:
            if not self.jobs:
                return
            fn, future = self.jobs.popleft()
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(self.model))
            except Exception as e:  # the caller gets it; the loop goes on
                future.set_exception(e)

    def _take(self) -> Request | None:
        with self.cond:
            req = self.waiting.popleft() if self.waiting else None
            self.metrics.queue_depth = len(self.waiting)
            return req

    def _admit(self):
        """Start the prefill of waiting requests while batch slots are free, then run one turn of
        prefill chunks: shortest prompt first (a short request is not queued behind a long one)."""
        while len(self.active) + len(self.prefilling) < self.max_batch:
            req = self._take()
            if req is None:
                break
            if req.cancelled:
                self.metrics.cancelled += 1
                continue
            try:
                max_len = len(req.ids) + req.max_tokens
                if req.prompt_top is not None:  # every position's logits are needed: one full pass
                    scores, cache, logits = prompt_scores(self.model, req.ids, req.prompt_top, max_len, req.adapter)
                    req.emit(PromptScores(scores))
                    if req.max_tokens == 0:
                        req.emit(Done("", "length", len(req.ids), 0, []))
                    else:
                        self._started(req, cache, logits)
                elif req.images:  # encoded here, on the thread that owns the models; prefilled at once
                    features = [encode_image(self.vision, im, self.pan_and_scan) for im in req.images]
                    self._started(req, *prefill(self.model, embed_prompt(self.model, req.ids, features), max_len,
                                                adapter=req.adapter))
                elif self.prefix_cache is not None:
                    self.prefilling.append((req, self.prefix_cache.start(req.ids, max_len, req.adapter)))
                    self.metrics.prefix_hits = self.prefix_cache.hits
                    self.metrics.prefix_tokens = self.prefix_cache.reused_tokens
                else:
                    cache = self.model.new_cache(1, max_len=max_len)
                    if req.adapter is not None:  # else the cache's own None: the default adapter, if any
                        cache.use_adapter(req.adapter)
                    self.prefilling.append((req, Prefill(self.model, list(req.ids), cache, self.block, piece=PIECE)))
            except Exception as e:  # one bad request must not take the loop down
                req.emit(Failed(f"prefill failed: {type(e).__name__}: {e}"))
                self.metrics.failed += 1
        self._prefill_turn()
        self._gauges()

    def _prefill_turn(self):
        """At most one chunk, of the shortest prompt; while sequences decode, only when their
        steps have earned the time (PREFILL_SHARE), so they keep at least 1 / (1 + share) of the
        engine whatever prompts arrive."""
        if not self.prefilling:
            return
        if self.active and self.credit <= 0:
            return
        req, job = min(self.prefilling, key=lambda p: p[1].left)
        self.prefilling.remove((req, job))
        if req.cancelled:
            self.metrics.cancelled += 1
            return
        start = time.perf_counter()
        try:
            logits = job.step(BUSY_CHUNK if self.active else IDLE_CHUNK)
        except Exception as e:
            req.emit(Failed(f"prefill failed: {type(e).__name__}: {e}"))
            self.metrics.failed += 1
            return
        if self.active:
            self.credit -= time.perf_counter() - start
        if logits is None:
            self.prefilling.append((req, job))
        else:
            self._started(req, job.cache, logits)

    def _started(self, req: Request, cache, logits: torch.Tensor):
        """A prompt is in its cache: sample the first token, then the sequence joins the batch."""
        seq = _Sequence(req, cache, self.tokenizer, self.model, self.draft, self.draft_k)
        # Logprobs stay the model's own (a masked token's would be -inf, which JSON cannot carry).
        token = sample(logits, req.params, seq.generator, seq.history) if seq.guide is None else \
            sample_guided(seq.guide, logits, req.params, seq.generator, seq.history)
        self.metrics.observe_first_token(time.perf_counter() - req.submitted)
        self.metrics.prompt_tokens += len(req.ids)
        if not self._advance(seq, token, logits):
            self.active.append(seq)

    def _advance(self, seq: _Sequence, token: int, logits: torch.Tensor) -> bool:
        self.metrics.generation_tokens += 1
        done = seq.advance(token, _logprob(logits, token, seq.req.top_logprobs))
        if done:
            self.metrics.observe_request(time.perf_counter() - seq.req.submitted)
        return done

    def _step(self):
        live = []
        for seq in self.active:
            if seq.req.cancelled:
                self.metrics.cancelled += 1  # dropping the sequence drops its cache
            else:
                live.append(seq)
        self.active = live
        if not live:
            self._gauges()
            return
        self.metrics.observe_batch(len(live))
        try:
            with torch.inference_mode():
                start = time.perf_counter()
                keep = self._decode(live, self._propose(live))
                # Earned prefill time, capped at one chunk's worth so idle credit cannot pile up.
                self.credit = min(self.credit + PREFILL_SHARE * (time.perf_counter() - start), 0.05) \
                    if self.prefilling else 0.0
        except Exception as e:
            for seq in live:
                seq.req.emit(Failed(f"decode failed: {type(e).__name__}: {e}"))
            self.metrics.failed += len(live)
            keep = []
        self.active = keep
        self._gauges()

    def _propose(self, batch: list[_Sequence]) -> list[list[int]]:
        """Each sequence's draft for this step (none: one plain row). Prompt lookup drafts per
        sequence; the draft-model sequences draft together, one batched draft step per token."""
        drafts: list[list[int]] = [[] for _ in batch]
        by_model = [i for i, s in enumerate(batch) if isinstance(s.drafter, DraftModel)]
        for i, seq in enumerate(batch):
            if isinstance(seq.drafter, PromptLookup):
                drafts[i] = seq.drafter.propose(seq.history, seq.room())
        if by_model:
            proposed = draft_together([batch[i].drafter for i in by_model], [batch[i].history for i in by_model],
                                      [batch[i].room() for i in by_model])
            for i, draft in zip(by_model, proposed):
                drafts[i] = draft
        for seq, draft in zip(batch, drafts):
            if seq.drafter is not None and not draft:
                seq.drafter.stats.plain_steps += 1
                self.metrics.speculative.plain_steps += 1
        return drafts

    def _decode(self, batch: list[_Sequence], drafts: list[list[int]]) -> list[_Sequence]:
        """One batched decode step: a row for each sequence's last token, followed by its draft
        if it has one (a verify step within the batch); the sequences that go on."""
        guided = [i for i, s in enumerate(batch) if s.guide is not None]  # never drafting: they are refused
        # Rows whose sampling cuts by the whole distribution (top-k/p, min-p) need their masks
        # before they sample: those depend only on the tokens sampled so far, so they are computed
        # beside the forward (llguidance drops the GIL) and waited for after it. The other
        # constrained rows sample unmasked and are masked only when the grammar refuses their
        # token (constrain.sample_lazily): a fill thread beside the forward takes a core from it.
        eager = [i for i in guided if not lazy_exact(batch[i].req.params)]
        lazy = [i for i in guided if lazy_exact(batch[i].req.params)]
        masks = self.masker.submit(fill_masks, [batch[i].guide for i in eager]) if eager else None
        tokens = torch.tensor([t for s, d in zip(batch, drafts) for t in [s.last] + d], device=self.model.device)
        caches = [s.cache for s in batch]
        if any(drafts):
            marks = [s.cache.mark(len(d) + 1) if d else None for s, d in zip(batch, drafts)]
            logits = self.model.decode(tokens, caches, [len(d) + 1 for d in drafts])
        else:
            logits = self.model.decode(tokens, caches)
        starts = list(itertools.accumulate((len(d) + 1 for d in drafts), initial=0))  # each sequence's rows
        chosen = {}  # the constrained rows' tokens
        if masks is not None:  # every eager row masked at once (apply_masks says why)
            rows = apply_masks(logits[[starts[i] for i in eager]], masks.result(), self.tokenizer.vocab_size)
            chosen = {i: sample(row, batch[i].req.params, batch[i].generator, batch[i].history)
                      for i, row in zip(eager, rows)}
        if lazy:
            picked = [batch[i] for i in lazy]
            chosen.update(zip(lazy, sample_lazily([s.guide for s in picked], [logits[starts[i]] for i in lazy],
                                                  [s.req.params for s in picked], [s.generator for s in picked],
                                                  [s.history for s in picked], self.tokenizer.vocab_size)))
        keep = []
        for i, (seq, draft) in enumerate(zip(batch, drafts)):
            out = logits[starts[i]:starts[i + 1]]
            if draft:
                done = self._verified(seq, draft, out.cpu(), marks[i])
            else:
                token = chosen[i] if i in chosen else sample(out[0], seq.req.params, seq.generator, seq.history)
                done = self._advance(seq, token, out[0])
            if not done:
                keep.append(seq)
        return keep

    def _verified(self, seq: _Sequence, draft: list[int], logits: torch.Tensor, mark) -> bool:
        """After a verify step: the agreeing prefix of `draft` and the token after it emitted, the
        rest taken back from the caches. True when the sequence is finished."""
        kept, token = accept(logits, draft, seq.req.params, seq.generator, seq.history, seq.drafter.q)
        seq.cache.rewind(mark, kept + 1)
        seq.drafter.record(len(draft), kept)
        spec = self.metrics.speculative
        spec.verify_steps, spec.drafted, spec.accepted = spec.verify_steps + 1, spec.drafted + len(draft), \
            spec.accepted + kept
        for i, t in enumerate(draft[:kept] + [token]):
            if self._advance(seq, t, logits[i]):
                return True
        return False

    def _gauges(self):
        self.metrics.active_sequences = len(self.active) + len(self.prefilling)
        self.metrics.queue_depth = len(self.waiting)
