"""`gemma3 serve --ray`: the OpenAI server as Ray Serve replicas (server/ray_serve.py).

`gemma3 serve --ray` deploys and waits; ray_app.py offers the same application as a Ray Serve
import path. Also the helpers both servers share: `limits`, `has_vision`.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial

from . import options


def autoscale(text: str) -> tuple[int, int]:
    """argparse type of --autoscale MIN:MAX."""
    low, sep, high = text.partition(":")
    try:
        bounds = int(low), int(high)
    except ValueError:
        bounds = None
    if not sep or bounds is None or bounds[0] < 0 or bounds[1] < max(bounds[0], 1):
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN:MAX replicas with 0 <= MIN <= MAX and MAX >= 1 "
                                         "(e.g. 1:4)")
    return bounds


def add_arguments(p):
    ray = p.add_argument_group("Ray Serve replicas (pip install 'gemma3[ray]'; docs/serving.md)")
    ray.add_argument("--ray", action="store_true",
                     help="serve through Ray Serve: engine replicas behind one ingress at --host/--port, restarted "
                          "when they die; each replica uses --threads CPUs")
    count = ray.add_mutually_exclusive_group()
    count.add_argument("--replicas", type=options.positive_int, default=None, help="engine replicas with --ray (default 1)")
    count.add_argument("--autoscale", type=autoscale, default=None, metavar="MIN:MAX",
                       help="with --ray: between MIN and MAX replicas, scaled on ongoing requests per replica "
                            "(target: --max-batch)")
    ray.add_argument("--ray-address", default=None,
                     help="Ray cluster to deploy to (e.g. 10.0.0.1:6379 or auto; default: $RAY_ADDRESS, else a "
                          "local cluster on 127.0.0.1 started for this command)")
    ray.add_argument("--drain-timeout", type=options.positive, default=60.0,
                     help="seconds a replica being removed has to finish its requests (default 60)")


def check(args):
    """Ray options without --ray, or what --ray cannot serve: a clear error."""
    given = [flag for flag, value in (("--replicas", args.replicas), ("--autoscale", args.autoscale),
                                      ("--ray-address", args.ray_address)) if value is not None]
    if given and not args.ray:
        raise ValueError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --ray")
    if args.ray and args.tp:
        raise ValueError("--ray serves whole-model replicas; --tp is not served through Ray (run torchrun per "
                         "replica instead: docs/serving.md)")
    if args.ray and getattr(args, "draft_model", None):
        raise ValueError("--ray replicas do not load a --draft-model yet: serve it without --ray")


def limits(args):
    """The request limits set on the command line (the same for `serve` and each Ray replica)."""
    from ..server.guard import Limits

    return Limits(max_tokens=args.max_tokens, max_stop=args.max_stop, max_stop_chars=args.max_stop_chars,
                  max_logit_bias=args.max_logit_bias, max_body_bytes=int(args.max_body_mb * 2**20),
                  prompt_bytes_per_token=args.prompt_bytes_per_token)


def has_vision(model) -> bool:
    """An HF directory whose config describes a vision tower (Gemma3ForConditionalGeneration)."""
    from ..inference.load import resolve

    path = resolve(model)
    config = path / "config.json"
    return path.is_dir() and config.is_file() and "vision_config" in json.loads(config.read_text())


def load_replica(args):
    """What a replica loads, in its own process: model, tokenizer and the vision encoder if any."""
    model, tok = options.load_model(args)
    vision, pan_and_scan = options.vision_encoder(args) if (args.mmproj or has_vision(args.model)) else (None, None)
    return model, tok, vision, pan_and_scan


def application(args):
    from pathlib import Path

    from ..inference.load import resolve
    from ..server.guard import allowed_hosts as host_names
    from ..server.ray_serve import Settings, application

    model_id = args.served_model_name or Path(resolve(args.model)).name.removesuffix(".gguf")
    settings = Settings(load=partial(load_replica, argparse.Namespace(**{k: v for k, v in vars(args).items()
                                                                          if k != "func"})),
                        model_id=model_id, ctx=args.ctx, limits=limits(args), api_key=args.api_key,
                        hosts=host_names(args.host, args.allowed_hosts.split(",") if args.allowed_hosts else None),
                        max_batch=args.max_batch, max_queue=args.max_queue, prefix_cache_mb=args.prefix_cache_mb,
                        threads=args.threads or 1)
    return model_id, application(settings, replicas=args.replicas or 1, autoscale=args.autoscale,
                                 drain_s=args.drain_timeout)


def run(args):
    """Deploys, prints where, and waits for Ctrl-C/SIGTERM; then removes the application (and
    stops the local cluster if this command started one)."""
    import signal
    import threading

    try:
        import ray
        from ray import serve
    except ImportError:
        raise ValueError("serve --ray needs Ray Serve: pip install 'gemma3[ray]'") from None
    from ..server.ray_serve import APP_NAME

    model_id, app = application(args)
    local = args.ray_address is None and not _env_address()
    if local:
        start_local()
    else:
        ray.init(address=args.ray_address)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        scale = f"{args.autoscale[0]}..{args.autoscale[1]} replicas (autoscaled)" if args.autoscale else \
            f"{args.replicas or 1} replica{'s' * ((args.replicas or 1) > 1)}"
        print(f"gemma3 serve: {model_id} on Ray Serve, {scale} x {args.threads or 1} threads\n"
              f"gemma3 serve: http://{args.host}:{args.port}/v1 (OpenAI API)", file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        serve.delete(APP_NAME)
        if local:
            serve.shutdown()
            ray.shutdown()


# Ray Serve's defaults that take a replica's CPU on a small machine, for the local cluster that
# `gemma3 serve --ray` starts (on a cluster of your own, set them in its nodes' environment; an
# environment variable already set wins). Health checks, restarts and autoscaling keep working:
# the controller acts on them within its loop period.
LEAN_SERVE_ENV = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",  # the controller's loop (default 0.1 s)
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",  # each replica's and proxy's metrics push (default 100)
    "RAY_SERVE_LOG_TO_STDERR": "0",  # Serve's log lines to its log files only, not again through Ray's log monitor
    "RAY_USAGE_STATS_ENABLED": "0",
    # Request handlers on each replica's own event loop, and the ingress's router on its loop,
    # instead of a loop on a thread of their own: one hand-over between threads less per request
    # and per streamed item (our handlers await the engine, which runs on a thread of its own).
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


def start_local(**init):
    """A local Ray cluster for this machine's replicas: its services on loopback like the server
    itself, no dashboard, LEAN_SERVE_ENV (its processes inherit this one's environment)."""
    import os

    import ray

    for name, value in LEAN_SERVE_ENV.items():
        os.environ.setdefault(name, value)
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, **init)


def _env_address() -> bool:
    import os

    return bool(os.environ.get("RAY_ADDRESS"))
