"""Quantized models as a directory, for every format (the paper's sfp8 / int4-channel /
int8-channel have no GGUF type):

    config.json          transformers-style config (as an HF model directory)
    model.safetensors    per quantized weight W: `W.qdata` (uint8 [rows, row_bytes]) and, for formats
                         with separate scales, `W.qscale` (float32); norms as float32 tensors
    quantization.json    {"format_version": 1, "recipe": …, "weights": {W: {"format", "shape"}}}
    metadata.gguf        the source's GGUF metadata (tokenizer, architecture), no tensors

`load()` recognises the directory by `quantization.json`, reads it with `read_dir` (strictly: a
missing, extra or mis-shaped tensor is named) and installs the quantized modules (`apply.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..formats.checkpoint import WeightsError, check_names_and_shapes, hf_config
from ..formats.gguf import read_gguf
from ..formats.tokenizer import Tokenizer
from ..model.config import Gemma3Config, load_hf_config
from ..model.decoder import Gemma3
from .apply import Recipe, quantized_weights
from .formats import QuantError, Quantized, dequantize, get_format
from .gguf_writer import Metadata, write_gguf, write_metadata_gguf

QUANT_CONFIG = "quantization.json"
METADATA_FILE = "metadata.gguf"
FORMAT_VERSION = 1


def is_quantized_dir(path: Path) -> bool:
    return path.is_dir() and (path / QUANT_CONFIG).is_file()


def save_dir(path: str | Path, model: Gemma3, metadata: Metadata, recipe: str = "") -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, weights = {}, {}
    for name, q in quantized_weights(model).items():
        tensors[f"{name}.qdata"] = q.data.contiguous()
        if q.scale is not None:
            tensors[f"{name}.qscale"] = q.scale.float().contiguous()
        weights[name] = {"format": q.fmt, "shape": list(q.shape)}
    for name, t in model.state_dict().items():
        if not name.endswith(("qdata", "qscale")):
            tensors[name] = t.float().contiguous()
    (path / "config.json").write_text(json.dumps(hf_config(model.config), indent=2))
    save_file(tensors, str(path / "model.safetensors"), metadata={"quantization": QUANT_CONFIG})
    (path / QUANT_CONFIG).write_text(json.dumps(
        {"format_version": FORMAT_VERSION, "recipe": recipe, "weights": weights}, indent=1))
    write_metadata_gguf(path / METADATA_FILE, metadata, recipe)


def _read_spec(path: Path) -> dict:
    try:
        spec = json.loads((path / QUANT_CONFIG).read_text())
        weights = spec["weights"]
        if spec.get("format_version") != FORMAT_VERSION:
            raise WeightsError(f"{path / QUANT_CONFIG}: unsupported format_version {spec.get('format_version')!r}")
        return {name: (w["format"], tuple(int(s) for s in w["shape"])) for name, w in weights.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, WeightsError):
            raise
        raise WeightsError(f"{path / QUANT_CONFIG}: corrupt quantization config ({type(e).__name__}: {e})") from None


def read_dir(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Gemma3Config, dict, str]:
    """Config, tensors by our names (a `Quantized` for each quantized weight, float tensors for the
    rest) and the recipe of a directory that `save_dir` wrote, read strictly."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    cfg = load_hf_config(path / "config.json")
    spec = _read_spec(path)
    file = path / "model.safetensors"
    try:
        with safe_open(file, "pt") as f:
            raw = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{file}: cannot read safetensors file ({e})") from None
    shapes = {k: tuple(v.shape) for k, v in raw.items() if not k.endswith((".qdata", ".qscale"))}
    shapes.update({name: shape for name, (_, shape) in spec.items()})
    stray = sorted(k for k in raw if k.endswith((".qdata", ".qscale")) and k.rsplit(".", 1)[0] not in spec)
    if stray:
        raise WeightsError(f"{path}: unexpected tensor {stray[0]} (not listed in {QUANT_CONFIG})")
    check_names_and_shapes(shapes, cfg, str(path))
    weights = {}
    for name, (fmt, shape) in spec.items():
        if f"{name}.qdata" not in raw:
            raise WeightsError(f"{path}: missing tensor {name}.qdata")
        q = Quantized(fmt, shape, raw[f"{name}.qdata"], raw.get(f"{name}.qscale"))
        try:
            if q.data.dtype != torch.uint8 or q.data.dim() != 2 or q.data.shape[0] != shape[0]:
                raise ValueError(f"data of shape {tuple(q.data.shape)}")
            if q.scale is not None and q.scale.dim() == 1 and q.scale.numel() != shape[0]:
                raise ValueError(f"{q.scale.numel()} scales")
            if tuple(dequantize(q.rows(slice(0, 1))).shape) != (1, shape[1]):  # row layout of the format
                raise ValueError(f"{q.data.shape[1]} bytes per row")
        except (QuantError, ValueError, IndexError, TypeError, RuntimeError) as e:
            raise WeightsError(f"{path}: tensor {name} is not valid {fmt} data of shape {shape} ({e})") from None
        weights[name] = q
    weights.update({k: v.to(dtype) for k, v in raw.items() if k in shapes and k not in spec})
    recipe = json.loads((path / QUANT_CONFIG).read_text()).get("recipe", "")
    return cfg, weights, recipe


def load_tokenizer_dir(path: str | Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(read_gguf(Path(path) / METADATA_FILE).metadata)


# ---- either output: a .gguf name writes a GGUF file, any other name a directory ----


def without_gguf_type(recipe: Recipe) -> list[str]:
    """The formats of `recipe` that only a directory holds."""
    return [f for f in recipe.names() if get_format(f).ggml_type is None]


def check_output(out: str | Path, recipe: Recipe) -> None:
    """Fail before any work when `out` cannot hold `recipe`."""
    out = Path(out)
    if out.suffix.lower() == ".gguf":
        no_gguf = without_gguf_type(recipe)
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
