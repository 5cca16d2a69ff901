"""Per-token overhead cuts for decoding, applied as a module swap on top of linear.py.

A decode step of the 270M model moves ~250 MB of weights (~5 ms at memory speed), while the plain
decoder step (model/decoder.py) issues ~100 small PyTorch ops per layer (~5-10 µs each): Python
and dispatch, not arithmetic, would dominate. These subclasses keep the decoder's structure and
parameters and only replace the op-heavy parts of a one-token step:

- `FastRMSNorm`: one kernel call instead of eight ops;
- `FastMLP`: gate, up, GELU, down in one kernel call (the activations quantized once per input);
- `FastAttention`: for one query token per row, q/k/v in one kernel call, QK-norm + RoPE in one,
  the new key/value stored in its cache slot first (a ring slot can be overwritten before
  attending: the key it evicts is exactly one window behind, invisible to this query), and
  attention over the cache in one kernel call (no key concatenation, no mask tensor), reading
  fp32, bf16 or int8 storage directly. A continuous batch, whose rows each own a cache, takes one
  call per layer for all of them. Prefill chunks and images take the decoder's path unchanged;
- `FastBlock`: where every row owns its cache (batch-1 generate, the server's continuous batch),
  the whole layer (the above, o_proj and the residuals) in one kernel call (ops.DecodeLayer): ~20
  fewer Python calls per layer, which took ~3 of a 17 ms step on the 270M model;
- `FastGemma3`: a batch-1 step runs all layers in one kernel call holding the cache's tensors
  (ops.DecodeStack; another ~0.5 ms of a ~12.5 ms step), and greedy decoding takes the argmax
  inside its LM head.

The fused kernels read the modules' own tensors (weights, norms), so in-place weight changes
reach them. They run a layer as one call, so they cannot run module forward hooks: building one
over a module with a hook is an error (hooks belong on the torch backend, as tensor parallelism's).
Tests compare every swapped module with the original (tests/cpu/).
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.adapters import with_delta
from ..model.cache import KVCache
from ..model.decoder import MLP, Attention, Block, Gemma3, KVRows, RMSNorm, rope_cos_sin
from . import kernels
from .linear import MAX_VNNI_ROWS, GGMLLinear

ROPE_BLOCK = 64  # positions per RoPE table of the one-call step (FastGemma3._rope_at)


class FastRMSNorm(RMSNorm):
    def forward(self, x):
        ops = kernels.ops()
        if ops is None or x.dtype != torch.float32:
            return super().forward(x)
        return ops.rms_norm(x, self.weight, self.eps)


def _one_token_per_row(x, kv: list[KVRows], groups) -> bool:
    """A decode step whose rows each own a cache (a one-row batch owns its cache too)."""
    b, t, _ = x.shape
    return (t == 1 and groups is None and x.dtype == torch.float32 and len(kv) == b
            and all(part.cache is not None for part in kv))


class FastAttention(Attention):
    def forward(self, x, cos, sin, kv: list[KVRows], groups=None):
        ops = kernels.ops()
        b, t, _ = x.shape
        per_row = _one_token_per_row(x, kv, groups)
        shared = t == 1 and groups is None and len(kv) == 1 and kv[0].cache is not None and x.dtype == torch.float32
        if ops is None or not (per_row or shared):
            return super().forward(x, cos, sin, kv, groups)
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if b <= MAX_VNNI_ROWS and all(kernel_ready(p) for p in projections):  # one activation quantization
            weights = [p.weight_for(b) for p in projections]
            x2 = x.view(b, -1)
            q, k, v = ops.qmatmul_many(x2, [w for w, _ in weights], [t for _, t in weights],
                                       [p.out_features for p in projections])
            q, k, v = (with_delta(p, x2, y) for p, y in zip(projections, (q, k, v)))  # LoRA adapters, if any
        else:
            q, k, v = (p(x) for p in projections)
        q = q.view(b, self.n_heads, self.head_dim)
        k = k.view(b, self.n_kv, self.head_dim)
        # cos/sin: [1, D] for one position shared by every row, [B, 1, 1, D] for one per sequence.
        q, k = ops.qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, cos.reshape(-1, self.head_dim),
                                sin.reshape(-1, self.head_dim), self.q_norm.eps)
        v = v.view(b, self.n_kv, self.head_dim)
        if per_row:
            out = ops.decode_attention_list(q, k, v, *cache_args(kv), self.window or 0, self.scale)
            for part in kv:
                part.cache.commit()
        else:
            out = self._attend_shared(ops, q, k, v, kv[0])
        return self.o_proj(out.view(b, 1, self.n_heads * self.head_dim))

    def _attend_shared(self, ops, q, k, v, part: KVRows):
        """Every row at the same position in one cache (generate with a batch of prompts)."""
        b = q.shape[0]
        part.cache.store(k.view(b, self.n_kv, 1, self.head_dim), v.view(b, self.n_kv, 1, self.head_dim),
                         part.positions)
        view = part.cache.view()  # read in its storage dtype (fp32, bf16, or int8 with its scales)
        return ops.decode_attention(q, view.keys, view.values, part.cache.key_positions(), int(part.positions[0]),
                                    self.window or 0, self.scale, view.k_scale, view.v_scale)


def cache_args(kv: list[KVRows]) -> tuple:
    """decode_attention_list's cache arguments for one new token per row: storage, int8 scales,
    ring slot positions, the slot each new key/value goes to, and its position. The kernel stores
    the token through these views; the caller then commits it to each cache."""
    positions = [int(part.positions) for part in kv]
    slots = [part.cache.next_slot(p) for part, p in zip(kv, positions)]
    views = [part.cache.view() for part in kv]
    int8 = views[0].k_scale is not None
    ring = views[0].ring_positions is not None
    return ([w.keys for w in views], [w.values for w in views],
            [w.k_scale for w in views] if int8 else [], [w.v_scale for w in views] if int8 else [],
            [w.ring_positions for w in views] if ring else [], slots, positions)


class FastBlock(Block):
    """A decode step's whole layer in one kernel call (ops.DecodeLayer: norms, q/k/v, QK-norm and
    RoPE, attention with the cache write, o_proj, MLP, residuals) when every row has its own
    cache (a batch-1 generate, or a continuous batch) and every projection has a kernel.
    Anything else goes through the swapped submodules."""

    def forward(self, x, cos, sin, kv: list[KVRows], groups=None):
        b, _, d = x.shape
        fused = self.fused() if _one_token_per_row(x, kv, groups) and b <= MAX_VNNI_ROWS else None
        if fused is None:
            return super().forward(x, cos, sin, kv, groups)
        D = self.self_attn.head_dim
        bank = self.__dict__.get("adapters")  # LoRA: each row's adapter slot (model/adapters.py)
        y = fused.forward(x.view(b, d), cos.reshape(-1, D), sin.reshape(-1, D), *cache_args(kv),
                          bank.row_slots(b) if bank is not None else [])
        for part in kv:
            part.cache.commit()
        return y.view(b, 1, d)

    def fused(self):
        """The layer's ops.DecodeLayer, built on first use (None where a projection has no
        kernel). It holds the module's tensors, so in-place weight updates reach it."""
        if "_fused" not in self.__dict__:
            self.__dict__["_fused"] = _decode_layer(self)
        return self.__dict__["_fused"]


class FastGemma3(Gemma3):
    """A batch-1 decode step (one token, one sequence, a KVCache of its own) is one kernel call
    (ops.DecodeStack, kept with the cache as its backend state): embedding, every layer, final
    norm and LM head. Per-layer calls cost ~25 us each in Python and argument conversion, and the
    Python around the layers another ~0.3 ms of a ~9.5 ms step on the 270M model. Everything else
    goes through the decoder's loop over the (fast) blocks."""

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

    def decode(self, tokens, caches, counts=None):
        """Gemma3.decode; one sequence (a server serving one request) takes the one-call step. A
        step with verify rows (`counts`) runs in groups of whole sequences of at most
        MAX_VNNI_ROWS rows: only there do the fused layers compute every row as a one-row step
        does (more rows take the GEMM kernels, which round differently)."""
        if counts is not None and sum(counts) > MAX_VNNI_ROWS:
            return torch.cat([super(FastGemma3, self).decode(tokens[start:start + sum(c)], caches[i:i + len(c)], c)
                              for i, start, c in _groups(counts, MAX_VNNI_ROWS)])
        stack = self._one_call(tokens.view(1, 1), caches[0]) if len(caches) == 1 and tokens.numel() == 1 else None
        if stack is None:
            return super().decode(tokens, caches, counts)
        return self._step(stack.step, tokens, caches[0], True)

    def greedy_next(self, input_ids, cache):
        """The argmax of a one-call step is taken inside the LM head, chunk by chunk as its logits
        are written (scanning them afterwards, out of the caches, cost ~0.14 ms of a ~8.5 ms step);
        other steps scan their logits with the argmax kernel."""
        stack = self._one_call(input_ids, cache)
        if stack is not None:
            return torch.tensor([self._step(stack.next_token, input_ids, cache)])
        logits, ops = self(input_ids, cache, last_only=True)[:, -1], kernels.ops()
        return ops.argmax_rows(logits) if ops is not None and logits.dtype == torch.float32 else logits.max(-1).indices

    def decode_stack(self, cache: KVCache):
        """The one-call step held with `cache` (None where its steps are not one call)."""
        return cache.backend_state(self)

    def _one_call(self, input_ids, cache, embeds=None, groups=None):
        """The DecodeStack for this call where it is a one-call step (room for the token reserved
        first: a global layer's buffer that grows means a new stack), else None."""
        if (cache is None or input_ids.shape != (1, 1) or embeds is not None or groups is not None
                or cache.pos >= cache.max_len):
            return None
        cache.reserve_token()
        return cache.backend_state(self, self._build_stack)

    def _step(self, run, input_ids, cache: KVCache, *extra):
        """run(token, RoPE rows, pos, *extra): a DecodeStack method; then the cache holds the token."""
        out = run(int(input_ids.reshape(())), *self._rope_at(cache.pos), cache.pos, *extra)
        cache.commit()
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

    def _build_stack(self, cache: KVCache):
        """The DecodeStack over `cache`'s storage, or None where the step cannot run in one call."""
        views = [layer.view() for layer in cache.layers]
        table = self.embed_tokens
        if (self.dtype != torch.float32 or views[0].keys.shape[0] != 1 or not kernel_ready(table)
                or not isinstance(self.norm, FastRMSNorm)):
            return None
        layers = [layer.fused() for layer in self.layers]
        if None in layers:
            return None
        refuse_hooks(self, (table, self.norm))
        return kernels.ops().DecodeStack(
            layers, [w.keys for w in views], [w.values for w in views], [w.k_scale for w in views],
            [w.v_scale for w in views], [w.ring_positions for w in views],
            [layer.window if w.ring_positions is not None else 0 for layer, w in zip(cache.layers, views)],
            qweight(table), self.embed_scale().item(), self.norm.weight, self.norm.eps,
            bank.slot_of(cache) if (bank := self.__dict__.get("adapters")) is not None else -1)


def _groups(counts: list[int], limit: int):
    """(first sequence, first row, counts) of consecutive sequences whose rows add up to at most
    `limit` (a sequence with more rows alone)."""
    group, first, row = [], 0, 0
    for i, n in enumerate(counts):
        if group and sum(group) + n > limit:
            yield first, row, group
            first, row, group = i, row + sum(group), []
        group.append(n)
    yield first, row, group


def refuse_hooks(model: nn.Module, modules) -> None:
    """A fused kernel runs these modules' forward in C++, where no Python hook can run."""
    names = {id(m): n for n, m in model.named_modules()}
    for m in modules:
        if m._forward_hooks or m._forward_pre_hooks:
            raise RuntimeError(f"{names.get(id(m), type(m).__name__)} has a forward hook, which the CPU backend's "
                               "fused decode step would skip: use the torch backend for hooked modules")


def qweight(p: GGMLLinear):
    return kernels.ops().QWeight(p.blocks, p.storage_type, p.out_features, p.packed, p.packed_type)


def _decode_layer(block: Block):
    ops, attn, mlp = kernels.ops(), block.self_attn, block.mlp
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if ops is None or not all(kernel_ready(p) for p in linears):
        return None
    norms = (block.input_layernorm, block.post_attention_layernorm, block.pre_feedforward_layernorm,
             block.post_feedforward_layernorm)
    refuse_hooks(block, (block, attn, mlp, attn.q_norm, attn.k_norm) + linears + norms)
    layer = ops.DecodeLayer(*(qweight(p) for p in linears), *(n.weight for n in norms), attn.q_norm.weight,
                            attn.k_norm.weight, attn.n_heads, attn.n_kv, attn.head_dim, attn.window or 0, attn.scale,
                            attn.q_norm.eps)
    for i, p in enumerate(linears):  # LoRA adapters beside the quantized projections (model/adapters.py)
        if p.__dict__.get("lora"):
            layer.set_lora(i, *p.__dict__["lora"].kernel_tensors())
    return layer


class FastMLP(MLP):
    def forward(self, x):
        layers = (self.gate_proj, self.up_proj, self.down_proj)
        rows = x.numel() // x.shape[-1]
        # The one-call MLP has no LoRA paths: adapted projections take the modules' way (one kernel
        # call each, plus their paths); the fused decode layer does add them (DecodeLayer).
        if (rows > MAX_VNNI_ROWS or x.dtype != torch.float32 or not all(kernel_ready(p) for p in layers)
                or any(p.__dict__.get("lora") for p in layers)):
            if x.dtype != torch.float32 or kernels.ops() is None:
                return super().forward(x)
            g = self.gate_proj(x).contiguous()
            kernels.ops().gelu_mul_(g, self.up_proj(x).contiguous())  # torch's gelu and mul, in one pass
            return self.down_proj(g)
        g, u, d = layers
        y = kernels.ops().mlp(x.reshape(rows, -1), *g.weight_for(rows), *u.weight_for(rows), *d.weight_for(rows),
                              g.out_features, d.out_features)
        return y.view(*x.shape[:-1], d.out_features)


def kernel_ready(module: nn.Module) -> bool:
    return isinstance(module, GGMLLinear) and module.ggml_type in kernels.TYPES and kernels.ops() is not None


def make_fast(model: nn.Module) -> nn.Module:
    """Swap the RMSNorm, Attention, MLP, Block and Gemma3 modules of `model` (in place) for their fast subclasses."""
    swaps = {RMSNorm: FastRMSNorm, Attention: FastAttention, MLP: FastMLP, Block: FastBlock, Gemma3: FastGemma3}
    for module in model.modules():
        fast = swaps.get(type(module))
        if fast is not None:
            module.__class__ = fast  # same parameters and submodules, another forward
    return model
