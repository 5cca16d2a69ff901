"""LoRA adapters at inference, unmerged: the base projections stay as they are (GGUF blocks on the
CPU backend, fp32/bf16 tensors on the torch one) and each adapter adds its low-rank path beside
them, y = base(x) + (α/r)·(x·Aᵀ)·Bᵀ, so one model serves several adapters (and none) at once.

`attach` gives every projection an adapter targets a table of paths by adapter *slot* and swaps
its class for a subclass whose forward adds the path of the row's slot. Which slot a row uses
follows its KV cache (`KVCache.adapter`; None: the bank's `default`): the model's entry points
(decoder.py) route the rows of each forward before running the layers, so prefill chunks,
batched decode rows and speculative verify rows each get their own sequence's adapter. The CPU
backend's fused decode step adds the same paths inside its kernel (cpu/fused.py, DecodeLayer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AdapterBank:
    """The adapters loaded beside one model, by slot, and the slot of each row of the forward
    that is running (one entry: every row)."""

    def __init__(self):
        self.names: list[str] = []
        self.default: int | None = None  # the slot of caches that name none (`generate --adapter`)
        self.rows: list[int] = [-1]

    def slot(self, name: str) -> int:
        return self.names.index(name)

    def slot_of(self, cache) -> int:
        slot = getattr(cache, "adapter", None)
        slot = self.default if slot is None else slot
        return -1 if slot is None else slot

    def route(self, caches) -> None:
        """Rows of the next forward: one per cache (a batched decode step), or one cache for all."""
        self.rows = [self.slot_of(c) for c in caches]

    def row_slots(self, batch: int) -> list[int]:
        return self.rows * batch if len(self.rows) == 1 else list(self.rows)


class _Paths(dict):
    """One projection's adapter paths: slot -> (A [r, in], B [out, r], scale), fp32."""

    def __init__(self, bank: AdapterBank):
        super().__init__()
        self.bank = bank

    def kernel_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """DecodeLayer.set_lora's arguments: A and (scale·B)ᵀ per slot, empty where a slot has none."""
        n = len(self.bank.names)
        empty = torch.empty(0)
        a = [self[s][0] if s in self else empty for s in range(n)]
        bs = [(self[s][1] * self[s][2]).T.contiguous() if s in self else empty for s in range(n)]
        return a, bs


def _delta(path, x: torch.Tensor) -> torch.Tensor:
    a, b, scale = path
    return F.linear(F.linear(x.float(), a), b) * scale


def with_delta(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y = module's base output for x; plus each row's adapter path (rows are x's first dim)."""
    paths = module.__dict__.get("lora")
    if not paths:
        return y
    rows = paths.bank.rows
    if len(set(rows)) == 1:
        path = paths.get(rows[0])
        return y if path is None else y + _delta(path, x).to(y.dtype)
    if len(rows) != x.shape[0]:
        raise RuntimeError(f"adapter routing has {len(rows)} rows, the forward {x.shape[0]}")
    y = y.clone()
    for slot in sorted(set(rows)):  # rows grouped by adapter: one low-rank product per adapter
        if slot in paths:
            idx = torch.tensor([r for r, s in enumerate(rows) if s == slot])
            y[idx] += _delta(paths[slot], x[idx]).to(y.dtype)
    return y


class _Adapted:
    """Mixin over a projection class: its output plus the routed adapter path."""

    def forward(self, x):
        return with_delta(self, x, super().forward(x))


_CLASSES: dict[type, type] = {}


def _adapted(module: nn.Module, bank: AdapterBank) -> _Paths:
    cls = type(module)
    if not issubclass(cls, _Adapted):
        if cls not in _CLASSES:
            _CLASSES[cls] = type(f"Adapted{cls.__name__}", (_Adapted, cls), {})
        module.__class__ = _CLASSES[cls]
        module.__dict__["lora"] = _Paths(bank)
    return module.__dict__["lora"]


def bank(model) -> AdapterBank | None:
    """The model's adapters (None: it has none)."""
    return getattr(model, "__dict__", {}).get("adapters")


def attach(model: nn.Module, name: str, rank: int, alpha: float, tensors: dict[str, torch.Tensor],
           default: bool = False) -> int:
    """Adds an adapter (tensors under our names: `layers.0.self_attn.q_proj.lora_A` / `.lora_B`) as
    the next slot, strictly (every tensor must meet a projection of matching shape); `default`:
    caches that name no adapter use it. Returns the slot."""
    held = bank(model)
    if held is None:
        held = model.__dict__["adapters"] = AdapterBank()
    if name in held.names:
        raise ValueError(f"adapter {name!r} is loaded already")
    modules = dict(model.named_modules())
    paths = {}
    for key in sorted(tensors):
        if not key.endswith((".lora_A", ".lora_B")):
            raise ValueError(f"adapter {name!r}: unexpected tensor {key}")
        if not key.endswith(".lora_A"):
            continue
        target = key[:-len(".lora_A")]
        module = modules.get(target)
        if module is None or not hasattr(module, "in_features"):
            raise ValueError(f"adapter {name!r}: the model has no projection {target}")
        if target + ".lora_B" not in tensors:
            raise ValueError(f"adapter {name!r}: {target} has lora_A but no lora_B")
        a, b = tensors[key].float().contiguous(), tensors[target + ".lora_B"].float().contiguous()
        if a.shape != (rank, module.in_features) or b.shape != (module.out_features, rank):
            raise ValueError(f"adapter {name!r}: {target} has A {tuple(a.shape)} and B {tuple(b.shape)}, expected "
                             f"{(rank, module.in_features)} and {(module.out_features, rank)}")
        paths[target] = (module, (a, b, alpha / rank))
    if not paths:
        raise ValueError(f"adapter {name!r} holds no LoRA tensors")
    slot = len(held.names)
    held.names.append(name)
    for module, path in paths.values():
        _adapted(module, held)[slot] = path
    if default:
        held.default = slot
    for module in model.modules():
        module.__dict__.pop("_fused", None)  # fused decode layers are rebuilt with the new paths
        if hasattr(module, "self_attn"):
            module.__dict__["adapters"] = held  # blocks read their rows' slots (cpu/fused.py)
    return slot


def update(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Overwrites adapter `name`'s tensors in place with new values for the same projections and
    shapes (an adapter being trained, refreshed after each step: copies, no re-quantization);
    the fused decode layers, which hold (α/r)·Bᵀ, are rebuilt on their next use (as after `attach`, a
    cache whose one-call decode step was built before keeps the old values: use new caches)."""
    held = bank(model)
    if held is None or name not in held.names:
        raise ValueError(f"no adapter {name!r} is loaded")
    slot, modules = held.slot(name), dict(model.named_modules())
    paths = {target: module.__dict__["lora"][slot] for target, module in modules.items()
             if slot in module.__dict__.get("lora", {})}
    wanted = {f"{t}.lora_{k}" for t in paths for k in "AB"}
    if set(tensors) != wanted:
        odd = sorted(set(tensors) ^ wanted)[0]
        raise ValueError(f"adapter {name!r}: {odd} is {'not in the adapter' if odd in tensors else 'missing'}")
    for key, value in tensors.items():
        target, _, kind = key.rpartition(".")
        held_tensor = paths[target][0 if kind == "lora_A" else 1]
        if held_tensor.shape != value.shape:
            raise ValueError(f"adapter {name!r}: {key} has shape {tuple(value.shape)}, "
                             f"expected {tuple(held_tensor.shape)}")
        held_tensor.copy_(value)
    for module in model.modules():
        module.__dict__.pop("_fused", None)


def route(model: nn.Module, caches) -> None:
    """Called by the model's entry points: the rows of this forward follow these caches' adapters."""
    held = bank(model)
    if held is not None:
        held.route(caches)
