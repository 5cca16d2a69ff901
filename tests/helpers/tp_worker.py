"""Run under `torchrun --nproc-per-node N` by tests/model/test_tp.py: every rank builds the same model,
rank 0 records the unsharded model's results first, then all ranks shard it (gemma3.tp) and
repeat; rank 0 saves both sides to OUT for the test to compare.

usage: tp_worker.py tiny|270m OUT
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[2]))  # the repository root: tests.helpers

from gemma3.inference.generate import generate_step  # noqa: E402
from gemma3.inference.sampling import SamplingParams  # noqa: E402
from gemma3.model import tp  # noqa: E402
from gemma3.train.distributed import setup, teardown  # noqa: E402

GENERATE = 64


def build(kind):
    if kind == "tiny":  # 2 KV heads (split across 2 ranks), odd vocabulary (padded slice), 3 prompt chunks
        from tests.helpers.models import random_model, tiny_config

        model = random_model(tiny_config(kv_heads=2, heads=4, layers=6, window=8, vocab=257))
        prompt = torch.randint(3, 257, (20,), generator=torch.Generator().manual_seed(1)).tolist()
        return model, prompt
    from gemma3.inference.load import load

    model, tok = load(backend="torch")  # 1 KV head: replicated on both ranks
    return model, tok.encode("The history of the printing press begins in")


def run(model, prompt, kind, seed):
    out = {}
    with torch.inference_mode():
        out["logits"] = model(torch.tensor([prompt]))[0]
        caches = [model.new_cache(1, max_len=len(prompt) + 1) for _ in range(2)]
        if kind == "tiny":  # batched decode (the server's path): two sequences, two caches, one step
            for c, p in zip(caches, (prompt, prompt[:-3])):
                model(torch.tensor([p]), c)
            out["batched"] = model.decode(torch.tensor([prompt[-1], prompt[-4]]), caches)
        out["kv_bytes"] = torch.tensor(caches[0].nbytes())
    out["tokens"] = torch.tensor(list(generate_step(model, prompt, SamplingParams(), GENERATE)))
    if kind == "tiny":
        hot = SamplingParams(temperature=1.0, seed=seed)
        out["sampled"] = torch.tensor(list(generate_step(model, prompt, hot, GENERATE)))
    return out


def main():
    kind, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    ctx = setup()
    model, prompt = build(kind)
    seed = tp.shared_seed()  # what the CLI does when no --seed is given
    result = {}
    if ctx.rank == 0:
        result = {f"single_{k}": v for k, v in run(model, prompt, kind, seed).items()}
        model.double()  # the fp32 noise floor: the same model's float64 logits
        with torch.inference_mode():
            result["fp64_logits"] = model(torch.tensor([prompt]))[0]
        model.float()
    tp.apply(model, ctx.rank, ctx.world)
    result |= {f"tp_{k}": v for k, v in run(model, prompt, kind, seed).items()}
    if kind == "tiny":  # every rank must have drawn the same tokens
        everyone = [torch.empty_like(result["tp_sampled"]) for _ in range(ctx.world)]
        dist.all_gather(everyone, result["tp_sampled"])
        result["tp_sampled_all_ranks"] = torch.stack(everyone)
    if ctx.rank == 0:
        torch.save(result, out)
    teardown(ctx)


if __name__ == "__main__":
    main()
