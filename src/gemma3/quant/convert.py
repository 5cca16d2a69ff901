"""`gemma3 quantize`: any loadable model → a recipe → a GGUF file or a quantized directory."""

from __future__ import annotations

from pathlib import Path

from ..formats.gguf import read_gguf
from ..inference.load import load, resolve
from .apply import Recipe, quantize_model
from .formats import QuantError, get_format
from .gguf_writer import Metadata, metadata_from_config, metadata_from_gguf, write_gguf
from .store import METADATA_FILE, is_quantized_dir, save_dir


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


def check_output(out: str | Path, recipe: Recipe) -> None:
    """Fail before any work when `out` cannot hold `recipe`."""
    out = Path(out)
    if out.suffix.lower() == ".gguf":
        no_gguf = [f for f in recipe.names() if get_format(f).ggml_type is None]
        if no_gguf:
            raise QuantError(f"{', '.join(no_gguf)} has no GGUF type: write a directory instead "
                             f"(--out DIR: safetensors + quantization.json)")
    elif out.exists() and not out.is_dir():
        raise QuantError(f"{out}: exists and is not a directory (use a .gguf name for a GGUF file)")


def save(model, out: str | Path, metadata: Metadata, recipe: str) -> None:
    out = Path(out)
    if out.suffix.lower() == ".gguf":
        write_gguf(out, model, metadata, recipe)
    else:
        save_dir(out, model, metadata, recipe)


def output_bytes(out: str | Path) -> int:
    out = Path(out)
    return sum(f.stat().st_size for f in out.iterdir()) if out.is_dir() else out.stat().st_size


def convert(model_arg, recipe: Recipe, out: str | Path, progress: bool = False) -> dict:
    check_output(out, recipe)
    model, _, metadata = read_source(model_arg)
    quantize_model(model, recipe, progress=progress)
    save(model, out, metadata, recipe.spec)
    params = model.config.num_params()
    return {"out": str(out), "recipe": recipe.spec, "bytes": output_bytes(out), "params": params,
            "bits_per_param": round(8 * output_bytes(out) / params, 3)}
