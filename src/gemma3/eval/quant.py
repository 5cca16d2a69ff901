"""`gemma3 eval quant`: size and quality of each weight format on one model (paper §5, Table 3).

For every format (or named recipe) the source model is quantized with the module swap, written
to a temporary file (GGUF where the format has a GGUF type, else a quantized directory) to
measure its size, scored for perplexity with the same method as `gemma3 perplexity`, and timed
on a short greedy decode through the quantized modules (the reference dequantize-then-matmul
path of `quant/apply.py`). The reference row is the source's weights decoded to float32.

Perplexity runs on the quantized weights decoded once to float32: the same products the
quantized modules compute (`tests/quant/test_formats.py` checks they agree), without decoding
the 262k-row LM head again for every scored slice.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from .perplexity import perplexity

DEFAULT_FORMATS = "q8_0,int8-channel,sfp8,int4-block32,int4-channel"
DECODE_PROMPT = "The GNU General Public License is a free, copyleft license for"


@dataclass
class FormatResult:
    format: str
    recipe: str
    file: str  # "gguf" or "dir"
    file_bytes: int
    weight_bytes: int  # tensor bytes alone (no tokenizer metadata)
    bits_per_param: float  # 8 · weight_bytes / params
    ppl: float
    nll: float
    delta_ppl: float | None = None
    delta_ppl_pct: float | None = None
    decode_tok_s: float | None = None


def decode_speed(model, tokenizer, tokens: int, prompt: str = DECODE_PROMPT) -> float:
    """Greedy tokens per second after a short prompt (prefill not counted)."""
    ids = tokenizer.encode(prompt, add_bos=True)
    cache = model.new_cache(1, max_len=len(ids) + tokens)
    with torch.inference_mode():
        nxt = model(torch.tensor([ids]), cache, last_only=True)[0, -1].argmax()
        start = time.perf_counter()
        for _ in range(tokens):
            nxt = model(nxt.view(1, 1), cache, last_only=True)[0, -1].argmax()
    return tokens / (time.perf_counter() - start)


def _dequantized_copy(model):
    from ..model.decoder import Gemma3
    from ..quant.apply import float_state

    with torch.device("meta"):
        plain = Gemma3(model.config)
    plain.load_state_dict(float_state(model), strict=True, assign=True)
    return plain.eval()


def _weight_bytes(model) -> int:
    from ..quant.apply import quantized_weights

    floats = sum(t.numel() * 4 for k, t in model.state_dict().items() if not k.endswith(("qdata", "qscale")))
    return floats + sum(q.nbytes for q in quantized_weights(model).values())


def evaluate(model_arg, formats: list[str], text: str, ctx: int = 512, chunks: int | None = None,
             decode_tokens: int = 8, progress: bool = True) -> dict:
    from ..inference.convert import read_source
    from ..quant.apply import RECIPES, parse_recipe, quantize_model
    from ..quant.store import check_output, output_bytes, save

    recipes = [parse_recipe(f) if f in RECIPES else parse_recipe(default=f) for f in formats]  # errors first
    base, tok, metadata = read_source(model_arg)
    params = base.config.num_params()

    def measure(name, recipe, model, scored) -> FormatResult:
        with tempfile.TemporaryDirectory() as tmp:
            gguf_ok = recipe is None or all(_has_gguf(f) for f in recipe.names())
            out = Path(tmp) / ("model.gguf" if gguf_ok else "model")
            if recipe is not None:
                check_output(out, recipe)
            save(model, out, metadata, recipe.spec if recipe else "")
            size = output_bytes(out)
        ppl = perplexity(scored, tok, text, ctx=ctx, max_chunks=chunks, progress=progress)
        speed = decode_speed(model, tok, decode_tokens) if decode_tokens else None
        wbytes = _weight_bytes(model)
        return FormatResult(name, recipe.spec if recipe else "float32 (dequantized source)", "gguf" if gguf_ok else "dir",
                            size, wbytes, round(8 * wbytes / params, 3), ppl.ppl, ppl.nll,
                            decode_tok_s=round(speed, 3) if speed else None)

    reference = measure("reference", None, base, base)
    rows = []
    for name, recipe in zip(formats, recipes):
        model = quantize_model(copy.deepcopy(base), recipe,
                               progress=partial(tqdm, desc="quantize", unit="tensor") if progress else None)
        row = measure(name, recipe, model, _dequantized_copy(model))
        row.delta_ppl = row.ppl - reference.ppl
        row.delta_ppl_pct = 100 * row.delta_ppl / reference.ppl
        rows.append(row)
        del model
    return {"model": str(model_arg or "270m"), "params": params, "ctx": ctx, "chunks": chunks,
            "decode_tokens": decode_tokens, "reference": asdict(reference), "formats": [asdict(r) for r in rows]}


def _has_gguf(fmt: str) -> bool:
    from ..quant.formats import get_format

    return get_format(fmt).ggml_type is not None


def table(result: dict) -> str:
    """Markdown table, one row per format."""
    head = ("| format | file MiB | bits/param | perplexity | Δ ppl | Δ % | decode tok/s |\n"
            "|---|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in [result["reference"]] + result["formats"]:
        delta = "—" if r["delta_ppl"] is None else f"{r['delta_ppl']:+.4f}"
        pct = "—" if r["delta_ppl_pct"] is None else f"{r['delta_ppl_pct']:+.2f}"
        speed = "—" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.2f}"
        name = "float32 (reference)" if r["format"] == "reference" else f"`{r['format']}`"
        lines.append(f"| {name} | {r['file_bytes'] / 2**20:.1f} | {r['bits_per_param']:.2f} | {r['ppl']:.4f} | "
                     f"{delta} | {pct} | {speed} |")
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5))
    ref = result["reference"]
    points: dict[tuple, list[str]] = {}  # formats of (nearly) the same size and perplexity share a label
    for r in result["formats"]:
        key = (round(r["file_bytes"] / 2**20), round(r["ppl"], 1))
        points.setdefault(key, []).append(r["format"])
    for i, ((mib, ppl), names) in enumerate(sorted(points.items())):
        ax.scatter(mib, ppl, zorder=3)
        ax.annotate(" / ".join(names), (mib, ppl), textcoords="offset points", fontsize=8, ha="center",
                    xytext=(0, 7) if i % 2 else (0, -13))
    ax.scatter(ref["file_bytes"] / 2**20, ref["ppl"], marker="*", s=120, color="black", zorder=3)
    ax.annotate("float32 (reference)", (ref["file_bytes"] / 2**20, ref["ppl"]), textcoords="offset points",
                xytext=(-40, 8), fontsize=8)
    ax.axhline(ref["ppl"], color="gray", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(bottom=ref["ppl"] * 0.88)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0)))
        axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("file size (MiB, log scale)")
    ax.set_ylabel(f"perplexity (ctx {result['ctx']}, log scale)")
    ax.set_title(f"Weight formats: size vs perplexity ({result['model']})")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
