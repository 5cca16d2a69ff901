"""`gemma3 serve`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import os
import sys

from . import options, serve_ray


def register(sub):
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a chat page",
                       description="Serves /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, "
                                   "/tokenize, /detokenize, /tokenizer_info, /props, /health, /metrics and a chat "
                                   "page at /. Example: gemma3 serve --port 8000 --max-batch 8")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=options.port, default=8000, help="TCP port (default 8000)")
    p.add_argument("--max-batch", type=options.positive_int, default=8, help="sequences decoded together at most (default 8)")
    p.add_argument("--max-queue", type=options.positive_int, default=64,
                   help="requests waiting for a batch slot at most; more get HTTP 503 (default 64)")
    p.add_argument("--ctx", type=options.positive_int, default=None, help="context per request, prompt + completion (default: the model's)")
    p.add_argument("--max-tokens", type=options.positive_int, default=None,
                   help="default and upper bound of a request's max_tokens (default: what is left of --ctx)")
    p.add_argument("--max-stop", type=options.positive_int, default=16,
                   help="stop strings a request may give (default 16; OpenAI allows 4): each is matched "
                        "against every new piece of text on the engine's thread")
    p.add_argument("--max-stop-chars", type=options.positive_int, default=256, help="characters per stop string at most (default 256)")
    p.add_argument("--max-logit-bias", type=options.count, default=1024, help="logit_bias entries per request at most (default 1024)")
    p.add_argument("--max-body-mb", type=options.positive, default=64,
                   help="request body size at most, in MiB; larger bodies get HTTP 413 (default 64: room for images)")
    p.add_argument("--prompt-bytes-per-token", type=options.positive_int, default=8,
                   help="prompt text accepted per token of --ctx, checked before tokenizing (default 8: ordinary "
                        "text takes about 4)")
    p.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host header names to answer besides the default (bound to loopback: "
                        "localhost, 127.0.0.1, ::1 only, which stops DNS-rebinding pages; elsewhere: any); * = any")
    p.add_argument("--head-timeout", type=options.positive, default=10.0,
                   help="seconds a client has to send a request's line and headers (default 10)")
    p.add_argument("--keep-alive", type=options.positive, default=5.0, help="seconds an idle keep-alive connection stays open (default 5)")
    p.add_argument("--max-connections", type=options.positive_int, default=256,
                   help="open connections at most; more get HTTP 503 (default 256)")
    p.add_argument("--api-key", default=os.environ.get("GEMMA3_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize "
                        "(default: $GEMMA3_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: the model file's name)")
    p.add_argument("--prefix-cache-mb", type=options.count, default=256, help="prompt prefix cache size, 0 = off (default 256)")
    p.add_argument("--tp", type=options.positive_int, default=None,
                   help="tensor parallel over N ranks on this machine (started by the server; float weights, "
                        "text only, no prefix cache). Under torchrun the ranks are torchrun's")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="uvicorn log level (default info: one line per request)")
    options.add(p, *options.VISION, *options.MODEL, "adapter", "draft_model", "draft_k",
                helps={"draft_model": "a smaller Gemma 3 of the same vocabulary that requests may draft with "
                                      "(body: \"speculative\": {\"method\": \"draft\", \"k\": 4}); each "
                                      "drafting sequence keeps a KV cache of the draft beside its own",
                       "draft_k": "tokens drafted per step by a draft request that gives no k, 1-7 "
                                  "(default: %(default)s)"})
    serve_ray.add_arguments(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args):
    from pathlib import Path

    from ..inference.load import resolve
    from ..model import tp
    from ..server import ranks, serve

    serve_ray.check(args)
    if args.ray:
        return serve_ray.run(args)
    world = tp.world_size()
    if args.tp and world > 1 and args.tp != world:
        raise ValueError(f"--tp {args.tp} under torchrun with {world} processes: they must agree (or leave out --tp)")
    world = max(world, args.tp or 1)
    model_id = args.served_model_name or Path(resolve(args.model)).name.removesuffix(".gguf")
    # Images need a vision encoder: --mmproj for a GGUF, or the HF directory's own; else text-only.
    wants_vision = bool(args.mmproj) or serve_ray.has_vision(args.model)
    if world > 1 and args.draft_model:
        raise ValueError("serve --tp does not serve speculative decoding: leave out --draft-model")
    if not 1 <= args.draft_k <= 7:
        raise ValueError(f"--draft-k must be 1 to 7, got {args.draft_k}")
    if world > 1 and wants_vision:
        raise ValueError("serve --tp serves text only (the vision encoder is not sharded); "
                         "serve a multimodal model without --tp")
    vision, pan_and_scan = options.vision_encoder(args) if wants_vision else (None, None)
    followers = []
    if world > tp.world_size():  # `serve --tp N` outside torchrun: start the other ranks here
        followers = ranks.start_ranks(world, args.argv, args.threads)
    try:
        model, tok = options.load_model(args, timeout=ranks.IDLE_TIMEOUT)
        if world > 1 and int(os.environ["RANK"]):
            return ranks.follow(model)
        draft = options.load_draft(args, model) if args.draft_model else None
        if world > 1:
            model = ranks.Leader(model)
            print(f"gemma3 serve: tensor parallel over {world} ranks (float weights; prefix cache off)",
                  file=sys.stderr)
        try:
            serve(model, tok, model_id, host=args.host, port=args.port, ctx=args.ctx, max_batch=args.max_batch,
                  max_queue=args.max_queue, api_key=args.api_key, limits=serve_ray.limits(args),
                  allowed_hosts=args.allowed_hosts.split(",") if args.allowed_hosts else None,
                  head_timeout=args.head_timeout, keep_alive=args.keep_alive,
                  max_connections=args.max_connections,
                  prefix_cache_mb=0 if world > 1 else args.prefix_cache_mb, log_level=args.log_level,
                  vision=vision, pan_and_scan=pan_and_scan, draft=draft, draft_k=args.draft_k)
        finally:
            if world > 1:
                model.close()
    except BaseException:
        ranks.stop_ranks(followers, timeout=1.0)  # e.g. a failed load: the others may wait for rank 0
        raise
    ranks.stop_ranks(followers)

