"""`gemma3 quantize`'s pipeline: any model `load()` reads → a recipe (quant/) → a GGUF file or a
quantized directory."""

from __future__ import annotations

from pathlib import Path

from ..formats.gguf import read_gguf
from ..quant.apply import Recipe, quantize_model
from ..quant.gguf_writer import metadata_from_config, metadata_from_gguf
from ..quant.store import METADATA_FILE, check_output, is_quantized_dir, output_bytes, save
from .load import load, resolve


def read_source(model_arg=None):
    """(float32 model, tokenizer, GGUF metadata to carry over) for any model `load()` accepts."""
    path = resolve(model_arg)
    model, tokenizer = load(path)
    if is_quantized_dir(path):
        metadata = metadata_from_gguf(read_gguf(path / METADATA_FILE))
    elif path.is_dir():
        metadata = metadata_from_config(model.config, tokenizer)
    else:
        metadata = metadata_from_gguf(read_gguf(path))
    return model, tokenizer, metadata


def convert(model_arg, recipe: Recipe, out: str | Path, progress: bool = False) -> dict:
    check_output(out, recipe)
    model, _, metadata = read_source(model_arg)
    quantize_model(model, recipe, progress=progress)
    save(model, out, metadata, recipe.spec)
    params = model.config.num_params()
    return {"out": str(out), "recipe": recipe.spec, "bytes": output_bytes(out), "params": params,
            "bits_per_param": round(8 * output_bytes(out) / params, 3)}
