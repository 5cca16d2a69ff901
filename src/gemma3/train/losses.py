"""Cross-entropy against the tied LM head without materialising [tokens, vocab] logits for backward.

Gemma's head is 262k wide: logits for 2,048 tokens are 2 GiB in fp32, so the head and the loss are
fused and run over row chunks. For each chunk the forward pass computes the logits once and, in the
same pass, the gradients w.r.t. the hidden states and the head weight (the logit gradient of a
cross-entropy with target weights q is `Σq · softmax(z) − q`), so backward only scales stored
gradients: three head-sized matmuls per step instead of four with recomputation, and one
chunk of logits alive at a time.

Targets:
- `SparseTarget(ids [N, K], weights [N, K])`: loss_n = −Σ_k w_nk · log softmax(z_n)[ids_nk].
  One-hot LM loss is K = 1 with weight = loss mask; sampled distillation targets are K = 256
  (duplicate slots carry weight 0); the two are mixed by concatenating columns.
- `DenseTarget(hidden [N, D], weight [V, D])`: the full teacher distribution softmax(h·Wᵀ/τ) of a
  teacher that shares the vocabulary, computed chunk by chunk; the returned value is
  KL(teacher ‖ student) (cross-entropy minus the teacher's entropy, which has no gradient). QAT uses it.

The head is a tensor, or a frozen head that is not held as one (`SlicedHead`: QAT's embedding,
frozen and read in its quantized form): its logits and the gradient through it are computed a
slice of the vocabulary at a time, so no float copy of the 262k-row table is ever whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.nn.utils import parametrize


@dataclass
class SparseTarget:
    ids: torch.Tensor  # long [N, K]
    weights: torch.Tensor  # float [N, K]; 0 for padding / masked tokens / duplicate samples

    def rows(self, s: int, e: int, dtype=torch.float32):
        return self.ids[s:e], self.weights[s:e].to(dtype)

    def to(self, device) -> "SparseTarget":
        return SparseTarget(self.ids.to(device), self.weights.to(device))


@dataclass
class DenseTarget:
    hidden: torch.Tensor  # teacher final-norm hidden states [N, D_teacher]
    weight: torch.Tensor  # teacher head (embedding) [V, D_teacher]
    mask: torch.Tensor  # float [N]: 1 for target tokens
    temperature: float = 1.0

    def to(self, device) -> "DenseTarget":
        return DenseTarget(self.hidden.to(device), self.weight.to(device), self.mask.to(device), self.temperature)

    def probs(self, s: int, e: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        # In place where possible: each [rows, vocab] temporary is 64 MiB per 64 rows of a 262k vocabulary.
        logits = (self.hidden[s:e] @ self.weight.T).to(dtype).div_(self.temperature)
        logp = torch.log_softmax(logits, dim=-1)
        del logits
        p = logp.exp().mul_(self.mask[s:e, None])
        return p, torch.linalg.vecdot(p, logp)  # probabilities and −entropy per row (0 where masked)


class SlicedHead(Protocol):
    """A frozen [V, D] head read a slice of rows at a time: `slices(dtype)` yields (start, end,
    rows [end - start, D]) covering 0..V; `shape` is (V, D). No gradient flows into it."""

    shape: tuple[int, int]

    def slices(self, dtype: torch.dtype) -> Iterator[tuple[int, int, torch.Tensor]]: ...


def _head_matmul(h: torch.Tensor, weight, out: torch.Tensor):
    """out = h · weightᵀ, out [n, V] (a tensor head, or a `SlicedHead` slice by slice)."""
    if isinstance(weight, torch.Tensor):
        if out.dtype == h.dtype:
            torch.matmul(h, weight.T, out=out)
        else:
            out.copy_(h @ weight.T)
        return
    for s, e, w in weight.slices(h.dtype):
        out[:, s:e] = h @ w.T


def _head_grad(g: torch.Tensor, weight, out: torch.Tensor):
    """out = g · weight, the gradient w.r.t. the hidden states of a chunk."""
    if isinstance(weight, torch.Tensor):
        torch.matmul(g, weight, out=out)
        return
    out.zero_()
    for s, e, w in weight.slices(g.dtype):
        out.addmm_(g[:, s:e], w)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # False for a SlicedHead
        dtype = _compute_dtype(hidden)
        acc = torch.promote_types(dtype, torch.float32)  # softmax / loss precision: fp32 at least
        h_all = hidden.to(dtype)
        w = weight.to(dtype) if isinstance(weight, torch.Tensor) else weight
        n = hidden.shape[0]
        grad_h = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        # One [chunk, vocab] buffer, reused: fresh 100+ MB allocations per chunk cost page faults.
        buf = torch.empty(min(chunk, n), weight.shape[0], dtype=acc, device=hidden.device)
        with torch.no_grad():
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                h, logits = h_all[s:e], buf[:e - s]
                _head_matmul(h, w, logits)
                if isinstance(target, SparseTarget):
                    ids, q = target.rows(s, e, acc)
                    target_term = (q * logits.gather(1, ids)).sum(-1)
                else:
                    q, neg_entropy = target.probs(s, e, acc)
                    target_term = (q * logits).sum(-1) - neg_entropy
                mass = q.sum(-1, keepdim=True)
                peak = logits.amax(-1, keepdim=True)
                exp = logits.sub_(peak).exp_()  # in place: the buffer now holds exp(z - max)
                denom = exp.sum(-1, keepdim=True)
                total += (mass * (peak + denom.log())).sum() - target_term.sum()
                if not (need_h or need_w):
                    continue
                grad = exp.mul_(mass / denom)  # Σq · softmax(z) ...
                if isinstance(target, SparseTarget):
                    grad.scatter_add_(1, ids, -q)  # ... − q
                else:
                    grad.sub_(q)
                g = grad.to(dtype)
                if need_h:
                    _head_grad(g, w, grad_h[s:e])
                if need_w:
                    grad_w.addmm_(g.T.to(acc), h.to(acc))
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hidden.dtype, getattr(weight, "dtype", None)
        return total.to(acc)

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (None if grad_h is None else (grad_h * g).to(h_dtype),
                None if grad_w is None else (grad_w * g).to(w_dtype), None, None)


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor | SlicedHead, target: SparseTarget | DenseTarget,
                       chunk: int = 128) -> torch.Tensor:
    """Summed loss over rows of `hidden` [N, D] with logits hidden · weightᵀ (see module docstring)."""
    return _HeadCrossEntropy.apply(hidden, weight, target, chunk)


def one_hot_target(targets: torch.Tensor, mask: torch.Tensor) -> SparseTarget:
    """The LM loss as a K = 1 sparse target: next-token ids, weight 1 where the loss mask is set."""
    return SparseTarget(targets.reshape(-1, 1), mask.reshape(-1, 1).float())


def mix_targets(soft: SparseTarget, hard: SparseTarget, hard_weight: float) -> SparseTarget:
    """(1 − α)·soft + α·one-hot, as one sparse target."""
    if hard_weight == 0:
        return soft
    return SparseTarget(torch.cat([soft.ids, hard.ids], dim=1),
                        torch.cat([soft.weights * (1 - hard_weight), hard.weights * hard_weight], dim=1))


class TiedHeadLoss(nn.Module):
    """Model → final hidden states → fused loss against the tied head, as one module, so that DDP
    and FSDP see (and synchronise) a single forward. Returns the summed loss; the trainer divides
    by the global number of target tokens."""

    def __init__(self, model: nn.Module, checkpoint: bool = False, chunk: int = 128):
        super().__init__()
        self.model = model
        self.checkpoint = checkpoint
        self.chunk = chunk

    def forward(self, input_ids: torch.Tensor, target: SparseTarget | DenseTarget) -> torch.Tensor:
        embedding = self.model.embed_tokens
        # cached(): a fake-quantized embedding (QAT, trained) is computed once per forward, although
        # it is read twice (lookup and head). Only then: the cache also keeps every layer's
        # fake-quantized weight (0.4 GB for the 270M) to the end of the forward, where activation
        # checkpointing would otherwise hold one layer's at a time.
        with parametrize.cached() if parametrize.is_parametrized(embedding) else contextlib.nullcontext():
            hidden = self.model.hidden_states(input_ids, checkpoint=self.checkpoint)
            # A head that says how it is read slice by slice (QAT's frozen embedding) is read so.
            head = embedding.sliced_head() if hasattr(embedding, "sliced_head") else embedding.weight
            return head_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head, target, self.chunk)
