"""Weight merges of policies fine-tuned from one initialisation (WARP, Ramé et al., 2024).

All merges act on *task vectors* δ = θ − θ_init, tensor by tensor:
- `average`: θ_init + Σ wᵢ·δᵢ (wᵢ normalised) — for models sharing the init, the plain weight average;
- `slerp`: spherical interpolation of two task vectors, θ_init + sin((1−t)Ω)/sin Ω·δ_a + sin(tΩ)/sin Ω·δ_b
  with Ω the angle between δ_a and δ_b (linear interpolation where they are parallel); more than two
  are folded in one after another with t = 1/(i+1), so each gets an equal share;
- `liti`: linear interpolation towards the init, θ_init + η·(θ_merged − θ_init) (η = 0: the init,
  η = 1: the merge; WARP's trade between reward and KL);
- `ema`: the moving anchor used as the RL reference, anchor ← (1 − μ)·anchor + μ·θ.

LoRA adapters (PEFT directories) share an implicit init, the base model (task vector ΔW = (α/r)·B·A
per projection): `merge_adapters` merges the dense ΔW and factors the result back into an adapter of
rank Σ rᵢ by SVD, which is exact for averages, SLERP and LITI (they are linear combinations of the
ΔW). Merging A and B separately would not be: the product of averages is not the average of products.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..formats.peft import LoRAConfig, read_adapter


def _check(states: list[dict[str, torch.Tensor]], init: dict[str, torch.Tensor]):
    for i, s in enumerate(states):
        if set(s) != set(init):
            odd = sorted(set(s) ^ set(init))[0]
            raise ValueError(f"model {i + 1} and the initialisation differ in tensors ({odd}): "
                             "merges need models fine-tuned from one initialisation")
        for k, v in s.items():
            if v.shape != init[k].shape:
                raise ValueError(f"model {i + 1}: {k} has shape {tuple(v.shape)}, the init {tuple(init[k].shape)}")


def average(init: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]],
            weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    _check(states, init)
    w = weights if weights is not None else [1.0] * len(states)
    if len(w) != len(states) or min(w) < 0 or sum(w) <= 0:
        raise ValueError("average: one non-negative weight per model, not all zero")
    total = sum(w)
    return {k: init[k] + sum((wi / total) * (s[k] - init[k]) for wi, s in zip(w, states)) for k in init}


def _slerp_vectors(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    na, nb = a.double().norm(), b.double().norm()
    if na < eps or nb < eps:  # a zero task vector has no direction: interpolate linearly
        return (1 - t) * a + t * b
    cos = float((a.double().flatten() @ b.double().flatten()) / (na * nb))
    omega = math.acos(max(-1.0, min(1.0, cos)))
    if math.sin(omega) < 1e-6:
        return (1 - t) * a + t * b
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def slerp(init: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]], t: float = 0.5) -> dict[str, torch.Tensor]:
    """Two models: SLERP of their task vectors at t (0: the first). More: folded with equal shares."""
    _check(states, init)
    if len(states) < 2:
        raise ValueError("slerp merges at least two models")
    if not 0 <= t <= 1:
        raise ValueError(f"slerp t must be in [0, 1], got {t}")
    deltas = {k: states[0][k] - init[k] for k in init}
    for i, s in enumerate(states[1:], 1):
        share = t if len(states) == 2 else 1 / (i + 1)
        deltas = {k: _slerp_vectors(deltas[k], s[k] - init[k], share) for k in init}
    return {k: init[k] + deltas[k].to(init[k].dtype) for k in init}


def liti(init: dict[str, torch.Tensor], merged: dict[str, torch.Tensor], eta: float) -> dict[str, torch.Tensor]:
    _check([merged], init)
    if not 0 <= eta <= 1:
        raise ValueError(f"liti η must be in [0, 1], got {eta}")
    return {k: init[k] + eta * (merged[k] - init[k]) for k in init}


@torch.no_grad()
def ema(anchor: dict[str, torch.Tensor], current: dict[str, torch.Tensor], rate: float):
    """anchor ← (1 − rate)·anchor + rate·current, in place."""
    for k, v in anchor.items():
        v.lerp_(current[k].to(v.dtype), rate)


# ---- LoRA adapters: the task vector is ΔW = (α/r)·B·A, the base model is the init ---------------


def adapter_deltas(path: str | Path) -> dict[str, torch.Tensor]:
    """The dense ΔW of each projection an adapter directory (PEFT layout) changes."""
    cfg, tensors = read_adapter(path)
    scale = cfg.alpha / cfg.rank
    return {k[:-len(".lora_A")]: (tensors[k[:-len(".lora_A")] + ".lora_B"].double() @ tensors[k].double()) * scale
            for k in tensors if k.endswith(".lora_A")}


def deltas_to_adapter(deltas: dict[str, torch.Tensor], rank: int) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """An adapter (α = rank, so the scale is 1) whose ΔW is each delta's best rank-`rank` approximation."""
    targets = sorted({k.rsplit(".", 1)[-1] for k in deltas})
    out = {}
    for name, d in deltas.items():
        u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        b, a = u[:, :r] * root, root[:, None] * vh[:r]
        if r < rank:  # keep every projection at the adapter's rank
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], 1)
            a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], 0)
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = a.float(), b.float()
    return LoRAConfig(rank=rank, alpha=float(rank), targets=tuple(targets)), out


def merge_adapters(paths: list[str | Path], how: str, t: float = 0.5, eta: float = 1.0,
                   weights: list[float] | None = None) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """`how` = "average" | "slerp" | "liti" (one adapter: η·ΔW) over adapters of one base model; the
    result has rank Σ rᵢ (exact)."""
    deltas = [adapter_deltas(p) for p in paths]
    keys = set().union(*deltas)
    for d in deltas:  # a projection an adapter leaves alone has ΔW = 0
        for k in keys - set(d):
            ref = next(x[k] for x in deltas if k in x)
            d[k] = torch.zeros_like(ref)
    zero = {k: torch.zeros_like(v) for k, v in deltas[0].items()}
    if how == "average":
        merged = average(zero, deltas, weights)
    elif how == "slerp":
        merged = slerp(zero, deltas, t)
    elif how == "liti":
        if len(deltas) != 1:
            raise ValueError("liti interpolates one model towards the init: give one adapter (merge first)")
        merged = liti(zero, deltas[0], eta)
    else:
        raise ValueError(f"unknown merge {how!r}: average, slerp or liti")
    rank = sum(read_adapter(p)[0].rank for p in paths)
    return deltas_to_adapter(merged, rank)
