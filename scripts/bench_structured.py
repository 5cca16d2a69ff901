"""Batch decode speed of the server's engine with every row constrained to a JSON schema against
the same batch unconstrained, on the embedded 270M (or --model):

    PYTHONPATH=src python scripts/bench_structured.py --batch 8 --tokens 64 --rounds 2

`--batch` requests are queued together and decode `--tokens` tokens each: unconstrained with no
stop token (so none ends early), constrained by a schema no document can complete in that many
tokens (an array of at least 50 records), so both batches run the same steps. The engine is
driven step by step on the main thread (the thread `gemma3 serve` runs it on), every prompt
prefilled before the first step. Timed: each `Engine._step` (the batched forward, the masks
computed beside it on the engine's mask thread, the masking, the sampling), all of them running
the whole batch. Reported per round: the median and mean step time of each and their ratio (the
two alternate, so a busy machine slows both). On a shared machine the forward's time varies more
than the whole cost of the masks, so the constrained rounds also time that cost directly: the
mask fill (on the mask thread, beside the forward) and the masking, per step; their sum over the
unconstrained median step bounds the slowdown the constraints add."""

from __future__ import annotations

import argparse
import json
import math
import queue
import statistics
import time

import torch

from gemma3.inference.constrain import Constraint, Guide
from gemma3.inference.load import load
from gemma3.inference.sampling import SamplingParams
from gemma3.server import engine as engine_module
from gemma3.server.engine import Done, Engine, Request

RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                     "country": {"enum": ["FR", "DE", "US"]}},
                    "required": ["city", "country"], "additionalProperties": False},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 10}, "maxItems": 4},
    },
    "required": ["name", "age", "role", "address", "scores"],
    "additionalProperties": False,
}
SCHEMA = {"type": "array", "items": RECORD, "minItems": 50}
PROMPT = "A list of the users of our web site, as JSON:\n"


class _Timed:
    """Wraps a function of the engine module, keeping how long each call took."""

    def __init__(self, name: str):
        self.name, self.fn, self.seconds = name, getattr(engine_module, name), []
        setattr(engine_module, name, self)

    def __call__(self, *args):
        start = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.seconds.append(time.perf_counter() - start)


class _Inbox:
    """Stands in for the asyncio side of a Request: its events land in its queue at once."""

    def call_soon_threadsafe(self, fn, *args):
        fn(*args)


def run_batch(engine: Engine, tok, batch: int, tokens: int, constrained: bool) -> list[float]:
    """Seconds of each decode step of `batch` requests decoding together, the engine driven step by
    step on this thread. Every prompt is prefilled before the first step (the running engine
    spreads admissions over decode steps, PREFILL_SHARE, so its first steps run a partial batch),
    so every step runs the whole batch."""
    ids = tok.encode(PROMPT)
    constraint = Constraint.json_schema(SCHEMA)
    reqs = [Request(ids=ids, params=SamplingParams(temperature=0.8, seed=i), max_tokens=tokens, stop=[],
                    stop_ids=frozenset(), guide=Guide(tok, constraint) if constrained else None,
                    loop=_Inbox(), events=queue.SimpleQueue()) for i in range(batch)]
    for r in reqs:
        engine.submit(r)
    while engine.waiting or engine.prefilling:
        engine.credit = math.inf  # prefill the next prompt now, whatever the decode steps have earned
        engine._admit()
    steps = []
    while engine.active:
        if len(engine.active) != batch:
            raise RuntimeError(f"{len(engine.active)} rows decoding, not {batch}")
        start = time.perf_counter()
        engine._step()
        steps.append(time.perf_counter() - start)
    for r in reqs:
        events = [r.events.get() for _ in range(r.events.qsize())]
        if not isinstance(events[-1], Done) or events[-1].finish_reason != "length":
            raise RuntimeError(f"a request ended with {events[-1]}")
    return steps[:-1]  # the last step only finishes the rows (no row goes on)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    model, tok = load(args.model, backend="cpu")[:2]
    engine = Engine(model, tok, max_batch=args.batch, max_queue=args.batch, prefix_cache_bytes=0)
    Guide(tok, Constraint("json_object"))  # builds llguidance's tokenizer view (~1 s) before timing
    results, fill, apply = [], _Timed("fill_masks"), _Timed("apply_masks")
    with torch.inference_mode():
        run_batch(engine, tok, args.batch, 8, True)  # warm-up: kernels, allocator, grammar cache
        for r in range(args.rounds):
            free = run_batch(engine, tok, args.batch, args.tokens, False)
            fill.seconds.clear()
            apply.seconds.clear()
            constrained = run_batch(engine, tok, args.batch, args.tokens, True)
            masks = statistics.median(fill.seconds) + statistics.median(apply.seconds)
            f, c = statistics.median(free), statistics.median(constrained)
            results.append((free, constrained, masks))
            print(f"round {r + 1}: batch {args.batch} x {args.tokens} tokens, {len(free)} / {len(constrained)} steps "
                  f"of the whole batch: median step unconstrained {1e3 * f:.1f} ms, constrained {1e3 * c:.1f} ms, "
                  f"ratio {c / f:.3f} (means {1e3 * statistics.mean(free):.1f} / "
                  f"{1e3 * statistics.mean(constrained):.1f} ms); masks per step: fill "
                  f"{1e3 * statistics.median(fill.seconds):.1f} ms + apply {1e3 * statistics.median(apply.seconds):.1f} "
                  f"ms = {100 * masks / f:.1f}% of the unconstrained step", flush=True)
    print(json.dumps({"batch": args.batch, "tokens": args.tokens, "rounds": [
        {"steps": [len(f), len(c)], "unconstrained_median_ms": round(1e3 * statistics.median(f), 2),
         "constrained_median_ms": round(1e3 * statistics.median(c), 2),
         "ratio": round(statistics.median(c) / statistics.median(f), 3), "mask_ms": round(1e3 * m, 2),
         "mask_share": round(m / statistics.median(f), 4)} for f, c, m in results]}))


if __name__ == "__main__":
    main()
