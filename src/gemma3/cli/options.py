"""Options shared by several commands, each defined once (llama.cpp's common/arg.cpp rule), and the
helpers that turn them into objects: the model, sampling parameters, the vision encoder.

A command takes the options it needs by name (`add(p, "model", "threads", ...)`), with its own
default where one differs (`defaults={"threads": 2}`); `--help` shows each default.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import NamedTuple

from ..eval.results import DEFAULT_RESULTS

BACKENDS = ("cpu", "torch")


# ---- one convention for every command ----------------------------------------------------------


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default unless the help already states it; descriptions
    keep their own line breaks (formats lists, examples), each line wrapped to the terminal."""

    def _fill_text(self, text, width, indent):
        import textwrap

        return "\n".join(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                         for line in text.splitlines())

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default is None or default is False
                or default == [] or default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with the formatter above, and bad input answered by one line naming the problem
    (the default prints the whole usage first, which buries it)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _checked(kind, ok, what: str):
    """An argparse `type` that parses `kind` and rejects values `ok` refuses, at parse time."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if kind is float and not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    parse.__name__ = what
    return parse


positive_int = _checked(int, lambda v: v > 0, "a positive integer")
count = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive = _checked(float, lambda v: v > 0, "a positive number")
non_negative = _checked(float, lambda v: v >= 0, "a number >= 0")
fraction = _checked(float, lambda v: 0 <= v <= 1, "a number from 0 to 1")
share = _checked(float, lambda v: 0 < v <= 1, "a number above 0 and at most 1")
port = _checked(int, lambda v: 0 <= v <= 65535, "a TCP port (0-65535)")


def comma_list(parse):
    """An argparse `type` for a comma-separated list, e.g. 1,4,16, each item parsed by `parse`."""

    def parse_list(text: str) -> list:
        return [parse(x.strip()) for x in text.split(",") if x.strip()]

    parse_list.__name__ = f"list of {parse.__name__}"
    return parse_list


int_list = comma_list(positive_int)
fraction_list = comma_list(fraction)


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
    "threads": Option(("--threads",), dict(type=positive_int, default=None,
                                           help="CPU threads (default: PyTorch's choice)")),
    "json": Option(("--json",), dict(action="store_true", help="machine-readable output")),
    "kv_dtype": Option(("--kv-dtype",), dict(
        choices=("fp32", "bf16", "int8"), default=None,
        help="KV cache storage; int8 = per-token per-head scales (default: the compute dtype)")),
    "max_tokens": Option(("--max-tokens", "-n"), dict(type=positive_int, default=256,
                                                      help="tokens to generate at most (default: %(default)s)")),
    "temperature": Option(("--temperature", "-t"), dict(type=non_negative, default=0.0,
                                                        help="0 = greedy (default: %(default)s)")),
    "top_k": Option(("--top-k",), dict(type=count, default=0, help="keep the k most likely tokens (0 = off)")),
    "top_p": Option(("--top-p",), dict(type=share, default=1.0, help="nucleus sampling mass (1 = off)")),
    "min_p": Option(("--min-p",), dict(type=fraction, default=0.0,
                                       help="drop tokens below min_p × p(best) (0 = off)")),
    "repeat_penalty": Option(("--repeat-penalty",), dict(type=positive, default=1.0,
                                                         help="llama.cpp-style repetition penalty (1 = off)")),
    "seed": Option(("--seed",), dict(type=count, default=None, help="random seed (default: a fresh one each run)")),
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
    "adapter": Option(("--adapter",), dict(
        action="append", default=[], metavar="[NAME=]DIR",
        help="LoRA adapter directory (PEFT layout, as `gemma3 finetune --lora-rank` writes) applied unmerged "
             "beside the base's weights; serve: NAME=DIR (repeatable) serves it as model NAME, chosen per "
             "request, while a bare DIR applies to every request")),
    "lookup": Option(("--lookup",), dict(
        action="store_true", help="speculative decoding by prompt lookup: drafts the tokens that followed the "
                                  "last n-gram earlier in the text, checked in one step (same greedy text; "
                                  "faster when the output repeats the input: editing, quoting, copying)")),
    "lookup_ngram": Option(("--lookup-ngram",), dict(type=positive_int, default=3,
                                                     help="longest n-gram --lookup matches (default: %(default)s)")),
    "lookup_k": Option(("--lookup-k",), dict(type=positive_int, default=7,
                                             help="tokens --lookup drafts at most, 1-7 (default: %(default)s)")),
    "draft_model": Option(("--draft-model",), dict(
        default=None, metavar="FILE",
        help="speculative decoding with a smaller Gemma 3 of the same vocabulary drafting (e.g. the 270M for a "
             "4B): its k tokens are checked by the model in one step (same greedy text, same sampling "
             "distribution)")),
    "draft_k": Option(("--draft-k",), dict(type=positive_int, default=4,
                                           help="tokens --draft-model drafts per step, 1-7 (default: %(default)s)")),
    "json_schema": Option(("--json-schema",), dict(
        default=None, metavar="FILE", help="constrain the output to JSON valid against the JSON schema in FILE")),
    "grammar": Option(("--grammar",), dict(
        default=None, metavar="FILE", help="constrain the output to the grammar in FILE (llguidance's Lark "
                                           "dialect, or llama.cpp's GBNF)")),
    "regex": Option(("--regex",), dict(default=None, help="constrain the output to match this regular expression")),
    "choice": Option(("--choice",), dict(action="append", default=None,
                                         help="the output is exactly one of these strings (repeatable)")),
    "tools": Option(("--tools",), dict(
        default=None, metavar="FILE",
        help="tools the model may call: a JSON list of OpenAI tool definitions ({\"type\": \"function\", "
             "\"function\": {\"name\", \"description\", \"parameters\"}}); the calls it makes are printed")),
    "tool_choice": Option(("--tool-choice",), dict(
        default="auto", metavar="CHOICE",
        help="with --tools: auto (the model answers with text or a call), required (a call, constrained to the "
             "tools' schemas), none, or a function's name (a call of that function) (default: %(default)s)")),
    "parallel_tool_calls": Option(("--parallel-tool-calls",), dict(
        action="store_true", help="with --tools: the model may make several calls at once (a JSON list); "
                                  "by default it makes one")),
}

# The options of a command that loads a model to run it.
MODEL = ("model", "backend", "precision", "dtype", "threads")
SAMPLING = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed", "stop", "kv_dtype")
VISION = ("mmproj", "no_pan_and_scan")
LOOKUP = ("lookup", "lookup_ngram", "lookup_k", "draft_model", "draft_k")
CONSTRAIN = ("json_schema", "grammar", "regex", "choice")
TOOLS = ("tools", "tool_choice", "parallel_tool_calls")


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


# What a quantized directory costs: its QuantizedLinear decodes weights at every step, at a small
# fraction of the kernels' speed (0.4-0.7 tok/s at 4B).
REFERENCE_PATH = "runs on the slow reference path (weights decoded again at every step)"


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
    attach_adapters(args, model, world)
    if getattr(model, "quant_recipe", None):  # only a quantized directory loads with a recipe
        print(f"gemma3: warning: {args.model} ({model.quant_recipe}) {REFERENCE_PATH}; a .gguf from "
              "`gemma3 quantize` runs on the C++ kernels", file=sys.stderr)
    if world > 1:
        import atexit

        from ..train.distributed import setup, teardown

        ctx = setup(device=dev, timeout=timeout)
        atexit.register(teardown, ctx)  # gloo's threads abort the process if it exits with the group alive
        model, dev = tp.apply(model, ctx.rank, ctx.world), ctx.device
        if ctx.rank:
            sys.stdout = open(os.devnull, "w")
    return model.to(dev), tok


def attach_adapters(args, model, world: int):
    """Applies `--adapter`s: a bare DIR to every sequence, NAME=DIR (serve only) as a model clients
    choose by name (model/adapters.py's bank holds the names)."""
    from ..inference.load import load_adapter

    specs = [a.split("=", 1) if "=" in a else (None, a) for a in getattr(args, "adapter", None) or []]
    if specs and world > 1:
        raise ValueError("--adapter does not run tensor parallel: serve adapters from one process")
    if sum(name is None for name, _ in specs) > 1:
        raise ValueError("more than one --adapter DIR without a name: name them (--adapter NAME=DIR) to serve "
                         "several, chosen per request by `model`")
    if args.command != "serve" and any(name is not None for name, _ in specs):
        raise ValueError(f"`gemma3 {args.command}` takes --adapter DIR; NAME=DIR is for `gemma3 serve`")
    for name, path in specs:
        if name is not None and not name:
            raise ValueError(f"--adapter ={path}: empty name")
        load_adapter(model, path, name=name, default=name is None)


PRETRAINED = re.compile(r"(?:^|[-_.])pt(?:[-_.]|$)", re.IGNORECASE)


def warn_if_not_chat_model(args, tok):
    """`chat` and `generate --chat` on a model not tuned to chat (the embedded 270M is a base
    model): one line on stderr, since its replies will be poor. Such a model ships no chat template
    or is named as pre-trained (gemma-3-1b-pt: the template comes with every Gemma tokenizer)."""
    from ..inference.load import resolve

    name = resolve(args.model).name
    why = "no chat template" if tok.chat_template is None else "named -pt" if PRETRAINED.search(name) else None
    if why:
        print(f"gemma3: warning: {name} looks like a base model ({why}), not an instruction-tuned one: chat "
              "replies will be poor; for chat pass one with --model, e.g. gemma-3-1b-it-Q4_K_M.gguf", file=sys.stderr)


def sampling_params(args):
    from ..inference.sampling import SamplingParams
    from ..model import tp

    seed = args.seed
    if seed is None and tp.world_size() > 1:
        seed = tp.shared_seed()  # every rank must draw the same tokens
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repeat_penalty, seed=seed, constraint=constraint(args))


def tool_calling(args, tok=None):
    """The inference/tools.Calling of --tools FILE and --tool-choice (None: no tools, or
    --tool-choice none); with `tok`, every tool's parameters schema is checked against it, and a
    tokenizer with FunctionGemma's tool tokens gets that format (Calling.native: see tool_prompt)."""
    if not getattr(args, "tools", None):
        return None
    import json
    from dataclasses import replace

    from ..inference import functiongemma, tools

    with open(args.tools, encoding="utf-8") as f:
        try:
            definitions = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"--tools {args.tools}: not JSON: {e}") from None
    choice = args.tool_choice if args.tool_choice in tools.CHOICES else \
        {"type": "function", "function": {"name": args.tool_choice}}
    try:
        calling = tools.calling(definitions, choice, parallel=args.parallel_tool_calls)
        if calling is not None and tok is not None and functiongemma.supported(tok):
            calling = replace(calling, native=True)  # its own tool tokens: FunctionGemma's format
        if calling is not None and tok is not None:
            calling.check(tok)
    except tools.ToolError as e:
        raise ValueError(f"--tools {args.tools}: {e}") from None
    return calling


def constraint(args):
    """The Constraint of --json-schema / --grammar / --regex / --choice (at most one) or of the
    answer --tools allows (tools.Calling.constraint), or None."""
    given = [name for name in CONSTRAIN if getattr(args, name, None)]
    calling = tool_calling(args)
    if calling is not None and given:
        raise ValueError(f"--{given[0].replace('_', '-')} cannot be combined with --tools (use --tool-choice none)")
    if calling is not None:
        return calling.constraint()
    if not given:
        return None
    if len(given) > 1:
        raise ValueError(f"give one of {', '.join('--' + n.replace('_', '-') for n in given)}, not several")
    from ..inference.constrain import Constraint

    if args.json_schema:
        with open(args.json_schema, encoding="utf-8") as f:
            return Constraint.json_schema(f.read())
    if args.grammar:
        with open(args.grammar, encoding="utf-8") as f:
            return Constraint("grammar", f.read())
    return Constraint("regex", args.regex) if args.regex else Constraint.choice(args.choice)


def drafter(args, model):
    """The --lookup or --draft-model drafter (the draft loaded like the model, on its device), or None."""
    from ..inference.speculative import DraftModel, PromptLookup

    if args.lookup and args.draft_model:
        raise ValueError("--lookup and --draft-model are two ways to draft: pass one")
    if args.lookup:
        return PromptLookup(ngram=args.lookup_ngram, k=args.lookup_k)
    if not args.draft_model:
        return None
    return DraftModel(load_draft(args, model), k=args.draft_k)


def load_draft(args, model):
    """The --draft-model, loaded like the model (backend, dtype) on its device; refused unless it
    shares the model's vocabulary."""
    from ..inference.load import load
    from ..inference.speculative import check_vocabulary

    backend = args.backend if model.device.type == "cpu" else "torch"
    draft, _ = load(args.draft_model, dtype=dtype(args, model.device.type), backend=backend)
    check_vocabulary(draft, model)
    return draft.to(model.device)


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


def tool_prompt(tok, messages: list[dict], calling, params, images: bool = False):
    """(the prompt, the sampling params, the stream_generate options) of a chat with tools in
    FunctionGemma's format (calling.native): the prompt as ids, the params constrained by its
    grammar (sampling_params builds the JSON format's, knowing no tokenizer), its call markers
    kept in the text and <start_function_response> a stop."""
    from dataclasses import replace

    from ..inference import functiongemma

    if images:
        raise ValueError("--image cannot be combined with --tools for a model in FunctionGemma's format")
    keep, stop_ids = functiongemma.decoding(tok)
    return functiongemma.encode(tok, messages, calling), replace(params, constraint=calling.constraint()), \
        {"keep": keep, "stop_ids": stop_ids}
