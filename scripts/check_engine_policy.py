"""The RL rollout policy on the real model: the quantized engine + the training model's LoRA adapter
(train/rollout.EnginePolicy) against the fp32 training model, on the embedded 270M (or --model).

    PYTHONPATH=src python scripts/check_engine_policy.py [--prompts 4 --tokens 8]

1. Zero adapter (B = 0, LoRA's initialisation): greedy rollouts on the engine equal the base
   engine's (no adapter) token for token; agreement with the fp32 model's greedy tokens is shown.
2. A "trained" adapter (random A, B of a size that moves the logits): after `refresh`, the
   engine's last-position logits against the training model's, relative L2 error, next to the
   base's quantization error (engine vs fp32, no adapter) and to how far the adapter moves the
   logits; and the share of positions where both pick the same greedy token."""

from __future__ import annotations

import argparse
import json

import torch

from gemma3.inference.load import load
from gemma3.train import lora, tasks
from gemma3.train.rollout import EnginePolicy, rollout


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load(args.model)
    engine, _ = load(args.model, backend="cpu")
    base, _ = load(args.model, backend="cpu")
    prompts = [tok.encode(s["prompt"], add_bos=True) for s in tasks.arithmetic(args.prompts, seed=0)]
    with torch.no_grad():
        plain = [model(torch.tensor([p]))[0, -1] for p in prompts]
    lora.apply_lora(model, lora.LoRAConfig(rank=8, alpha=16))
    policy = EnginePolicy(engine, model)
    greedy = rollout(engine, prompts, 1, args.tokens, 0.0, set())
    result = {"zero_adapter_equals_base_engine": greedy == rollout(base, prompts, 1, args.tokens, 0.0, set()),
              "zero_adapter_rows_equal_fp32_greedy": sum(a == b for a, b in zip(greedy, rollout(model, prompts, 1, args.tokens, 0.0, set()))),
              "rows": len(prompts)}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.02)
    policy.refresh()
    errs, quant, moved, same = [], [], [], 0
    with torch.inference_mode():
        for p, before in zip(prompts, plain):
            want = model(torch.tensor([p]))[0, -1]
            got = engine(torch.tensor([p]), engine.new_cache(1, len(p)), last_only=True)[0, -1]
            base_got = base(torch.tensor([p]), base.new_cache(1, len(p)), last_only=True)[0, -1]
            errs.append(rel(got, want))
            quant.append(rel(base_got, before))
            moved.append(rel(want, before))
            same += int(got.argmax() == want.argmax())
    result |= {"adapter_rel_err_max": round(max(errs), 4), "base_quantization_rel_err_max": round(max(quant), 4),
               "adapter_moves_logits_by": round(min(moved), 4), "same_argmax": f"{same}/{len(prompts)}"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
