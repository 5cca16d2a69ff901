"""KV cache variants: ring wrap-around, int8 storage, prefix reuse across the window, RoPE past 32K."""

import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

from gemma3.inference.prefix_cache import PrefixCache
from gemma3.model.decoder import rope_cos_sin
from gemma3.model.memory import kv_bytes_planned
from tests.helpers.hf_reference import hf_config
from tests.helpers.models import random_model, tiny_config


def test_ring_wraps_around_and_keeps_the_last_window(tiny):
    window = tiny.config.sliding_window
    cache = tiny.new_cache(max_len=100)
    with torch.no_grad():
        tiny(torch.randint(0, 100, (1, 3 * window + 3)), cache)
    ring = cache.layers[tiny.config.local_layers[0]]
    assert sorted(ring.positions.tolist()) == list(range(2 * window + 3, 3 * window + 3))
    assert (ring.positions % window == torch.arange(window)).all()


def test_ring_stores_a_chunk_as_its_tokens_one_by_one():
    # A chunk of consecutive positions is stored by slice copies (split where the ring wraps);
    # single tokens by index_copy_: both must leave the same slots, in fp32 and int8 storage.
    from gemma3.model.cache import RingKV

    for dtype in (torch.float32, torch.int8):
        chunked, single = (RingKV.empty(1, 2, 8, 10, dtype, torch.float32, "cpu") for _ in "ab")
        for start, n in ((0, 7), (7, 6), (13, 25), (38, 1), (39, 10)):  # fill, wrap, > window, one, wrap at 9
            k, v, pos = torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8), torch.arange(start, start + n)
            chunked.store(k, v, pos)
            for i in range(n):
                single.store(k[:, :, i:i + 1], v[:, :, i:i + 1], pos[i:i + 1])
            assert torch.equal(chunked.positions, single.positions)
            for a, b in zip(chunked.contents(), single.contents()):
                assert torch.equal(a, b)
        assert sorted(chunked.positions.tolist()) == list(range(39, 49))


def test_int8_kv_close_to_full_precision(tiny):
    ids = torch.randint(0, tiny.config.vocab_size, (1, 60))
    with torch.no_grad():
        ref = tiny(ids)
        q8 = tiny(ids, tiny.new_cache(max_len=60, kv_dtype="int8"))
        bf = tiny(ids, tiny.new_cache(max_len=60, kv_dtype="bf16"))
    span = ref.abs().max()
    assert (q8 - ref).abs().max() < 0.02 * span
    assert (bf - ref).abs().max() < 0.02 * span


def test_int8_kv_halves_bf16_bytes(tiny):
    caches = {d: tiny.new_cache(max_len=2048, kv_dtype=d) for d in ("bf16", "int8")}
    with torch.no_grad():
        for c in caches.values():
            tiny(torch.randint(0, 100, (1, 40)), c)
    hd = tiny.config.head_dim
    # int8 data + one fp32 scale per (token, head): (hd + 4) / (2 hd) of bf16, ~0.51 at head_dim 256
    assert caches["int8"].nbytes() / caches["bf16"].nbytes() == (hd + 4) / (2 * hd)
    for dtype, cache in caches.items():
        assert cache.nbytes() == kv_bytes_planned(tiny.config, 40, 2048, dtype)


def test_prefix_cache_reuse_across_the_window_boundary(tiny):
    """A shared prefix much longer than the window: cached and uncached logits are equal."""
    window = tiny.config.sliding_window
    prefix = torch.randint(3, 200, (5 * window + 3,)).tolist()
    second = prefix + torch.randint(3, 200, (7,)).tolist()
    diverging = prefix[: 3 * window + 5] + [1, 2, 3]
    pc = PrefixCache(tiny, block=window)
    pc.prefill(prefix, max_len=200)
    for ids in (second, diverging, prefix):
        cache, logits = pc.prefill(ids, max_len=200)
        with torch.no_grad():
            full = tiny(torch.tensor([ids]))[0, -1]
        assert (logits - full).abs().max().item() <= 1e-5
        assert cache.pos == len(ids)
        # decoding continues correctly from the restored cache
        nxt = int(full.argmax())
        with torch.no_grad():
            step = tiny(torch.tensor([[nxt]]), cache)[0, -1]
            again = tiny(torch.tensor([ids + [nxt]]))[0, -1]
        assert (step - again).abs().max().item() <= 1e-5
    assert pc.hits == 3
    assert pc.reused_tokens == len(prefix) + 3 * window + (len(prefix) - 1) // window * window


def test_rope_scaling_past_32k_matches_transformers():
    cfg = tiny_config(rope_scale=8.0, head_dim=32, ctx=131_072)
    rope = Gemma3RotaryEmbedding(hf_config(cfg))
    positions = torch.tensor([0, 1, 32_767, 32_768, 40_000, 100_000, 131_071])
    x = torch.zeros(1, len(positions), cfg.head_dim)
    for kind, ours_inv in (("full_attention", random_model(cfg).rope_global),
                           ("sliding_attention", random_model(cfg).rope_local)):
        cos, sin = rope(x, positions[None], layer_type=kind)
        our_cos, our_sin = rope_cos_sin(positions, ours_inv, torch.float32)
        assert torch.equal(cos[0], our_cos) and torch.equal(sin[0], our_sin)
    # ×8 linear scaling: a global layer at position 8p rotates like an unscaled one at p.
    model = random_model(cfg)
    scaled, _ = rope_cos_sin(torch.tensor([80_000]), model.rope_global, torch.float32)
    plain, _ = rope_cos_sin(torch.tensor([10_000]), model.rope_global * 8, torch.float32)
    assert torch.allclose(scaled, plain, atol=1e-4)


def test_chunked_prefill_equals_one_forward(tiny):
    """Prefill.step in uneven chunks (crossing window boundaries mid-chunk and mid-window) gives
    the logits and the cache one forward gives: decoding on from it matches too."""
    from gemma3.inference.prefix_cache import Prefill

    window = tiny.config.sliding_window
    ids = torch.randint(3, 200, (4 * window + 5,)).tolist()
    with torch.no_grad():
        full = tiny(torch.tensor([ids]))[0, -1]
    for sizes in ([1] * 3 + [window - 1, 3, 2 * window], [5, 7, 11], [window]):
        job = Prefill(tiny, ids, tiny.new_cache(max_len=200), block=window)
        logits, k = None, 0
        while logits is None:
            logits = job.step(sizes[k % len(sizes)])
            k += 1
        assert job.left == 0 and job.cache.pos == len(ids)
        assert (logits - full).abs().max().item() <= 1e-5
        with torch.inference_mode():  # the cache was written in inference mode
            step = tiny(torch.tensor([[7]]), job.cache)[0, -1]
            again = tiny(torch.tensor([ids + [7]]))[0, -1]
        assert (step - again).abs().max().item() <= 1e-5


def test_prefix_cache_start_stores_when_the_chunks_finish(tiny):
    window = tiny.config.sliding_window
    ids = torch.randint(3, 200, (3 * window + 2,)).tolist()
    pc = PrefixCache(tiny, block=window)
    job = pc.start(ids, max_len=200)
    assert job.step(window + 3) is None and not pc.entries  # stored only once complete
    logits = job.step()
    assert list(pc.entries) == [(None, tuple(ids))]  # keyed by (adapter slot, prompt)
    cache, again = pc.prefill(ids + [5], max_len=200)
    assert pc.hits == 1 and pc.reused_tokens == len(ids)
    with torch.no_grad():
        assert (again - tiny(torch.tensor([ids + [5]]))[0, -1]).abs().max().item() <= 1e-5
        assert (logits - tiny(torch.tensor([ids]))[0, -1]).abs().max().item() <= 1e-5


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_big_buffers_are_zeros_resident_only_where_written():
    """A cache's big CPU buffers come from fresh pages (cache._zeros): zeros, like torch.zeros,
    but memory is held only for the slots written, so a long context costs nothing up front."""
    from gemma3.model.cache import _zeros

    before = _rss_kb()
    kv = _zeros((1, 1, 65536, 256), torch.float32, "cpu")  # 64 MB
    assert kv.max().item() == 0 and kv.min().item() == 0  # reading maps the zero page: no memory
    kv[0, 0, :1024] = 1.0  # 1 MB written
    assert kv.sum().item() == 1024 * 256
    assert _rss_kb() - before < 16 * 1024  # torch.zeros: 64 MB
    small = _zeros((1, 1, 8, 4), torch.int8, "cpu")
    assert small.dtype == torch.int8 and not small.any()


def test_a_cleared_cache_gives_what_a_new_one_gives(tiny):
    # Stale keys left in the storage (rings wrapped, a global layer grown) must not leak into the
    # next prompt: every slot is empty again, on the model and on the fused CPU path.
    from gguf import GGMLQuantizationType as T

    from gemma3.cpu import kernels
    from tests.helpers.kernels import quantized_copy

    models = [tiny] + ([quantized_copy(tiny, T.Q8_0)[0]] if kernels.available() else [])
    window = tiny.config.sliding_window
    first, second = (torch.randint(0, tiny.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
                     for n in (3 * window + 5, window + 3))
    with torch.inference_mode():
        for model in models:
            used = model.new_cache(max_len=100)
            model(first, used)
            for t in second[0, :4].tolist():  # one-token steps too (the fused path's own store)
                model(torch.tensor([[t]]), used)
            used.clear()
            assert used.pos == 0
            fresh = model.new_cache(max_len=100)
            assert torch.equal(model(second, used), model(second, fresh))
            for t in first[0, :5].tolist():
                assert torch.equal(model(torch.tensor([[t]]), used), model(torch.tensor([[t]]), fresh))
