"""Continuous batching: one thread owns the model and runs the loop

    admit waiting requests (prefill, via the prefix cache) → one batched `model.decode` over every
    active sequence → sample each with its own params and generator → emit text → retire finished

so a new request joins at the next decode step instead of waiting for the batch to drain (the
Orca/vLLM scheduling idea, without paging: each sequence keeps its own KVCache and dropping the
object frees it). Requests come in through a bounded deque; results go back to the asyncio side
as events on the request's own asyncio.Queue (`loop.call_soon_threadsafe`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..inference.generate import StopMatcher, prefill
from ..inference.multimodal import embed_prompt, encode_image
from ..inference.prefix_cache import PrefixCache
from ..inference.sampling import SamplingParams, sample
from .arenas import release_free_memory
from .metrics import Metrics


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
        self.req, self.cache = req, cache
        self.generator = req.params.generator()
        self.history = list(req.ids)
        self.matcher = StopMatcher(tokenizer, req.stop, req.stop_ids)
        self.n = 0
        self.last = None

    def advance(self, token: int, logprob: TokenLogprob | None) -> bool:
        """Emit what `token` adds; True when the sequence is finished."""
        req, self.n, self.last = self.req, self.n + 1, token
        self.history.append(token)
        lps = [logprob] if logprob is not None and token not in req.stop_ids else []
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
                 prefix_cache_bytes: int = 256 * 2**20, prefill_budget: int = 512, metrics: Metrics | None = None,
                 vision=None, pan_and_scan=None):
        self.model, self.tokenizer = model, tokenizer
        self.vision, self.pan_and_scan = vision, pan_and_scan  # vision None: a text-only server
        self.max_batch, self.max_queue, self.prefill_budget = max_batch, max_queue, prefill_budget
        self.prefix_cache = PrefixCache(model, max_bytes=prefix_cache_bytes) if prefix_cache_bytes else None
        self.metrics = metrics or Metrics()
        self.waiting: deque[Request] = deque()
        self.active: list[_Sequence] = []
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

    def submit(self, req: Request):
        with self.cond:
            if self.stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy: {len(self.waiting)} requests are already queued "
                                f"(--max-queue {self.max_queue}); retry later")
            self.waiting.append(req)
            self.metrics.queue_depth = len(self.waiting)
            self.cond.notify()

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
                if not self.stopping and not self.waiting and not self.active:
                    release_free_memory()  # going idle: nothing is in flight
                while not self.stopping and not self.waiting and not self.active:
                    self.cond.wait(1.0)  # a bounded wait lets the main thread run signal handlers
                if self.stopping:
                    break
            self._admit()
            self._step()
        for seq in self.active:
            seq.req.emit(Failed("the server is shutting down"))
        with self.cond:
            for req in self.waiting:
                req.emit(Failed("the server is shutting down"))
            self.waiting.clear()
        self.active = []
        self._gauges()

    def _take(self) -> Request | None:
        with self.cond:
            req = self.waiting.popleft() if self.waiting else None
            self.metrics.queue_depth = len(self.waiting)
            return req

    def _admit(self):
        """Prefill waiting requests into free batch slots, at most `prefill_budget` prompt tokens per
        step beyond the first request so that running sequences keep decoding."""
        budget = self.prefill_budget
        while len(self.active) < self.max_batch and (budget > 0 or not self.active):
            req = self._take()
            if req is None:
                break
            if req.cancelled:
                self.metrics.cancelled += 1
                continue
            budget -= len(req.ids)
            try:
                max_len = len(req.ids) + req.max_tokens
                prompt = req.ids
                if req.images:  # encoded here, on the thread that owns the models
                    features = [encode_image(self.vision, im, self.pan_and_scan) for im in req.images]
                    prompt = embed_prompt(self.model, req.ids, features)
                cache, logits = prefill(self.model, prompt, max_len, self.prefix_cache)
                seq = _Sequence(req, cache, self.tokenizer)
                token = sample(logits, req.params, seq.generator, seq.history)
                self.metrics.observe_first_token(time.perf_counter() - req.submitted)
                self.metrics.prompt_tokens += len(req.ids)
                if not self._advance(seq, token, logits):
                    self.active.append(seq)
            except Exception as e:  # one bad request must not take the loop down
                req.emit(Failed(f"prefill failed: {type(e).__name__}: {e}"))
                self.metrics.failed += 1
        self._gauges()

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
                logits = self.model.decode(torch.tensor([s.last for s in live]), [s.cache for s in live])
                keep = []
                for seq, row in zip(live, logits):
                    token = sample(row, seq.req.params, seq.generator, seq.history)
                    if not self._advance(seq, token, row):
                        keep.append(seq)
        except Exception as e:
            for seq in live:
                seq.req.emit(Failed(f"decode failed: {type(e).__name__}: {e}"))
            self.metrics.failed += len(live)
            keep = []
        self.active = keep
        self._gauges()

    def _gauges(self):
        self.metrics.active_sequences = len(self.active)
        self.metrics.queue_depth = len(self.waiting)
