"""Batch decode speed of the server's engine with every row constrained to a JSON schema against
the same batch unconstrained, on the embedded 270M (or --model):

    PYTHONPATH=src python scripts/bench_structured.py --batch 8 --tokens 64 --rounds 2

`--batch` requests are queued together and decode `--tokens` tokens each: unconstrained with no
stop token (so none ends early), constrained by a schema no document can complete in that many
tokens (an array of at least 50 records), so both batches run the same steps. The engine is
driven step by step on the main thread (the thread `gemma3 serve` runs it on), every prompt
prefilled before the first step. Timed: each `Engine._step` (the batched forward, the sampling,
and for constrained rows the grammar check of each sampled token, and the masks of the rows whose
token the grammar refused, sampled again: constrain.sample_lazily), all of them running the whole
batch. With --top-k the constrained rows are masked before they sample instead (their masks filled
on the engine's mask thread beside the forward). Reported per round: the median and mean step time
of each and their ratio (the two alternate, so a busy machine slows both), how many of the
constrained tokens needed a mask, and the masks' whole cost (fill + apply) per step."""

from __future__ import annotations

import argparse
import json
import math
import queue
import statistics
import time

import torch

from gemma3.inference import constrain
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
    """Wraps a function of constrain.py where the engine and constrain.py call it, keeping how long
    each call took and how many rows it was given."""

    def __init__(self, name: str):
        self.name, self.fn, self.seconds, self.rows = name, getattr(constrain, name), [], []
        for module in (engine_module, constrain):
            setattr(module, name, self)

    def __call__(self, *args):
        start = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.seconds.append(time.perf_counter() - start)
            self.rows.append(len(args[0]))

    def clear(self):
        self.seconds.clear()
        self.rows.clear()

    def per_step(self, steps: int) -> float:
        """Seconds per step: the calls' total over `steps` (most steps of the lazy path call none)."""
        return sum(self.seconds) / steps


class _Inbox:
    """Stands in for the asyncio side of a Request: its events land in its queue at once."""

    def call_soon_threadsafe(self, fn, *args):
        fn(*args)


def run_batch(engine: Engine, tok, batch: int, tokens: int, constrained: bool, top_k: int = 0) -> list[float]:
    """Seconds of each decode step of `batch` requests decoding together, the engine driven step by
    step on this thread. Every prompt is prefilled before the first step (the running engine
    spreads admissions over decode steps, PREFILL_SHARE, so its first steps run a partial batch),
    so every step runs the whole batch."""
    ids = tok.encode(PROMPT)
    constraint = Constraint.json_schema(SCHEMA)
    reqs = [Request(ids=ids, params=SamplingParams(temperature=0.8, top_k=top_k, seed=i), max_tokens=tokens, stop=[],
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
    ap.add_argument("--top-k", type=int, default=0,
                    help="sample from the top k (both batches): constrained rows are then masked before every step")
    args = ap.parse_args()
    model, tok = load(args.model, backend="cpu")[:2]
    engine = Engine(model, tok, max_batch=args.batch, max_queue=args.batch, prefix_cache_bytes=0)
    Guide(tok, Constraint("json_object"))  # builds llguidance's tokenizer view (~1 s) before timing
    results, fill, apply = [], _Timed("fill_masks"), _Timed("apply_masks")
    with torch.inference_mode():
        run_batch(engine, tok, args.batch, 8, True, args.top_k)  # warm-up: kernels, allocator, grammar cache
        for r in range(args.rounds):
            free = run_batch(engine, tok, args.batch, args.tokens, False, args.top_k)
            fill.clear()
            apply.clear()
            constrained = run_batch(engine, tok, args.batch, args.tokens, True, args.top_k)
            # Every mask call of the round (its first tokens' included) over its timed steps: an upper bound.
            masks = fill.per_step(len(constrained)) + apply.per_step(len(constrained))
            f, c = statistics.median(free), statistics.median(constrained)
            rows = sum(fill.rows)
            results.append((free, constrained, masks, rows))
            print(f"round {r + 1}: batch {args.batch} x {args.tokens} tokens, {len(free)} / {len(constrained)} steps "
                  f"of the whole batch: median step unconstrained {1e3 * f:.1f} ms, constrained {1e3 * c:.1f} ms, "
                  f"ratio {c / f:.3f} (means {1e3 * statistics.mean(free):.1f} / "
                  f"{1e3 * statistics.mean(constrained):.1f} ms); masks filled for {rows} of the "
                  f"{args.batch * args.tokens} constrained tokens; masks per step: fill "
                  f"{1e3 * fill.per_step(len(constrained)):.2f} ms + apply {1e3 * apply.per_step(len(constrained)):.2f} "
                  f"ms = {100 * masks / f:.1f}% of the unconstrained step", flush=True)
    # Pooled over the rounds: the forward's speed drifts between rounds on a shared machine (by
    # 25% between two rounds of one quiet run), and alternating rounds spread the drift over both.
    free_all = [t for f, _, _, _ in results for t in f]
    constrained_all = [t for _, c, _, _ in results for t in c]
    pooled = statistics.median(constrained_all) / statistics.median(free_all)
    print(f"all rounds: median step unconstrained {1e3 * statistics.median(free_all):.1f} ms, constrained "
          f"{1e3 * statistics.median(constrained_all):.1f} ms, ratio {pooled:.3f}")
    print(json.dumps({"batch": args.batch, "tokens": args.tokens, "top_k": args.top_k, "pooled_ratio": round(pooled, 3),
                      "rounds": [
        {"steps": [len(f), len(c)], "unconstrained_median_ms": round(1e3 * statistics.median(f), 2),
         "constrained_median_ms": round(1e3 * statistics.median(c), 2),
         "ratio": round(statistics.median(c) / statistics.median(f), 3), "mask_ms": round(1e3 * m, 2),
         "mask_share": round(m / statistics.median(f), 4), "masked_rows": rows,
         "constrained_tokens": args.batch * args.tokens} for f, c, m, rows in results]}))


if __name__ == "__main__":
    main()
