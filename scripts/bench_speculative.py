"""Prompt-lookup speculative decoding against plain decoding on the embedded 270M (or --model):

    PYTHONPATH=src python scripts/bench_speculative.py              # speed: repeat task and free prose
    PYTHONPATH=src python scripts/bench_speculative.py --identity   # greedy identity, 10 prompts x 128 tokens

Speed: greedy decode tok/s (after the first token, so prefill is left out) of plain decoding and
of --lookup, run back to back `--rounds` times (other processes on a shared machine slow both
alike), and the ratio of the medians; a task that repeats its input and one of free prose.
Identity: the generated token ids of plain and lookup decoding, compared for every prompt."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gemma3.inference.generate import generate_step
from gemma3.inference.load import load
from gemma3.inference.sampling import SamplingParams
from gemma3.inference.speculative import PromptLookup

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


def decode_rate(model, ids, max_tokens, lookup):
    """(decode tok/s after the first token, tokens)."""
    tokens, start = [], None
    for token in generate_step(model, ids, SamplingParams(), max_tokens, lookup=lookup):
        tokens.append(token)
        if start is None:
            start = time.perf_counter()
    return (len(tokens) - 1) / (time.perf_counter() - start), tokens


def speed(model, tok, args):
    for name, text in TASKS.items():
        ids = tok.encode(text)
        plain, spec, stats = [], [], None
        for _ in range(args.rounds):
            plain.append(decode_rate(model, ids, args.tokens, None)[0])
            lookup = PromptLookup(ngram=args.ngram, k=args.k)
            spec.append(decode_rate(model, ids, args.tokens, lookup)[0])
            stats = lookup.stats
        p, s = statistics.median(plain), statistics.median(spec)
        print(f"{name:7s} plain {p:6.1f} tok/s   lookup {s:6.1f} tok/s   x{s / p:.2f}   {stats.summary()}", flush=True)


def identity(model, tok, args):
    same = 0
    for text in IDENTITY_PROMPTS:
        ids = tok.encode(text)
        plain = decode_rate(model, ids, args.tokens, None)[1]
        spec = decode_rate(model, ids, args.tokens, PromptLookup(ngram=args.ngram, k=args.k))[1]
        same += plain == spec
        print(f"{'identical' if plain == spec else 'DIFFERENT'}  {len(plain)} tokens  {text[:40]!r}", flush=True)
    print(f"{same}/{len(IDENTITY_PROMPTS)} prompts identical")
    return same == len(IDENTITY_PROMPTS)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ngram", type=int, default=3)
    parser.add_argument("--k", type=int, default=7)
    parser.add_argument("--identity", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load(args.model, backend="cpu")
    print(f"threads {torch.get_num_threads()}", flush=True)
    with torch.inference_mode():
        if args.identity:
            raise SystemExit(0 if identity(model, tok, args) else 1)
        speed(model, tok, args)


if __name__ == "__main__":
    main()
