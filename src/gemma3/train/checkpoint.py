"""Checkpoints that resume exactly and load everywhere.

OUT/checkpoints/step-NNNNNNNN/ holds
- the model: an HF-style directory (config.json + model.safetensors, `weights.save_hf_dir`) plus
  tokenizer.model, so `gemma3 generate --model DIR` runs it; for LoRA only the adapter
  (adapter_config.json + adapter_model.safetensors, PEFT layout) — the base is the --model given;
- trainer_state.pt: step, optimizer state (fully gathered, keyed by parameter name), RNG states,
  the data fingerprint and the run configuration. The learning rate is a function of the step and
  the data position is step × batch size, so nothing else is needed to continue bit for bit.
OUT/checkpoints/latest names the newest complete checkpoint (written last).

Saving is atomic, so `kill -9` (or a power cut) at any moment leaves the last complete checkpoint
loadable: a step is written into step-N.partial/, every file and the directory are fsynced, and
only then is it renamed to step-N/; `latest` is replaced the same way (temp file, fsync, rename).
A leftover .partial directory is never read and is cleared by the next save.

Under FSDP nothing is gathered: a model that needs FSDP does not fit one process, nor its AdamW
state (3× the weights in fp32). Every rank writes its own shards of the weights and the optimizer
state into step-N/sharded/ with torch.distributed.checkpoint (DCP), and trainer_state.pt keeps the
rest. DCP reshards on load, so a run resumes on a different number of ranks, or in one process.
Such a step directory is for resuming only; OUT/final (gathered once, at the end) is the model
that other commands load.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from ..formats.checkpoint import read_hf_dir, save_hf_dir
from . import lora
from .distributed import DistContext, barrier

_PARAM_INFIX = ".parametrizations.weight.original"  # torch.nn.utils.parametrize (QAT's fake quant)
SHARDED = "sharded"  # the DCP directory of an FSDP checkpoint


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, or from a different run."""


def public_name(name: str) -> str:
    return name.replace(_PARAM_INFIX, ".weight")


def _options(ctx: DistContext) -> StateDictOptions:
    return StateDictOptions(full_state_dict=ctx.fsdp, cpu_offload=ctx.fsdp)


def model_state(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """Every parameter under its public name, full (gathered under FSDP). Collective."""
    return {public_name(k): v for k, v in get_model_state_dict(model, options=_options(ctx)).items()}


def save_model_files(path: Path, model: nn.Module, state: dict[str, torch.Tensor], tokenizer,
                     merge_lora: bool = False):
    """The loadable part of a checkpoint: adapter only for LoRA (or merged weights), else full weights."""
    cfg = getattr(model, "lora_config", None)
    if cfg is not None and not merge_lora:
        lora.save_adapter(path, cfg, state, base_name=getattr(model, "base_name", None) or model.config.name)
    else:
        weights = lora.merge_state(state, cfg) if cfg is not None else state
        save_hf_dir(path, model.config, {k: v.detach().cpu().contiguous() for k, v in weights.items()})
    if tokenizer is not None:
        tokenizer.save(path)


def save(out: Path, step: int, model: nn.Module, optimizer, ctx: DistContext, tokenizer, run: dict) -> Path:
    """Writes OUT/checkpoints/step-N atomically and then points `latest` at it. Collective when
    distributed."""
    root = Path(out) / "checkpoints"
    path = root / f"step-{step:08d}"
    partial = path.with_name(path.name + ".partial")
    if ctx.is_main:
        for stale in root.glob("*.partial"):  # saves that were killed
            shutil.rmtree(stale, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier(ctx)
    if ctx.fsdp:  # every rank writes its shards; DCP's own collectives finish before `latest` moves
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=partial / SHARDED)
        state, optim = None, None
    else:
        state = model_state(model, ctx)
        optim = get_optimizer_state_dict(model, optimizer, options=_options(ctx))
    barrier(ctx)  # every rank's shards are in
    if ctx.is_main:
        if state is not None:
            save_model_files(partial, model, state, tokenizer)
        torch.save({"step": step, "optimizer": optim, "sharded": ctx.fsdp, "run": run, "rng": {
            "torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
            partial / "trainer_state.pt")
        _fsync_tree(partial)
        if path.exists():  # the same step saved again (a resumed run): the old copy goes first
            shutil.rmtree(path)
        os.replace(partial, path)
        _write_atomic(root / "latest", path.name + "\n")
    barrier(ctx)
    return path


def _fsync_tree(root: Path):
    for dirpath, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(file: Path, text: str):
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)
    _fsync_dir(file.parent)


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint: the one `latest` names, else (no pointer, or one naming a
    directory that is gone) the highest step-N with its trainer_state.pt."""
    root = Path(out) / "checkpoints"
    pointer = root / "latest"
    name = pointer.read_text().strip() if pointer.is_file() else ""
    if name and (root / name / "trainer_state.pt").is_file():
        return root / name
    steps = sorted(p for p in root.glob("step-*") if not p.name.endswith(".partial")
                   and (p / "trainer_state.pt").is_file()) if root.is_dir() else []
    return steps[-1] if steps else None


def load_weights(model: nn.Module, path: Path):
    """Loads a checkpoint's model files into the (unwrapped) model, strictly."""
    params = {public_name(n): p for n, p in model.named_parameters()}
    if hasattr(model, "lora_config"):
        lora.load_adapter(model, path)
        return
    _, state = read_hf_dir(path)
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise CheckpointError(f"{path}: checkpoint {'lacks ' + missing[0] if missing else 'has unexpected ' + extra[0]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def resumable(out: Path, run: dict) -> tuple[Path, dict]:
    """The latest checkpoint of OUT and its trainer state, refusing a run whose trajectory settings
    (`run`: the settings a resumed run must share) differ from the checkpoint's."""
    path = latest(out)
    if path is None:
        raise CheckpointError(f"{out}: no checkpoint to resume from")
    state = load_trainer_state(path)
    changed = [k for k in run if json.dumps(state["run"].get(k), default=str) != json.dumps(run[k], default=str)]
    if changed:
        raise CheckpointError(f"{path}: cannot resume with a different {changed[0]} "
                              f"({state['run'].get(changed[0])} → {run[changed[0]]})")
    return path, state


def load_trainer_state(path: Path) -> dict:
    file = Path(path) / "trainer_state.pt"
    if not file.is_file():
        raise CheckpointError(f"{path}: no trainer_state.pt (not a training checkpoint)")
    return torch.load(file, map_location="cpu", weights_only=False)


def restore(trainer_state: dict, path: Path, model: nn.Module, optimizer, ctx: DistContext):
    """Optimizer and RNG state from the checkpoint at `path`; for a sharded (FSDP) checkpoint the
    weights too, resharded by DCP to this run's ranks (a full checkpoint's weights were loaded
    before wrapping)."""
    if trainer_state.get("sharded"):
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=Path(path) / SHARDED)
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    else:
        set_optimizer_state_dict(model, optimizer, trainer_state["optimizer"], options=_options(ctx))
    rng = trainer_state["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
