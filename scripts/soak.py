"""Soak test for `gemma3 serve`: many concurrent clients, a long mixed stream of requests.

The mix: normal chat completions, streamed ones, streams the client abandons after the first
chunk (cancelled), and malformed requests (bad JSON, wrong types, out-of-range values, unknown
fields, over-long prompts and stop lists). It checks that no response is a 5xx, that every
well-formed request completes (finish_reason, and [DONE] for streams), that the malformed ones get
a 4xx with an OpenAI-shaped error, that no sequence is left running at the end, and that the
server's RSS after the run is within 5% of its RSS after a warm-up of the same mix.

    python scripts/soak.py --concurrency 64 --requests 2000 --json docs/soak_64x2000.json
    python scripts/soak.py --port 8000     # an already running server on 127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import time
from pathlib import Path

import httpx
from load_test import PROMPTS, settled_rss
from local_server import start_server, stop_server

KINDS = ("normal", "stream", "cancel", "malformed")


def malformed(rng: random.Random, model: str) -> tuple[str, bytes | dict]:
    """(endpoint, body) of a request the server must refuse with a 4xx."""
    chat, comp = "/v1/chat/completions", "/v1/completions"
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        (chat, b'{"model": "x", "messages": [{"role": "user", "content": "hi"'),   # truncated JSON
        (chat, b"\xff\xfe not json at all"),
        (chat, {"model": model}),                                                 # no messages
        (chat, {"model": model, "messages": "hi"}),
        (chat, {"model": model, "messages": [{"role": "wizard", "content": "hi"}]}),
        (chat, {"model": model, "messages": msgs, "temperature": -1}),
        (chat, {"model": model, "messages": msgs, "max_tokens": -5}),  # (too large is capped, not refused)
        (chat, {"model": model, "messages": msgs, "top_p": "high"}),
        (chat, {"model": model, "messages": msgs, "stop": ["x"] * 10_000}),
        (chat, {"model": model, "messages": msgs, "logit_bias": {"abc": 1}}),
        (chat, {"model": model, "messages": msgs, "n": 0}),
        (comp, {"model": model, "prompt": ""}),
        (comp, {"model": model, "prompt": "word " * 200_000}),                    # over the context
        (comp, {"model": model, "prompt": [[1, 2], "mixed"]}),
        (comp, {"model": model, "prompt": "hi", "logprobs": 99}),
    ]
    return rng.choice(cases)


async def one(client: httpx.AsyncClient, kind: str, model: str, rng: random.Random) -> dict:
    if kind == "malformed":
        path, body = malformed(rng, model)
        kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) \
            else {"json": body}
        try:
            r = await client.post(path, **kw)
        except httpx.HTTPError as e:
            return {"kind": kind, "status": None, "error": f"{type(e).__name__}: {e}"}
        ok = 400 <= r.status_code < 500 and set(r.json().get("error", {})) >= {"message", "type", "code"}
        return {"kind": kind, "status": r.status_code, "error": None if ok else f"unexpected: {r.text[:200]}"}

    body = {"model": model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "max_tokens": rng.choice((4, 8, 16, 32)), "temperature": rng.choice((0.0, 0.7, 1.0)),
            "seed": rng.randrange(2**31)}
    try:
        if kind == "normal":
            r = await client.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                return {"kind": kind, "status": r.status_code, "error": r.text[:200]}
            finish = r.json()["choices"][0]["finish_reason"]
            return {"kind": kind, "status": 200, "error": None if finish in ("stop", "length") else f"finish {finish}"}
        async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                return {"kind": kind, "status": r.status_code, "error": (await r.aread())[:200].decode("replace")}
            finish, done = None, False
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                if kind == "cancel":  # walk away after the first chunk: the server must drop the sequence
                    return {"kind": kind, "status": 200, "error": None}
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return {"kind": kind, "status": 200, "error": chunk["error"]["message"]}
                finish = chunk["choices"][0]["finish_reason"] or finish
            ok = done and finish in ("stop", "length")
            return {"kind": kind, "status": 200, "error": None if ok else f"incomplete stream ({finish}, {done})"}
    except httpx.HTTPError as e:
        return {"kind": kind, "status": None, "error": f"{type(e).__name__}: {e}"}


async def run(url: str, model: str, n: int, concurrency: int, seed: int, timeout: float) -> dict:
    rng = random.Random(seed)
    kinds = [rng.choice(KINDS) for _ in range(n)]
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout,
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def limited(kind, i):
            async with sem:
                return await one(client, kind, model, random.Random(seed * 1_000_003 + i))

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(k, i) for i, k in enumerate(kinds)))
        wall = time.perf_counter() - start
    statuses = collections.Counter(str(r["status"]) for r in results)
    errors = [r for r in results if r["error"]]
    return {"requests": n, "concurrency": concurrency, "wall_s": round(wall, 1),
            "by_kind": dict(collections.Counter(kinds)), "statuses": dict(sorted(statuses.items())),
            "5xx": sum(c for s, c in statuses.items() if s.startswith("5")),
            "failed": len(errors), "failed_by_kind": dict(collections.Counter(r["kind"] for r in errors)),
            "error_samples": sorted({str(r["error"]) for r in errors})[:5]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=None, help="use a running server on 127.0.0.1:PORT")
    ap.add_argument("--concurrency", "-c", type=int, default=64)
    ap.add_argument("--requests", "-n", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=256, help="requests of the same mix before the RSS baseline")
    ap.add_argument("--max-batch", type=int, default=16, help="server --max-batch")
    ap.add_argument("--ctx", type=int, default=1024, help="server --ctx")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per request at most")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = ap.parse_args()

    # A queue as deep as twice the clients: no 429s.
    proc, url = (None, f"http://127.0.0.1:{args.port}") if args.port else start_server(
        "--max-batch", str(args.max_batch), "--max-queue", str(2 * args.concurrency), "--ctx", str(args.ctx))
    try:
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        report = {"warmup": asyncio.run(run(url, model, args.warmup, args.concurrency, args.seed + 1, args.timeout))}
        report["rss_after_warmup_mb"] = proc and settled_rss(url, proc.pid)
        report["soak"] = asyncio.run(run(url, model, args.requests, args.concurrency, args.seed, args.timeout))
        report["rss_after_run_mb"] = proc and settled_rss(url, proc.pid)
        if proc is not None:
            report["rss_ratio"] = round(report["rss_after_run_mb"] / report["rss_after_warmup_mb"], 4)
        health = httpx.get(url + "/health", timeout=30).json()
        report["active_sequences_after"] = health["active_sequences"]
        report["queue_depth_after"] = health["queue_depth"]
        soak = report["soak"]
        report["pass"] = (soak["5xx"] == 0 and soak["failed"] == 0 and health["active_sequences"] == 0
                          and (proc is None or report["rss_ratio"] <= 1.05))
        text = json.dumps(report, indent=2)
        print(text)
        if args.json:
            args.json.write_text(text + "\n")
        sys.exit(0 if report["pass"] else 1)
    finally:
        stop_server(proc)


if __name__ == "__main__":
    main()
