"""RL rollout throughput: our engine against plain PyTorch generation of the same samples.

    PYTHONPATH=src python scripts/bench_rollout.py [--prompts 4 --group 8 --max-tokens 16 --rounds 2] [--fp32]

Every engine samples `prompts × group` completions of exactly `max-tokens` tokens (no stop token, so
all produce the same number of tokens) at temperature 1 from the embedded 270M (or --model), prompt
prefill included in the time:
- ours/engine+lora: `train.rollout.rollout` on the policy `gemma3 rl` samples from: the GGUF blocks on
  the C++ kernels (CPU backend) with the training model's rank-8 LoRA adapter applied unmerged
  (`EnginePolicy`, B ≠ 0 so the adapter paths really run), one prefill per prompt, every row in
  one decode call per step, sampling by the inverse CDF (one uniform per row);
- ours/fp32+lora (with --fp32): the same rollout on the training model itself (fp32 PyTorch
  weights, adapters live), the path before the engine;
- plain: transformers' Gemma3ForCausalLM with the same fp32 weights, `generate(do_sample=True)` on
  the left-padded batch with its KV cache (eager attention), i.e. plain PyTorch generation.
Rounds run back to back (a shared machine slows all alike); the ratio is of the medians."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fp32", action="store_true", help="also time the rollout on the fp32 training model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    sys.path.insert(0, str(REPO))
    from gemma3.inference.load import load
    from gemma3.train import lora, tasks
    from gemma3.train.rollout import EnginePolicy, rollout
    from tests.helpers.hf_reference import hf_model

    model, tok = load(args.model)
    fast, _ = load(args.model, backend="cpu")
    plain = hf_model(model)
    lora.apply_lora(model, lora.LoRAConfig(rank=8, alpha=16))
    g = torch.Generator().manual_seed(0)
    for m in model.modules():  # a non-zero B, as after training
        if isinstance(m, lora.LoRALinear):
            m.lora_B.data = torch.randn(m.lora_B.shape, generator=g) * 1e-3
    EnginePolicy(fast, model)
    prompts = [tok.encode(s["prompt"], add_bos=True) for s in tasks.arithmetic(args.prompts, seed=0)]
    n_tokens = args.prompts * args.group * args.max_tokens

    def ours(net):
        def run():
            out = rollout(net, prompts, args.group, args.max_tokens, 1.0, set(), torch.Generator().manual_seed(0))
            assert sum(map(len, out)) == n_tokens
        return run

    def hf():
        width = max(map(len, prompts))
        rows = [p for p in prompts for _ in range(args.group)]
        ids = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in rows])
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
        with torch.inference_mode():
            out = plain.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=None,
                                 top_p=None, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                                 pad_token_id=tok.pad_id)
        assert out.shape[1] - width == args.max_tokens

    engines = {"ours/engine+lora": ours(fast), **({"ours/fp32+lora": ours(model)} if args.fp32 else {}), "plain": hf}
    times = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, run in engines.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    result = {"sequences": args.prompts * args.group, "tokens": n_tokens, "threads": args.threads,
              "tokens_per_s": {k: [round(n_tokens / t, 1) for t in v] for k, v in times.items()}}
    median = {k: statistics.median(v) for k, v in times.items()}
    result["ratio_vs_plain"] = {k: round(median["plain"] / median[k], 2) for k in engines if k != "plain"}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
