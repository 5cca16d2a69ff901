"""Per-token overhead cuts for decoding, applied as a module swap on top of qlinear.py.

A decode step of the 270M model moves ~250 MB of weights (~5 ms at memory speed), while the plain
model.py step issues ~100 small PyTorch ops per layer (~5-10 µs each): Python and dispatch, not
arithmetic, would dominate. These subclasses keep model.py's structure and parameters and only
replace the op-heavy parts of a one-token step:

- `FastRMSNorm`: one kernel call with the (1 + w) weight precomputed, instead of eight ops;
- `FastMLP`: gate, up, GELU, down in one kernel call (the activations quantized once per input);
- `FastAttention`: for one query token per row, q/k/v in one kernel call, QK-norm + RoPE in one, the new key/value
  written straight into its cache slot (a ring slot can be overwritten before attending: the key it
  evicts is exactly one window behind, invisible to this query), and attention over the cache in
  one kernel call (no key concatenation, no mask tensor), reading fp32, bf16 or int8 storage
  directly (int8 scales applied per row inside the kernel). A continuous batch, whose rows each
  own a cache, takes one call per layer for all of them. Prefill chunks and images take model.py's
  path unchanged.

Tests compare every swapped module with the original (tests/test_fast_path.py).
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .cache import LinearKV, RingKV
from .model import MLP, Attention, RMSNorm
from .qlinear import MAX_VNNI_ROWS, QuantLinear


class FastRMSNorm(RMSNorm):
    def refresh(self):
        """Recompute the fused weight; call after changing `weight` (the fast path is for inference)."""
        self.register_buffer("weight1", (1.0 + self.weight.detach().float()), persistent=False)

    def forward(self, x):
        ops = kernels.ops()
        if ops is None or x.dtype != torch.float32:
            return super().forward(x)
        return ops.rms_norm(x, self.weight1, self.eps)


class FastAttention(Attention):
    def forward(self, x, cos, sin, positions, layer_cache, groups=None):
        ops = kernels.ops()
        b, t, _ = x.shape
        caches = layer_cache if isinstance(layer_cache, list) else [layer_cache]
        if (ops is None or t != 1 or groups is not None or x.dtype != torch.float32
                or not all(isinstance(c, (RingKV, LinearKV)) for c in caches)):
            return super().forward(x, cos, sin, positions, layer_cache, groups)
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if b <= MAX_VNNI_ROWS and all(kernel_ready(p) for p in projections):  # one activation quantization
            weights = [p.weight_for(b) for p in projections]
            q, k, v = ops.qmatmul_many(x.view(b, -1), [w for w, _ in weights], [t for _, t in weights],
                                       [p.out_features for p in projections])
        else:
            q, k, v = (p(x) for p in projections)
        q = q.view(b, self.n_heads, self.head_dim)
        k = k.view(b, self.n_kv, self.head_dim)
        # cos/sin: [1, D] for one position shared by every row, [B, 1, 1, D] for one per sequence.
        q, k = ops.qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, cos.reshape(-1, self.head_dim),
                                sin.reshape(-1, self.head_dim), self.q_norm.eps)
        if isinstance(layer_cache, list):
            out = self._attend_each(ops, q, k, v.view(b, self.n_kv, self.head_dim), positions, layer_cache)
        else:
            out = self._attend_shared(ops, q, k.view(b, self.n_kv, 1, self.head_dim),
                                      v.view(b, self.n_kv, 1, self.head_dim), positions, layer_cache)
        return self.o_proj(out.view(b, 1, self.n_heads * self.head_dim))

    def _attend_shared(self, ops, q, k, v, positions, layer_cache):
        """Every row at the same position in one cache (generate with a batch of prompts)."""
        if isinstance(layer_cache, RingKV):
            slot = positions % layer_cache.window
            layer_cache.k.write(slot, k)
            layer_cache.v.write(slot, v)
            layer_cache.pos.index_copy_(0, slot, positions)
            key_pos = layer_cache.pos
        else:
            layer_cache.append(k, v)
            key_pos = torch.arange(layer_cache.length)
        # The kernel reads the cache in its storage dtype (fp32, bf16, or int8 with its scales).
        ks, vs = layer_cache.k, layer_cache.v
        return ops.decode_attention(q, ks.data, vs.data, key_pos, int(positions[0]), self.window or 0, self.scale,
                                    ks.scale, vs.scale)

    def _attend_each(self, ops, q, k, v, positions, caches):
        """Row i of the batch owns caches[i] (continuous batching): one kernel call stores every
        row's key and value in its own cache and attends over it."""
        pos = positions.view(-1).tolist()
        ring = isinstance(caches[0], RingKV)
        if ring:
            slots = [p % c.window for p, c in zip(pos, caches)]
        else:
            for c in caches:
                c.reserve(c.length + 1)
            slots = [c.length for c in caches]
        int8 = caches[0].k.scale is not None
        out = ops.decode_attention_list(
            q, k, v, [c.k.data for c in caches], [c.v.data for c in caches],
            [c.k.scale for c in caches] if int8 else [], [c.v.scale for c in caches] if int8 else [],
            [c.pos for c in caches] if ring else [], slots, pos, self.window or 0, self.scale)
        if not ring:
            for c in caches:
                c.length += 1
        return out


class FastMLP(MLP):
    def forward(self, x):
        layers = (self.gate_proj, self.up_proj, self.down_proj)
        rows = x.numel() // x.shape[-1]
        if rows > MAX_VNNI_ROWS or x.dtype != torch.float32 or not all(kernel_ready(p) for p in layers):
            return super().forward(x)
        g, u, d = layers
        y = kernels.ops().mlp(x.reshape(rows, -1), *g.weight_for(rows), *u.weight_for(rows), *d.weight_for(rows),
                              g.out_features, d.out_features)
        return y.view(*x.shape[:-1], d.out_features)


def kernel_ready(module: nn.Module) -> bool:
    return isinstance(module, QuantLinear) and module.ggml_type in kernels.TYPES and kernels.ops() is not None


def make_fast(model: nn.Module) -> nn.Module:
    """Swap RMSNorm, Attention and MLP modules of `model` (in place) for their fast subclasses."""
    swaps = {RMSNorm: FastRMSNorm, Attention: FastAttention, MLP: FastMLP}
    for module in model.modules():
        fast = swaps.get(type(module))
        if fast is not None:
            module.__class__ = fast  # same parameters and submodules, another forward
            if fast is FastRMSNorm:
                module.refresh()
    return model
