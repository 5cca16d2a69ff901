"""GGUF files that llama.cpp runs, written from a (quantized) model with `gguf.GGUFWriter`.

Metadata is copied key for key, with its stored value types, from the source GGUF (architecture
and tokenizer: llama.cpp rejects a key of the wrong type), or built from the config and tokenizer
for other sources. `general.file_type` is set from the formats used and the recipe is recorded
under `quantize.recipe`. Tensors are written in llama.cpp's names; norms as F32 holding 1 + w,
the way llama.cpp's converter stores Gemma norms.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from ..formats.checkpoint import gguf_norms, ours_to_gguf, to_gguf_float
from ..formats.ggml_types import GGMLQuantizationType, GGUFValueType
from ..formats.gguf import GGUFFile
from ..formats.tokenizer import Tokenizer
from ..model.config import Gemma3Config
from .apply import quantized_weights
from .formats import QuantError, get_format

# key → (value, value type, array item type or None)
Metadata = dict[str, tuple[object, GGUFValueType, GGUFValueType | None]]

RECIPE_KEY = "quantize.recipe"
_SET_BY_WRITER = ("general.architecture", "general.alignment", "general.file_type", "general.quantization_version",
                  RECIPE_KEY)


def metadata_from_gguf(gg: GGUFFile) -> Metadata:
    out = {}
    for key, value in gg.metadata.items():
        vtype, item = gg.value_types[key]
        if item == GGUFValueType.ARRAY:
            raise QuantError(f"{gg.path}: cannot copy nested-array metadata key {key!r}")
        out[key] = (value, vtype, item)
    return out


def metadata_from_config(cfg: Gemma3Config, tokenizer: Tokenizer) -> Metadata:
    """What llama.cpp's converter writes for a Gemma 3 text model, from our config and tokenizer."""
    u32, f32, s, b = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING, GGUFValueType.BOOL
    md: Metadata = {
        "general.name": (cfg.name, s, None),
        "gemma3.context_length": (cfg.max_context, u32, None),
        "gemma3.embedding_length": (cfg.hidden_size, u32, None),
        "gemma3.block_count": (cfg.num_layers, u32, None),
        "gemma3.feed_forward_length": (cfg.intermediate_size, u32, None),
        "gemma3.attention.head_count": (cfg.num_heads, u32, None),
        "gemma3.attention.head_count_kv": (cfg.num_kv_heads, u32, None),
        "gemma3.attention.key_length": (cfg.head_dim, u32, None),
        "gemma3.attention.value_length": (cfg.head_dim, u32, None),
        "gemma3.attention.layer_norm_rms_epsilon": (cfg.rms_norm_eps, f32, None),
        "gemma3.rope.freq_base": (cfg.rope_global_base, f32, None),
        "gemma3.attention.sliding_window": (cfg.sliding_window, u32, None),
        "tokenizer.ggml.pre": ("default", s, None),
    }
    if cfg.rope_global_scale != 1.0:
        md["gemma3.rope.scaling.type"] = ("linear", s, None)
        md["gemma3.rope.scaling.factor"] = (cfg.rope_global_scale, f32, None)
    arrays = {"tokenizer.ggml.tokens": s, "tokenizer.ggml.scores": f32, "tokenizer.ggml.token_type": GGUFValueType.INT32}
    for key, value in tokenizer.to_gguf_metadata().items():
        if key in arrays:
            md[key] = (value, GGUFValueType.ARRAY, arrays[key])
        else:
            md[key] = (value, b if isinstance(value, bool) else s if isinstance(value, str) else u32, None)
    return md


def _file_type(types: list[GGMLQuantizationType]):
    from gguf import LlamaFileType  # the writer's package, imported only to write (see formats/ggml_types.py)

    """llama.cpp's label for a file: its most common type outside the embedding."""
    common = Counter(types).most_common(1)[0][0]
    return LlamaFileType.ALL_F32 if common == GGMLQuantizationType.F32 else LlamaFileType[f"MOSTLY_{common.name}"]


def write_gguf(path: str | Path, model, metadata: Metadata, recipe: str = "") -> None:
    qweights = quantized_weights(model)
    for name, q in qweights.items():
        if get_format(q.fmt).ggml_type is None:
            raise QuantError(f"format {q.fmt} has no GGUF type (tensor {name}); write a directory instead "
                             f"(--out DIR: safetensors + quantization.json)")
    layer_types = [get_format(q.fmt).ggml_type for n, q in qweights.items() if n != "embed_tokens.weight"]
    writer = _writer(path, metadata, recipe)
    writer.add_file_type(_file_type(layer_types or [GGMLQuantizationType.F32]))
    norms = gguf_norms(model)
    for name, tensor in model.state_dict().items():
        if name.endswith(("qdata", "qscale")):
            continue
        w = to_gguf_float(tensor, name in norms)
        writer.add_tensor(ours_to_gguf(name), np.ascontiguousarray(w.numpy()))
    for name, q in qweights.items():
        writer.add_tensor(ours_to_gguf(name), q.data.numpy(), raw_dtype=get_format(q.fmt).ggml_type)
    _finish(writer)


def write_metadata_gguf(path: str | Path, metadata: Metadata, recipe: str = "") -> None:
    """A GGUF with metadata and no tensors: how a safetensors directory keeps its tokenizer."""
    _finish(_writer(path, metadata, recipe))


def _writer(path: str | Path, metadata: Metadata, recipe: str):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "gemma3")
    for key, (value, vtype, item) in metadata.items():
        if key not in _SET_BY_WRITER:
            writer.add_key_value(key, value, vtype, item)
    writer.add_quantization_version(2)  # GGML_QNT_VERSION
    if recipe:
        writer.add_string(RECIPE_KEY, recipe)
    return writer


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
