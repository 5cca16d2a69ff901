"""Long-context check for the 270M model (issue: long context and KV memory).

For each prompt length: chunked-prefill time, KV bytes held by the cache, peak RSS. Then, at the
end of the longest prompt, logits of the last --tail positions computed token by token (decode
steps after a chunked prefill of the rest) against the same positions from one chunked prefill.

    .venv/bin/python scripts/long_context.py --lengths 4096,8192,16384,32768 --tail 32 --json out.json
"""

import argparse
import json
import resource
import time

import torch

from gemma3 import load
from gemma3.model.memory import kv_bytes_windowed


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--lengths", default="4096,8192,16384,32768")
    ap.add_argument("--tail", type=int, default=32, help="positions compared token by token at the end")
    ap.add_argument("--kv-dtype", default="bf16")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()
    model, _ = load(args.model)
    lengths = [int(x) for x in args.lengths.split(",")]
    ids = torch.randint(3, model.config.vocab_size, (1, max(lengths)), generator=torch.Generator().manual_seed(0))
    rows = []
    with torch.inference_mode():
        for n in lengths:
            cache = model.new_cache(1, max_len=n, kv_dtype=args.kv_dtype)
            t0 = time.perf_counter()
            hidden = model.forward_hidden(ids[:, :n], cache)
            dt = time.perf_counter() - t0
            rows.append({"tokens": n, "prefill_s": dt, "prefill_tok_s": n / dt, "kv_bytes": cache.nbytes(),
                         "kv_bytes_formula": kv_bytes_windowed(model.config, n, args.kv_dtype),
                         "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
            print(json.dumps(rows[-1]), flush=True)
        n, tail = lengths[-1], args.tail
        chunked = model.logits(hidden[0, -tail:]).float()
        cache = model.new_cache(1, max_len=n, kv_dtype=args.kv_dtype)
        model.forward_hidden(ids[:, : n - tail], cache)
        steps = torch.stack([model(ids[:, p : p + 1], cache, last_only=True)[0, -1].float()
                             for p in range(n - tail, n)])
    diff = (steps - chunked).abs().max().item()
    scaling = rows[-1]["prefill_s"] / rows[0]["prefill_s"]
    result = {"rows": rows, "tail_positions": tail, "token_by_token_vs_chunked_max_abs_diff": diff,
              "time_ratio_longest_over_shortest": scaling, "length_ratio": lengths[-1] / lengths[0]}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
