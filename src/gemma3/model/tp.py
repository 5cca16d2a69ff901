"""Tensor-parallel inference, applied to a loaded model like gpt-fast's `tp.py`.

Megatron-LM's split (Shoeybi et al. 2019, §3): q/k/v and gate/up are column-parallel (each rank
computes its own heads / its own slice of the MLP width from the full hidden state), o and down are
row-parallel (each rank multiplies its slice and an all-reduce sums the partial outputs), so one
block costs two all-reduces. The tied embedding is vocab-parallel: each rank holds a slice of the
rows; a lookup is masked to the rank's rows and all-reduced, the LM head's logits are all-gathered.
Norms and RoPE are replicated. Every rank ends up with the same logits, so greedy decoding (and
sampling with a shared seed) stays in step without further communication.

KV heads: with `num_kv_heads` divisible by the world size each rank keeps its share. With fewer KV
heads than ranks (the 270M and 1B models have one) each rank keeps a copy of the one KV head its
query heads read (GQA groups never straddle ranks), i.e. KV heads are *replicated*, as vLLM and
Megatron do: the alternative, splitting the head dimension, would need an all-reduce inside the
attention scores. The cost is KV projection work and KV cache memory repeated world/num_kv_heads
times. Query heads (and the MLP width) must divide evenly; anything else is a clear error.

Only the torch backend (float weights) is supported: the quantized CPU kernels of the cpu backend fuse projections
that TP has to split. Torch's collectives do all the communication (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import Gemma3Config
from .decoder import MLP, Attention, Gemma3, TiedEmbedding


@dataclass(frozen=True)
class Shard:
    """What one of `world` ranks holds of a model with config `cfg`."""

    heads: int
    kv_heads: int
    kv_replicated: bool  # True: each KV head is copied to world / num_kv_heads ranks
    ffn: int
    vocab: int  # rows of the (zero-padded) vocabulary slice

    @classmethod
    def plan(cls, cfg: Gemma3Config, world: int) -> "Shard":
        """Query heads and MLP width split evenly or not at all; KV heads split when they divide,
        else one copy per rank of the head its query heads share (needs world % num_kv_heads == 0)."""
        if world < 1:
            raise ValueError(f"tensor parallel size must be >= 1, got {world}")
        if cfg.num_heads % world:
            raise ValueError(f"tensor parallel over {world} ranks needs the query heads to split evenly, but "
                             f"{cfg.name} has {cfg.num_heads} query heads; use a size that divides {cfg.num_heads}")
        if cfg.intermediate_size % world:
            raise ValueError(f"tensor parallel over {world} ranks: the MLP width {cfg.intermediate_size} "
                             f"does not divide evenly")
        kv = cfg.num_kv_heads
        if kv % world == 0:
            kv_local, replicated = kv // world, False
        elif world % kv == 0:
            kv_local, replicated = 1, True
        else:
            raise ValueError(f"tensor parallel over {world} ranks: {cfg.name}'s {kv} KV heads can neither be "
                             f"split evenly nor replicated (which needs a multiple of {kv} ranks)")
        return cls(cfg.num_heads // world, kv_local, replicated, cfg.intermediate_size // world,
                   -(-cfg.vocab_size // world))

    def local_config(self, cfg: Gemma3Config) -> Gemma3Config:
        """The rank's own shapes: what `Gemma3.new_cache` sizes the KV cache from."""
        return cfg.replace(num_heads=self.heads, num_kv_heads=self.kv_heads, intermediate_size=self.ffn)


def world_size() -> int:
    """Ranks that torchrun started (1 for a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def shared_seed() -> int:
    """A seed drawn by rank 0 and broadcast, so that every rank samples the same tokens."""
    seed = [secrets.randbits(63) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(seed, src=0)
    return seed[0]


def _all_reduce(module, inputs, output):
    dist.all_reduce(output)
    return output


def _rows(linear: nn.Linear, start: int, count: int):
    linear.weight = nn.Parameter(linear.weight.detach()[start:start + count].clone(), requires_grad=False)
    linear.out_features = count


def _columns(linear: nn.Linear, start: int, count: int):
    linear.weight = nn.Parameter(linear.weight.detach()[:, start:start + count].contiguous(), requires_grad=False)
    linear.in_features = count
    linear.register_forward_hook(_all_reduce)


class VocabParallelEmbedding(TiedEmbedding):
    """Rows [start, start + n) of the tied embedding (zero rows pad the last rank's slice)."""

    def __init__(self, full: TiedEmbedding, rank: int, world: int, n: int):
        vocab, dim = full.weight.shape
        rows = full.weight.detach()[rank * n:(rank + 1) * n]
        weight = torch.cat([rows, rows.new_zeros(n - rows.shape[0], dim)])
        super().__init__(n, dim, _weight=weight, _freeze=True, device=weight.device, dtype=weight.dtype)
        self.start, self.vocab, self.world = rank * n, vocab, world

    def forward(self, ids):
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        dist.all_reduce(x)  # exactly one rank holds each row: the sum adds zeros only
        return x

    def attend(self, hidden):
        local = (hidden @ self.weight.T).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local)
        return torch.cat(parts, dim=-1)[..., :self.vocab]


def apply(model: Gemma3, rank: int, world: int) -> Gemma3:
    """Shards `model` in place for `rank` of `world` (the process group must be initialised);
    afterwards `model.config` describes this rank's shard."""
    cfg = model.config
    shard = Shard.plan(cfg, world)
    swapped = [f"{name} ({type(m).__name__})" for name, m in model.named_modules()
               if name.endswith(("_proj", "self_attn", "mlp", "embed_tokens"))
               and type(m) not in (nn.Linear, Attention, MLP, TiedEmbedding)]
    if swapped:
        raise ValueError("tensor parallel shards the float model (backend 'torch'); these modules were "
                         f"swapped by a quantized or fast path: {', '.join(swapped[:3])}")
    hd = cfg.head_dim
    ranks_per_kv = world // cfg.num_kv_heads if shard.kv_replicated else 1  # ranks sharing one KV head
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _rows(attn.q_proj, rank * shard.heads * hd, shard.heads * hd)
        kv_start = (rank // ranks_per_kv) * shard.kv_heads * hd
        _rows(attn.k_proj, kv_start, shard.kv_heads * hd)
        _rows(attn.v_proj, kv_start, shard.kv_heads * hd)
        _columns(attn.o_proj, rank * shard.heads * hd, shard.heads * hd)
        attn.n_heads, attn.n_kv = shard.heads, shard.kv_heads
        _rows(mlp.gate_proj, rank * shard.ffn, shard.ffn)
        _rows(mlp.up_proj, rank * shard.ffn, shard.ffn)
        _columns(mlp.down_proj, rank * shard.ffn, shard.ffn)
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, rank, world, shard.vocab)
    model.config = shard.local_config(cfg)
    return model
