"""`gemma3 quantize`'s pipeline: any model `load()` reads → a recipe (quant/) → a GGUF file or a
quantized directory."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from ..formats.gguf import read_gguf
from ..quant.apply import Recipe, quantize_model
from ..quant.gguf_writer import metadata_from_config, metadata_from_gguf
from ..quant.store import METADATA_FILE, check_output, is_quantized_dir, output_bytes, save
from .load import load, resolve


def read_source(model_arg=None, progress=None):
    """(float32 model, tokenizer, GGUF metadata to carry over) for any model `load()` accepts;
    `progress` as load()'s."""
    path = resolve(model_arg)
    model, tokenizer = load(path, progress=progress)
    if is_quantized_dir(path):
        metadata = metadata_from_gguf(read_gguf(path / METADATA_FILE))
    elif path.is_dir():
        metadata = metadata_from_config(model.config, tokenizer)
    else:
        metadata = metadata_from_gguf(read_gguf(path))
    return model, tokenizer, metadata


def convert(model_arg, recipe: Recipe, out: str | Path, progress: bool = False) -> dict:
    """Reads `model_arg`, quantizes it with `recipe` and writes `out`, with one progress bar over
    the whole job when `progress`."""
    check_output(out, recipe)
    bar = _Progress(progress)
    try:
        model, _, metadata = read_source(model_arg, progress=bar.reading)
        quantize_model(model, recipe, progress=bar.converting)
        bar.stage("writing")
        save(model, out, metadata, recipe.spec)
        bar.advance()
    finally:
        bar.close()
    params = model.config.num_params()
    return {"out": str(out), "recipe": recipe.spec, "bytes": output_bytes(out), "params": params,
            "bits_per_param": round(8 * output_bytes(out) / params, 3)}


class _Progress:
    """One bar over a conversion, in tensors: each one read (decoded to float), each 2-D one
    converted, then the file written (one step: a few percent of the time). It appears once the
    source's tensors are known, so a file that fails to open leaves its error alone."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def reading(self, tensors):
        total = len(tensors) + sum(len(t.shape) == 2 for _, t in tensors) + 1
        self.bar = tqdm(desc="reading", unit="tensor", total=total, disable=not self.enabled)
        return self._ticking(tensors)

    def converting(self, modules):
        self.stage("converting")
        self.bar.total = self.bar.n + len(modules) + 1  # the same count, unless the source held quantized weights
        return self._ticking(modules)

    def stage(self, name: str):
        self.bar.set_description(name)

    def advance(self):
        self.bar.update()

    def _ticking(self, items):
        for item in items:
            yield item
            self.advance()

    def close(self):
        if self.bar is not None:
            self.bar.close()
