"""The `gemma3` command. Human output by default, machine output with --json."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DTYPES = ("float32", "bfloat16")


def _add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", "-m", default=None,
                   help="GGUF file, HF-style directory (config.json + *.safetensors) or preset name "
                        "(default: the embedded Gemma 3 270M Q4_K_M GGUF)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--precision", choices=("fast", "fp32"), default="fast",
                   help="fast: GGUF weights stay quantized and run on the C++ kernels (default; one CPU "
                        "process: on CUDA and under torchrun the float path runs); fp32: every weight "
                        "dequantized, the reference path")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _add_sampling_args(p: argparse.ArgumentParser):
    p.add_argument("--max-tokens", "-n", type=int, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p × p(best) (0 = off)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="llama.cpp-style repetition penalty (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--kv-dtype", choices=("fp32", "bf16", "int8"), default=None,
                   help="KV cache storage (default: the compute dtype); int8 = per-token per-head scales")


# Commands that run sharded under `torchrun`: generate runs unchanged on every rank (same model
# calls, output from rank 0 only); serve takes its requests on rank 0 and mirrors its model calls
# to the other ranks (server/ranks.py).
TP_COMMANDS = ("generate", "serve")


def _device(args) -> str:
    """--device (generate, bench): "auto" is CUDA when PyTorch sees a GPU; other commands run on CPU."""
    import torch

    device = getattr(args, "device", "cpu")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this PyTorch build sees no CUDA GPU")
    return device


def _dtype(args, device: str):
    import torch

    return getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))


def _load(args, timeout=None):
    """The model on its device. Under `torchrun --nproc-per-node N`, each rank joins the process
    group (`timeout`: of each collective) and keeps its tensor-parallel shard (tp.py); only rank 0
    writes to stdout."""
    import torch

    from ..model import tp
    from ..inference.load import load

    if args.threads:
        torch.set_num_threads(args.threads)
    device, world = _device(args), tp.world_size()
    if world > 1 and args.command not in TP_COMMANDS:
        raise ValueError(f"`gemma3 {args.command}` does not run under torchrun (tensor parallel works for "
                         f"{', '.join(TP_COMMANDS)}); start it as a single process")
    # The quantized C++ kernels of --precision fast are CPU-only and unsharded: elsewhere the float path runs.
    precision = args.precision if device == "cpu" and world == 1 else "fp32"
    model, tok = load(args.model, dtype=_dtype(args, device), precision=precision)
    if world > 1:
        import atexit

        from ..train.distributed import setup, teardown

        ctx = setup(device=device, timeout=timeout)
        atexit.register(teardown, ctx)  # gloo's threads abort the process if it exits with the group alive
        model, device = tp.apply(model, ctx.rank, ctx.world), ctx.device
        if ctx.rank:
            sys.stdout = open(os.devnull, "w")
    return model.to(device), tok


def _params(args):
    from ..model import tp
    from ..inference.sampling import SamplingParams

    seed = args.seed
    if seed is None and tp.world_size() > 1:
        seed = tp.shared_seed()  # every rank must draw the same tokens
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repeat_penalty, seed=seed)


def _add_vision_args(p: argparse.ArgumentParser):
    p.add_argument("--mmproj", default=None,
                   help="llama.cpp mmproj GGUF with the vision encoder (for GGUF models; HF directories carry theirs)")
    p.add_argument("--no-pan-and-scan", action="store_true",
                   help="encode each image once, without Pan & Scan crops of elongated images")


def _encoder(args):
    """(vision model, Pan & Scan settings) for args."""
    from ..inference.load import load_vision
    from ..inference.multimodal import PanAndScan

    vision = load_vision(args.model, args.mmproj, dtype=_dtype(args, "cpu"))
    return vision, None if args.no_pan_and_scan else PanAndScan()


def cmd_generate(args):
    from ..inference.generate import stream_generate
    from ..inference.multimodal import build_prompt, encode_image, load_image, with_placeholders
    from ..formats.tokenizer import apply_chat_template

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    # Images and their encoder before the slow text model: a bad file or a missing mmproj fails fast.
    images = [load_image(path) for path in args.image]
    if images and _device(args) != "cpu":
        raise ValueError("--image runs on the CPU only for now (use --device cpu)")
    vision, pan_and_scan = _encoder(args) if images else (None, None)
    model, tok = _load(args)
    if images:
        prompt = with_placeholders(prompt, len(images))
    if args.chat:
        prompt = apply_chat_template([{"role": "user", "content": prompt}])
    if images:
        prompt = build_prompt(model, tok, prompt, [encode_image(vision, im, pan_and_scan) for im in images])
    start, first, text, last = time.perf_counter(), None, [], None
    for chunk in stream_generate(model, tok, prompt, args.max_tokens, _params(args), args.stop,
                                 kv_dtype=args.kv_dtype):
        first = first or time.perf_counter()
        text.append(chunk.text)
        last = chunk
        if not args.json:
            print(chunk.text, end="", flush=True)
    elapsed = time.perf_counter() - start
    decode_s = time.perf_counter() - first
    stats = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
             "finish_reason": last.finish_reason, "time_to_first_token_s": round(first - start, 4),
             "decode_tok_s": round((last.completion_tokens - 1) / decode_s, 2) if decode_s > 0 else None,
             "total_s": round(elapsed, 3)}
    if args.json:
        print(json.dumps({"text": "".join(text), **stats}))
    else:
        print()
        if args.verbose:
            print(json.dumps(stats), file=sys.stderr)


def cmd_chat(args):
    from ..inference.generate import stream_generate
    from ..inference.multimodal import build_prompt, encode_image, load_image, with_placeholders
    from ..formats.tokenizer import apply_chat_template

    from ..inference.prefix_cache import PrefixCache

    model, tok = _load(args)
    # Each turn re-sends the whole conversation; the prefix cache resumes after the previous turns.
    prefix_cache = PrefixCache(model, kv_dtype=args.kv_dtype)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    encoder, features, pending = None, [], []  # soft tokens of the conversation's images, of the next message's
    print("Chat with Gemma 3. /image PATH attaches a picture to your next message, /reset clears the "
          "conversation, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            features, pending = [], []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.strip().startswith("/image"):
            path = line.strip()[len("/image"):].strip()
            try:
                image = load_image(path)
                encoder = encoder or _encoder(args)
                pending.append(encode_image(encoder[0], image, encoder[1]))
            except ValueError as e:  # a bad file or missing vision weights; the conversation goes on
                print(f"gemma3: error: {e}", file=sys.stderr)
                continue
            print(f"(image {path} attached to your next message)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": with_placeholders(line, len(pending)) if pending else line})
        features, pending = features + pending, []
        prompt = apply_chat_template(messages)
        if features:
            prompt = build_prompt(model, tok, prompt, features)
        reply = []
        for chunk in stream_generate(model, tok, prompt, args.max_tokens, _params(args), args.stop,
                                     prefix_cache=prefix_cache):
            reply.append(chunk.text)
            print(chunk.text, end="", flush=True)
        print()
        messages.append({"role": "model", "content": "".join(reply)})


def cmd_serve(args):
    from pathlib import Path

    from ..model import tp
    from ..inference.load import resolve
    from ..server import ranks, serve

    for name in ("port", "max_batch", "max_queue", "ctx", "max_tokens", "tp"):
        value = getattr(args, name)
        if value is not None and value < (0 if name in ("port",) else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    world = tp.world_size()
    if args.tp and world > 1 and args.tp != world:
        raise ValueError(f"--tp {args.tp} under torchrun with {world} processes: they must agree (or leave out --tp)")
    world = max(world, args.tp or 1)
    model_id = args.served_model_name or Path(resolve(args.model)).name.removesuffix(".gguf")
    # Images need a vision encoder: --mmproj for a GGUF, or the HF directory's own; else text-only.
    wants_vision = bool(args.mmproj) or _has_vision(args.model)
    if world > 1 and wants_vision:
        raise ValueError("serve --tp serves text only (the vision encoder is not sharded); "
                         "serve a multimodal model without --tp")
    vision, pan_and_scan = _encoder(args) if wants_vision else (None, None)
    followers = []
    if world > tp.world_size():  # `serve --tp N` outside torchrun: start the other ranks here
        followers = ranks.start_ranks(world, args.argv, args.threads)
    try:
        model, tok = _load(args, timeout=ranks.IDLE_TIMEOUT)
        if world > 1 and int(os.environ["RANK"]):
            return ranks.follow(model)
        if world > 1:
            model = ranks.Leader(model)
            print(f"gemma3 serve: tensor parallel over {world} ranks (float weights; prefix cache off)",
                  file=sys.stderr)
        try:
            serve(model, tok, model_id, host=args.host, port=args.port, ctx=args.ctx, max_batch=args.max_batch,
                  max_queue=args.max_queue, max_tokens=args.max_tokens, api_key=args.api_key,
                  prefix_cache_mb=0 if world > 1 else args.prefix_cache_mb, log_level=args.log_level,
                  vision=vision, pan_and_scan=pan_and_scan)
        finally:
            if world > 1:
                model.close()
    except BaseException:
        ranks.stop_ranks(followers, timeout=1.0)  # e.g. a failed load: the others may wait for rank 0
        raise
    ranks.stop_ranks(followers)


def _has_vision(model) -> bool:
    """An HF directory whose config describes a vision tower (Gemma3ForConditionalGeneration)."""
    from ..inference.load import resolve

    path = resolve(model)
    config = path / "config.json"
    return path.is_dir() and config.is_file() and "vision_config" in json.loads(config.read_text())


def cmd_tokenize(args):
    from ..inference.load import load_tokenizer

    tok = load_tokenizer(args.model)
    stream = open(args.file, encoding="utf-8", errors="strict") if args.file else sys.stdin
    with stream:
        lines = stream.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # a trailing newline ends the last line; it is not an empty extra line
    for line in lines:
        ids = tok.encode(line, add_bos=False if args.no_bos else None, parse_special=args.special)
        if args.json:
            print(json.dumps(ids))
        else:
            print(" ".join(f"{i}:{tok.id_to_token(i)!r}" for i in ids))


def cmd_info(args):
    from ..inference.load import describe

    info = describe(args.model)
    if args.json:
        print(json.dumps(info, indent=None))
        return
    cfg = info["config"]
    print(f"model      {info['path']}")
    print(f"format     {info['format']}  ({info['file_bytes'] / 2**20:.1f} MiB)")
    print(f"params     {info['params'] / 1e6:.1f} M")
    print(f"layers     {cfg['num_layers']} ({len([t for t in cfg['layer_types'] if t == 'global'])} global, "
          f"window {cfg['sliding_window']})")
    print(f"dims       d_model {cfg['hidden_size']}, heads {cfg['num_heads']} q / {cfg['num_kv_heads']} kv "
          f"× {cfg['head_dim']}, ffn {cfg['intermediate_size']}, vocab {cfg['vocab_size']}")
    print(f"context    {cfg['max_context']} (rope local {cfg['rope_local_base']:g}, global "
          f"{cfg['rope_global_base']:g} ×{cfg['rope_global_scale']:g})")
    print("tensors    " + ", ".join(f"{k}: {v['count']} ({v['bytes'] / 2**20:.1f} MiB)"
                                    for k, v in info["tensor_types"].items()))


def cmd_perplexity(args):
    from ..eval.perplexity import perplexity, read_text
    from ..eval.results import record

    text = read_text(args.file)
    model, tok = _load(args)
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
    out = {"table3": memory.table3()}
    if args.model is not None or args.ctx is not None:
        out["model"] = _measure_kv(args, memory)
    if args.plot:
        memory.plot_kv_vs_context(args.plot)
        out["plot"] = args.plot
    if args.json:
        print(json.dumps(out))
        return
    print("Paper Table 3 (GB) vs our computation from the configs; +KV = weights + full-length bf16 KV at 32,768")
    print(f"{'model':6}{'format':10}{'weights':>9}{'paper':>7}{'Δ':>8}{'+KV':>9}{'paper':>7}{'Δ':>8}"
          f"{'+window KV':>12}")
    for r in out["table3"]:
        print(f"{r['model']:6}{r['format']:10}{r['weights_gb']:9.2f}{r['paper_weights_gb']:7.1f}"
              f"{r['weights_rel_diff']:+8.1%}{r['with_kv_gb']:9.2f}{r['paper_with_kv_gb']:7.1f}"
              f"{r['with_kv_rel_diff']:+8.1%}{r['with_windowed_kv_gb']:12.2f}")
    if "model" in out:
        m = out["model"]
        how = "planned (dry run)" if m["dry_run"] else "measured after the prompt"
        print(f"\n{m['model']}: KV cache at {m['ctx']} tokens ({m['kv_dtype']}): {m['kv_bytes'] / 2**20:.1f} MiB {how}; "
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
    import torch

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
    model, _ = _load(args)
    cache = model.new_cache(1, max_len=ctx, kv_dtype=kv_dtype)
    ids = torch.randint(3, cfg.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model.forward_hidden(ids, cache)
    result["kv_bytes"] = cache.nbytes()
    return result


def cmd_eval_needle(args):
    from ..eval.needle import plot_heatmap, run_needle, to_json
    from ..eval.perplexity import read_text
    from ..eval.results import emit

    haystack = read_text(args.haystack) if args.haystack else _default_haystack()
    ctxs = [int(c) for c in args.ctx.split(",")]
    depths = [float(d) for d in args.depths.split(",")]
    model, tok = _load(args)
    results = run_needle(model, tok, haystack, ctxs, depths, seed=args.seed, progress=not args.json)
    out = to_json(results)
    if emit(args, "needle", out, model.config, plot=lambda path: plot_heatmap(results, path)):
        return
    for r in results:
        print(f"ctx {r.ctx:>6}  depth {r.depth:4.0%}  {'found ' if r.found else 'MISSED'}  "
              f"log p(answer) {r.answer_logprob:7.2f}  generated {r.generated!r}")
    print(f"accuracy {out['accuracy']:.0%}" + (f"; heat map written to {args.plot}" if args.plot else ""))


def _default_haystack() -> str:
    from importlib.resources import files

    return files("gemma3.eval").joinpath("haystack.txt").read_text(encoding="utf-8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma3", description="Run Gemma 3 models in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)",
                       description="Generate a continuation. Example: gemma3 generate \"The capital of France is\" -n 32")
    p.add_argument("prompt", help="prompt text, or - to read it from stdin")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template (instruction-tuned models)")
    p.add_argument("--verbose", "-v", action="store_true", help="print timing stats to stderr")
    p.add_argument("--image", action="append", default=[],
                   help="image file (repeatable); each <start_of_image> in the prompt marks where one goes, "
                        "otherwise they come before the text")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                   help="cpu (default) or cuda (bfloat16 unless --dtype, float weights); auto = cuda when available")
    _add_model_args(p)
    _add_sampling_args(p)
    _add_vision_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat with the chat template")
    p.add_argument("--system", default=None, help="system prompt (merged into the first user turn)")
    _add_model_args(p)
    _add_sampling_args(p)
    _add_vision_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a chat page",
                       description="Serves /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics "
                                   "and a chat page at /. Example: gemma3 serve --port 8000 --max-batch 8")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together at most (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a batch slot at most; more get HTTP 503 (default 64)")
    p.add_argument("--ctx", type=int, default=None, help="context per request, prompt + completion (default: the model's)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="default and upper bound of a request's max_tokens (default: what is left of --ctx)")
    p.add_argument("--api-key", default=os.environ.get("GEMMA3_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $GEMMA3_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: the model file's name)")
    p.add_argument("--prefix-cache-mb", type=int, default=256, help="prompt prefix cache size, 0 = off (default 256)")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor parallel over N ranks on this machine (started by the server; float weights, "
                        "text only, no prefix cache). Under torchrun the ranks are torchrun's")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="uvicorn log level (default info: one line per request)")
    _add_vision_args(p)
    _add_model_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("tokenize", help="token ids of each input line",
                       description="Tokenize text from a file or stdin, one line at a time.")
    p.add_argument("file", nargs="?", help="text file (default: stdin)")
    p.add_argument("--no-bos", action="store_true", help="do not prepend <bos>")
    p.add_argument("--special", action="store_true", help="parse special-token text such as <start_of_turn>")
    _add_model_args(p)
    p.set_defaults(func=cmd_tokenize)

    from ..eval.results import add_results_argument

    p = sub.add_parser("perplexity", help="perplexity of a text file (llama-perplexity method by default)",
                       description="Perplexity of FILE. Default: llama.cpp's method (chunks of --ctx tokens, "
                                   "BOS first, second half of each chunk scored), comparable with llama-perplexity. "
                                   "--stride S: sliding windows of --ctx advanced by S, every token scored once.")
    p.add_argument("file", help="UTF-8 text file")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk/window (default 512)")
    p.add_argument("--stride", type=int, default=None, help="sliding-window mode with this stride")
    p.add_argument("--chunks", type=int, default=None, help="evaluate at most this many chunks")
    p.add_argument("--kv-dtype", choices=("fp32", "bf16", "int8"), default=None,
                   help="KV cache storage (default: the compute dtype)")
    add_results_argument(p)
    _add_model_args(p)
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("memory", help="the paper's Table 3 and the KV cache a model really needs",
                       description="Prints the report's Table 3 (weights and weights + KV at 32K per format) "
                                   "computed from the configs beside the paper's figures. With --model/--ctx: "
                                   "the KV bytes a model's cache holds after a --ctx-token prompt (measured, or "
                                   "planned with --dry-run) next to llama.cpp's default allocation.")
    p.add_argument("--ctx", type=int, default=None, help="context length to measure (default: the model's)")
    p.add_argument("--kv-dtype", choices=("bf16", "fp32", "int8"), default="bf16", help="KV cache dtype")
    p.add_argument("--dry-run", action="store_true", help="compute the allocation plan instead of running a prompt")
    p.add_argument("--plot", default=None, help="write KV memory vs context (1K…128K) to this PNG")
    p.add_argument("--tp", type=int, default=None,
                   help="plan tensor-parallel inference over this many ranks instead: per-rank weights + KV "
                        "(e.g. gemma3 memory --model 27b --tp 4 --ctx 131072 --device-gb 80)")
    p.add_argument("--device-gb", type=float, default=None, help="with --tp: device memory in GiB; says whether it fits")
    p.add_argument("--format", choices=("bf16", "int4", "int4-b32", "sfp8"), default="bf16",
                   help="with --tp: weight format of the plan (default bf16, what TP runs on GPUs)")
    _add_model_args(p)
    p.set_defaults(func=cmd_memory)

    from ..eval.bench import add_arguments as add_bench_arguments, cmd_bench

    p = sub.add_parser("bench", help="load time, prefill/decode speed and peak memory, optionally vs llama.cpp",
                       description="Each side runs in fresh processes, repetitions interleaved, medians reported. "
                                   "Example: gemma3 bench --against llama.cpp --llama-python /path/to/python --json")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("info", help="model config, tensor types and sizes")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)

    from .train import add_commands as add_training_commands  # distill, finetune, qat

    add_training_commands(sub)

    from .quantize import add_commands as add_quant_commands  # quantize

    add_quant_commands(sub)

    from .study import add_commands as add_study_commands  # study ratio | window | teacher

    add_study_commands(sub)

    # `gemma3 eval <study>`: each evaluation module registers its own sub-subcommand here.
    p = sub.add_parser("eval", help="evaluations and studies (SPEC §8): quant, needle, …")
    evals = p.add_subparsers(dest="eval_command", required=True, metavar="STUDY")
    from ..eval.quant import add_command as add_eval_quant

    add_eval_quant(evals)
    e = evals.add_parser("needle", help="needle in a haystack at several context lengths and depths",
                         description="Plants 'The secret number is N.' at each depth of a haystack of each "
                                     "context length and asks for N (greedy). Example: gemma3 eval needle "
                                     "--ctx 4096,8192,16384,32768 --depths 0,0.25,0.5,0.75,1.0 --plot needle.png")
    e.add_argument("--ctx", default="4096,8192,16384,32768", help="comma-separated context lengths")
    e.add_argument("--depths", default="0,0.25,0.5,0.75,1.0", help="comma-separated depths in [0, 1]")
    e.add_argument("--haystack", default=None, help="filler text file (default: a built-in text about a river valley)")
    e.add_argument("--seed", type=int, default=0, help="seed for the hidden numbers")
    e.add_argument("--plot", default=None, help="write a heat map PNG here")
    add_results_argument(e)
    _add_model_args(e)
    e.set_defaults(func=cmd_eval_needle)
    from ..eval.memorization import add_command as add_eval_memorization
    from ..eval.results import add_command as add_eval_report

    add_eval_memorization(evals)
    add_eval_report(evals)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line a --results entry records
    from ..model.config import UnsupportedModelError
    from ..formats.gguf import GGUFError
    from ..formats.checkpoint import WeightsError

    try:
        args.func(args)
    except (GGUFError, WeightsError, UnsupportedModelError, OSError, UnicodeDecodeError, ValueError) as e:
        if os.environ.get("GEMMA3_DEBUG"):
            raise
        print(f"gemma3: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
