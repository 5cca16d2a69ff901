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
  directly (int8 scales applied per row inside the kernel). Prefill chunks and images take
  model.py's path unchanged.

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
        if (ops is None or t != 1 or groups is not None or x.dtype != torch.float32
                or not isinstance(layer_cache, (RingKV, LinearKV))):
            return super().forward(x, cos, sin, positions, layer_cache, groups)
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if all(kernel_ready(p) for p in projections):  # one activation quantization for all three
            q, k, v = ops.qmatmul_many(x.view(b, -1), [p.blocks for p in projections],
                                       [p.ggml_type for p in projections], [p.out_features for p in projections])
        else:
            q, k, v = (p(x) for p in projections)
        q = q.view(b, self.n_heads, self.head_dim)
        k = k.view(b, self.n_kv, self.head_dim)
        v = v.view(b, self.n_kv, 1, self.head_dim)
        q, k = ops.qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, cos[0], sin[0], self.q_norm.eps)
        k = k.view(b, self.n_kv, 1, self.head_dim)
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
        out = ops.decode_attention(q, ks.data, vs.data, key_pos, int(positions[0]), self.window or 0, self.scale,
                                   ks.scale, vs.scale)
        return self.o_proj(out.view(b, 1, self.n_heads * self.head_dim))


class FastMLP(MLP):
    def forward(self, x):
        layers = (self.gate_proj, self.up_proj, self.down_proj)
        rows = x.numel() // x.shape[-1]
        if rows > MAX_VNNI_ROWS or x.dtype != torch.float32 or not all(kernel_ready(p) for p in layers):
            return super().forward(x)
        g, u, d = layers
        y = kernels.ops().mlp(x.reshape(rows, -1), g.blocks, g.ggml_type, u.blocks, u.ggml_type, d.blocks,
                              d.ggml_type, g.out_features, d.out_features)
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
