"""Models to train: a student built from a preset or a config file (random init), or loaded weights."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from ..model.config import PRESETS, Gemma3Config, from_hf_config, layer_pattern
from ..model.decoder import Gemma3

INIT_STD = 0.02  # transformers' Gemma 3 `initializer_range`


def config_from_json(path: str | Path, vocab_size: int) -> Gemma3Config:
    """A student configuration from JSON: an HF config.json (has "model_type"), or our field names
    (`Gemma3Config`), where `layer_types` may be replaced by "local_per_global" (default 5) and
    `vocab_size` defaults to the teacher's."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if "model_type" in raw:
        return from_hf_config(raw)
    fields = {f.name for f in dataclasses.fields(Gemma3Config)}
    unknown = set(raw) - fields - {"local_per_global"}
    if unknown:
        raise ValueError(f"{path}: unknown config field {sorted(unknown)[0]!r}")
    raw.setdefault("vocab_size", vocab_size)
    raw.setdefault("query_pre_attn_scalar", raw.get("head_dim", 256))
    raw.setdefault("name", path.stem)
    if "layer_types" in raw:
        raw["layer_types"] = tuple(raw["layer_types"])
    else:
        raw["layer_types"] = layer_pattern(raw["num_layers"], raw.pop("local_per_global", 5))
    raw.pop("local_per_global", None)
    try:
        return Gemma3Config(**raw)
    except TypeError as e:
        raise ValueError(f"{path}: {e}") from None


def student_config(spec: str, vocab_size: int) -> Gemma3Config:
    """`spec` is a preset name or a JSON file; the student must cover the teacher's vocabulary."""
    if spec.lower() in PRESETS:
        cfg = PRESETS[spec.lower()]
    elif Path(spec).is_file() and spec.endswith(".json"):
        cfg = config_from_json(spec, vocab_size)
    else:
        raise ValueError(f"--student {spec!r}: not a preset ({', '.join(PRESETS)}), a config .json or a model")
    if cfg.vocab_size < vocab_size:
        raise ValueError(f"student vocabulary ({cfg.vocab_size}) is smaller than the teacher's ({vocab_size})")
    return cfg


@torch.no_grad()
def init_weights(model: nn.Module, seed: int = 0, std: float = INIT_STD) -> nn.Module:
    """N(0, std) for matrices and the embedding, zero for the (1 + w) norms; the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        else:
            p.zero_()
    return model


def new_model(cfg: Gemma3Config, seed: int = 0) -> Gemma3:
    with torch.device("meta"):
        model = Gemma3(cfg)
    model.to_empty(device="cpu")
    return init_weights(model, seed)
