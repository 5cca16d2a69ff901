"""The one training loop behind `distill`, `finetune` and `qat`.

What differs between them is only the *target source*: a callable that turns a `Batch` into the
target of the fused head loss (`losses.py`): one-hot next tokens (SFT), sampled teacher targets
(distillation, on the fly or from a store) or the dense teacher distribution (QAT).

Per optimizer step: the global batch of `batch_size` sequences (`data.batch_indices`) is split
across ranks and then into micro-batches (gradient accumulation); each micro-batch's summed loss
is divided by the number of target tokens in the *global* batch, so the step's gradient is that of
the mean loss over the global batch whatever the number of ranks or micro-batches; gradients are
clipped by global norm; AdamW with linear warm-up then cosine decay to `min_lr_ratio · lr`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint, distributed
from .data import PackedDataset, batch_indices
from .losses import TiedHeadLoss, mix_targets, one_hot_target
from .metrics import MetricsLog, plot_curves, read_metrics

# Settings that define the trajectory: a resumed run must use the same ones.
_TRAJECTORY = ("steps", "batch_size", "lr", "min_lr_ratio", "warmup", "weight_decay", "betas", "clip", "seed")


@dataclass
class TrainConfig:
    out: str
    steps: int = 100
    batch_size: int = 8  # sequences per optimizer step, all ranks together
    micro_batch: int | None = None  # sequences per forward on one rank (default: all of the rank's share)
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0  # max global grad norm (0 = no clipping)
    bf16: bool = False  # autocast matmuls to bfloat16; weights and optimizer state stay fp32
    checkpointing: bool = False  # activation checkpointing per decoder layer
    seed: int = 0  # data order (and sampled targets)
    eval_every: int = 0
    save_every: int = 0
    stop_after: int | None = None  # end this run (with a checkpoint) after this many steps; resume later
    strategy: str = "ddp"  # under torchrun: "ddp" or "fsdp"
    chunk: int = 128  # rows per chunk of the fused head loss
    progress: bool = True
    extra: dict = field(default_factory=dict)  # recorded in the checkpoint (e.g. the command line)


@dataclass
class Batch:
    indices: np.ndarray  # sequence indices in the packed dataset
    positions: np.ndarray  # positions in the global data order (seed per-sequence sampling)
    inputs: torch.Tensor  # [b, L]
    targets: torch.Tensor  # [b, L] next tokens
    mask: torch.Tensor  # [b, L] bool: loss on this token


def one_hot(batch: Batch):
    return one_hot_target(batch.targets, batch.mask)


class WithOneHot:
    """Soft targets mixed with the one-hot LM loss: (1 − α)·soft + α·one-hot."""

    def __init__(self, soft, weight: float):
        self.soft, self.weight = soft, weight

    def __call__(self, batch: Batch):
        return mix_targets(self.soft(batch), one_hot(batch), self.weight)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _param_groups(model, weight_decay: float):
    decay, rest = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _make_batch(data: PackedDataset, indices, positions) -> Batch:
    inputs, targets, mask = data.sequences(indices)
    return Batch(np.asarray(indices), np.asarray(positions), inputs, targets, mask)


@torch.no_grad()
def evaluate(objective: TiedHeadLoss, data: PackedDataset, micro_batch: int, ctx, bf16: bool = False) -> float:
    """Mean next-token NLL (nats) over every target token of `data`; ranks split the sequences."""
    total = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    for s in range(ctx.rank * micro_batch, data.n, ctx.world * micro_batch):
        idx = np.arange(s, min(s + micro_batch, data.n))
        batch = _make_batch(data, idx, idx)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = objective(batch.inputs.to(ctx.device), one_hot(batch).to(ctx.device))
        total += torch.stack([loss.double(), batch.mask.sum().double().to(ctx.device)])
    distributed.all_reduce_sum(total, ctx)
    return float(total[0] / total[1])


def train(model, data: PackedDataset, targets, cfg: TrainConfig, *, tokenizer=None,
          eval_data: PackedDataset | None = None, resume: bool = False, merge_lora: bool = False,
          ctx: distributed.DistContext | None = None) -> dict:
    """Trains `model` in place; writes OUT/metrics.jsonl, OUT/loss.png, checkpoints and OUT/final.
    `targets` maps a Batch to the loss target. Returns a summary dict."""
    ctx = ctx or distributed.setup(cfg.strategy)
    out = Path(cfg.out)
    per_rank, rem = divmod(cfg.batch_size, ctx.world)
    micro = cfg.micro_batch or per_rank
    if rem or per_rank % micro:
        raise ValueError(f"--batch-size {cfg.batch_size} must split evenly into {ctx.world} rank(s) × micro-batches "
                         f"of {micro}")
    accum = per_rank // micro
    run = {k: v for k, v in asdict(cfg).items() if k in _TRAJECTORY}
    run |= {"data_fingerprint": data.fingerprint, "seq_len": data.seq_len}

    start, state = 0, None
    if resume:
        path, state = checkpoint.resumable(out, run)
        if not state.get("sharded"):  # sharded weights load after wrapping, into the shards
            checkpoint.load_weights(model, path)
        start = state["step"]

    model.to(ctx.device).train()
    objective = TiedHeadLoss(model, checkpoint=cfg.checkpointing, chunk=cfg.chunk)
    wrapped = distributed.wrap(objective, ctx)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    if state is not None:
        checkpoint.restore(state, path, model, optimizer, ctx)
    log = MetricsLog(out / "metrics.jsonl", resume_step=start if resume else None) if ctx.is_main else None
    params = [p for p in model.parameters() if p.requires_grad]

    def save(step):
        # Informational: the position and the learning rate are functions of the step.
        position = {"sequences_consumed": step * cfg.batch_size, "epoch": step * cfg.batch_size // data.n,
                    "next_lr": lr_at(step, cfg)}
        path = checkpoint.save(out, step, model, optimizer, ctx, tokenizer,
                               run | {"data_position": position, "extra": cfg.extra})
        if ctx.is_main:
            plot_curves({"run": read_metrics(out / "metrics.jsonl")}, out / "loss.png")
        return path

    last_saved, last_loss, eval_loss = start if resume else None, None, None
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
    began = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not (cfg.progress and ctx.is_main))
    for step in range(start, end):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = batch_indices(data.n, step, cfg.batch_size, cfg.seed)
        positions = np.arange(step * cfg.batch_size, (step + 1) * cfg.batch_size)
        n_targets = max(1, data.target_count(indices))
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        t0 = time.perf_counter()
        for m in range(accum):
            sel = slice(ctx.rank * per_rank + m * micro, ctx.rank * per_rank + (m + 1) * micro)
            batch = _make_batch(data, indices[sel], positions[sel])
            target = targets(batch).to(ctx.device)
            with distributed.grad_sync(wrapped, ctx, m == accum - 1):
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss = wrapped(batch.inputs.to(ctx.device), target)
                (loss * (ctx.world / n_targets)).backward()
            loss_sum += loss.detach().double()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        last_loss = float(distributed.all_reduce_sum(loss_sum, ctx)) / n_targets
        record = {"step": step + 1, "loss": last_loss, "lr": lr, "grad_norm": float(grad_norm),
                  "targets": n_targets, "tokens_per_s": round(cfg.batch_size * data.seq_len / (time.perf_counter() - t0), 1)}
        if eval_data is not None and cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            eval_loss = evaluate(objective, eval_data, micro, ctx, cfg.bf16)
            record |= {"eval_loss": eval_loss, "eval_ppl": math.exp(eval_loss)}
        if log:
            log.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < end:
            save(step + 1)
            last_saved = step + 1
    bar.close()
    if end > start and last_saved != end:
        save(end)
    summary = {"out": str(out), "steps": end, "finished": end == cfg.steps, "final_loss": last_loss,
               "eval_loss": eval_loss, "seconds": round(time.perf_counter() - began, 2),
               "tokens": (end - start) * cfg.batch_size * data.seq_len}
    if end == cfg.steps:
        state = checkpoint.model_state(model, ctx)
        if ctx.is_main:
            checkpoint.save_model_files(out / "final", model, state, tokenizer, merge_lora=merge_lora)
            if hasattr(model, "lora_config") and merge_lora:
                checkpoint.save_model_files(out / "adapter", model, state, None)
        summary["final"] = str(out / "final")
    distributed.barrier(ctx)
    return summary
