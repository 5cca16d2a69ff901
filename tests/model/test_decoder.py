"""The decoder against transformers' Gemma3ForCausalLM, and the cached paths against full recompute."""

import pytest
import torch

from tests.helpers.hf_reference import hf_model
from tests.helpers.models import random_model, tiny_config

# Every preset's shape features on a tiny scale: GQA ratios 1/2/4 (270M/1B have 4:1, 27B 2:1),
# the 27B query scale, ×8 RoPE scaling, and odd local:global ratios.
CONFIGS = {
    "gqa4-5to1": dict(heads=4, kv_heads=1),
    "gqa2-27b-qscale": dict(heads=8, kv_heads=4, head_dim=16, hidden=96, qscalar=12),
    "mha-rope-x8": dict(heads=4, kv_heads=4, rope_scale=8.0, window=16),
    "ratio-3to1": dict(layers=8, local_per_global=3),
    "ratio-7to1": dict(layers=9, local_per_global=7, window=12),
    "ratio-1to1": dict(layers=4, local_per_global=1),
    "global-only": dict(layers=3, local_per_global=None),
    "window-96": dict(window=96),  # prefill chunks of 96 >= BAND_MIN: the CPU band-attention path
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name):
    cfg = tiny_config(**CONFIGS[name])
    model = random_model(cfg, seed=1)
    ref = hf_model(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 3 * cfg.sliding_window + 11))
    with torch.no_grad():
        ours, theirs = model(ids), ref(ids).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_27b_style_query_scale_matters():
    """Guards the parity test: a wrong query scale must be visible in the logits."""
    cfg = tiny_config(qscalar=12)
    model = random_model(cfg)
    other = random_model(cfg.replace(query_pre_attn_scalar=16))
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        assert (model(ids) - other(ids)).abs().max() > 1e-3


@pytest.mark.parametrize("chunk", [1, 3, 8, 13, 1000])
def test_chunked_prefill_is_chunk_size_invariant(tiny, chunk):
    ids = torch.randint(0, tiny.config.vocab_size, (1, 50))
    with torch.no_grad():
        expected = tiny(ids)
        tiny.chunk_size = chunk
        got = tiny(ids)
    assert (got - expected).abs().max().item() <= 1e-5


def test_cached_decoding_equals_full_recompute(tiny):
    """Token-by-token decoding after a prefill, at positions before, at and far past the window."""
    window = tiny.config.sliding_window
    ids = torch.randint(0, tiny.config.vocab_size, (2, 6 * window))
    prefill = window // 2
    with torch.no_grad():
        full = tiny(ids)
        cache = tiny.new_cache(batch_size=2, max_len=ids.shape[1])
        steps = [tiny(ids[:, :prefill], cache)[:, -1]]
        for t in range(prefill, ids.shape[1] - 1):
            steps.append(tiny(ids[:, t : t + 1], cache)[:, -1])
    cached = torch.stack(steps, dim=1)
    assert (cached - full[:, prefill - 1 : -1]).abs().max().item() <= 1e-4


def test_cache_allocation_is_window_sized_for_local_layers(tiny):
    cfg = tiny.config
    cache = tiny.new_cache(max_len=4000)
    with torch.no_grad():
        tiny(torch.randint(0, cfg.vocab_size, (1, 40)), cache)
    per_slot = 2 * cfg.num_kv_heads * cfg.head_dim * 4  # K and V, fp32
    for layer, kind in zip(cache.layers, cfg.layer_types):
        slots = layer.size
        if kind == "local":
            assert slots == cfg.sliding_window
        else:
            assert 40 <= slots < 4000  # grows with use, not reserved up front
    slots = sum(layer.size for layer in cache.layers)
    assert cache.nbytes() == slots * per_slot


def test_context_overflow_is_a_clear_error(tiny):
    cache = tiny.new_cache(max_len=10)
    with pytest.raises(ValueError, match="context overflow"):
        tiny(torch.zeros(1, 11, dtype=torch.long), cache)


def test_bf16_close_to_fp32(tiny):
    ids = torch.randint(0, tiny.config.vocab_size, (1, 30))
    bf = random_model(tiny.config, dtype=torch.bfloat16)
    with torch.no_grad():
        a, b = tiny(ids), bf(ids).float()
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_training_path_equals_cached_path_and_has_gradients(tiny):
    ids = torch.randint(0, tiny.config.vocab_size, (2, 37))
    with torch.no_grad():
        expected = tiny(ids)
    hidden = tiny.hidden_states(ids, checkpoint=True)
    logits = tiny.logits(hidden)
    assert (logits - expected).abs().max().item() <= 1e-5
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tiny.parameters())


def test_batched_decode_of_sequences_at_different_positions(tiny):
    """decode() over independent caches equals decoding each sequence alone."""
    lengths = [3, 11, 29, 8]
    prompts = [torch.randint(0, tiny.config.vocab_size, (1, n)) for n in lengths]
    nxt = torch.randint(0, tiny.config.vocab_size, (len(lengths),))
    with torch.no_grad():
        caches = [tiny.new_cache(max_len=64) for _ in lengths]
        for p, c in zip(prompts, caches):
            tiny(p, c)
        batched = tiny.decode(nxt, caches)
        alone = torch.cat([tiny(torch.cat([p, nxt[i:i + 1, None]], 1))[:, -1] for i, p in enumerate(prompts)])
    assert [c.pos for c in caches] == [n + 1 for n in lengths]
    assert (batched - alone).abs().max().item() <= 1e-5


def _ring_positions(window: int, s: int) -> torch.Tensor:
    """A local layer's ring after positions 0..s-1 were stored (slot = position mod W, -1 empty)."""
    ring = torch.full((window,), -1)
    for p in range(max(0, s - window), s):
        ring[p % window] = p
    return ring


@pytest.mark.parametrize("window", [None, 96])
@pytest.mark.parametrize("start,length", [(0, 64), (0, 200), (96, 96), (192, 96), (100, 64), (10, 70), (3, 80),
                                          (150, 90)])
def test_band_attention_equals_the_masked_path(window, start, length):
    """Query blocks over position-ordered keys (a global layer's 0..s-1; a ring full, wrapped at any
    slot, or partly filled) give the masked path's attention."""
    from gemma3.model import decoder

    attn = decoder.Attention(tiny_config(heads=4, kv_heads=2, head_dim=8, hidden=32, window=window or 16),
                             is_global=window is None)
    positions = torch.arange(start, start + length)
    before = torch.arange(start) if window is None else _ring_positions(window, start)
    k_pos = torch.cat([before, positions])
    q = torch.randn(1, 4, length, 8)
    k, v = torch.randn(2, 1, 2, k_pos.shape[0], 8).unbind(0)
    assert decoder.in_position_order(k, v, k_pos, positions, attn.window) is not None
    got = attn.attend(q, k, v, k_pos, positions, None)
    allowed = (k_pos[None, :] <= positions[:, None]) & (k_pos[None, :] >= 0)
    if window is not None:
        allowed &= k_pos[None, :] > positions[:, None] - window
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=allowed, scale=attn.scale)
    assert (got - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_in_place_halves_give_the_rotate_half_formula_bit_for_bit(dtype):
    """apply_rope skips building rotate_half(x) = [-x2, x1]; its products and sums round the same."""
    from gemma3.model.decoder import apply_rope

    x = torch.randn(2, 7, 4, 64, dtype=dtype).transpose(1, 2)  # the attention's layout: a transposed view
    angle = torch.randn(7, 32)
    cos, sin = (torch.cat([f(angle)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    want = x * cos + torch.cat([-x[..., 32:], x[..., :32]], dim=-1) * sin
    assert torch.equal(apply_rope(x, cos, sin), want)


def test_band_masks_cached_under_inference_mode_serve_training():
    """A band mask first built in an inference_mode forward (cached) is reused by a forward that
    autograd records: it must not be an inference tensor."""
    model = random_model(tiny_config(layers=2, window=128), seed=0)
    ids = torch.randint(0, 100, (1, 80))  # one chunk of >= BAND_MIN tokens: the band attention path
    with torch.inference_mode():
        model(ids)
    model(ids).float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
