"""Options shared by several commands, each defined once (llama.cpp's common/arg.cpp rule), and the
helpers that turn them into objects: the model, sampling parameters, the vision encoder.

A command takes the options it needs by name (`add(p, "model", "threads", ...)`), with its own
default where one differs (`defaults={"threads": 2}`); `--help` shows each default.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NamedTuple

from ..eval.results import DEFAULT_RESULTS

BACKENDS = ("cpu", "torch")


class Option(NamedTuple):
    flags: tuple[str, ...]
    kwargs: dict


class PrecisionAlias(argparse.Action):
    """`--precision fast|fp32`, the old name of --backend cpu|torch; still accepted."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.backend = {"fast": "cpu", "fp32": "torch"}[value]


OPTIONS: dict[str, Option] = {
    "model": Option(("--model", "-m"), dict(
        default=None, help="GGUF file, HF-style directory (config.json + *.safetensors), quantized directory, "
                           "or preset name (default: the embedded Gemma 3 270M Q4_K_M GGUF, a base model)")),
    "backend": Option(("--backend",), dict(
        choices=BACKENDS, default="cpu",
        help="cpu: GGUF weights stay quantized and run on the C++ kernels (one CPU process; elsewhere the torch "
             "backend runs); torch: every weight decoded to --dtype, plain PyTorch, the reference "
             "(default: %(default)s)")),
    "precision": Option(("--precision",), dict(choices=("fast", "fp32"), action=PrecisionAlias,
                                               help=argparse.SUPPRESS)),
    "dtype": Option(("--dtype",), dict(choices=("float32", "bfloat16"), default=None,
                                       help="compute dtype (default: float32 on CPU, bfloat16 on CUDA)")),
    "device": Option(("--device",), dict(
        choices=("cpu", "cuda", "auto"), default="cpu",
        help="cpu or cuda (bfloat16 unless --dtype, float weights); auto = cuda when available (default: %(default)s)")),
    "threads": Option(("--threads",), dict(type=int, default=None,
                                           help="CPU threads (default: %(default)s; none = PyTorch's choice)")),
    "json": Option(("--json",), dict(action="store_true", help="machine-readable output")),
    "kv_dtype": Option(("--kv-dtype",), dict(
        choices=("fp32", "bf16", "int8"), default=None,
        help="KV cache storage; int8 = per-token per-head scales (default: %(default)s; none = the compute dtype)")),
    "max_tokens": Option(("--max-tokens", "-n"), dict(type=int, default=256,
                                                      help="tokens to generate at most (default: %(default)s)")),
    "temperature": Option(("--temperature", "-t"), dict(type=float, default=0.0,
                                                        help="0 = greedy (default: %(default)s)")),
    "top_k": Option(("--top-k",), dict(type=int, default=0, help="keep the k most likely tokens (0 = off)")),
    "top_p": Option(("--top-p",), dict(type=float, default=1.0, help="nucleus sampling mass (1 = off)")),
    "min_p": Option(("--min-p",), dict(type=float, default=0.0, help="drop tokens below min_p × p(best) (0 = off)")),
    "repeat_penalty": Option(("--repeat-penalty",), dict(type=float, default=1.0,
                                                         help="llama.cpp-style repetition penalty (1 = off)")),
    "seed": Option(("--seed",), dict(type=int, default=None, help="random seed (default: %(default)s)")),
    "stop": Option(("--stop",), dict(action="append", default=[], help="stop string (repeatable)")),
    "mmproj": Option(("--mmproj",), dict(
        default=None, help="llama.cpp mmproj GGUF with the vision encoder (for GGUF models; HF directories carry theirs)")),
    "no_pan_and_scan": Option(("--no-pan-and-scan",), dict(
        action="store_true", help="encode each image once, without Pan & Scan crops of elongated images")),
    "results": Option(("--results",), dict(
        nargs="?", const=DEFAULT_RESULTS, default=None, metavar="FILE",
        help=f"append this run (model, config, git commit, time, command, results) as one JSON line to FILE "
             f"(default {DEFAULT_RESULTS}; nothing is written without the flag); `gemma3 eval report` summarises it")),
    "plot": Option(("--plot",), dict(default=None, help="write the plot to this PNG")),
}

# The options of a command that loads a model to run it.
MODEL = ("model", "backend", "precision", "dtype", "threads", "json")
SAMPLING = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed", "stop", "kv_dtype")
VISION = ("mmproj", "no_pan_and_scan")


def add(p, *names: str, defaults: dict | None = None, helps: dict | None = None):
    """Adds the named options to parser (or argument group) `p`."""
    defaults, helps = defaults or {}, helps or {}
    for name in names:
        opt = OPTIONS[name]
        kwargs = dict(opt.kwargs)
        if name in defaults:
            kwargs["default"] = defaults[name]
        if name in helps:
            kwargs["help"] = helps[name]
        p.add_argument(*opt.flags, **kwargs)


# ---- what the options mean ---------------------------------------------------------------------

# Commands that run sharded under `torchrun`: generate runs unchanged on every rank (same model
# calls, output from rank 0 only); serve takes its requests on rank 0 and mirrors its model calls
# to the other ranks (server/ranks.py).
TP_COMMANDS = ("generate", "serve")


def device(args) -> str:
    """--device: "auto" is CUDA when PyTorch sees a GPU; commands without the option run on CPU."""
    import torch

    dev = getattr(args, "device", "cpu")
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this PyTorch build sees no CUDA GPU")
    return dev


def dtype(args, dev: str):
    import torch

    return getattr(torch, getattr(args, "dtype", None) or ("bfloat16" if dev == "cuda" else "float32"))


def load_model(args, timeout=None):
    """The model on its device. Under `torchrun --nproc-per-node N`, each rank joins the process
    group (`timeout`: of each collective) and keeps its tensor-parallel shard (model/tp.py); only
    rank 0 writes to stdout."""
    import torch

    from ..inference.load import load
    from ..model import tp

    if args.threads:
        torch.set_num_threads(args.threads)
    dev, world = device(args), tp.world_size()
    if world > 1 and args.command not in TP_COMMANDS:
        raise ValueError(f"`gemma3 {args.command}` does not run under torchrun (tensor parallel works for "
                         f"{', '.join(TP_COMMANDS)}); start it as a single process")
    # The quantized C++ kernels of the cpu backend are CPU-only and unsharded: elsewhere the float path runs.
    backend = args.backend if dev == "cpu" and world == 1 else "torch"
    model, tok = load(args.model, dtype=dtype(args, dev), backend=backend)
    if world > 1:
        import atexit

        from ..train.distributed import setup, teardown

        ctx = setup(device=dev, timeout=timeout)
        atexit.register(teardown, ctx)  # gloo's threads abort the process if it exits with the group alive
        model, dev = tp.apply(model, ctx.rank, ctx.world), ctx.device
        if ctx.rank:
            sys.stdout = open(os.devnull, "w")
    return model.to(dev), tok


def sampling_params(args):
    from ..inference.sampling import SamplingParams
    from ..model import tp

    seed = args.seed
    if seed is None and tp.world_size() > 1:
        seed = tp.shared_seed()  # every rank must draw the same tokens
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repeat_penalty, seed=seed)


def vision_encoder(args):
    """(vision model, Pan & Scan settings) for args."""
    from ..inference.load import load_vision
    from ..inference.multimodal import PanAndScan

    vision = load_vision(args.model, args.mmproj, dtype=dtype(args, "cpu"))
    return vision, None if args.no_pan_and_scan else PanAndScan()


def set_threads(args):
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
