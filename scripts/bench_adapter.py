"""Decode speed with a LoRA adapter applied unmerged against the base alone, on the embedded 270M
(or --model), CPU backend:

    PYTHONPATH=src python scripts/bench_adapter.py                 # random rank-8 adapter on q,k,v,o,gate,up,down
    PYTHONPATH=src python scripts/bench_adapter.py --adapter runs/lora/final

Batch 1: greedy tok/s after a 16-token prompt (`--tokens` steps, prefill left out), the one-call
step (ops.DecodeStack) both ways. Batch 4: a continuous-batch step (model.decode, one cache per
row, as the server runs it), every row under the adapter. Base and adapted models are loaded side
by side and measured back to back `--rounds` times (other processes on a shared machine slow both
alike); the figures are medians and the ratio is adapted / base."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from gemma3.formats.peft import ALL_TARGETS, read_adapter
from gemma3.inference.load import load
from gemma3.model import adapters

PROMPT = [2] + [1000 + 37 * i for i in range(15)]


def random_adapter(model, rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in ALL_TARGETS:
            out[f"{name}.lora_A"] = torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5
            out[f"{name}.lora_B"] = torch.randn(m.out_features, rank, generator=g) * 0.01
    return out


def batch1(model, tokens: int) -> float:
    cache = model.new_cache(1, max_len=len(PROMPT) + tokens + 1)
    token = model.greedy_next(torch.tensor([PROMPT]), cache)
    start = time.perf_counter()
    for _ in range(tokens):
        token = model.greedy_next(token.view(1, 1), cache)
    return tokens / (time.perf_counter() - start)


def batch4(model, steps: int) -> float:
    caches = [model.new_cache(1, max_len=len(PROMPT) + steps + 2) for _ in range(4)]
    for c in caches:
        model(torch.tensor([PROMPT]), c, last_only=True)
    tokens = torch.tensor([5, 6, 7, 8])
    start = time.perf_counter()
    for _ in range(steps):
        tokens = model.decode(tokens, caches).argmax(-1)
    return 4 * steps / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--adapter", default=None, help="a PEFT adapter directory (default: a random one)")
    p.add_argument("--rank", type=int, default=8, help="rank of the random adapter (default 8)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base, _ = load(args.model, backend="cpu")
    adapted, _ = load(args.model, backend="cpu")
    if args.adapter:
        cfg, tensors = read_adapter(args.adapter)
        rank, alpha = cfg.rank, cfg.alpha
    else:
        tensors, rank, alpha = random_adapter(adapted, args.rank), args.rank, 2.0 * args.rank
    adapters.attach(adapted, "bench", rank, alpha, tensors, default=True)
    figures = {"base_b1": [], "adapter_b1": [], "base_b4": [], "adapter_b4": []}
    with torch.inference_mode():
        batch1(base, 8), batch1(adapted, 8)  # warm-up
        for _ in range(args.rounds):
            figures["base_b1"].append(batch1(base, args.tokens))
            figures["adapter_b1"].append(batch1(adapted, args.tokens))
            figures["base_b4"].append(batch4(base, args.tokens // 4))
            figures["adapter_b4"].append(batch4(adapted, args.tokens // 4))
    med = {k: statistics.median(v) for k, v in figures.items()}
    result = {"rank": rank, "adapted_projections": len(tensors) // 2, "threads": torch.get_num_threads(),
              "tok_s": {k: round(v, 1) for k, v in med.items()},
              "ratio_b1": round(med["adapter_b1"] / med["base_b1"], 3),
              "ratio_b4": round(med["adapter_b4"] / med["base_b4"], 3),
              "rounds": {k: [round(x, 1) for x in v] for k, v in figures.items()}}
    if args.json:
        print(json.dumps(result))
    else:
        t = result["tok_s"]
        print(f"rank {rank} on {result['adapted_projections']} projections, {result['threads']} threads")
        print(f"batch 1: base {t['base_b1']} tok/s, adapter {t['adapter_b1']} tok/s ({result['ratio_b1']:.1%})")
        print(f"batch 4: base {t['base_b4']} tok/s, adapter {t['adapter_b4']} tok/s ({result['ratio_b4']:.1%})")


if __name__ == "__main__":
    main()
