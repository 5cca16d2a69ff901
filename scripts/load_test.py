"""Load test for `gemma3 serve`: N concurrent streaming clients send M requests of mixed lengths.

Reports errors, whether every stream completed (finish_reason + [DONE]), server RSS after warm-up
and after the run, aggregate throughput (completion tok/s), p50/p99 time to first token, and the
ratio of aggregate throughput at N concurrent clients to a single stream's on the same requests
(same prompts, `--ratio-tokens` long each, so only the batching differs).

Talks to 127.0.0.1 only and stops by itself (every request is bounded by --max-tokens and
--timeout). By default it starts its own server (the embedded 270M model) and stops it at the end:

    python scripts/load_test.py --concurrency 16 --requests 64 --max-tokens 8,16,32
    python scripts/load_test.py --port 8000   # an already running server on 127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path

import httpx
from local_server import start_server, stop_server

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the ocean.",
    "def quicksort(xs):",
    "Once upon a time, in a small village by the sea, there lived",
    "List three facts about the Moon:",
    "Translate to German: The weather is nice today.",
    "The history of the printing press begins",
    "Q: What is 17 times 23?\nA:",
    "Summarize the following text in one sentence.\n\n" + " ".join(
        ["The GNU General Public License is a free, copyleft license for software and other kinds of works."] * 20),
]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def settled_rss(url: str, pid: int) -> float | None:
    """RSS once the server is idle (no active sequence, empty queue) and has had a second to
    release what the last requests freed."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = httpx.get(url + "/health", timeout=10).json()
        if health["active_sequences"] == 0 and health["queue_depth"] == 0:
            break
        time.sleep(0.2)
    time.sleep(1.0)
    return rss_mb(pid)


async def one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, seed: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.7, "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    start, ttft, finish, usage, done = time.perf_counter(), None, None, None, False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return {"error": chunk["error"]["message"]}
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for c in chunk["choices"]:
                    if ttft is None and c["delta"].get("content"):
                        ttft = time.perf_counter() - start
                    finish = c["finish_reason"] or finish
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    complete = done and finish in ("stop", "length") and usage is not None
    return {"ttft": ttft, "tokens": usage["completion_tokens"] if usage else 0, "complete": complete,
            "latency": time.perf_counter() - start, "error": None if complete else "incomplete stream"}


async def run(url: str, model: str, jobs: list[tuple[str, int]], concurrency: int, timeout: float) -> dict:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout,
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def limited(i, job):
            async with sem:
                return await one(client, model, job[0], job[1], seed=i)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(i, j) for i, j in enumerate(jobs)))
        wall = time.perf_counter() - start
    ok = [r for r in results if not r["error"]]
    ttfts = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    tokens = sum(r["tokens"] for r in ok)
    q = (lambda p: ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))] if ttfts else None)
    return {"requests": len(jobs), "concurrency": concurrency, "errors": len(results) - len(ok),
            "error_samples": sorted({r["error"] for r in results if r["error"]})[:5],
            "all_complete": len(ok) == len(jobs), "completion_tokens": tokens, "wall_s": round(wall, 2),
            "throughput_tok_s": round(tokens / wall, 2), "ttft_p50_s": q(0.5) and round(q(0.5), 3),
            "ttft_p99_s": q(0.99) and round(q(0.99), 3),
            "latency_mean_s": round(statistics.mean(r["latency"] for r in ok), 2) if ok else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=None, help="use a running server on 127.0.0.1:PORT")
    ap.add_argument("--concurrency", "-c", type=int, default=16)
    ap.add_argument("--requests", "-n", type=int, default=64)
    ap.add_argument("--max-tokens", default="8,16,32", help="comma-separated lengths, mixed across requests")
    ap.add_argument("--single", type=int, default=4, help="sequential requests for the single-stream baseline")
    ap.add_argument("--ratio-tokens", type=int, default=64,
                    help="completion length of the single-stream vs --concurrency comparison (default 64)")
    ap.add_argument("--max-batch", type=int, default=None, help="server --max-batch (default: --concurrency)")
    ap.add_argument("--ctx", type=int, default=2048, help="server --ctx")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per request at most")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=None, help="warm-up requests at full concurrency (default: -c)")
    args = ap.parse_args()

    proc, url = (None, f"http://127.0.0.1:{args.port}") if args.port else start_server(
        "--max-batch", str(args.max_batch or args.concurrency), "--max-queue", str(max(args.requests, 1)),
        "--ctx", str(args.ctx))
    try:
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        lengths = [int(x) for x in args.max_tokens.split(",")]
        rng = random.Random(args.seed)
        # Warm-up: one full round at the target concurrency.
        warm = [(rng.choice(PROMPTS), rng.choice(lengths)) for _ in range(args.warmup or args.concurrency)]
        report = {"warmup": asyncio.run(run(url, model, warm, args.concurrency, args.timeout))}
        # Batching gain: the same requests (same prompts, same length) one at a time, then
        # --concurrency at a time. Only the scheduling differs, so the ratio measures batching.
        same = [(PROMPTS[i % 4], args.ratio_tokens) for i in range(args.concurrency * 2)]
        report["single"] = asyncio.run(run(url, model, same[:args.single], 1, args.timeout))
        report["batched"] = asyncio.run(run(url, model, same, args.concurrency, args.timeout))
        # The RSS baseline comes after every shape the server will see (full batches of long
        # completions included): what grows after it, over the mixed run, would be a leak.
        report["rss_after_warmup_mb"] = proc and settled_rss(url, proc.pid)
        # Mixed load (robustness, TTFT, RSS): random prompts, short and long, random lengths.
        jobs = [(rng.choice(PROMPTS), rng.choice(lengths)) for _ in range(args.requests)]
        report["concurrent"] = asyncio.run(run(url, model, jobs, args.concurrency, args.timeout))
        report["rss_after_run_mb"] = proc and settled_rss(url, proc.pid)
        if proc is not None:
            report["rss_growth_after_warmup"] = round(report["rss_after_run_mb"] / report["rss_after_warmup_mb"] - 1, 4)
        metrics = httpx.get(url + "/metrics", timeout=30).text
        report["server_active_sequences_after"] = next(
            float(l.split()[1]) for l in metrics.splitlines() if l.startswith("gemma3_active_sequences "))
        single = report["single"]["throughput_tok_s"]
        report["throughput_ratio_concurrent_vs_single"] = (
            round(report["batched"]["throughput_tok_s"] / single, 2) if single else None)
        print(json.dumps(report, indent=2))
    finally:
        stop_server(proc)


if __name__ == "__main__":
    main()
