"""OpenAI-compatible HTTP server: `engine` (the continuous-batching loop that owns the
model), `app` (FastAPI routes and error shapes), `schemas` (request bodies), `metrics`
(Prometheus text), `guard` (limits, Host/key/body checks, slow-client timeouts), `arenas` (glibc arena cap and trim), `static/index.html` (the chat page)."""

from __future__ import annotations


def banner(model_id: str, host: str, port: int, ctx: int, max_batch: int, api_key: str | None) -> str:
    """What a server runs and where, printed once at start-up (before uvicorn's own lines)."""
    import torch

    address = f"[{host}]" if ":" in host else host
    key = "API key required (Authorization: Bearer …)" if api_key else "no API key required"
    return (f"gemma3 serve: {model_id}, context {ctx}, batch {max_batch}, {torch.get_num_threads()} threads\n"
            f"gemma3 serve: http://{address}:{port}/ (chat page; OpenAI API under /v1), {key}")


def serve(model, tokenizer, model_id: str, host: str = "127.0.0.1", port: int = 8000, ctx: int | None = None,
          max_batch: int = 8, max_queue: int = 64, limits=None, api_key: str | None = None,
          prefix_cache_mb: int = 256, log_level: str = "info", vision=None, pan_and_scan=None,
          allowed_hosts: list[str] | None = None, head_timeout: float = 10.0, keep_alive: float = 5.0,
          max_connections: int = 256, draft=None, draft_k: int = 4):
    """Run until SIGINT/SIGTERM: uvicorn stops accepting connections, lets in-flight responses
    finish (up to 30 s), then the engine cancels whatever is left and the call returns.

    The engine loop runs on this (the main) thread and uvicorn on a second one: all model work
    then happens on the thread that loaded the model, so it shares that thread's OpenMP pool (see
    Engine.start for what a second pool costs). `draft`: the model of requests that ask for
    speculative decoding with a draft model (`draft_k` tokens per step unless they say)."""
    import signal
    import sys
    import threading

    import uvicorn

    from .app import create_app
    from .arenas import limit_arenas
    from .engine import Engine
    from .guard import Limits, is_loopback, protocol
    from .guard import allowed_hosts as host_names

    limit_arenas()
    ctx = min(ctx or model.config.max_context, model.config.max_context)
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue,
                    prefix_cache_bytes=prefix_cache_mb * 2**20, vision=vision, pan_and_scan=pan_and_scan,
                    draft=draft, draft_k=draft_k)
    app = create_app(engine, model_id, ctx, limits or Limits(), api_key=api_key, start_engine=False,
                     hosts=host_names(host, allowed_hosts))
    print(banner(model_id, host, port, ctx, max_batch, api_key), file=sys.stderr, flush=True)
    if draft is not None:
        print(f"gemma3 serve: draft model for speculative requests: {draft.config.num_layers} layers, "
              f"{draft_k} tokens per step by default", file=sys.stderr, flush=True)
    if not api_key and not is_loopback(host):
        print(f"gemma3 serve: warning: listening on {host} without --api-key: anyone who can reach this "
              "address can use the model", file=sys.stderr)
    # Slow clients are closed: a request head must arrive within head_timeout, an idle keep-alive
    # connection lasts keep_alive, and connections beyond max_connections get a 503.
    http = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                         timeout_graceful_shutdown=30, http=protocol(head_timeout),
                                         timeout_keep_alive=keep_alive, limit_concurrency=max_connections))

    def serve_http():
        try:
            http.run()  # off the main thread uvicorn installs no signal handlers: ours below do
        finally:
            engine.stop(timeout=0)  # if uvicorn could not start (port taken), the loop must end too

    def on_signal(*_):  # like uvicorn's own: the first signal shuts down gracefully, a second forces
        if http.should_exit:
            http.force_exit = True
        http.should_exit = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=serve_http, name="gemma3-http")
    try:
        thread.start()
        engine.run()
        thread.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not http.started:
        raise SystemExit(f"gemma3 serve: could not start the HTTP server on {host}:{port}")
