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

A request with `speculative` options drafts by prompt lookup: in a step where it has a draft it
leaves the batched decode and runs its own verify step (model.verify: the rows are the one-token
steps' rows, so greedy output is the plain request's), then gives back the rejected tokens.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..inference.constrain import Guide, apply_masks, fill_masks
from ..inference.generate import StopMatcher, prefill
from ..inference.multimodal import embed_prompt, encode_image
from ..inference.prefix_cache import PIECE, Prefill, PrefixCache
from ..inference.sampling import SamplingParams, sample
from ..inference.score import TokenScore, prompt_scores
from ..inference.speculative import PromptLookup, accept
from .arenas import release_free_memory
from .metrics import Metrics

# While sequences are decoding, prefill work may take this much time per second of decode steps.
PREFILL_SHARE = 0.35
# Prompt tokens per prefill turn while sequences decode (small: a turn is the longest stall it
# causes) and while nothing else runs (what a newly arrived request may wait for). Either way the
# prompt is computed in the same position-aligned pieces (prefix_cache.PIECE), so its logits do
# not depend on the load.
BUSY_CHUNK, IDLE_CHUNK = 64, 128


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
    top_logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled token's plus the k best
    images: list = field(default_factory=list)  # decoded PIL images; `ids` holds their soft tokens
    prompt_top: int | None = None  # None: no prompt scores; k >= 0: each prompt token's logprob and k best
    speculative: object | None = None  # schemas.Speculative: draft by prompt lookup (ngram, k)
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

    def __init__(self, req: Request, cache, tokenizer):
        self.req, self.cache, self.guide = req, cache, req.guide
        self.generator = req.params.generator()
        self.history = list(req.ids)
        self.matcher = StopMatcher(tokenizer, req.stop, req.stop_ids)
        self.n = 0
        self.last = None
        spec = req.speculative
        self.drafter = PromptLookup(ngram=spec.ngram, k=spec.k) if spec is not None else None

    def propose(self) -> list[int]:
        """Tokens drafted for the next step (none: a plain decode step)."""
        if self.drafter is None:
            return []
        draft = self.drafter.propose(self.history, min(self.req.max_tokens - self.n - 1,
                                                       self.cache.max_len - self.cache.pos - 1))
        if not draft:
            self.drafter.stats.plain_steps += 1
        return draft

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
                 vision=None, pan_and_scan=None):
        self.model, self.tokenizer = model, tokenizer
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
            with self.cond:
                if not self._busy():
                    release_free_memory()  # going idle: nothing is in flight
                while not self._busy():
                    self.cond.wait(1.0)  # a bounded wait lets the main thread run signal handlers
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
        seq = _Sequence(req, cache, self.tokenizer)
        # Logprobs stay the model's own (a masked token's would be -inf, which JSON cannot carry).
        allowed = logits if seq.guide is None else seq.guide.apply(logits, seq.guide.mask())
        token = sample(allowed, req.params, seq.generator, seq.history)
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
                drafts = [seq.propose() for seq in live]
                self.metrics.speculative.plain_steps += sum(1 for s, d in zip(live, drafts) if s.drafter and not d)
                plain = [seq for seq, draft in zip(live, drafts) if not draft]
                keep = self._decode(plain) if plain else []
                keep += [seq for seq, draft in zip(live, drafts) if draft and not self._verify(seq, draft)]
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

    def _decode(self, batch: list[_Sequence]) -> list[_Sequence]:
        """One batched decode step; the sequences that go on."""
        guided = [s.guide for s in batch if s.guide is not None]
        # The masks depend only on the tokens sampled so far: computed beside the forward
        # (llguidance drops the GIL), waited for after it.
        masks = self.masker.submit(fill_masks, guided) if guided else None
        logits = self.model.decode(torch.tensor([s.last for s in batch]), [s.cache for s in batch])
        allowed = list(logits)
        if masks is not None:  # every constrained row masked at once (apply_masks says why)
            rows = [i for i, s in enumerate(batch) if s.guide is not None]
            for i, masked in zip(rows, apply_masks(logits[rows], masks.result(), self.tokenizer.vocab_size)):
                allowed[i] = masked
        keep = []
        for seq, row, choices in zip(batch, logits, allowed):
            token = sample(choices, seq.req.params, seq.generator, seq.history)
            if not self._advance(seq, token, row):
                keep.append(seq)
        return keep

    def _verify(self, seq: _Sequence, draft: list[int]) -> bool:
        """A speculative step of one sequence: its last token and `draft` scored in one verify
        step (the rows a one-token step would give), the agreeing prefix and the token after it
        emitted, the rest taken back from its cache. True when the sequence is finished."""
        mark = seq.cache.mark(len(draft) + 1)
        logits = self.model.verify(torch.tensor([seq.last] + draft, device=self.model.device), seq.cache).cpu()
        kept, token = accept(logits, draft, seq.req.params, seq.generator, seq.history)
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
