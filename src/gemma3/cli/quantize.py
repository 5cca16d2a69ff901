"""The `gemma3 quantize` subcommand."""

from __future__ import annotations

import json
import sys

from ..quant.apply import KEYS, RECIPES
from ..quant.formats import ALIASES, FORMATS
from . import options


def format_help() -> str:
    gguf = [n for n, f in FORMATS.items() if f.ggml_type is not None] + list(ALIASES)
    other = [n for n, f in FORMATS.items() if f.ggml_type is None]
    return f"{', '.join(gguf)} (GGUF file or directory); {', '.join(other)} (directory only)"


def cmd_quantize(args):
    from pathlib import Path

    from ..inference.convert import convert
    from ..quant.apply import parse_recipe
    from ..quant.store import without_gguf_type

    options.set_threads(args)
    recipe = parse_recipe(args.recipe, args.to)
    result = convert(args.model, recipe, args.out, progress=not args.json)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"wrote {result['out']}: {result['bytes'] / 2**20:.1f} MiB, {result['bits_per_param']:.2f} bits/param "
              f"({recipe.spec})")
    if Path(args.out).suffix.lower() != ".gguf":
        no_gguf = without_gguf_type(recipe)
        better = (f"{', '.join(no_gguf)} has no GGUF type or fast kernel" if no_gguf else
                  f"the same recipe to {Path(args.out).name}.gguf runs on the C++ kernels")
        print(f"gemma3: warning: a quantized directory {options.REFERENCE_PATH}; {better}", file=sys.stderr)


def register(sub):
    p = sub.add_parser(
        "quantize", help="convert a model's weights to another format (GGUF file or quantized directory)",
        description="Quantize every projection and the tied embedding / LM head of --model (norms stay float) and "
                    "write OUT: a .gguf name writes a GGUF file llama.cpp runs, any other name a directory "
                    "(model.safetensors + quantization.json) that `--model` reads back.\n\n"
                    f"formats: {format_help()}\n"
                    f"recipe keys: {', '.join(KEYS)} (most specific wins); named recipes: "
                    + ", ".join(f"{k} = {v}" for k, v in RECIPES.items()) +
                    "\n\nexample: gemma3 quantize --to int4-block32 --recipe embed=q8_0 --out model-q4_0.gguf")
    p.add_argument("--to", default=None, help="format of every quantized weight (the recipe's default)")
    p.add_argument("--recipe", default=None,
                   help="named recipe or key=format pairs, e.g. embed=q8_0,default=int4-block32")
    p.add_argument("--out", "-o", required=True, help="OUT.gguf, or a directory")
    options.add(p, "model", "threads", "json")
    p.set_defaults(func=cmd_quantize)

