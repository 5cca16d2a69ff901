"""LoRA (Hu et al., 2021) as a module swap: each targeted nn.Linear becomes a `LoRALinear` that keeps
the frozen base weight under the same name (`q_proj.weight`) and adds `lora_A` [r, in] and
`lora_B` [out, r]: y = x·Wᵀ + (α/r)·(x·Aᵀ)·Bᵀ. B starts at zero, so training starts from the base.

Adapters are saved in PEFT's layout (adapter_config.json + adapter_model.safetensors with keys
`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`), so they load in PEFT too.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.peft import ALL_TARGETS, LoRAConfig, read_adapter_config
from ..formats.peft import PEFT_PREFIX as _PEFT_PREFIX

__all__ = ["ALL_TARGETS", "LoRAConfig", "LoRALinear", "apply_lora", "lora_values", "merge_lora", "lora_state",
           "merge_state", "save_adapter", "read_adapter_config", "load_adapter"]


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype,
                                               device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype,
                                               device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default initialisation
        self.enabled = True

    def enable(self, on: bool):
        self.enabled = on

    def forward(self, x):
        if not self.enabled:
            return F.linear(x, self.weight)
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def merged(self) -> nn.Linear:
        out, inp = self.weight.shape
        linear = nn.Linear(inp, out, bias=False, dtype=self.weight.dtype, device=self.weight.device)
        with torch.no_grad():
            linear.weight.copy_(self.weight + (self.lora_B @ self.lora_A) * self.scale)
        return linear


def _targets(model: nn.Module, names):
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in names and isinstance(module, (nn.Linear, LoRALinear)):
            parent_name, _, child = name.rpartition(".")
            yield name, model.get_submodule(parent_name), child, module


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Freezes every parameter of `model` and swaps the targeted linears for LoRALinear, in place."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, parent, child, module in _targets(model, cfg.targets):
        setattr(parent, child, LoRALinear(module, cfg.rank, cfg.alpha))
    model.lora_config = cfg
    return model


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """The base model's outputs from a LoRA model (e.g. RL's reference policy) for the duration."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enable(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable(True)


@contextlib.contextmanager
@torch.no_grad()
def lora_values(model: nn.Module, state: dict[str, torch.Tensor]):
    """The model with its adapters holding `state` (lora_state names; e.g. RL's moving EMA anchor)
    for the duration, then its own values again."""
    params = {n: p for n, p in model.named_parameters() if _is_lora(n)}
    if set(state) != set(params):
        raise ValueError("lora_values: the state's tensors are not the model's adapter tensors")
    saved = {n: p.detach().clone() for n, p in params.items()}
    for n, p in params.items():
        p.copy_(state[n])
    try:
        yield model
    finally:
        for n, p in params.items():
            p.copy_(saved[n])


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every adapter into its base weight (W + (α/r)·B·A), in place; the model is plain again."""
    for _, parent, child, module in _targets(model, ALL_TARGETS):
        if isinstance(module, LoRALinear):
            setattr(parent, child, module.merged())
    model.__dict__.pop("lora_config", None)
    return model


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under our parameter names (`layers.0.self_attn.q_proj.lora_A`)."""
    return {n: p.detach() for n, p in model.named_parameters() if _is_lora(n)}


def _is_lora(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def merge_state(state: dict[str, torch.Tensor], cfg: LoRAConfig) -> dict[str, torch.Tensor]:
    """A state dict with every adapter folded into its base weight and the adapter tensors dropped."""
    scale = cfg.alpha / cfg.rank
    merged = {k: v for k, v in state.items() if not _is_lora(k)}
    for key, a in state.items():
        if key.endswith(".lora_A"):
            base = key[:-len(".lora_A")]
            merged[base + ".weight"] = state[base + ".weight"] + (state[base + ".lora_B"] @ a) * scale
    return merged


def save_adapter(path: str | Path, cfg: LoRAConfig, state: dict[str, torch.Tensor], base_name: str | None = None):
    """Writes the adapter tensors of `state` (our names; other entries are ignored) in PEFT's layout."""

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
        "target_modules": list(cfg.targets), "lora_dropout": 0.0, "bias": "none",
        "base_model_name_or_path": base_name}, indent=2))
    save_file({f"{_PEFT_PREFIX}{k}.weight": v.detach().contiguous().cpu() for k, v in state.items() if _is_lora(k)},
              str(path / "adapter_model.safetensors"))


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Applies the adapter at `path` to a plain model (or loads it into matching LoRA layers), strictly."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = read_adapter_config(path)
    if not hasattr(model, "lora_config"):
        apply_lora(model, cfg)
    elif model.lora_config != cfg:
        raise ValueError(f"{path}: adapter config {cfg} differs from the model's LoRA config {model.lora_config}")
    state = load_file(str(path / "adapter_model.safetensors"))
    want = {f"{_PEFT_PREFIX}{k}.weight" for k in lora_state(model)}
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra:
        raise ValueError(f"{path}: adapter {'lacks ' + missing[0] if missing else 'has unexpected ' + extra[0]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            name = key[len(_PEFT_PREFIX):-len(".weight")]
            if params[name].shape != value.shape:
                raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, expected {tuple(params[name].shape)}")
            params[name].copy_(value)
    return model
