"""Gemma 3 text-decoder configuration: frozen dataclass, named presets, and readers for
GGUF metadata and Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

LOCAL, GLOBAL = "local", "global"


def layer_pattern(num_layers: int, local_per_global: int | None = 5) -> tuple[str, ...]:
    """The paper's interleaving: `local_per_global` sliding-window layers, then one global layer.

    Layer i is global iff (i + 1) % (local_per_global + 1) == 0, so 5 gives Gemma 3's 5:1.
    `None` means every layer is global (the ablation baseline), 0 means 1:0 → all global too.
    A layer count beyond the configuration bound is a ValueError before any tuple is built (a
    corrupt config asked for 2**40 layers).
    """
    if not 1 <= num_layers <= _SIZE_LIMITS["num_layers"]:
        raise ValueError(f"num_layers must be in [1, {_SIZE_LIMITS['num_layers']}], got {num_layers}")
    if local_per_global is not None and local_per_global < 0:  # sliding_window_pattern 0 in a config
        raise ValueError(f"local_per_global must be >= 0 (or None), got {local_per_global}")
    if local_per_global is None or local_per_global == 0:
        return (GLOBAL,) * num_layers
    period = local_per_global + 1
    return tuple(GLOBAL if (i + 1) % period == 0 else LOCAL for i in range(num_layers))


# Bounds of a configuration's sizes, far above any real model (checked by Gemma3Config).
_SIZE_LIMITS = {"vocab_size": 2**24, "hidden_size": 2**16, "num_layers": 1024, "num_heads": 1024,
                "num_kv_heads": 1024, "head_dim": 2**12, "intermediate_size": 2**18, "sliding_window": 2**24,
                "max_context": 2**24, "query_pre_attn_scalar": 2**16}


@dataclass(frozen=True)
class Gemma3Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    sliding_window: int
    max_context: int
    layer_types: tuple[str, ...]
    # Attention scores are scaled by query_pre_attn_scalar**-0.5: head_dim for every size but 27B,
    # where the report uses d_model / n_heads = 168.
    query_pre_attn_scalar: int = 256
    rope_local_base: float = 10_000.0
    rope_global_base: float = 1_000_000.0
    # Linear RoPE scaling on global layers only: positions are divided by this factor (×8 for 128K).
    rope_global_scale: float = 1.0
    rms_norm_eps: float = 1e-6
    name: str = "custom"

    def __post_init__(self):
        # Bounds far above any real model, so a corrupt config is an error here rather than a
        # tuple of 2**40 layer types or a multi-gigabyte RoPE table later.
        for name, hi in _SIZE_LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= hi:
                raise ValueError(f"{name} must be an integer in [1, {hi}], got {value!r}")
        for name in ("rope_local_base", "rope_global_base", "rope_global_scale", "rms_norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        bad = set(self.layer_types) - {LOCAL, GLOBAL}
        if bad:
            raise ValueError(f"unknown layer type(s) {sorted(bad)}; expected 'local' or 'global'")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def local_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == LOCAL]

    @property
    def global_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == GLOBAL]

    def replace(self, **changes) -> "Gemma3Config":
        """A modified copy; changing num_layers without layer_types keeps the 5:1 pattern."""
        if "num_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = layer_pattern(changes["num_layers"])
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads) + 2 * hd
        per_layer = attn + 3 * d * f + 4 * d
        return self.vocab_size * d + self.num_layers * per_layer + d

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _preset(name, vocab, d, layers, heads, kv, hd, ffn, window, ctx, qscalar, rope_scale):
    return Gemma3Config(
        vocab_size=vocab, hidden_size=d, num_layers=layers, num_heads=heads, num_kv_heads=kv,
        head_dim=hd, intermediate_size=ffn, sliding_window=window, max_context=ctx,
        layer_types=layer_pattern(layers), query_pre_attn_scalar=qscalar,
        rope_global_scale=rope_scale, name=name,
    )


# The five released sizes. 4B+ checkpoints are multimodal and pad the vocabulary to 262,208.
PRESETS: dict[str, Gemma3Config] = {
    "270m": _preset("270m", 262_144, 640, 18, 4, 1, 256, 2048, 512, 32_768, 256, 1.0),
    "1b": _preset("1b", 262_144, 1152, 26, 4, 1, 256, 6912, 512, 32_768, 256, 1.0),
    "4b": _preset("4b", 262_208, 2560, 34, 8, 4, 256, 10240, 1024, 131_072, 256, 8.0),
    "12b": _preset("12b", 262_208, 3840, 48, 16, 8, 256, 15360, 1024, 131_072, 256, 8.0),
    "27b": _preset("27b", 262_208, 5376, 62, 32, 16, 128, 21504, 1024, 131_072, 168, 8.0),
}


def preset(name: str) -> Gemma3Config:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


class UnsupportedModelError(ValueError):
    """The checkpoint is not a Gemma 3 text model."""


def from_gguf_metadata(md: dict, vocab_size: int | None = None) -> Gemma3Config:
    return _typed(lambda m: _from_gguf_metadata(m, vocab_size), md, "GGUF metadata")


def _from_gguf_metadata(md: dict, vocab_size: int | None = None) -> Gemma3Config:
    arch = md.get("general.architecture")
    if arch != "gemma3":
        raise UnsupportedModelError(f"unknown architecture {arch!r} (this package runs 'gemma3' GGUF files)")

    def get(key, default=None):
        value = md.get(f"gemma3.{key}", default)
        if value is None:
            raise UnsupportedModelError(f"GGUF metadata lacks 'gemma3.{key}'")
        return value

    layers = int(get("block_count"))
    d, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length"))
    if vocab_size is None:
        vocab_size = len(md["tokenizer.ggml.tokens"])
    scale = 1.0
    if md.get("gemma3.rope.scaling.type") == "linear":
        scale = float(md["gemma3.rope.scaling.factor"])
    # GGUF does not store the query scale, the local RoPE base or the layer pattern; llama.cpp
    # fills them from the Gemma 3 definition, and so do we: 27B (62 layers) scales queries by
    # d_model/n_heads, local layers use base 10k, and the pattern is 5 local : 1 global.
    qscalar = d // heads if layers == 62 else head_dim
    return Gemma3Config(
        vocab_size=vocab_size, hidden_size=d, num_layers=layers, num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv")), head_dim=head_dim,
        intermediate_size=int(get("feed_forward_length")),
        sliding_window=int(get("attention.sliding_window")),
        max_context=int(get("context_length")), layer_types=layer_pattern(layers),
        query_pre_attn_scalar=int(qscalar), rope_local_base=10_000.0,
        rope_global_base=float(get("rope.freq_base", 1_000_000.0)), rope_global_scale=scale,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        name=str(md.get("general.name", "gguf")),
    )


_HF_TEXT_TYPES = {"gemma3_text", "gemma3"}


def from_hf_config(cfg: dict) -> Gemma3Config:
    """Reads `Gemma3TextConfig` keys, or the `text_config` of a multimodal `Gemma3Config`.

    Accepts both the current `rope_parameters` layout and the older `rope_theta` /
    `rope_local_base_freq` / `rope_scaling` / `sliding_window_pattern` keys. A value of the wrong
    type or out of range is an UnsupportedModelError naming it.
    """
    if not isinstance(cfg, dict):
        raise UnsupportedModelError(f"config.json must hold a JSON object, not {type(cfg).__name__}")
    return _typed(_from_hf_config, cfg, "config.json")


def _typed(read, source: dict, what: str) -> Gemma3Config:
    try:
        return read(source)
    except UnsupportedModelError:
        raise
    except (TypeError, ValueError, AttributeError, OverflowError, KeyError, IndexError) as e:
        raise UnsupportedModelError(f"{what}: invalid model configuration ({type(e).__name__}: {e})") from None


def _from_hf_config(cfg: dict) -> Gemma3Config:
    model_type = cfg.get("model_type")
    if model_type not in _HF_TEXT_TYPES:
        raise UnsupportedModelError(f"unknown architecture: config.json model_type is {model_type!r}, expected gemma3")
    if model_type == "gemma3":
        cfg = {"model_type": "gemma3_text", **cfg.get("text_config", {})}
    if cfg.get("final_logit_softcapping") or cfg.get("attn_logit_softcapping"):
        raise UnsupportedModelError("logit soft-capping is Gemma 2, not Gemma 3")
    layers = int(cfg.get("num_hidden_layers", 26))
    if cfg.get("layer_types"):
        types = tuple(GLOBAL if t == "full_attention" else LOCAL for t in cfg["layer_types"])
    else:
        types = layer_pattern(layers, int(cfg.get("sliding_window_pattern", 6)) - 1)
    rope = cfg.get("rope_parameters") or {}
    full = dict(rope.get("full_attention") or {})
    full.update(cfg.get("rope_scaling") or {})
    local = rope.get("sliding_attention") or {}
    scale = float(full.get("factor", 1.0)) if full.get("rope_type", full.get("type")) == "linear" else 1.0
    head_dim = int(cfg.get("head_dim", 256))
    return Gemma3Config(
        vocab_size=int(cfg.get("vocab_size", 262_208)), hidden_size=int(cfg.get("hidden_size", 2304)),
        num_layers=layers, num_heads=int(cfg.get("num_attention_heads", 8)),
        num_kv_heads=int(cfg.get("num_key_value_heads", 4)), head_dim=head_dim,
        intermediate_size=int(cfg.get("intermediate_size", 9216)),
        sliding_window=int(cfg.get("sliding_window", 4096)),
        max_context=int(cfg.get("max_position_embeddings", 131_072)), layer_types=types,
        query_pre_attn_scalar=int(cfg.get("query_pre_attn_scalar", head_dim)),
        rope_local_base=float(local.get("rope_theta", cfg.get("rope_local_base_freq", 10_000.0))),
        rope_global_base=float(full.get("rope_theta", cfg.get("rope_theta", 1_000_000.0))),
        rope_global_scale=scale, rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        name=str(cfg.get("_name_or_path") or "hf"),
    )


def load_hf_config(path: str | Path) -> Gemma3Config:
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnsupportedModelError(f"{path}: invalid JSON ({e})") from None
    return from_hf_config(data)
