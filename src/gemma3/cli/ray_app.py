"""`gemma3 serve --ray`'s application as a Ray Serve import path, for `serve run`, Serve config
files and KubeRay RayService manifests:

    serve run gemma3.cli.ray_app:build argv="--replicas 2 --threads 4 --model /models/x.gguf"

`argv` holds `gemma3 serve` options; the HTTP listener is the cluster's (its http_options), not
--host/--port. A module of its own: it parses with the whole `gemma3` parser, above serve_ray.
"""

from __future__ import annotations

import shlex

from . import build_parser, serve_ray


def build(args: dict):
    """Ray Serve application builder (args: the `key=value` pairs of `serve run` or a config's
    `args`)."""
    ns = build_parser().parse_args(["serve", "--ray", *shlex.split(args.get("argv", ""))])
    serve_ray.check(ns)
    return serve_ray.application(ns)[1]
