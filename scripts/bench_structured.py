"""Batch decode speed of the server's engine with every row constrained to a JSON schema against
the same batch unconstrained, on the embedded 270M (or --model):

    PYTHONPATH=src python scripts/bench_structured.py --batch 8 --tokens 64 --rounds 2

`--batch` requests are queued together and decode `--tokens` tokens each: unconstrained with no
stop token (so none ends early), constrained by a schema no document can complete in that many
tokens (an array of at least 50 records), so both batches run the same steps. The engine runs on
the main thread as in `gemma3 serve`. Reported: aggregate completion tok/s of each, and the
constrained/unconstrained ratio, per round, counted while the whole batch decodes (the two alternate, so a busy machine slows both)."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time

from gemma3.inference.constrain import Constraint, Guide
from gemma3.inference.load import load
from gemma3.inference.sampling import SamplingParams
from gemma3.server.engine import Done, Engine, Failed, Request

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


def run_batch(engine: Engine, tok, batch: int, tokens: int, constrained: bool) -> float:
    """Aggregate tok/s of `batch` requests queued at once, counted only while every row decodes:
    the engine admits queued prompts a chunk at a time while earlier rows decode (PREFILL_SHARE),
    so the first steps run a partial batch."""
    ids = tok.encode(PROMPT)
    constraint = Constraint.json_schema(SCHEMA)

    async def consume(r: Request) -> list[float]:
        times = []
        while True:
            event = await r.events.get()
            if isinstance(event, Failed):
                raise RuntimeError(event.message)
            times.append(time.perf_counter())
            if isinstance(event, Done):
                assert event.finish_reason == "length", event
                return times

    async def main():
        loop = asyncio.get_running_loop()
        reqs = [Request(ids=ids, params=SamplingParams(temperature=0.8, seed=i), max_tokens=tokens, stop=[],
                        stop_ids=frozenset(), guide=Guide(tok, constraint) if constrained else None,
                        loop=loop, events=asyncio.Queue()) for i in range(batch)]
        for r in reqs:
            engine.submit(r)
        events = await asyncio.gather(*(consume(r) for r in reqs))
        start, end = max(t[0] for t in events), min(t[-1] for t in events)  # every row decoding
        if end <= start:
            raise SystemExit("no step ran the whole batch (the first row finished before the last was admitted): "
                             "raise --tokens")
        n = sum(start < x <= end for t in events for x in t)
        return n / (end - start)

    return asyncio.run(main())


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
    results = []

    def drive():
        try:
            run_batch(engine, tok, args.batch, 8, True)  # warm-up: kernels, allocator, grammar cache
            for r in range(args.rounds):
                free = run_batch(engine, tok, args.batch, args.tokens, False)
                constrained = run_batch(engine, tok, args.batch, args.tokens, True)
                results.append((free, constrained))
                print(f"round {r + 1}: batch {args.batch} x {args.tokens} tokens: unconstrained {free:.1f} tok/s, "
                      f"constrained {constrained:.1f} tok/s, ratio {constrained / free:.3f} "
                      f"({100 * (free / constrained - 1):.1f}% slower)", flush=True)
        finally:
            engine.stop()

    threading.Thread(target=drive, daemon=True).start()
    engine.run()  # on the main thread, as `gemma3 serve` runs it
    print(json.dumps({"batch": args.batch, "tokens": args.tokens,
                      "rounds": [{"unconstrained_tok_s": round(f, 2), "constrained_tok_s": round(c, 2)}
                                 for f, c in results]}))


if __name__ == "__main__":
    main()
