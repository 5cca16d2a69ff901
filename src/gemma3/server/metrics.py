"""Server counters rendered in the Prometheus text exposition format (no client library needed).
Written by the engine thread and the request handlers; plain int/float updates under the GIL are
enough for monitoring figures."""

from __future__ import annotations

import threading
from collections import Counter

from ..inference.speculative import SpeculativeStats

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float):
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str) -> list[str]:
        lines = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        lines += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return lines


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = Counter()  # (endpoint, HTTP status) -> count
        self.prompt_tokens = self.generation_tokens = 0
        self.cancelled = self.failed = 0
        self.prefix_hits = self.prefix_tokens = 0
        self.queue_depth = self.active_sequences = self.batch_size = 0
        self.latency = Histogram(LATENCY_BUCKETS)
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.batch = Histogram(BATCH_BUCKETS)
        self.speculative = SpeculativeStats()  # over every request that asked for speculative decoding

    def count_request(self, endpoint: str, status: int):
        with self.lock:
            self.requests[(endpoint, status)] += 1

    def observe_request(self, seconds: float):
        self.latency.observe(seconds)

    def observe_first_token(self, seconds: float):
        self.ttft.observe(seconds)

    def observe_batch(self, size: int):
        self.batch_size = size
        self.batch.observe(size)

    def render(self) -> str:
        out = ["# HELP gemma3_requests_total HTTP requests by endpoint and status code.",
               "# TYPE gemma3_requests_total counter"]
        with self.lock:
            out += [f'gemma3_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())]
        for name, kind, help_, value in (
            ("prompt_tokens_total", "counter", "Prompt tokens prefilled.", self.prompt_tokens),
            ("generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens),
            ("prefix_cache_hits_total", "counter", "Prompts that resumed from a cached prefix.", self.prefix_hits),
            ("prefix_cache_reused_tokens_total", "counter", "Prompt tokens taken from the prefix cache instead of "
             "being computed.", self.prefix_tokens),
            ("cancelled_sequences_total", "counter", "Sequences dropped because the client went away.", self.cancelled),
            ("failed_sequences_total", "counter", "Sequences ended by an internal error.", self.failed),
            ("queue_depth", "gauge", "Requests waiting for a batch slot.", self.queue_depth),
            ("active_sequences", "gauge", "Sequences in the running batch (each holds a KV cache).",
             self.active_sequences),
            ("batch_size", "gauge", "Sequences in the last decode step.", self.batch_size),
            ("speculative_verify_steps_total", "counter", "Verify steps of speculative requests.",
             self.speculative.verify_steps),
            ("speculative_plain_steps_total", "counter", "Steps of speculative requests with nothing drafted.",
             self.speculative.plain_steps),
            ("speculative_draft_tokens_total", "counter", "Tokens drafted (prompt lookup or the draft model).", self.speculative.drafted),
            ("speculative_accepted_tokens_total", "counter", "Drafted tokens the model accepted.",
             self.speculative.accepted),
            ("speculative_acceptance_rate", "gauge", "Accepted / drafted tokens so far.",
             round(self.speculative.acceptance, 4)),
            ("speculative_tokens_per_step", "gauge", "Tokens generated per step of speculative requests so far.",
             round(self.speculative.tokens_per_step, 4)),
        ):
            out += [f"# HELP gemma3_{name} {help_}", f"# TYPE gemma3_{name} {kind}", f"gemma3_{name} {value}"]
        for name, help_, hist in (
            ("request_latency_seconds", "Submission to last token.", self.latency),
            ("time_to_first_token_seconds", "Submission to first token.", self.ttft),
            ("decode_batch_size", "Sequences per decode step.", self.batch),
        ):
            out += [f"# HELP gemma3_{name} {help_}", f"# TYPE gemma3_{name} histogram"] + hist.render(f"gemma3_{name}")
        return "\n".join(out) + "\n"
