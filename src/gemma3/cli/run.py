"""`gemma3 generate | chat | tokenize | info`: running a model and looking at one."""

from __future__ import annotations

import json
import sys
import time

from . import options


def register(sub):
    p = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)",
                       description="Generate a continuation. Example: gemma3 generate \"The capital of France is\" -n 32")
    p.add_argument("prompt", help="prompt text, or - to read it from stdin")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template (instruction-tuned models)")
    p.add_argument("--verbose", "-v", action="store_true", help="print timing stats to stderr")
    p.add_argument("--image", action="append", default=[],
                   help="image file (repeatable); each <start_of_image> in the prompt marks where one goes, "
                        "otherwise they come before the text")
    options.add(p, *options.MODEL, "device", *options.SAMPLING, *options.VISION)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat with the chat template")
    p.add_argument("--system", default=None, help="system prompt (merged into the first user turn)")
    options.add(p, *options.MODEL, *options.SAMPLING, *options.VISION)
    p.set_defaults(func=cmd_chat)

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


def cmd_generate(args):
    from ..formats.tokenizer import apply_chat_template
    from ..inference.generate import stream_generate
    from ..inference.multimodal import build_prompt, encode_image, load_image, with_placeholders

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    # Images and their encoder before the slow text model: a bad file or a missing mmproj fails fast.
    images = [load_image(path) for path in args.image]
    if images and options.device(args) != "cpu":
        raise ValueError("--image runs on the CPU only for now (use --device cpu)")
    vision, pan_and_scan = options.vision_encoder(args) if images else (None, None)
    model, tok = options.load_model(args)
    if images:
        prompt = with_placeholders(prompt, len(images))
    if args.chat:
        prompt = apply_chat_template([{"role": "user", "content": prompt}])
    if images:
        prompt = build_prompt(model, tok, prompt, [encode_image(vision, im, pan_and_scan) for im in images])
    start, first, text, last = time.perf_counter(), None, [], None
    for chunk in stream_generate(model, tok, prompt, args.max_tokens, options.sampling_params(args), args.stop,
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
    from ..formats.tokenizer import apply_chat_template
    from ..inference.generate import stream_generate
    from ..inference.multimodal import build_prompt, encode_image, load_image, with_placeholders
    from ..inference.prefix_cache import PrefixCache

    model, tok = options.load_model(args)
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
                encoder = encoder or options.vision_encoder(args)
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
        for chunk in stream_generate(model, tok, prompt, args.max_tokens, options.sampling_params(args), args.stop,
                                     prefix_cache=prefix_cache):
            reply.append(chunk.text)
            print(chunk.text, end="", flush=True)
        print()
        messages.append({"role": "model", "content": "".join(reply)})


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
