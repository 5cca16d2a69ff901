"""Distillation demo: the embedded Gemma 3 270M teaches a 26M-parameter student (6 layers,
5 local : 1 global, d_model 96, the teacher's 262k vocabulary) on the GPL-3.0 text shipped in
tests/data; the same student trained on one-hot labels for the same steps is the baseline.

    .venv/bin/python scripts/distill_demo.py   # 19 min measured (1 thread, busy 2-core machine); docs/distill_demo.{json,png}

Sections 0-11 of the licence are the training text, sections 12-17 and the appendix the held-out
text. The teacher's targets are precomputed once (`gemma3 distill precompute`, 256 samples per
token) and reused; both students start from the same initialisation and see the same batches.
Every step is a `gemma3` command, printed before it runs.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import time
from pathlib import Path

import torch

from gemma3.cli import main as gemma3
from gemma3.eval.perplexity import perplexity
from gemma3.inference.load import load
from gemma3.train.metrics import plot_curves, read_metrics

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "tests" / "data" / "gpl-3.0.txt"
HELD_OUT_FROM = "  12. No Surrender of Others' Freedom."
STUDENT = {"hidden_size": 96, "num_layers": 6, "local_per_global": 5, "num_heads": 4, "num_kv_heads": 1,
           "head_dim": 32, "intermediate_size": 384, "sliding_window": 64, "max_context": 2048}


def run(*argv):
    print("$ gemma3 " + " ".join(shlex.quote(str(a)) for a in argv), flush=True)
    gemma3([str(a) for a in argv])


def held_out_ppl(model_dir, text: str, ctx: int) -> float:
    model, tok = load(model_dir)
    return perplexity(model, tok, text, ctx=ctx, stride=ctx // 2, progress=False).ppl


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/gemma3-distill-demo", help="scratch directory (targets are reused)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--target-mode", default="renorm", choices=("renorm", "unbiased"),
                    help="sparse target weights (default renorm, the report's; the store is reused only if it matches)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "distill_demo"), help="result prefix (.json, .png)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    text = TEXT.read_text()
    cut = text.index(HELD_OUT_FROM)
    (work / "train.txt").write_text(text[:cut])
    (work / "heldout.txt").write_text(text[cut:])
    (work / "student.json").write_text(json.dumps(STUDENT, indent=2))
    data = ["--data", work / "train.txt", "--seq-len", args.seq_len, "--threads", args.threads]
    timings = {}

    meta = work / "targets" / "meta.json"
    if not meta.exists() or json.loads(meta.read_text()).get("mode") != args.target_mode:
        run("distill", "precompute", *data, "--out", work / "targets", "--k", 256, "--target-mode", args.target_mode)
    store = json.loads(meta.read_text())
    timings["precompute_s"] = store["seconds"]  # as measured when the store was written

    train = [*data, "--student", work / "student.json", "--targets", work / "targets", "--steps", args.steps,
             "--batch-size", args.batch_size, "--lr", args.lr, "--warmup", 10, "--weight-decay", 0.1,
             "--eval-data", work / "heldout.txt", "--eval-every", 10, "--json"]
    runs = {"distilled (256 sampled teacher logits)": ("distilled", []),
            "one-hot labels": ("onehot", ["--onehot-weight", 1.0])}
    for name, (sub, extra) in runs.items():
        start = time.perf_counter()
        run("distill", *train, *extra, "--out", work / sub)
        timings[f"{sub}_s"] = round(time.perf_counter() - start, 1)

    held_out = (work / "heldout.txt").read_text()
    ctx = args.seq_len
    result = {
        "teacher": "Gemma 3 270M (embedded Q4_K_M GGUF, dequantized)",
        "student": STUDENT | {"params": load(work / "distilled" / "final")[0].config.num_params()},
        "data": {"train": "GPL-3.0 §0-11", "held_out": "GPL-3.0 §12-17 + appendix",
                 "train_target_tokens": store["target_tokens"], "seq_len": args.seq_len},
        "targets": {k: store[k] for k in ("k", "temperature", "mode", "ids_per_target_token", "bytes")},
        "training": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup": 10,
                     "weight_decay": 0.1, "schedule": "cosine to 0.1 × lr", "threads": args.threads},
        "held_out_ppl": {"teacher": held_out_ppl(None, held_out, ctx)},
        "held_out_eval": f"perplexity over the held-out text, windows of {ctx} tokens advanced by {ctx // 2}",
        "seconds": timings,
    }
    for name, (sub, _) in runs.items():
        result["held_out_ppl"][sub] = held_out_ppl(work / sub / "final", held_out, ctx)
        result[f"{sub}_final_eval_nll"] = read_metrics(work / sub / "metrics.jsonl")[-1]["eval_loss"]
    ppl = result["held_out_ppl"]
    result["distilled_beats_onehot"] = ppl["distilled"] < ppl["onehot"]
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot_curves({name: read_metrics(work / sub / "metrics.jsonl") for name, (sub, _) in runs.items()},
                out.with_suffix(".png"),
                title=f"26M student, GPL-3.0 held-out ppl: distilled {ppl['distilled']:.0f}, "
                      f"one-hot {ppl['onehot']:.0f} (teacher {ppl['teacher']:.0f})")
    print(json.dumps(result["held_out_ppl"], indent=2))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    assert math.isfinite(ppl["distilled"])


if __name__ == "__main__":
    main()
