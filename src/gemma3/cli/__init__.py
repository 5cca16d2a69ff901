"""The `gemma3` command: the only place that parses arguments. Human output by default, machine
output with --json. Shared options are defined once in options.py; each module registers one
group of commands."""

from __future__ import annotations

import argparse
import os
import sys

from . import embed, evaluate, options, quantize, rl, rm, run, serve, study, train


def build_parser() -> argparse.ArgumentParser:
    parser = options.Parser(prog="gemma3", description="Run Gemma 3 models in plain PyTorch.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (run, serve, embed, evaluate, train, rl, rm, quantize, study):
        group.register(sub)
    return parser


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("gemma3")
    except PackageNotFoundError:  # run from a source tree that pip never installed
        return "(not installed)"


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line a --results entry records
    from ..formats.checkpoint import WeightsError
    from ..formats.gguf import GGUFError
    from ..model.config import UnsupportedModelError

    try:
        args.func(args)
    except BrokenPipeError:
        # The reader went away (`gemma3 generate … | head -c 10`): end quietly, as `cat` does.
        # Python would report the failed flush of stdout at exit, so stdout points at devnull first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # 128 + SIGPIPE, what a shell reports for a command killed by the pipe
    except (GGUFError, WeightsError, UnsupportedModelError, OSError, UnicodeDecodeError, ValueError) as e:
        if os.environ.get("GEMMA3_DEBUG"):
            raise
        print(f"gemma3: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


__all__ = ["build_parser", "main", "options"]
