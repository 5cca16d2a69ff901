"""The Gemma 3 text decoder in plain PyTorch. Pure math: no I/O, no sampling.

Per layer: h = x + post_attn_norm(attn(pre_attn_norm(x))); out = h + post_ffw_norm(mlp(pre_ffw_norm(h))).
Every forward runs through a KV cache in chunks, so a local layer only ever scores a chunk
against (window + chunk) keys, never an L×L mask.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from .adapters import route
from .cache import KVCache, LayerKV
from .config import GLOBAL, Gemma3Config


@contextmanager
def no_init():
    """Modules built inside skip their random init: for models built on the meta device, to be
    filled from a checkpoint. Besides being useless there, nn.init on meta tensors imports
    torch._dynamo (0.5-1 s) on first use: a third of a cold load."""
    saved = {name: getattr(nn.init, name) for name in _INITS}
    for name in _INITS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


_INITS = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "zeros_", "ones_")


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: computed in float32 and scaled by (1 + w), so w is stored zero-centred."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)


def rope_inv_freq(head_dim: int, base: float, scale: float) -> torch.Tensor:
    # Linear scaling divides positions by `scale`, i.e. divides every frequency by it.
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)) / scale


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype):
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1], without building rotate_half:
    each half's product added to (subtracted from) x * cos in place. The same roundings, so the
    same bits (a + (-b) is a - b exactly), in three passes over x where the neg, cat, two products
    and sum took five (~4% of a 512-token prefill of the 270M)."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half] -= x[..., half:] * sin[..., :half]
    out[..., half:] += x[..., :half] * sin[..., half:]
    return out


class KVRows(NamedTuple):
    """How rows of the batch meet their keys in one layer: `rows` of the batch, the layer's cache
    for them (None: the chunk attends to itself alone, as in training) and their positions [t]."""

    rows: slice
    cache: LayerKV | None
    positions: torch.Tensor


class Attention(nn.Module):
    def __init__(self, cfg: Gemma3Config, is_global: bool):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.window = None if is_global else cfg.sliding_window
        self.scale = cfg.query_pre_attn_scalar ** -0.5
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, kv: list[KVRows], groups=None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        outs = []
        for part in kv:
            r = part.rows
            keys = (k[r], v[r], part.positions) if part.cache is None else part.cache.update(k[r], v[r], part.positions)
            outs.append(self.attend(q[r], *keys, part.positions, None if groups is None else groups[r]))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def attend(self, q, k, v, k_pos, positions, groups):
        """Attention of queries at `positions` over keys at `k_pos`; mask derived from positions."""
        b, t = q.shape[0], q.shape[2]
        if groups is None and t >= BAND_MIN and q.device.type == "cpu":
            keys = in_position_order(k, v, k_pos, positions, self.window)
            if keys is not None:
                return band_attention(q, *keys, positions, self.window, self.scale)
        if groups is None and t > 1 and only_chunk(k_pos, positions):
            # A chunk with nothing before it (a fresh prompt) off the band path (another device, or
            # a short chunk): its own keys suffice, and within the window the mask is plain causal,
            # so no [t, keys] mask is built or read (2x at 512 tokens on the CPU, before the band path).
            k, v, k_pos = k[:, :, -t:], v[:, :, -t:], k_pos[-t:]
            if self.window is None or t <= self.window:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
            # Past a local layer's window: blocks of W queries over the 2W keys they can see, a
            # W x 2W band mask each instead of t x t (the first block is causal again).
            w = self.window
            return torch.cat([self.attend(q[:, :, s:s + w], k[:, :, max(0, s - w):s + w], v[:, :, max(0, s - w):s + w],
                                          k_pos[max(0, s - w):s + w], positions[s:s + w], None)
                              for s in range(0, t, w)], dim=2)
        allowed = (k_pos[None, :] <= positions[:, None]) & (k_pos[None, :] >= 0)
        if groups is not None:
            allowed = allowed | same_image(groups, k.shape[2])
        if self.window is not None:
            # After the image OR, as transformers composes local layers: window AND (causal OR same
            # image). A soft token sees every later token of its image but no key W or more behind.
            allowed = allowed & (k_pos[None, :] > positions[:, None] - self.window)
        # Fold the query heads of each KV group into the query length: one SDPA call per KV head
        # instead of materialising repeated keys (GQA without repeat_kv).
        group = self.n_heads // self.n_kv
        q = q.reshape(b, self.n_kv, group * t, self.head_dim)
        mask = allowed.repeat(*[1] * (allowed.dim() - 2), group, 1)  # row g*t + i is query i of head g
        if mask.dim() == 3:
            mask = mask[:, None]  # per-batch-row masks (images) broadcast over KV heads
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return out.reshape(b, self.n_heads, t, self.head_dim)


BAND_MIN = 64  # a prefill chunk at least this long attends in query blocks (below: one masked call)
# Up to this many keys, a query block's band takes one masked call: at 512 tokens (2 threads, 4
# heads of 256) 5.1 ms per layer where causal + prefix calls and their merge took 6.2-6.8; a global
# layer's 2048-token prefill 71.5 against 70 ms with the merge.
MERGE_SPAN = 1024


def in_position_order(k, v, k_pos, positions, window):
    """(keys, values, first key's position) holding every key the chunk at `positions` can see,
    contiguous in position order, when the cache's keys allow it (a prefill leaves them so: a
    global layer holds 0..s-1, a ring the last W positions in slot order); else None."""
    t, s = positions.shape[0], int(positions[0])
    if not torch.equal(k_pos[-t:], positions.to(k_pos.dtype)):
        return None
    before = k_pos[:-t]
    held = (before >= 0).nonzero().squeeze(1)
    held = held[before[held].argsort()]
    first = s - held.shape[0]
    if first > (0 if window is None else max(0, s - window + 1)):
        return None  # keys the first query needs are missing
    if not torch.equal(before[held], torch.arange(first, s, device=k_pos.device, dtype=k_pos.dtype)):
        return None
    if held.shape[0] == before.shape[0] and (held.shape[0] == 0 or bool((held[1:] > held[:-1]).all())):
        return k, v, first  # already in order (a global layer, a fresh chunk)
    return (torch.cat([k.index_select(2, held), k[:, :, -t:]], 2),
            torch.cat([v.index_select(2, held), v[:, :, -t:]], 2), first)


def band_attention(q, k, v, first: int, positions, window, scale, block: int = 64):
    """Attention of a chunk whose every query sees a contiguous band of the position-ordered keys
    (causal, and within the window on local layers), `block` queries at a time over only the keys
    their band spans: the work is t x (band + block), not t x all keys, and the mask per call is a
    [block, span] edge instead of [t, keys]. GQA on the kernel's own head mapping (no repeat).
    A block's span of at most MERGE_SPAN keys takes one masked call; a longer one (a global layer
    far into a long prompt) its own keys causally and the keys before them unmasked, merged by
    their log-sum-exp (the two calls and the merge cost less than a mask over the whole span)."""
    t, s = positions.shape[0], int(positions[0])
    width = s + t if window is None else window  # keys a query sees, itself included

    def lo(i):  # index of the first key query i sees
        return max(0, s + i - width + 1 - first)

    outs = []
    for i0 in range(0, t, block):
        i1 = min(t, i0 + block)
        rows, k0, k1 = i1 - i0, lo(i0), s + i1 - first  # keys k0..k1-1, the last `rows` the block's own
        qb = q[:, :, i0:i1]
        if lo(i1 - 1) == k0 and k1 - k0 > MERGE_SPAN:
            # No key leaves the window within the block, and many keys before it: its own keys
            # causally (the kernel's top-left causal mask is exactly that), every key before them
            # for every row, both without a mask, merged by their log-sum-exp.
            part = flash(qb, k[:, :, k1 - rows:k1], v[:, :, k1 - rows:k1], None, scale, causal=True)
            part = merged(part, flash(qb, k[:, :, k0:k1 - rows], v[:, :, k0:k1 - rows], None, scale))
        else:
            # Key c of the span is hidden from row r when c - r leaves [low, high]; c - r >= -rows
            # always holds, so a lower bound below it is none (one cached mask for all such blocks).
            high = s - first - k0 + i0
            low = max(high - width + 1, -rows)
            part = flash(qb, k[:, :, k0:k1], v[:, :, k0:k1], band_mask(rows, k1 - k0, low, high, q.dtype, q.device), scale)
        outs.append(part[0])
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


@functools.lru_cache(maxsize=32)
def band_mask(rows: int, span: int, low: int, high: int, dtype, device) -> torch.Tensor:
    """[rows, span] additive mask, 0 where low <= c - r <= high. Cached: every full block of a
    chunk, and every layer, asks for the same one (span <= MERGE_SPAN: at most 256 kB each)."""
    # A normal tensor even when first asked for under inference_mode: the cached mask may next serve
    # a forward that autograd records (training), which cannot save an inference tensor.
    with torch.inference_mode(False):
        d = torch.arange(span, device=device)[None, :] - torch.arange(rows, device=device)[:, None]
        return torch.zeros(rows, span, dtype=dtype, device=device).masked_fill_((d < low) | (d > high), float("-inf"))


def flash(q, k, v, mask, scale: float, causal: bool = False):
    """(output, log-sum-exp per query) from the CPU flash-attention kernel, called directly: the
    public SDPA entry would expand k/v to every query head for a float mask, and hides the LSE."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask,
                                                                      scale=scale)


def merged(a, b):
    """(output, LSE) of attention over the union of two disjoint key sets, from each one's."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a.float() * (lse_a - lse).exp().unsqueeze(-1) + out_b.float() * (lse_b - lse).exp().unsqueeze(-1)
    return out.to(out_a.dtype), lse


def only_chunk(k_pos: torch.Tensor, positions: torch.Tensor) -> bool:
    """True when the keys are the queries' own chunk (the last len(positions) keys, at the same
    positions) and every earlier key slot is empty (position < 0, as a fresh ring holds)."""
    t = positions.shape[0]
    return (k_pos.shape[0] >= t and torch.equal(k_pos[-t:], positions.to(k_pos.dtype))
            and bool((k_pos[:-t] < 0).all()))


def same_image(groups: torch.Tensor, n_keys: int) -> torch.Tensor:
    """[batch, chunk, keys] True where a query and a key are soft tokens of the same image.

    Image soft tokens attend bidirectionally within their image. `groups` [batch, chunk]
    holds an image index per token (-1 for text); a whole image always lies inside one chunk, so
    only the chunk's own keys (the last `chunk` keys) can share a query's image.
    """
    b, t = groups.shape
    key_groups = torch.cat([groups.new_full((b, n_keys - t), -1), groups], dim=1)
    return (groups[:, :, None] == key_groups[:, None, :]) & (groups[:, :, None] >= 0)


class MLP(nn.Module):
    def __init__(self, cfg: Gemma3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: Gemma3Config, is_global: bool):
        super().__init__()
        self.is_global = is_global
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, is_global)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, kv: list[KVRows], groups=None):
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, kv, groups))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class TiedEmbedding(nn.Embedding):
    """Token embedding that is also the LM head (Gemma ties them). Quantized replacements
    (quant/apply.py) implement the same two calls: lookup (`forward`) and `attend`."""

    def attend(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.weight.T


class Gemma3(nn.Module):
    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.config = config
        self.embed_tokens = TiedEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, t == GLOBAL) for t in config.layer_types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.chunk_size = config.sliding_window  # prefill chunk; bounds attention work per step

    @property
    def rope_local(self):
        return self._inv_freq(self.config.rope_local_base, 1.0)

    @property
    def rope_global(self):
        # Only global layers are scaled for long context; local layers never see far positions.
        return self._inv_freq(self.config.rope_global_base, self.config.rope_global_scale)

    def _inv_freq(self, base: float, scale: float) -> torch.Tensor:
        # Kept per (base, scale, device): rebuilding it took ~15 of a decode step's Python microseconds.
        cached = self.__dict__.setdefault("_inv_freqs", {})
        key = (self.config.head_dim, base, scale, self.device)
        if key not in cached:
            cached[key] = rope_inv_freq(self.config.head_dim, base, scale).to(self.device)
        return cached[key]

    @property
    def dtype(self):
        return self.norm.weight.dtype  # not the embedding's: a quantized one (quant/) holds packed bytes

    @property
    def device(self):
        return self.norm.weight.device

    def new_cache(self, batch_size: int = 1, max_len: int | None = None, kv_dtype=None,
                  adapter: int | None = None) -> KVCache:
        """`kv_dtype`: "fp32" | "bf16" | "int8" storage (default: the model's dtype); `adapter`: the
        LoRA adapter slot its rows use (model/adapters.py; None: the default one, if any)."""
        cache = KVCache.empty(self.config, batch_size, max_len, dtype=self.dtype, device=self.device,
                              kv_dtype=kv_dtype)
        cache.use_adapter(adapter)
        return cache

    def embed_scale(self) -> torch.Tensor:
        # The sqrt(d_model) factor is rounded to the activation dtype first, as the reference does.
        return torch.tensor(math.sqrt(self.config.hidden_size), dtype=self.dtype)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids) * self.embed_scale()

    def chunks(self, length: int, groups: torch.Tensor | None):
        """Prefill chunk boundaries; a chunk is extended rather than cut through an image."""
        start = 0
        while start < length:
            end = min(start + self.chunk_size, length)
            if groups is not None:
                while end < length and bool(((groups[:, end] >= 0) & (groups[:, end] == groups[:, end - 1])).any()):
                    end += 1
            yield start, end
            start = end

    def rope(self, positions: torch.Tensor) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) for local (False) and global (True) layers: [t, D] for positions [t] shared by
        every row, [B, 1, 1, D] for one position per row ([B, 1])."""
        def table(inv_freq):
            cos, sin = rope_cos_sin(positions.reshape(-1), inv_freq, self.dtype)
            return (cos, sin) if positions.dim() == 1 else (cos[:, None, None], sin[:, None, None])

        return {False: table(self.rope_local), True: table(self.rope_global)}

    def run_layers(self, x: torch.Tensor, rope: dict, kv: Callable[[int], list[KVRows]],
                   groups: torch.Tensor | None = None, checkpoint: bool = False) -> torch.Tensor:
        """The one layer loop. `kv(i)` says how layer i's attention meets its keys: through one
        cache shared by the batch (prefill), one cache per row (batched decode), or none (training:
        the sequence itself); `checkpoint` recomputes each layer in the backward pass."""
        for i, layer in enumerate(self.layers):
            cos, sin = rope[layer.is_global]
            if checkpoint:
                x = activation_checkpoint(layer, x, cos, sin, kv(i), groups, use_reentrant=False)
            else:
                x = layer(x, cos, sin, kv(i), groups)
        return x

    def forward_hidden(self, input_ids: torch.Tensor, cache: KVCache, embeds: torch.Tensor | None = None,
                       groups: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states for `input_ids` [batch, seq] appended after `cache.pos` tokens,
        in chunks. `embeds` [batch, seq, d_model] replaces the token embeddings (image features
        spliced in); `groups` [batch, seq] gives each image soft token its image index (-1 elsewhere)."""
        outs = []
        route(self, [cache])
        for start, end in self.chunks(input_ids.shape[1], groups):
            n = end - start
            cache.check_room(n)
            positions = torch.arange(cache.pos, cache.pos + n, device=input_ids.device)
            x = self.embed(input_ids[:, start:end]) if embeds is None else embeds[:, start:end]
            g = None if groups is None else groups[:, start:end]
            x = self.run_layers(x, self.rope(positions), lambda i: [KVRows(slice(None), cache.layers[i], positions)], g)
            cache.advance(n)
            outs.append(self.norm(x))
        return torch.cat(outs, dim=1)

    def decode(self, tokens: torch.Tensor, caches: list[KVCache], counts: list[int] | None = None) -> torch.Tensor:
        """One decode step for B independent sequences: logits [B, vocab] for `tokens` [B], each
        appended to its own cache at its own position. Projections, MLPs and the LM head run
        batched (their weights are read once per step); attention runs per sequence.

        `counts` (speculative verify steps): caches[j] takes counts[j] consecutive tokens, so
        `tokens` has sum(counts) rows; each is a row of the step as a one-token step would be
        (the same logits), attention taking a sequence's rows in order, each storing its key
        before attending. Logits [sum(counts), vocab]."""
        counts = [1] * len(caches) if counts is None else counts
        for c, n in zip(caches, counts):
            c.check_room(n)
        rows = [(c, c.pos + i) for c, n in zip(caches, counts) for i in range(n)]
        positions = torch.tensor([[p] for _, p in rows], device=tokens.device)  # [rows, 1]
        route(self, [c for c, _ in rows])

        def kv(i):
            return [KVRows(slice(r, r + 1), c.layers[i], positions[r]) for r, (c, _) in enumerate(rows)]

        x = self.run_layers(self.embed(tokens[:, None]), self.rope(positions), kv)
        for c, n in zip(caches, counts):
            c.advance(n)
        return self.logits(self.norm(x))[:, 0]

    def verify(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [n, vocab] for `tokens` [n], consecutive tokens of the one sequence in `cache`
        (a speculative verify step): `decode` with the n tokens as the rows of one step."""
        return self.decode(tokens, [cache], [tokens.shape[0]])

    def hidden_states(self, input_ids: torch.Tensor, embeds: torch.Tensor | None = None,
                      groups: torch.Tensor | None = None, checkpoint: bool = False) -> torch.Tensor:
        """Training path: one pass over the whole sequence from position 0 with no KV cache, so
        autograd and activation checkpointing (`checkpoint=True`, per layer) see pure functions."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) if embeds is None else embeds
        whole = [KVRows(slice(None), None, positions)]
        route(self, [None])
        return self.norm(self.run_layers(x, self.rope(positions), lambda i: whole, groups, checkpoint))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens.attend(hidden)  # tied LM head

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = False,
                embeds: torch.Tensor | None = None, groups: torch.Tensor | None = None):
        """Logits [batch, seq, vocab]. Without a cache this is a full forward from position 0."""
        if cache is None:
            cache = self.new_cache(input_ids.shape[0], max_len=input_ids.shape[1])
        hidden = self.forward_hidden(input_ids, cache, embeds, groups)
        return self.logits(hidden[:, -1:] if last_only else hidden)

    def greedy_next(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The greedy next token [batch] after `input_ids` (argmax of the last position's logits,
        the first index on ties). A backend may take the argmax inside its step (cpu/fused.py)."""
        return self(input_ids, cache, last_only=True)[:, -1].max(-1).indices
