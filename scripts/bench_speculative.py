"""Speculative decoding (prompt lookup, a draft model) against plain decoding on the embedded 270M
(or --model):

    PYTHONPATH=src python scripts/bench_speculative.py              # speed: repeat task and free prose
    PYTHONPATH=src python scripts/bench_speculative.py --identity   # greedy identity, 10 prompts x 128 tokens
    ... --draft-model small.gguf [--draft-k 4]    # the draft model too (speed and identity)
    ... --step-times 1b.gguf 4b.gguf               # ms per decode step and per verify step of each model
    ... --server http://127.0.0.1:8000             # greedy identity through a running `gemma3 serve`

Speed: greedy decode tok/s (after the first token, so prefill is left out) of plain decoding and
of --lookup, run back to back `--rounds` times (other processes on a shared machine slow both
alike), and the ratio of the medians; a task that repeats its input and one of free prose.
Identity: the generated token ids of plain, lookup and draft-model decoding, compared for every
prompt. Step times: the inputs of an estimated draft-model speed-up (docs/speculative.md).
Server: the identity prompts greedy through the server, each alone without `speculative`, then
all at once (sharing the continuous batch) plainly and with each method of --methods; the texts
compared, the batch's wall time, and acceptance and tokens per step from /metrics."""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from gemma3.inference.generate import generate_step
from gemma3.inference.load import load
from gemma3.inference.sampling import SamplingParams
from gemma3.inference.speculative import DraftModel, PromptLookup

PARAGRAPH = (
    "The committee met on Tuesday to review the budget for the coming year. After a long discussion, "
    "the members agreed to increase funding for the public library by ten percent, to repair the roof "
    "of the community centre before winter, and to hire two additional staff for the parks department. "
    "A proposal to extend the opening hours of the swimming pool was postponed until the next meeting, "
    "because several members asked for more information about the costs of heating and staffing."
)
CODE = '''def mean(values):
    total = 0
    for v in values:
        total += v
    return total / len(values)


def variance(values):
    m = mean(values)
    total = 0
    for v in values:
        total += (v - m) ** 2
    return total / len(values)
'''
TASKS = {
    "repeat": f"Text: {PARAGRAPH}\n\nThe same text, copied exactly:\n{PARAGRAPH[:60]}",
    "code": f"Original code:\n```python\n{CODE}```\n\nThe same code with the functions documented:\n```python\n",
    "prose": "Once upon a time, in a small village at the edge of a great forest, there lived",
}
IDENTITY_PROMPTS = [
    TASKS["repeat"], TASKS["code"], TASKS["prose"],
    "The history of the Roman Empire",
    "Q: What is the capital of France?\nA:",
    "def fibonacci(n):\n",
    "List of prime numbers: 2, 3, 5, 7, 11,",
    f"Summary of the following text.\n{PARAGRAPH}\nSummary:",
    "The recipe for a simple bread: flour, water, salt and yeast. First,",
    "1. Introduction\n\nMachine learning is",
]


def decode_rate(model, ids, max_tokens, drafter):
    """(decode tok/s after the first token, tokens)."""
    tokens, start = [], None
    for token in generate_step(model, ids, SamplingParams(), max_tokens, speculative=drafter):
        tokens.append(token)
        if start is None:
            start = time.perf_counter()
    return (len(tokens) - 1) / (time.perf_counter() - start), tokens


def drafters(args, draft):
    """(name, a new drafter) for each method measured."""
    yield "lookup", PromptLookup(ngram=args.ngram, k=args.k)
    if draft is not None:
        yield "draft", DraftModel(draft, k=args.draft_k)


def speed(model, tok, args, draft):
    for name, text in TASKS.items():
        ids = tok.encode(text)
        rates, stats = {"plain": []}, {}
        for _ in range(args.rounds):
            rates["plain"].append(decode_rate(model, ids, args.tokens, None)[0])
            for method, drafter in drafters(args, draft):
                rates.setdefault(method, []).append(decode_rate(model, ids, args.tokens, drafter)[0])
                stats[method] = drafter.stats
        plain = statistics.median(rates["plain"])
        print(f"{name:7s} plain {plain:6.1f} tok/s", flush=True)
        for method, stat in stats.items():
            rate = statistics.median(rates[method])
            print(f"        {method:6s} {rate:6.1f} tok/s   x{rate / plain:.2f}   {stat.summary()}", flush=True)


def identity(model, tok, args, draft):
    same = 0
    for text in IDENTITY_PROMPTS:
        ids = tok.encode(text)
        plain = decode_rate(model, ids, args.tokens, None)[1]
        results = {method: decode_rate(model, ids, args.tokens, d)[1] for method, d in drafters(args, draft)}
        ok = all(tokens == plain for tokens in results.values())
        same += ok
        verdict = "identical" if ok else "DIFFERENT: " + ", ".join(m for m, t in results.items() if t != plain)
        print(f"{verdict}  plain {' '.join(results)}  {len(plain)} tokens  {text[:40]!r}", flush=True)
    print(f"{same}/{len(IDENTITY_PROMPTS)} prompts identical")
    return same == len(IDENTITY_PROMPTS)


def step_times(paths, args):
    """Median ms of a one-token decode step and of a verify step of draft_k + 1 rows, per model."""
    for path in paths:
        model, _ = load(path, backend="cpu")
        one, verify = [], []
        for _ in range(args.rounds):
            cache = model.new_cache(1, max_len=160)
            model(torch.tensor([[2] + [100] * 99]), cache)  # a 100-token context
            for _ in range(8):
                start = time.perf_counter()
                model.greedy_next(torch.tensor([[100]]), cache)
                one.append(time.perf_counter() - start)
            mark = cache.mark(args.draft_k + 1)
            for _ in range(4):
                start = time.perf_counter()
                model.verify(torch.tensor([100] * (args.draft_k + 1)), cache)
                verify.append(time.perf_counter() - start)
                cache.rewind(mark, 0)
        print(f"{model.config.name or path}: step {1000 * statistics.median(one):.1f} ms, verify of "
              f"{args.draft_k + 1} rows {1000 * statistics.median(verify):.1f} ms  ({path})", flush=True)


def server_identity(url, args) -> bool:
    import re

    import httpx

    model_id = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]

    def complete(prompt, spec=None):
        body = {"model": model_id, "prompt": prompt, "max_tokens": args.tokens, "temperature": 0}
        if spec:
            body["speculative"] = spec
        r = httpx.post(url + "/v1/completions", json=body, timeout=3600)
        if r.status_code != 200:
            raise SystemExit(f"{r.status_code}: {r.text}")
        return r.json()["choices"][0]["text"]

    def together(spec):
        out = [None] * len(IDENTITY_PROMPTS)
        threads = [threading.Thread(target=lambda i=i, p=p: out.__setitem__(i, complete(p, spec)))
                   for i, p in enumerate(IDENTITY_PROMPTS)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out, time.perf_counter() - start

    def counters():
        text = httpx.get(url + "/metrics", timeout=30).text
        return {k: float(re.search(rf"^gemma3_speculative_{k}_total (\S+)$", text, re.M).group(1))
                for k in ("verify_steps", "plain_steps", "draft_tokens", "accepted_tokens")}

    alone = [complete(p) for p in IDENTITY_PROMPTS]
    ok = True
    for method in ["plain"] + args.methods.split(","):
        spec = None if method == "plain" else {"method": method}
        if method == "draft":
            spec["k"] = args.draft_k
        before = counters()
        texts, wall = together(spec)
        moved = {k: v - before[k] for k, v in counters().items()}
        same = sum(a == b for a, b in zip(texts, alone))
        ok = ok and same == len(alone)
        steps = moved["verify_steps"] + moved["plain_steps"]
        extra = (f", {moved['accepted_tokens']:.0f}/{moved['draft_tokens']:.0f} drafted tokens accepted, "
                 f"{(moved['accepted_tokens'] + steps) / steps:.2f} tokens per step" if steps else "")
        print(f"{method:6s} {same}/{len(alone)} identical to alone-plain, {len(alone)} requests together in "
              f"{wall:.1f} s{extra}", flush=True)
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ngram", type=int, default=3)
    parser.add_argument("--k", type=int, default=7)
    parser.add_argument("--identity", action="store_true")
    parser.add_argument("--draft-model", default=None, help="also measure this draft model")
    parser.add_argument("--draft-k", type=int, default=4)
    parser.add_argument("--step-times", nargs="+", default=None, metavar="MODEL",
                        help="only time decode and verify steps of these models")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--server", default=None, metavar="URL", help="only check identity through this server")
    parser.add_argument("--methods", default="lookup,draft",
                        help="--server: speculative methods to send (default lookup,draft; draft needs a server "
                             "started with --draft-model)")
    args = parser.parse_args()
    if args.server:
        raise SystemExit(0 if server_identity(args.server.rstrip("/"), args) else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}", flush=True)
    with torch.inference_mode():
        if args.step_times:
            return step_times(args.step_times, args)
        model, tok = load(args.model, backend="cpu")
        draft = load(args.draft_model, backend="cpu")[0] if args.draft_model else None
        if args.identity:
            raise SystemExit(0 if identity(model, tok, args, draft) else 1)
        speed(model, tok, args, draft)


if __name__ == "__main__":
    main()
