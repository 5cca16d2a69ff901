"""LoRA adapters in PEFT's layout: adapter_config.json + adapter_model.safetensors, with keys such as
`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`. `gemma3 finetune` writes them
(train/lora.py) and inference applies them unmerged (model/adapters.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model.model."


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ALL_TARGETS

    def __post_init__(self):
        bad = set(self.targets) - set(ALL_TARGETS)
        if bad or not self.targets:
            raise ValueError(f"unknown LoRA target(s) {sorted(bad)}; choose from {', '.join(ALL_TARGETS)}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be ≥ 1, got {self.rank}")


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def _config(path: Path) -> dict:
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no adapter_config.json (not a LoRA adapter directory)") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: adapter type {cfg.get('peft_type')!r} is not LoRA")
    return cfg


def read_adapter_config(path: str | Path) -> LoRAConfig:
    cfg = _config(Path(path))
    targets = cfg["target_modules"]
    targets = ALL_TARGETS if targets == "all-linear" else tuple([targets] if isinstance(targets, str) else targets)
    return LoRAConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), targets=targets)


def base_model(path: str | Path) -> str | None:
    """The base model the adapter was trained on (`base_model_name_or_path`; None where unnamed)."""
    return _config(Path(path)).get("base_model_name_or_path")


def read_adapter(path: str | Path) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """The adapter's config and tensors under our names (`layers.0.self_attn.q_proj.lora_A`)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = read_adapter_config(path)
    tensors = {}
    for key, value in load_file(str(path / "adapter_model.safetensors")).items():
        if not (key.startswith(PEFT_PREFIX) and key.endswith(".weight")):
            raise ValueError(f"{path}: unexpected tensor {key} (expected {PEFT_PREFIX}...lora_A.weight)")
        tensors[key[len(PEFT_PREFIX):-len(".weight")]] = value
    return cfg, tensors
