"""`gemma3 study ratio | window | teacher`: each trains its models, prints a table (or JSON with
--json) and with --out DIR writes DIR/study_<name>.json and DIR/study_<name>.png. Under
`torchrun` every model is trained with DDP and the main process evaluates and writes."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

from . import options


def _add_common(p: argparse.ArgumentParser, steps: int | None):
    g = p.add_argument_group("data and training (shared by every model of the study)")
    g.add_argument("--data", default=None,
                   help="UTF-8 text file, or a directory of *.py/*.txt/*.md files joined in path order "
                        "(default: the gemma3 package's own source, ~450 KB)")
    g.add_argument("--held-out", type=options.share, default=0.1, help="fraction at the end of the text held out (default 0.1)")
    g.add_argument("--seq-len", type=options.positive_int, default=256,
                   help="training and held-out sequence length in byte tokens (default 256)")
    if steps:
        g.add_argument("--steps", type=options.positive_int, default=steps, help=f"optimizer steps per model (default {steps})")
    g.add_argument("--batch-size", type=options.positive_int, default=16, help="sequences per step (default 16)")
    g.add_argument("--lr", type=options.positive, default=3e-3, help="peak learning rate (default 3e-3)")
    g.add_argument("--weight-decay", type=options.non_negative, default=0.1, help="AdamW weight decay on matrices (default 0.1)")
    g.add_argument("--kv-ctx", type=options.positive_int, default=None, help="context at which KV memory is stated (default: --seq-len)")
    options.add(g, "seed", "kv_dtype", defaults={"seed": 0, "kv_dtype": "bf16"},
                helps={"seed": "initial weights and data order (default: %(default)s)",
                       "kv_dtype": "KV dtype of the memory figures (default: %(default)s)"})
    g = p.add_argument_group("output")
    g.add_argument("--out", "-o", default=None, help="directory for study_<name>.json and study_<name>.png")
    g.add_argument("--work", default=None, help="keep the trained models here (default: a temporary directory)")
    options.add(g, "threads", "json", defaults={"threads": 1},
                helps={"threads": "CPU threads (default 1: tiny matmuls gain little from more, and on a busy machine "
                                  "two threads measured 20× slower than one)"})
    g.add_argument("--quiet", action="store_true", help="no progress output")


def _add_size(p: argparse.ArgumentParser):
    g = p.add_argument_group("model (the same for every variant)")
    g.add_argument("--d-model", type=options.positive_int, default=64, help="hidden size (default 64)")
    g.add_argument("--layers", type=options.positive_int, default=12, help="decoder layers (default 12)")
    g.add_argument("--heads", type=options.positive_int, default=4, help="query heads (default 4)")
    g.add_argument("--kv-heads", type=options.positive_int, default=1, help="KV heads (default 1)")
    g.add_argument("--head-dim", type=options.positive_int, default=16, help="head dimension (default 16)")
    g.add_argument("--ffn", type=options.positive_int, default=None, help="GeGLU hidden size (default 4 × d-model)")
    g.add_argument("--seeds", type=options.positive_int, default=1,
                   help="train every variant with this many seeds (seed, seed+1, …) and average (default 1)")


def register(sub):
    p = sub.add_parser("study", help="the report's ablations in miniature: ratio, window, teacher (train tiny models)",
                       description="Train small Gemma 3 models from scratch on a text (byte-level tokens) and "
                                   "compare them: local:global ratio (Fig. 3), sliding window (Fig. 4), teacher "
                                   "size in distillation (Fig. 8). Example: gemma3 study ratio --out docs")
    studies = p.add_subparsers(dest="study", required=True, metavar="STUDY")

    s = studies.add_parser("ratio", help="local:global 1:1, 3:1, 5:1, 7:1 and global only (Fig. 3)",
                           description="Same data, steps, seed and parameters; only the layer pattern differs. "
                                       "Reports held-out perplexity (Δ vs global only) and KV memory per model.")
    s.add_argument("--ratios", default="global,1,3,5,7",
                   help="local layers per global one, 'global' = every layer global (default global,1,3,5,7)")
    s.add_argument("--window", type=options.positive_int, default=None, help="sliding window of local layers (default seq-len / 8)")
    _add_size(s)
    _add_common(s, steps=200)
    s.set_defaults(func=cmd_study)

    s = studies.add_parser("window", help="sliding window sizes up to the sequence length (Fig. 4)",
                           description="Same data, steps, seed and parameters; only the window of the local layers "
                                       "differs. Reports held-out perplexity (Δ vs the largest window) and KV memory.")
    s.add_argument("--windows", default=None,
                   help="comma-separated windows (default seq-len/16, /8, /4, /2, seq-len)")
    s.add_argument("--ratios", default="3", help="local:global ratio(s), one curve each (default 3, i.e. 3:1)")
    _add_size(s)
    _add_common(s, steps=200)
    s.set_defaults(func=cmd_study)

    s = studies.add_parser("teacher",
                           help="distil one student from a small and a large teacher per token budget (Fig. 8)",
                           description="Trains a small and a large teacher (one-hot loss) on the training text, then "
                                       "the same student from each teacher (256 sampled teacher ids per token) and "
                                       "from "
                                       "one-hot labels, for each budget of steps. Sizes are DxL: d_model D (multiple "
                                       "of 16, head_dim 16, D/16 heads, ffn 4D) and L layers.")
    s.add_argument("--student", default="32x6", help="student size DxL (default 32x6)")
    s.add_argument("--small-teacher", default="64x6", help="small teacher size DxL (default 64x6)")
    s.add_argument("--large-teacher", default="128x6", help="large teacher size DxL (default 128x6)")
    s.add_argument("--teacher-steps", type=options.positive_int, default=300, help="training steps of each teacher (default 300)")
    s.add_argument("--budgets", default="25,50,100,200", help="student steps, comma-separated (default 25,50,100,200)")
    s.add_argument("--ratio", default="5", help="local:global ratio of every model, or 'global' (default 5)")
    s.add_argument("--window", type=options.positive_int, default=None, help="sliding window (default seq-len / 8)")
    s.add_argument("--k", type=options.positive_int, default=256, help="teacher samples per token (default 256)")
    s.add_argument("--no-baseline", action="store_true", help="skip the one-hot (no teacher) students")
    _add_common(s, steps=None)
    s.set_defaults(func=cmd_study)


def _ints(spec: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what}: expected comma-separated integers, got {spec!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"--{what}: expected positive integers, got {spec!r}")
    return values


def cmd_study(args):
    import functools

    import torch
    from tqdm import tqdm

    from ..study import ablation, teacher
    from ..study.tiny import ModelSize, Schedule, load_corpus
    from ..train import distributed

    # Every argument is checked before the data is read and anything is trained.
    L = args.seq_len
    steps = args.teacher_steps if args.study == "teacher" else args.steps
    for name, value in (("steps", steps), ("batch-size", args.batch_size), ("kv-ctx", args.kv_ctx or 1),
                        ("window", 1 if args.study == "window" or args.window is None else args.window),
                        ("seeds", getattr(args, "seeds", 1))):
        if value < 1:
            raise ValueError(f"--{name} must be positive")
    window = args.window if args.study != "window" and args.window is not None else max(1, L // 8)
    kv_ctx = args.kv_ctx or L
    schedule = Schedule(steps=steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay)
    if args.study == "teacher":
        ratios = ablation.parse_ratios(args.ratio)
        if len(ratios) != 1:
            raise ValueError("--ratio takes one ratio")
        sizes = {"small": ModelSize.parse(args.small_teacher), "large": ModelSize.parse(args.large_teacher)}
        module = teacher
        study = functools.partial(teacher.run, ModelSize.parse(args.student), sizes, schedule=schedule,
                                  teacher_steps=steps, budgets=_ints(args.budgets, "budgets"), seed=args.seed,
                                  window=window, local_per_global=ratios[0], k=args.k,
                                  baseline=not args.no_baseline)
    else:
        size = ModelSize(d_model=args.d_model, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                         head_dim=args.head_dim, ffn=args.ffn or 4 * args.d_model)
        if args.study == "ratio":
            variants = ablation.ratio_variants(ablation.parse_ratios(args.ratios), window)
        else:
            windows = _ints(args.windows, "windows") if args.windows else [max(1, L >> i) for i in (4, 3, 2, 1, 0)]
            variants = ablation.window_variants(windows, ablation.parse_ratios(args.ratios))
        size.config(L, window, None, "check")  # inconsistent dimensions fail here, not after training
        module = ablation
        study = functools.partial(ablation.run, args.study, variants, size, schedule=schedule,
                                  seeds=[args.seed + i for i in range(args.seeds)])

    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = load_corpus(args.data, L, args.held_out)
    ctx = distributed.setup()
    progress = not args.quiet and ctx.is_main

    def log(text):
        if progress:
            tqdm.write(text, file=sys.stderr)

    with (nullcontext(args.work) if args.work else tempfile.TemporaryDirectory(prefix="gemma3-study-")) as work:
        result = study(corpus=corpus, kv_ctx=kv_ctx, kv_dtype=args.kv_dtype, work=Path(work), ctx=ctx,
                       progress=progress, log=log)
    distributed.teardown(ctx)
    if result is None:  # not the main process
        return
    result["args"] = {k: v for k, v in vars(args).items() if k != "func"}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result["plot"] = str(out / f"study_{args.study}.png")
        module.plot(result, result["plot"])
        (out / f"study_{args.study}.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        print("\n".join(module.summary_lines(result)))
        if args.out:
            print(f"wrote {out / f'study_{args.study}.json'} and {result['plot']}")
