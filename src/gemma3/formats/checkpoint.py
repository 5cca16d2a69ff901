"""Checkpoints → our parameter names, strictly: a missing, extra or mis-shaped tensor is a loud
error naming it. Two sources: llama.cpp GGUF files (text model, and the vision tower's mmproj) and
Hugging Face safetensors directories. Readers return the config and the tensors by our names,
still in the file's encoding; `gguf_float` turns a GGUF tensor into our float parameter, the one
place that knows llama.cpp's norm convention (and `to_gguf_float` its inverse, for writers)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..model.config import Gemma3Config, from_gguf_metadata, load_hf_config
from ..model.decoder import Gemma3, RMSNorm, no_init
from ..model.vision import VisionConfig, VisionModel
from .gguf import GGUFFile, QTensor, read_gguf


class WeightsError(ValueError):
    """A checkpoint does not match the model it claims to be."""


# llama.cpp names → ours (ours follow transformers' names without the "model." prefix).
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GGUF_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight"}


def gguf_to_ours(name: str) -> str | None:
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m and m.group(2) in _GGUF_LAYER_NAMES:
        return f"layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}.weight"
    return None


def ours_to_gguf(name: str) -> str:
    """The inverse of gguf_to_ours (for GGUF writers)."""
    for gguf_name, ours in _GGUF_NAMES.items():
        if name == ours:
            return gguf_name
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name)
    short = {v: k for k, v in _GGUF_LAYER_NAMES.items()}.get(m.group(2)) if m else None
    if short is None:
        raise WeightsError(f"no GGUF name for tensor {name}")
    return f"blk.{m.group(1)}.{short}.weight"


def meta_model(cfg: Gemma3Config | VisionConfig) -> nn.Module:
    """The model of `cfg` on the meta device (no memory, no random init): the source of truth for
    parameter names and shapes, and what loaders fill."""
    with no_init(), torch.device("meta"):
        return VisionModel(cfg) if isinstance(cfg, VisionConfig) else Gemma3(cfg)


def expected_shapes(cfg: Gemma3Config | VisionConfig) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in meta_model(cfg).state_dict().items()}


# llama.cpp's converters store every Gemma RMSNorm weight (the decoder's, and the vision
# projector's soft-embedding norm) as 1 + w, where the model keeps w and scales by (1 + w).
GGUF_NORM_OFFSET = 1.0


def gguf_norms(model: nn.Module) -> set[str]:
    """Our names of the weights stored with GGUF_NORM_OFFSET: those of Gemma RMSNorm modules
    (SigLIP's LayerNorms are stored as they are)."""
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, RMSNorm)}


def gguf_float(t: QTensor, norm: bool, dtype=torch.float32) -> torch.Tensor:
    """A GGUF tensor as our parameter; `norm`: one of gguf_norms()."""
    w = t.dequantize(torch.float32)
    return (w - GGUF_NORM_OFFSET if norm else w).to(dtype)


def to_gguf_float(w: torch.Tensor, norm: bool) -> torch.Tensor:
    """The inverse of gguf_float, for GGUF writers."""
    return w.float() + GGUF_NORM_OFFSET if norm else w.float()


def check_names_and_shapes(state: dict[str, tuple[int, ...]], cfg: Gemma3Config | VisionConfig, source: str):
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing:
        raise WeightsError(f"{source}: missing tensor {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise WeightsError(f"{source}: unexpected tensor {extra[0]!r}" + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""))
    for name, shape in state.items():
        if tuple(shape) != want[name]:
            raise WeightsError(f"{source}: tensor {name!r} has shape {tuple(shape)}, expected {want[name]}")


def read_gguf_model(path: str | Path) -> tuple[Gemma3Config, GGUFFile, dict[str, QTensor]]:
    """Config, file and its tensors by our names, every name and shape checked."""
    gg = read_gguf(path)
    embd = gg.tensors.get("token_embd.weight")
    cfg = from_gguf_metadata(gg.metadata, vocab_size=embd.shape[0] if embd is not None else None)
    tensors = {}
    for name, t in gg.tensors.items():
        ours = gguf_to_ours(name)
        if ours is None:
            raise WeightsError(f"{path}: unexpected tensor {name!r} in a gemma3 GGUF")
        tensors[ours] = t
    check_names_and_shapes({k: t.shape for k, t in tensors.items()}, cfg, str(path))
    return cfg, gg, tensors


# Prefixes of the text decoder inside HF checkpoints: Gemma3ForCausalLM, and the language part of
# Gemma3ForConditionalGeneration before and after transformers 4.52 renamed it.
_HF_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_HF_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
_HF_TIED_HEADS = ("lm_head.weight", "language_model.lm_head.weight")


def _hf_name(key: str) -> str | None:
    """Our name for an HF key; None for tensors the text model does not own."""
    if key.startswith(_HF_VISION_PREFIXES) or key in _HF_TIED_HEADS:
        return None  # vision weights belong to the vision tower; the LM head is tied to the embedding
    for prefix in _HF_TEXT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def read_hf_dir(path: str | Path, dtype=torch.float32) -> tuple[Gemma3Config, dict[str, torch.Tensor]]:
    """The text decoder of an HF-style directory: config and float tensors by our names."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise WeightsError(f"{path}: no config.json (expected an HF-style model directory)")
    cfg = load_hf_config(path / "config.json")
    return cfg, _load_safetensors(path, _hf_name, cfg, dtype)


def _load_safetensors(path: Path, rename, cfg: Gemma3Config | VisionConfig, dtype) -> dict[str, torch.Tensor]:
    """The tensors of `path`/*.safetensors that `rename` gives one of our names, checked strictly
    against `cfg`'s model before any is read."""
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{path}: no *.safetensors files")
    shapes, sources = {}, {}
    for file in files:
        try:
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    ours = rename(key)
                    if ours is not None:
                        shapes[ours] = tuple(f.get_slice(key).get_shape())
                        sources[ours] = (file, key)
        except SafetensorError as e:
            raise WeightsError(f"{file}: corrupt safetensors file ({e})") from None
    check_names_and_shapes(shapes, cfg, str(path))
    state = {}
    for file in files:
        with safe_open(file, "pt") as f:
            for ours, (src, key) in sources.items():
                if src == file:
                    state[ours] = f.get_tensor(key).to(dtype)
    return state


def save_hf_dir(path: str | Path, cfg: Gemma3Config, state: dict[str, torch.Tensor]):
    """Writes a Gemma3ForCausalLM-style directory (used by tests and converters)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config(cfg), indent=2))
    save_file({f"model.{k}": v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))


def hf_config(cfg: Gemma3Config) -> dict:
    """`cfg` as a transformers Gemma3TextConfig `config.json`."""
    from ..model.config import GLOBAL

    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size,
        "sliding_window": cfg.sliding_window, "max_position_embeddings": cfg.max_context,
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar, "rms_norm_eps": cfg.rms_norm_eps,
        "layer_types": ["full_attention" if t == GLOBAL else "sliding_attention" for t in cfg.layer_types],
        "rope_parameters": {
            "full_attention": ({"rope_type": "linear", "factor": cfg.rope_global_scale} if cfg.rope_global_scale != 1.0
                               else {"rope_type": "default"}) | {"rope_theta": cfg.rope_global_base},
            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_base},
        },
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
    }


# ---- vision encoder + projector: Gemma3ForConditionalGeneration safetensors, llama.cpp mmproj GGUF ----

def _hf_vision_name(key: str) -> str | None:
    """Our VisionModel name for an HF key; None outside the vision tower and projector.

    transformers has written three layouts: `vision_tower.vision_model.*` (4.50, Google's
    release), `model.vision_tower.vision_model.*` (4.52+) and `vision_tower.*` (5.x).
    """
    m = re.fullmatch(r"(?:model\.)?(vision_tower|multi_modal_projector)\.(?:vision_model\.)?(.+)", key)
    if m is None:
        return None
    part, rest = m.groups()
    if part == "multi_modal_projector":
        return f"projector.{rest}"
    if rest.startswith("head."):
        return None  # SigLIP's pooling head: Gemma reads the patch tokens; llama.cpp's converter drops it too
    return rest.replace("encoder.layers.", "layers.", 1)


def read_vision_hf_dir(path: str | Path, dtype=torch.float32) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    from ..model.vision import from_hf_config

    path = Path(path)
    if not (path / "config.json").is_file():
        raise WeightsError(f"{path}: no config.json (expected an HF-style model directory)")
    cfg = from_hf_config(json.loads((path / "config.json").read_text()))
    if cfg is None:
        raise WeightsError(f"{path}: a text-only model (config.json has no vision_config); pass an mmproj GGUF")
    return cfg, _load_safetensors(path, _hf_vision_name, cfg, dtype)


# llama.cpp's names (gguf MODEL_TENSOR V_* / V_MM_*, as convert_hf_to_gguf.py's Gemma3VisionModel maps them).
_MMPROJ_NAMES = {
    "v.patch_embd.weight": "embeddings.patch_embedding.weight",
    "v.patch_embd.bias": "embeddings.patch_embedding.bias",
    "v.position_embd.weight": "embeddings.position_embedding.weight",
    "v.post_ln.weight": "post_layernorm.weight",
    "v.post_ln.bias": "post_layernorm.bias",
    "mm.input_projection.weight": "projector.mm_input_projection_weight",
    "mm.soft_emb_norm.weight": "projector.mm_soft_emb_norm.weight",
}
_MMPROJ_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_out": "self_attn.out_proj", "ln1": "layer_norm1", "ln2": "layer_norm2",
    "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2",
}


def mmproj_to_ours(name: str) -> str | None:
    if name in _MMPROJ_NAMES:
        return _MMPROJ_NAMES[name]
    m = re.fullmatch(r"v\.blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in _MMPROJ_LAYER_NAMES:
        return f"layers.{m.group(1)}.{_MMPROJ_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def read_mmproj(path: str | Path, dtype=torch.float32) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """A llama.cpp mmproj GGUF (projector type gemma3): config and float tensors by our names.

    The converter stores every tensor in transformers' orientation (the projection as
    [vision width, d_model]: clip.cpp transposes it at run time)."""
    from ..model.vision import from_gguf_metadata

    gg = read_gguf(path)
    cfg = from_gguf_metadata(gg.metadata)
    names = {}
    for name in gg.tensors:
        ours = mmproj_to_ours(name)
        if ours is None:
            raise WeightsError(f"{path}: unexpected tensor {name!r} in a gemma3 mmproj GGUF")
        names[ours] = name
    # Files from llama.cpp's first Gemma 3 converter (gemma3_convert_encoder_to_gguf.py) name fc1
    # ffn_down and fc2 ffn_up; clip.cpp recognises them by ffn_down taking the model width as
    # input, and swaps them back. So do we.
    for i in range(cfg.num_layers):
        down = gg.tensors.get(f"v.blk.{i}.ffn_down.weight")
        if down is not None and down.shape[-1] == cfg.hidden_size != cfg.intermediate_size:
            for kind in ("weight", "bias"):
                fc1, fc2 = f"layers.{i}.mlp.fc1.{kind}", f"layers.{i}.mlp.fc2.{kind}"
                if fc1 in names and fc2 in names:
                    names[fc1], names[fc2] = names[fc2], names[fc1]
    check_names_and_shapes({k: gg.tensors[v].shape for k, v in names.items()}, cfg, str(path))
    norms = gguf_norms(meta_model(cfg))
    return cfg, {ours: gguf_float(gg.tensors[name], ours in norms, dtype) for ours, name in names.items()}
