"""One client cannot slow the others: a normal request's latency alone, and beside each kind of
worst-case request the server accepts (or must refuse), as a ratio. The hardening goal is <= 2.

Worst cases (each started first, the normal request sent while it is being worked on):
  long-prompt   a prompt of nearly --ctx tokens (its prefill is chunked between decode steps)
  byte-limit    a prompt just under the byte limit checked before tokenizing, over --ctx tokens
                once tokenized (tokenized off the engine thread at low priority, then a 400)
  stop-strings  16 stop strings of 256 characters (the defaults' maxima), 256 tokens generated
  logit-bias    1024 logit_bias entries (the default maximum), 256 tokens generated
  huge-body     a 100 MB body (refused with 413 as it arrives)
For scale, not worst cases of one request: "ordinary" (an ordinary request generating 256 tokens:
what sharing the batch with anyone costs), "eight-byte-limit" and "eight-long" (eight at once).
`max_ratio` is over the single worst cases.

It starts its own server (embedded 270M model) on 127.0.0.1 and stops it:

    python scripts/worst_case_latency.py                  # prints a table
    python scripts/worst_case_latency.py --json --ctx 4096 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import httpx
from local_server import start_server, stop_server

NORMAL = {"prompt": "The three primary colours are", "max_tokens": 32, "temperature": 0}


SINGLE = ("long-prompt", "byte-limit", "stop-strings", "logit-bias", "huge-body")


def timed_normal(url: str, model: str) -> float:
    start = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json={"model": model, **NORMAL}, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - start


def worst_cases(model: str, ctx: int) -> dict[str, list]:
    """name -> list of (body bytes or dict, expected status) sent at once."""
    long_prompt = "Notes:" + " the" * (ctx - 300)  # " the" is one token: ctx - 300 tokens or so
    base = {"model": model, "temperature": 0}
    huge = json.dumps({**base, "prompt": "hi", "padding": "x" * 100 * 2**20}).encode()
    return {
        "ordinary": [({**base, "prompt": "Count to a thousand: 1, 2, 3,", "max_tokens": 256}, 200)],
        "long-prompt": [({**base, "prompt": long_prompt, "max_tokens": 16}, 200)],
        "byte-limit": [({**base, "prompt": "ab " * (8 * ctx // 3 - 1), "max_tokens": 1}, 400)],
        "stop-strings": [({**base, "prompt": "Count to a thousand: 1, 2, 3,", "max_tokens": 256,
                           "stop": [f"{i:02d}" + "\u00a7" * 254 for i in range(16)]}, 200)],
        "logit-bias": [({**base, "prompt": "Count to a thousand: 1, 2, 3,", "max_tokens": 256,
                         "logit_bias": {str(1000 + i): 0.5 for i in range(1024)}}, 200)],
        "huge-body": [(huge, 413)],
        "eight-byte-limit": [({**base, "prompt": "ab " * (8 * ctx // 3 - 1) + str(k), "max_tokens": 1}, 400)
                             for k in range(8)],
        "eight-long": [({**base, "prompt": long_prompt + f" {k}", "max_tokens": 16}, 200) for k in range(8)],
    }


def send(url: str, body, expect: int, errors: list):
    try:
        if isinstance(body, bytes):
            r = httpx.post(url + "/v1/completions", content=body, timeout=600,
                           headers={"Content-Type": "application/json"})
        else:
            r = httpx.post(url + "/v1/completions", json=body, timeout=600)
        if r.status_code != expect:
            errors.append(f"status {r.status_code}, expected {expect}: {r.text[:200]}")
    except httpx.HTTPError as e:
        if expect != 413:  # a 413 may close the connection before the client finished sending
            errors.append(f"{type(e).__name__}: {e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, default=8192, help="server --ctx (default 8192)")
    ap.add_argument("--repeat", type=int, default=3, help="normal requests per measurement; the median counts")
    ap.add_argument("--lead", type=float, default=0.3, help="seconds the worst case runs before the normal request")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    proc, url = start_server("--ctx", str(args.ctx), "--max-batch", "16", "--max-tokens", "256")
    try:
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        timed_normal(url, model)  # warm-up
        alone = statistics.median(timed_normal(url, model) for _ in range(args.repeat))
        rows = []
        for name, requests in worst_cases(model, args.ctx).items():
            times, errors = [], []
            for _ in range(args.repeat):
                threads = [threading.Thread(target=send, args=(url, body, expect, errors)) for body, expect in requests]
                for t in threads:
                    t.start()
                time.sleep(args.lead)
                times.append(timed_normal(url, model))
                for t in threads:
                    t.join()
            beside = statistics.median(times)
            rows.append({"worst_case": name, "normal_s": round(beside, 3), "ratio": round(beside / alone, 2),
                         "errors": errors})
        result = {"ctx": args.ctx, "normal_alone_s": round(alone, 3), "rows": rows,
                  "max_ratio": max(r["ratio"] for r in rows if r["worst_case"] in SINGLE)}
    finally:
        stop_server(proc)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"normal request alone: {alone:.3f} s (median of {args.repeat}); ctx {args.ctx}")
    for r in rows:
        print(f"  beside {r['worst_case']:<13} {r['normal_s']:7.3f} s  {r['ratio']:5.2f}x"
              + (f"  {len(r['errors'])} ERRORS, first: {r['errors'][0]}" if r["errors"] else ""))
    print(f"worst ratio of one request: {result['max_ratio']:.2f}x (goal <= 2)")


if __name__ == "__main__":
    main()
