"""`gemma3 generate | chat | tokenize | info`: running a model and looking at one."""

from __future__ import annotations

import json
import os
import sys
import time

from . import chat, options


def register(sub):
    p = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)",
                       description="Generate a continuation of the prompt, given as text or read from a file "
                                   "(-f FILE; -f - reads stdin).\nExamples: gemma3 generate \"One, two, three,\" -n 32; "
                                   "gemma3 generate -f notes.txt -v; "
                                   "gemma3 generate \"A user record: \" --json-schema user.schema.json; "
                                   "gemma3 generate --chat \"Weather in Paris?\" --tools tools.json")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("prompt", nargs="?", help="prompt text")
    source.add_argument("--file", "-f", help="read the prompt from this file (- = stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template (instruction-tuned models)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="print load time, prompt and decode speed and the thread count to stderr")
    p.add_argument("--image", action="append", default=[],
                   help="image file (repeatable); each <start_of_image> in the prompt marks where one goes, "
                        "otherwise they come before the text")
    options.add(p, *options.MODEL, "json", "device", *options.SAMPLING, *options.VISION, *options.LOOKUP, "adapter",
                *options.CONSTRAIN, *options.TOOLS)
    p.set_defaults(func=cmd_generate)

    chat.register(sub)

    p = sub.add_parser("tokenize", help="token ids of each input line",
                       description="Tokenize text from a file or stdin, one line at a time.")
    p.add_argument("file", nargs="?", help="text file (default: stdin)")
    p.add_argument("--no-bos", action="store_true", help="do not prepend <bos>")
    p.add_argument("--special", action="store_true", help="parse special-token text such as <start_of_turn>")
    options.add(p, "model", "json")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("info", help="model config, tensor types and sizes")
    options.add(p, "model", "json")
    p.set_defaults(func=cmd_info)


def read_prompt(args) -> str:
    if args.file is not None:
        if args.file == "-":
            return sys.stdin.read()
        with open(args.file, encoding="utf-8") as f:
            return f.read()
    if os.path.isfile(args.prompt):  # `generate notes.txt` meant -f, most likely
        print(f"gemma3: note: the prompt is the text {args.prompt!r}; to read that file, use -f {args.prompt}",
              file=sys.stderr)
    return args.prompt


def cmd_generate(args):
    import torch

    from ..formats.tokenizer import apply_chat_template
    from ..inference.generate import stream_generate
    from ..inference.multimodal import build_prompt, encode_image, load_image, with_placeholders
    from ..inference.tools import chat_messages

    if args.tools and not args.chat:
        raise ValueError("--tools needs --chat (the tools are described in the chat's first turn)")
    options.constraint(args)  # a bad schema file or a clash of options fails before the slow load
    prompt = read_prompt(args)
    # Images and their encoder before the slow text model: a bad file or a missing mmproj fails fast.
    images = [load_image(path) for path in args.image]
    if images and options.device(args) != "cpu":
        raise ValueError("--image runs on the CPU only for now (use --device cpu)")
    vision, pan_and_scan = options.vision_encoder(args) if images else (None, None)
    load_start = time.perf_counter()
    model, tok = options.load_model(args)
    load_s = time.perf_counter() - load_start
    if images:
        prompt = with_placeholders(prompt, len(images))
    calling = options.tool_calling(args, tok)
    params, extra = options.sampling_params(args), {}
    if args.chat:
        options.warn_if_not_chat_model(args, tok)
        messages = [{"role": "user", "content": prompt}]
        if calling is not None and calling.native:
            prompt, params, extra = options.tool_prompt(tok, messages, calling, params, bool(images))
        else:
            prompt = apply_chat_template(chat_messages(messages, calling))
    if images:
        prompt = build_prompt(model, tok, prompt, [encode_image(vision, im, pan_and_scan) for im in images])
    spec = options.drafter(args, model)
    start, first, text, last = time.perf_counter(), None, [], None
    for chunk in stream_generate(model, tok, prompt, args.max_tokens, params, args.stop,
                                 kv_dtype=args.kv_dtype, speculative=spec, **extra):
        first = first or time.perf_counter()
        text.append(chunk.text)
        last = chunk
        if not args.json and calling is None:  # with tools the reply is shown once parsed
            print(chunk.text, end="", flush=True)
    elapsed = time.perf_counter() - start
    decode_s = time.perf_counter() - first
    stats = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
             "finish_reason": last.finish_reason, "load_s": round(load_s, 3),
             "time_to_first_token_s": round(first - start, 4),
             "decode_tok_s": round((last.completion_tokens - 1) / decode_s, 2) if decode_s > 0 else None,
             "total_s": round(elapsed, 3), "threads": torch.get_num_threads()}
    if spec is not None:
        stats.update(draft_acceptance=round(spec.stats.acceptance, 3),
                     tokens_per_step=round(spec.stats.tokens_per_step, 2))
    calls = calling.parse("".join(text)) if calling is not None and last.finish_reason == "stop" else None
    if calls:
        stats["finish_reason"] = "tool_calls"
    if args.json:
        print(json.dumps({"text": "".join(text), **({"tool_calls": calls} if calling is not None else {}), **stats}))
    else:
        print("\n".join(call_line(c) for c in calls) if calls else "".join(text) if calling is not None else "")
        if args.verbose:
            print(timings(stats), file=sys.stderr)
            if spec is not None:
                print(spec.stats.summary(), file=sys.stderr)


def call_line(call: dict) -> str:
    """A tool call for a person: name(arguments JSON)."""
    return f"{call['function']['name']}({call['function']['arguments']})"


def timings(stats: dict) -> str:
    """`generate -v`'s line: where the time went, for a person."""
    decode = (f"{stats['completion_tokens']} tokens at {stats['decode_tok_s']:.1f} tok/s"
              if stats["decode_tok_s"] else f"{stats['completion_tokens']} token")
    return (f"load {stats['load_s']:.2f} s, first token after {stats['time_to_first_token_s']:.3f} s "
            f"(prompt {stats['prompt_tokens']} tokens), {decode} ({stats['finish_reason']}), "
            f"total {stats['total_s']:.2f} s, {stats['threads']} threads")


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
