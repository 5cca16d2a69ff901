"""Scale-out with PyTorch's own engines: one process per device started by `torchrun`,
`torch.distributed` with gloo on CPU and nccl on GPU, and the loss module wrapped in DDP
(replicated weights, averaged gradients) or FSDP2 `fully_shard` (parameters, gradients and
optimizer state sharded per decoder layer, for models that do not fit one device).
Nothing here communicates by itself except through torch.distributed collectives.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    strategy: str = "ddp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def fsdp(self) -> bool:
        return self.distributed and self.strategy == "fsdp"


def setup(strategy: str = "ddp", device: str | None = None, timeout=None) -> DistContext:
    """Joins the process group that torchrun describes in the environment (WORLD_SIZE, RANK,
    LOCAL_RANK, MASTER_ADDR/PORT); a plain `python` run is a world of one. `timeout` (a
    timedelta) bounds each collective; default: torch's."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if cuda else torch.device(device or "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None, timeout=timeout)
    rank = dist.get_rank() if world > 1 else 0
    return DistContext(rank=rank, world=world, device=dev, strategy=strategy)


def wrap(module: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP or FSDP2 around the loss module (whose `.model` is the decoder); identity for one process."""
    if not ctx.distributed:
        return module
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for layer in module.model.layers:
        fully_shard(layer)
    fully_shard(module)
    return module


def grad_sync(wrapped: nn.Module, ctx: DistContext, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step."""
    if not ctx.distributed or enabled:
        if ctx.fsdp:
            wrapped.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if ctx.fsdp:
        wrapped.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return wrapped.no_sync()


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(ctx: DistContext):
    if ctx.distributed:
        dist.barrier()


def teardown(ctx: DistContext):
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
