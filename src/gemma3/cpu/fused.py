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
  path unchanged;
- `FastBlock`: where every row owns its cache (batch-1 generate, the server's continuous batch),
  the whole layer (the above, o_proj and the residuals) in one kernel call: ~20 fewer Python
  calls per layer, which took ~3 of a 17 ms step on the 270M model;
- `FastGemma3`: a batch-1 step runs all layers in one kernel call holding the cache's tensors
  (another ~0.5 ms of a ~12.5 ms step).

Tests compare every swapped module with the original (tests/test_fast_path.py).
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from ..model.cache import LinearKV, RingKV
from ..model.decoder import MLP, Attention, Block, Gemma3, RMSNorm, rope_cos_sin
from .qlinear import MAX_VNNI_ROWS, QuantLinear

ROPE_BLOCK = 64  # positions per RoPE table of the one-call step (FastGemma3._rope_at)


class FastRMSNorm(RMSNorm):
    def refresh(self):
        """Recompute the fused weight; call after changing `weight` (the fast path is for inference).
        In place once it exists, so the FastBlock kernels that share it see the change."""
        w1 = 1.0 + self.weight.detach().float()
        if getattr(self, "weight1", None) is not None and self.weight1.shape == w1.shape:
            self.weight1.copy_(w1)
        else:
            self.register_buffer("weight1", w1, persistent=False)

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
        out = ops.decode_attention_list(q, k, v, *cache_args(caches, positions), self.window or 0, self.scale)
        advance(caches)
        return out


def cache_args(caches: list, positions: torch.Tensor) -> tuple:
    """decode_attention_list's cache arguments for one new token per cache: storage, int8 scales,
    ring slot positions, the slot each new key/value goes to, and its position."""
    pos = positions.view(-1).tolist()
    ring = isinstance(caches[0], RingKV)
    if ring:
        slots = [p % c.window for p, c in zip(pos, caches)]
    else:
        for c in caches:
            c.reserve(c.length + 1)
        slots = [c.length for c in caches]
    int8 = caches[0].k.scale is not None
    return ([c.k.data for c in caches], [c.v.data for c in caches],
            [c.k.scale for c in caches] if int8 else [], [c.v.scale for c in caches] if int8 else [],
            [c.pos for c in caches] if ring else [], slots, pos)


def advance(caches: list):
    """After the kernel stored one token in each cache: linear caches count it (ring caches
    record positions in their slots, which the kernel did)."""
    for c in caches:
        if isinstance(c, LinearKV):
            c.length += 1


class FastBlock(Block):
    """A decode step's whole layer in one kernel call (ops.DecodeLayer: norms, q/k/v, QK-norm and
    RoPE, attention with the cache write, o_proj, MLP, residuals) when every row has its own
    cache (a batch-1 generate, or a continuous batch) and every projection has a kernel.
    Anything else goes through the swapped submodules."""

    def forward(self, x, cos, sin, positions, layer_cache, groups=None):
        b, t, d = x.shape
        caches = layer_cache if isinstance(layer_cache, list) else [layer_cache] if b == 1 else None
        fused = self.fused() if t == 1 and groups is None and caches and x.dtype == torch.float32 else None
        if fused is None or b > MAX_VNNI_ROWS or not isinstance(caches[0], (RingKV, LinearKV)):
            return super().forward(x, cos, sin, positions, layer_cache, groups)
        D = self.self_attn.head_dim
        y = fused.forward(x.view(b, d), cos.reshape(-1, D), sin.reshape(-1, D), *cache_args(caches, positions))
        advance(caches)
        return y.view(b, 1, d)

    def fused(self):
        """The layer's ops.DecodeLayer, built on first use (None where a projection has no
        kernel). It shares the module's tensors, so in-place weight updates reach it."""
        if "_fused" not in self.__dict__:
            self.__dict__["_fused"] = _decode_layer(self)
        return self.__dict__["_fused"]


class FastGemma3(Gemma3):
    """A batch-1 decode step (one token, one sequence, a KVCache of its own) is one kernel call
    (ops.DecodeStack, built once per cache and kept on it): embedding, every layer, final norm and
    LM head. Per-layer calls cost ~25 us each in Python and argument conversion, and the Python
    around the layers another ~0.3 ms of a ~9.5 ms step on the 270M model. Everything else goes
    through model.py's loop over the (fast) blocks."""

    def forward(self, input_ids, cache=None, last_only=False, embeds=None, groups=None):
        stack = self._one_call(input_ids, cache, embeds, groups)
        if stack is None:
            return super().forward(input_ids, cache, last_only, embeds, groups)
        return self._step(stack.step, input_ids, cache, True).view(1, 1, -1)

    def forward_hidden(self, input_ids, cache, embeds=None, groups=None):
        stack = self._one_call(input_ids, cache, embeds, groups)
        if stack is None:
            return super().forward_hidden(input_ids, cache, embeds, groups)
        return self._step(stack.step, input_ids, cache, False).view(1, 1, -1)

    def decode(self, tokens, caches):
        """model.decode; one sequence (a server serving one request) takes the one-call step."""
        stack = self._one_call(tokens.view(1, 1), caches[0]) if len(caches) == 1 else None
        if stack is None:
            return super().decode(tokens, caches)
        return self._step(stack.step, tokens, caches[0], True)

    def fused_greedy(self, input_ids, cache) -> torch.Tensor | None:
        """The greedy next token [1] of a one-call step, its argmax taken inside the LM head (the
        logits are never returned: scanning them afterwards, out of the caches, cost ~0.14 ms of
        a ~8.5 ms step); None where the step is not one call (sampling.greedy_step)."""
        stack = self._one_call(input_ids, cache)
        return None if stack is None else torch.tensor([self._step(stack.next_token, input_ids, cache)])

    def _one_call(self, input_ids, cache, embeds=None, groups=None):
        """The cache's DecodeStack where this call is a one-call step, else None."""
        if (cache is None or input_ids.shape != (1, 1) or embeds is not None or groups is not None
                or cache.pos >= cache.max_len):
            return None
        return self._stack(cache)

    def _step(self, run, input_ids, cache, *extra):
        """run(token, RoPE rows, pos, *extra): a DecodeStack method; then the cache moves on."""
        out = run(int(input_ids.reshape(())), *self._rope_at(cache.pos), cache.pos, *extra)
        advance(cache.layers)
        cache.pos += 1
        return out

    def _rope_at(self, pos: int) -> tuple:
        """(cos, sin) of the local then the global RoPE at `pos`: rows of tables that rope_cos_sin
        computes ROPE_BLOCK positions at a time (two calls per step cost ~0.1 ms of a ~9 ms step)."""
        start = pos - pos % ROPE_BLOCK
        held = self.__dict__.get("_rope_block")
        if held is None or held[0] != start:
            positions = torch.arange(start, start + ROPE_BLOCK)
            tables = (*rope_cos_sin(positions, self.rope_local, self.dtype),
                      *rope_cos_sin(positions, self.rope_global, self.dtype))
            held = self.__dict__["_rope_block"] = (start, tables)
        return tuple(t[pos - start] for t in held[1])

    def _stack(self, cache):
        """The cache's DecodeStack, (re)built when the cache's storage changed (a global layer's
        buffer grows every GROW_CHUNK tokens); None where the step cannot run in one call."""
        linear = [c for c in cache.layers if isinstance(c, LinearKV)]
        for c in linear:
            if c.length != cache.pos:  # the stack writes position p at slot p
                return None
            c.reserve(c.length + 1)
        held = cache.__dict__.get("_decode_stack")  # (model, the K tensors it holds, stack)
        if held is not None and held[0] is self and all(a is c.k.data for a, c in zip(held[1], cache.layers)):
            return held[2]
        layers = [layer.fused() for layer in self.layers]
        table = self.embed_tokens
        if (self.dtype != torch.float32 or None in layers or cache.layers[0].k.data.shape[0] != 1
                or not all(isinstance(c, (RingKV, LinearKV)) for c in cache.layers)
                or not kernel_ready(table) or not isinstance(self.norm, FastRMSNorm)
                or table._forward_hooks or self.norm._forward_hooks):
            return None
        ops = kernels.ops()
        ring = [isinstance(c, RingKV) for c in cache.layers]
        stack = ops.DecodeStack(
            layers, [c.k.data for c in cache.layers], [c.v.data for c in cache.layers],
            [c.k.scale for c in cache.layers], [c.v.scale for c in cache.layers],
            [c.pos if r else None for c, r in zip(cache.layers, ring)],
            [c.window if r else 0 for c, r in zip(cache.layers, ring)],
            ops.QWeight(table.blocks, table.storage_type, table.out_features, table.packed, table.packed_type),
            self.embed_scale().item(), self.norm.weight1, self.norm.eps)
        cache.__dict__["_decode_stack"] = (self, [c.k.data for c in cache.layers], stack)
        return stack


def _decode_layer(block: Block):
    ops, attn, mlp = kernels.ops(), block.self_attn, block.mlp
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if ops is None or not all(kernel_ready(p) and not p._forward_hooks for p in linears):
        return None  # a hook (tensor parallelism's all-reduce) must see each projection's output
    weights = [ops.QWeight(p.blocks, p.storage_type, p.out_features, p.packed, p.packed_type) for p in linears]
    norms = (block.input_layernorm, block.post_attention_layernorm, block.pre_feedforward_layernorm,
             block.post_feedforward_layernorm)
    return ops.DecodeLayer(*weights, *(n.weight1 for n in norms), attn.q_norm.weight, attn.k_norm.weight,
                           attn.n_heads, attn.n_kv, attn.head_dim, attn.window or 0, attn.scale, attn.q_norm.eps)


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
    """Swap the RMSNorm, Attention, MLP, Block and Gemma3 modules of `model` (in place) for their fast subclasses."""
    swaps = {RMSNorm: FastRMSNorm, Attention: FastAttention, MLP: FastMLP, Block: FastBlock, Gemma3: FastGemma3}
    for module in model.modules():
        fast = swaps.get(type(module))
        if fast is not None:
            module.__class__ = fast  # same parameters and submodules, another forward
            if fast is FastRMSNorm:
                module.refresh()
    return model
