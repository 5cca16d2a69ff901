"""`gemma3 perplexity | memory | eval … | bench`: measuring a model."""

from __future__ import annotations

import json
from pathlib import Path

from ..eval.bench import DECODE_TOKENS, PREFILL_LENGTHS
from ..eval.memorization import PREFIX, SUFFIX
from ..eval.quant import DEFAULT_FORMATS
from ..eval.results import DEFAULT_RESULTS
from . import options


def register(sub):
    p = sub.add_parser("perplexity", help="perplexity of a text file (llama-perplexity method by default)",
                       description="Perplexity of FILE. Default: llama.cpp's method (chunks of --ctx tokens, "
                                   "BOS first, second half of each chunk scored), comparable with llama-perplexity. "
                                   "--stride S: sliding windows of --ctx advanced by S, every token scored once.")
    p.add_argument("file", help="UTF-8 text file")
    p.add_argument("--ctx", type=options.positive_int, default=512, help="tokens per chunk/window (default 512)")
    p.add_argument("--stride", type=options.positive_int, default=None, help="sliding-window mode with this stride")
    p.add_argument("--chunks", type=options.positive_int, default=None, help="evaluate at most this many chunks")
    options.add(p, "kv_dtype", "results", *options.MODEL, "json")
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("memory", help="the paper's Table 3 and the KV cache a model really needs",
                       description="Prints the report's Table 3 (weights and weights + KV at 32K per format) "
                                   "computed from the configs beside the paper's figures. With --model/--ctx: "
                                   "the KV bytes a model's cache holds after a --ctx-token prompt (measured, or "
                                   "planned with --dry-run) next to llama.cpp's default allocation.")
    p.add_argument("--ctx", type=options.positive_int, default=None, help="context length to measure (default: the model's)")
    p.add_argument("--dry-run", action="store_true", help="compute the allocation plan instead of running a prompt")
    p.add_argument("--tp", type=options.positive_int, default=None,
                   help="plan tensor-parallel inference over this many ranks instead: per-rank weights + KV "
                        "(e.g. gemma3 memory --model 27b --tp 4 --ctx 131072 --device-gb 80)")
    p.add_argument("--device-gb", type=options.positive, default=None, help="with --tp: device memory in GiB; says whether it fits")
    p.add_argument("--format", choices=("bf16", "int4", "int4-b32", "sfp8"), default="bf16",
                   help="with --tp: weight format of the plan (default bf16, what TP runs on GPUs)")
    # The report's Table 3 states KV memory in bf16, so the figures here default to it too.
    options.add(p, "kv_dtype", "plot", *options.MODEL, "json", defaults={"kv_dtype": "bf16"},
                helps={"plot": "write KV memory vs context (1K…128K) to this PNG"})
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("bench", help="load time, prefill/decode speed and peak memory, optionally vs llama.cpp",
                       description="Each side runs in fresh processes, repetitions interleaved, medians reported. "
                                   "Example: gemma3 bench --against llama.cpp --llama-python /path/to/python --json")
    p.add_argument("--repeat", type=options.positive_int, default=3, help="repetitions per side, interleaved; medians (default 3)")
    p.add_argument("--batch", type=options.int_list, default=[],
                   help="also measure batched decode throughput for these batch sizes, e.g. 1,4,16")
    p.add_argument("--against", choices=("llama.cpp",), default=None, help="measure llama-cpp-python side by side")
    p.add_argument("--llama-python", default=None,
                   help="interpreter with llama-cpp-python (default: this one, if it can import llama_cpp)")
    p.add_argument("--prefill", type=options.int_list, default=list(PREFILL_LENGTHS),
                   help="prompt lengths whose prefill is timed (default: %(default)s; fewer for big models, "
                        "e.g. --prefill 512: a 12B prefills 2048 tokens in minutes on 2 cores)")
    p.add_argument("--ctx", type=options.positive_int, default=max(PREFILL_LENGTHS) + DECODE_TOKENS,
                   help="context size (KV cache) for both sides (default: %(default)s)")
    p.add_argument("--decode", type=options.positive_int, default=DECODE_TOKENS, help="greedy tokens to time (default: %(default)s)")
    p.add_argument("--lookup", action="store_true",
                   help="also time generation with prompt-lookup speculative decoding beside plain, on a prompt "
                        "whose continuation repeats it (ours only)")
    p.add_argument("--draft-model", default=None, metavar="FILE",
                   help="also time generation with this draft model drafting (speculative decoding) beside plain, "
                        "on an ordinary instruction: tok/s, acceptance, tokens per step (ours only)")
    p.add_argument("--draft-k", type=options.positive_int, default=4,
                   help="tokens --draft-model drafts per step, 1-7 (default: %(default)s)")
    options.add(p, "model", "backend", "precision", "device", "threads", "json", defaults={"threads": 2},
                helps={"threads": "threads for both sides (default: %(default)s)",
                       "json": "print one JSON object {ours, llama_cpp, ratio}"})
    p.set_defaults(func=cmd_bench)

    # `gemma3 eval <study>`
    p = sub.add_parser("eval", help="evaluations: quant, needle, memorization, choices, report")
    evals = p.add_subparsers(dest="eval_command", required=True, metavar="EVALUATION")

    e = evals.add_parser(
        "quant", help="size, perplexity and decode speed of weight formats",
        description="Quantize --model to each format (or named recipe) of --formats, and print file size, "
                    "bits/param, perplexity on --text (llama-perplexity method) with its change from the float32 "
                    "reference, and greedy decode tokens/s on the reference (dequantize + matmul) path.")
    e.add_argument("--formats", default=DEFAULT_FORMATS, help=f"comma-separated (default {DEFAULT_FORMATS})")
    e.add_argument("--text", required=True, help="UTF-8 text file to score")
    e.add_argument("--ctx", type=options.positive_int, default=512, help="tokens per chunk (default 512)")
    e.add_argument("--chunks", type=options.positive_int, default=None, help="score at most this many chunks")
    e.add_argument("--decode-tokens", type=options.count, default=8, help="greedy tokens timed per format (0 = skip)")
    options.add(e, "plot", "model", "threads", "json", "results",
                helps={"plot": "write size vs perplexity to this PNG"})
    e.set_defaults(func=cmd_eval_quant)

    e = evals.add_parser("needle", help="needle in a haystack at several context lengths and depths",
                         description="Plants 'The secret number is N.' at each depth of a haystack of each "
                                     "context length and asks for N (greedy). Example: gemma3 eval needle "
                                     "--ctx 4096,8192,16384,32768 --depths 0,0.25,0.5,0.75,1.0 --plot needle.png")
    e.add_argument("--ctx", type=options.int_list, default="4096,8192,16384,32768",
                   help="comma-separated context lengths")
    e.add_argument("--depths", type=options.fraction_list, default="0,0.25,0.5,0.75,1.0",
                   help="comma-separated depths in [0, 1]")
    e.add_argument("--haystack", default=None, help="filler text file (default: a built-in text about a river valley)")
    options.add(e, "seed", "plot", "results", *options.MODEL, "json", defaults={"seed": 0},
                helps={"seed": "seed for the hidden numbers (default: %(default)s)", "plot": "write a heat map PNG here"})
    e.set_defaults(func=cmd_eval_needle)

    e = evals.add_parser(
        "memorization", help="exact / approximate memorization rates of text files (paper Fig. 9)",
        description="Samples non-overlapping windows of each --data file, prompts with the first --prefix tokens, "
                    "greedy-decodes --suffix tokens; exact = identical to the true suffix, approximate = token edit "
                    "distance ≤ 10% of it. Rates with 95% Wilson intervals. Example: gemma3 eval memorization "
                    "--data tests/data/gpl-3.0.txt --control --plot memorization.png")
    e.add_argument("--data", action="append", required=True, help="UTF-8 text file (repeatable)")
    e.add_argument("--control", action="store_true",
                   help="also score a fresh control text: the first file's words shuffled (seed --seed)")
    e.add_argument("--samples", type=options.positive_int, default=100, help="windows per file at most (default 100)")
    e.add_argument("--prefix", type=options.positive_int, default=PREFIX, help=f"prompt tokens (default {PREFIX})")
    e.add_argument("--suffix", type=options.positive_int, default=SUFFIX, help=f"generated and compared tokens (default {SUFFIX})")
    e.add_argument("--batch-size", type=options.positive_int, default=16, help="prompts decoded together (default 16)")
    options.add(e, "seed", "plot", "results", *options.MODEL, "json", defaults={"seed": 0},
                helps={"seed": "seed for window sampling and the control text (default: %(default)s)",
                       "plot": "write a log-scale bar plot (like Fig. 9) to this PNG"})
    e.set_defaults(func=cmd_eval_memorization)

    e = evals.add_parser(
        "choices", help="multiple-choice accuracy by log-likelihood (lm-evaluation-harness's protocol)",
        description="Scores each choice of each JSONL item ({question, choices, answer}) as the continuation "
                    "' CHOICE' of 'Question: QUESTION\\nAnswer:' and predicts the most likely, exactly as "
                    "lm_eval's multiple_choice tasks do (no <bos>, as lm_eval's remote tokenizer asks). Default "
                    "FILE: the shipped 100-item task. Example: gemma3 eval choices --json")
    e.add_argument("file", nargs="?", default=None, help="JSONL items (default: the shipped gemma3_choices.jsonl)")
    e.add_argument("--limit", type=options.positive_int, default=None, help="score the first N items only")
    options.add(e, *options.MODEL, "json")
    e.set_defaults(func=cmd_eval_choices)

    e = evals.add_parser("report", help="Markdown summary of a results file written with --results",
                         description="Renders the JSON lines that `gemma3 eval … --results` and `gemma3 perplexity "
                                     "--results` append: a table per kind of evaluation and links to the plots. "
                                     "Example: gemma3 eval report --out results/report.md")
    e.add_argument("--results", default=DEFAULT_RESULTS, help="results file (default: %(default)s)")
    e.add_argument("--out", default=None, help="write the Markdown here (default: stdout)")
    e.set_defaults(func=cmd_eval_report)


def cmd_perplexity(args):
    from ..eval.perplexity import perplexity, read_text
    from ..eval.results import record

    text = read_text(args.file)
    model, tok = options.load_model(args)
    result = perplexity(model, tok, text, ctx=args.ctx, stride=args.stride, max_chunks=args.chunks,
                        progress=not args.json, kv_dtype=args.kv_dtype)
    record(args, "perplexity", result.to_dict(), model.config)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"perplexity {result.ppl:.4f}  (nll {result.nll:.5f} over {result.tokens} scored tokens, "
              f"{len(result.chunks)} chunks of {args.ctx})")


def cmd_memory(args):
    from ..model import memory

    if args.tp:
        return _print_tp_plan(args, memory)
    # --model or --ctx asks about one model; without them, the table.
    asked = args.model is not None or args.ctx is not None
    out = {"model": _measure_kv(args, memory)} if asked else {"table3": memory.table3()}
    if args.plot:
        from ..eval.memory import plot_kv_vs_context

        plot_kv_vs_context(args.plot)
        out["plot"] = args.plot
    if args.json:
        print(json.dumps(out))
        return
    if "table3" in out:
        print("Paper Table 3 (GB) vs our computation from the configs; +KV = weights + full-length bf16 KV at 32,768")
        print(f"{'model':6}{'format':10}{'weights':>9}{'paper':>7}{'Δ':>8}{'+KV':>9}{'paper':>7}{'Δ':>8}"
              f"{'+window KV':>12}")
        for r in out["table3"]:
            print(f"{r['model']:6}{r['format']:10}{r['weights_gb']:9.2f}{r['paper_weights_gb']:7.1f}"
                  f"{r['weights_rel_diff']:+8.1%}{r['with_kv_gb']:9.2f}{r['paper_with_kv_gb']:7.1f}"
                  f"{r['with_kv_rel_diff']:+8.1%}{r['with_windowed_kv_gb']:12.2f}")
    else:
        m = out["model"]
        how = "planned (dry run)" if m["dry_run"] else "measured after the prompt"
        print(f"{m['model']}: KV cache at {m['ctx']} tokens ({m['kv_dtype']}): {m['kv_bytes'] / 2**20:.1f} MiB {how}; "
              f"window-sized formula {m['kv_bytes_formula'] / 2**20:.1f} MiB; full-length on every layer "
              f"{m['kv_bytes_full'] / 2**20:.1f} MiB; llama.cpp default {m['kv_bytes_llama_cpp_default'] / 2**20:.1f} MiB")
    if args.plot:
        print(f"plot written to {args.plot}")


def _print_tp_plan(args, memory):
    from ..inference.load import describe

    cfg = _config(describe(args.model))
    ctx = args.ctx or cfg.max_context
    if ctx > cfg.max_context:
        raise ValueError(f"--ctx {ctx} exceeds the model's context of {cfg.max_context} tokens")
    plan = memory.tp_plan(cfg, args.tp, ctx, args.format, args.kv_dtype, args.device_gb)
    if args.json:
        print(json.dumps(plan))
        return
    gib = 2**30
    kv_note = "replicated: one copy per rank" if plan["kv_replicated"] else f"{plan['kv_heads_per_rank']} per rank"
    print(f"{cfg.name} over {args.tp} ranks at {ctx} tokens ({args.format} weights, {args.kv_dtype} KV, one sequence)")
    print(f"  per rank: {plan['heads_per_rank']} query heads, KV heads {kv_note}")
    print(f"  weights {plan['weights_bytes_per_rank'] / gib:.2f} GiB + KV {plan['kv_bytes_per_rank'] / gib:.2f} GiB "
          f"= {plan['total_bytes_per_rank'] / gib:.2f} GiB per rank")
    if args.device_gb is not None:
        verdict = "fits" if plan["fits"] else "does NOT fit"
        print(f"  {verdict} a {args.device_gb:g} GiB device ({memory.DEVICE_RESERVE:.0%} kept free): room for "
              f"{plan['sequences_that_fit']} sequences of {ctx} tokens")


def _config(info: dict):
    """The text config in a `load.describe` result."""
    from ..model.config import Gemma3Config

    return Gemma3Config(**{**info["config"], "layer_types": tuple(info["config"]["layer_types"])})


def _measure_kv(args, memory) -> dict:

    from ..inference.load import describe

    info = describe(args.model)
    cfg = _config(info)
    ctx = args.ctx or cfg.max_context
    if ctx > cfg.max_context:
        raise ValueError(f"--ctx {ctx} exceeds the model's context of {cfg.max_context} tokens")
    kv_dtype = args.kv_dtype
    result = {"model": info["path"] or cfg.name, "ctx": ctx, "kv_dtype": kv_dtype, "dry_run": args.dry_run,
              "kv_bytes_formula": memory.kv_bytes_windowed(cfg, ctx, kv_dtype),
              "kv_bytes_full": memory.kv_bytes_full(cfg, ctx, kv_dtype),
              "kv_bytes_llama_cpp_default": memory.kv_bytes_llama_cpp_default(cfg, ctx)}
    if args.dry_run:
        result["kv_bytes"] = memory.kv_bytes_planned(cfg, ctx, ctx, kv_dtype)
        return result
    from ..eval.memory import measure_kv

    model, _ = options.load_model(args)
    result["kv_bytes"] = measure_kv(model, ctx, kv_dtype)
    return result


def cmd_eval_needle(args):
    from ..eval.needle import plot_heatmap, run_needle, to_json
    from ..eval.perplexity import read_text
    from ..eval.results import emit

    haystack = read_text(args.haystack) if args.haystack else _default_haystack()
    ctxs, depths = args.ctx, args.depths
    model, tok = options.load_model(args)
    results = run_needle(model, tok, haystack, ctxs, depths, seed=args.seed, progress=not args.json)
    out = to_json(results)
    if emit(args, "needle", out, model.config, plot=lambda path: plot_heatmap(results, path)):
        return
    for r in results:
        print(f"ctx {r.ctx:>6}  depth {r.depth:4.0%}  {'found ' if r.found else 'MISSED'}  "
              f"log p(answer) {r.answer_logprob:7.2f}  generated {r.generated!r}")
    print(f"accuracy {out['accuracy']:.0%}" + (f"; heat map written to {args.plot}" if args.plot else ""))


def cmd_eval_choices(args):
    from ..eval.choices import accuracy, default_items, read_items, score_items

    items = read_items(args.file or default_items())[:args.limit]
    model, tok = options.load_model(args)
    scored = score_items(model, tok, items)
    if args.json:
        print(json.dumps({"items": len(scored), "acc": accuracy(scored),
                          "loglikelihoods": [s.loglikelihoods for s in scored]}))
        return
    for i, (item, s) in enumerate(zip(items, scored)):
        mark = "right" if s.predicted == s.answer else "WRONG"
        print(f"{i:3}  {mark}  {item['choices'][s.predicted]!r:24}  "
              + "  ".join(f"{ll:8.3f}" for ll in s.loglikelihoods))
    print(f"accuracy {accuracy(scored):.1%} on {len(scored)} items")


def _default_haystack() -> str:
    from importlib.resources import files

    return files("gemma3.eval").joinpath("haystack.txt").read_text(encoding="utf-8")


def cmd_eval_quant(args):
    from ..eval import quant
    from ..eval.perplexity import read_text
    from ..eval.results import emit
    from ..inference.load import describe

    options.set_threads(args)
    text = read_text(args.text)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    result = quant.evaluate(args.model, formats, text, ctx=args.ctx, chunks=args.chunks,
                      decode_tokens=args.decode_tokens, progress=not args.json)
    result["text"] = str(args.text)
    # The source's config, read from its file (evaluate() loads and drops the model); only --results needs it.
    config = describe(args.model)["config"] if args.results else None
    if not emit(args, "quant", result, config, plot=lambda path: quant.plot(result, path)):
        print(quant.table(result))
        if args.plot:
            print(f"plot written to {args.plot}")


def cmd_eval_memorization(args):
    from ..eval import memorization as mem
    from ..eval.perplexity import read_text
    from ..eval.results import emit

    texts = [(path, read_text(path)) for path in args.data]  # input errors before the slow load
    if args.control:
        texts.append((f"{args.data[0]} (words shuffled)", mem.shuffled_words(texts[0][1], args.seed)))
    model, tok = options.load_model(args)
    results = [mem.evaluate(model, tok, text, str(name), samples=args.samples, prefix=args.prefix, suffix=args.suffix,
                        seed=args.seed, batch_size=args.batch_size, progress=not args.json)
               for name, text in texts]
    out = mem.to_json(results, args.model or "270m", args.prefix, args.suffix, args.seed, mem.APPROX_THRESHOLD)
    if emit(args, "memorization", out, model.config, plot=lambda path: mem.plot(out, path)):
        return
    print(f"{'text':40} {'windows':>8} {'exact':>22} {'approximate (≤10% edits)':>26} {'edit dist.':>10} "
          f"{'verbatim':>9}")
    for r in results:
        print(f"{r.name[-40:]:40} {r.samples:>8} {_rate(r.exact, r.samples, r.exact_ci):>22} "
              f"{_rate(r.approximate, r.samples, r.approximate_ci):>26} {r.mean_edit_distance:>10.3f} "
              f"{r.mean_verbatim_tokens:>9.2f}")
    print("(rates with 95% Wilson intervals; edit dist.: mean normalized token edit distance; verbatim: mean "
          "leading tokens of the true suffix generated exactly)")
    if args.plot:
        print(f"plot written to {args.plot}")


def _rate(k: int, n: int, ci: tuple[float, float]) -> str:
    return f"{k / n:6.1%} [{ci[0]:.1%}, {ci[1]:.1%}]"


def cmd_eval_report(args):
    from ..eval.results import read_results, render_report

    entries = read_results(args.results)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_report(entries, out.parent.resolve()), encoding="utf-8")
        print(f"report of {len(entries)} runs written to {out}")
    else:
        print(render_report(entries, Path.cwd()))


def cmd_bench(args):
    from ..eval.bench import bench, table

    result = bench(args)
    print(json.dumps(result) if args.json else table(result, args))
