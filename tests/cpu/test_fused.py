"""The fused modules of cpu/fused.py against the decoder they replace, on tiny random models
whose weights are re-encoded as GGUF blocks: prefill and decode, the one-call step, greedy
decoding inside the LM head, quantized caches, and the continuous batch."""

import pytest
import torch
from gguf import GGMLQuantizationType as T

from gemma3.cpu import kernels
from gemma3.cpu.linear import GGMLLinear
from tests.helpers.kernels import needs_kernels, quantized_copy, rel_err


@needs_kernels
@pytest.mark.parametrize("kv_heads,qtype,batch", [(1, T.Q8_0, 3), (2, T.Q8_0, 3), (2, T.Q4_0, 3), (1, T.Q5_0, 1)],
                         ids=["kv1-Q8_0", "kv2-Q8_0", "kv2-Q4_0", "kv1-Q5_0-packed"])
def test_fast_modules_match_model_py_on_tiny_model(kv_heads, qtype, batch):
    """Prefill chunks, then one-token steps far past the window (ring wrap-around, local and global
    layers, GQA): the swapped modules give the decoder's logits. Q4_0 is what `gemma3 quantize --to
    int4-block32` writes; Q4_0, Q5_0 and Q8_0 weights get interleaved copies, which batch 1 reads inside
    FastBlock's one-call layer; batch 3 shares one cache and takes the per-module path."""
    from gemma3.cpu.fused import FastAttention, FastBlock, FastMLP, FastRMSNorm
    from tests.helpers.models import random_model, tiny_config

    hidden = 128 if qtype == T.Q5_0 else 64
    cfg = tiny_config(layers=6, heads=4, kv_heads=kv_heads, head_dim=32, hidden=hidden, window=8)
    fast, ref = quantized_copy(random_model(cfg), qtype)
    assert {type(m) for m in fast.modules()} >= {FastAttention, FastBlock, FastMLP, FastRMSNorm, GGMLLinear}
    assert all(layer.fused() is not None for layer in fast.layers)  # batch 1 decodes a layer in one call
    assert fast.layers[0].mlp.up_proj.packed_type in kernels.INTERLEAVED_TYPES
    ids = torch.randint(0, cfg.vocab_size, (batch, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cf, cr = fast.new_cache(batch, 64), ref.new_cache(batch, 64)
        for t in range(40):  # decode only: > 4 windows
            a = fast(ids[:, t:t + 1], cf, last_only=True)
            b = ref(ids[:, t:t + 1], cr, last_only=True)
            assert rel_err(a, b) < 1e-3, t
        cf, cr = fast.new_cache(batch, 64), ref.new_cache(batch, 64)
        a, b = fast(ids[:, :30], cf), ref(ids[:, :30], cr)  # bf16 GEMM path, chunked (window 8)
        assert rel_err(a, b) < 2e-2
        for t in range(30, 40):
            assert rel_err(fast(ids[:, t:t + 1], cf), ref(ids[:, t:t + 1], cr)) < 2e-2


@needs_kernels
@pytest.mark.parametrize("kv_dtype", ["fp32", "int8"])
def test_batch_1_decode_runs_in_one_call_and_follows_the_cache_as_it_grows(kv_dtype):
    """A batch-1 step of the fast model goes through one ops.DecodeStack call holding the cache's
    tensors: the decoder's logits all the way past GROW_CHUNK, where the global layers' buffers are
    reallocated and the stack has to be rebuilt (exactly once)."""
    from gemma3.model.cache import GROW_CHUNK
    from tests.helpers.models import random_model, tiny_config

    cfg = tiny_config(layers=6, heads=4, kv_heads=1, head_dim=32, hidden=128, window=8)
    fast, ref = quantized_copy(random_model(cfg), T.Q5_0)
    n = GROW_CHUNK + 24
    ids = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(5))
    tol = 1e-3 if kv_dtype == "fp32" else 2e-2
    stacks = []
    with torch.inference_mode():
        cf, cr = fast.new_cache(1, n, kv_dtype=kv_dtype), ref.new_cache(1, n, kv_dtype=kv_dtype)
        fast(ids[:, :5], cf), ref(ids[:, :5], cr)
        for t in range(5, n):
            a = fast(ids[:, t:t + 1], cf, last_only=True)
            b = ref(ids[:, t:t + 1], cr, last_only=True)
            stack = fast.decode_stack(cf)
            if not any(stack is s for s in stacks):
                stacks.append(stack)
            if t % 50 == 0 or t >= GROW_CHUNK - 2:
                assert rel_err(a, b) < tol, t
    assert len(stacks) == 2
    assert cf.pos == cr.pos == n


@needs_kernels
def test_one_call_step_is_bit_exact_with_the_module_path():
    """ops.DecodeStack.step (embedding row, layers, final norm, LM head in one call; RoPE rows cut
    from 64-position tables) computes exactly what the fast modules compute one call at a time
    (the decoder's loop over the FastBlocks, model.embed, FastRMSNorm, the GGMLEmbedding head),
    across a RoPE table boundary; forward_hidden takes it too; a token id outside the vocabulary
    is refused by name."""
    from gemma3.cpu.fused import ROPE_BLOCK
    from gemma3.model.decoder import Gemma3
    from tests.helpers.models import random_model, tiny_config

    cfg = tiny_config(layers=4, heads=4, kv_heads=1, head_dim=32, hidden=128, window=8)
    fast, _ = quantized_copy(random_model(cfg), T.Q8_0)
    ids = torch.randint(0, cfg.vocab_size, (1, ROPE_BLOCK + 8), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        one, mod = fast.new_cache(1, ids.shape[1]), fast.new_cache(1, ids.shape[1])
        fast(ids[:, :ROPE_BLOCK - 4], one), fast(ids[:, :ROPE_BLOCK - 4], mod)
        for t in range(ROPE_BLOCK - 4, ids.shape[1] - 1):
            a = fast(ids[:, t:t + 1], one)
            b = fast.logits(Gemma3.forward_hidden(fast, ids[:, t:t + 1], mod))
            assert fast.decode_stack(one) is not None and fast.decode_stack(mod) is None
            assert torch.equal(a, b), t
        t = ids.shape[1] - 1
        assert torch.equal(fast.forward_hidden(ids[:, t:], one), Gemma3.forward_hidden(fast, ids[:, t:], mod))
        assert one.pos == mod.pos == ids.shape[1]
        with pytest.raises(RuntimeError, match="token id .* is not in"):
            fast(torch.tensor([[cfg.vocab_size]]), fast.new_cache(1, 4))


@needs_kernels
def test_greedy_next_takes_the_argmax_inside_the_lm_head():
    """FastGemma3.greedy_next on a one-call step (the argmax scanned chunk
    by chunk inside the LM head's product, the logits never returned) picks what greedy() picks
    from the step's logits and leaves the cache where a plain step leaves it. Ties go to the first
    index across the head's chunks (a table of identical rows: every logit equal), the first NaN
    wins as in torch.max, and a step that is not one call (batch 2) takes greedy(logits)."""
    from gemma3.inference.sampling import greedy
    from tests.helpers.models import random_model, tiny_config

    cfg = tiny_config(layers=4, heads=4, kv_heads=1, head_dim=32, hidden=128, window=8, vocab=4096)  # 8 chunks
    fast, _ = quantized_copy(random_model(cfg), T.Q8_0)
    ids = torch.randint(0, 90, (2, 30), generator=torch.Generator().manual_seed(4))

    def twins(rows=1):
        one, plain = fast.new_cache(rows, 64), fast.new_cache(rows, 64)
        fast(ids[:rows, :4], one), fast(ids[:rows, :4], plain)
        return one, plain

    with torch.inference_mode():
        one, plain = twins()
        for t in range(4, 29):
            a = fast.greedy_next(ids[:1, t:t + 1], one)
            assert fast.decode_stack(one) is not None
            assert torch.equal(a, greedy(fast(ids[:1, t:t + 1], plain, last_only=True)[:, -1])), t
        assert torch.equal(fast(ids[:1, 29:], one), fast(ids[:1, 29:], plain))
        one, plain = twins(rows=2)
        assert torch.equal(fast.greedy_next(ids[:, 4:5], one), greedy(fast(ids[:, 4:5], plain, last_only=True)[:, -1]))
        table = fast.embed_tokens.blocks
        table[:] = table[0].clone()  # every row the same: every logit ties
        one, plain = twins()
        assert fast.greedy_next(ids[:1, 4:5], one).tolist() == [0]
        table[[3000, 100], :2] = torch.tensor([0x00, 0x7E], dtype=torch.uint8)  # f16 NaN scales: NaN logits
        one, plain = twins()
        assert fast.greedy_next(ids[:1, 4:5], one).tolist() == [100]
        assert greedy(fast(ids[:1, 4:5], plain, last_only=True)[:, -1]).tolist() == [100]


@needs_kernels
@pytest.mark.parametrize("kv_dtype", ["bf16", "int8"])
def test_decode_attention_reads_quantized_cache_like_model_py(kv_dtype):
    """The kernel reads bf16/int8 K/V in place (int8 scales applied per row inside the loop);
    the decoder's path dequantizes a copy. Decoding far past the window (ring wrap-around, global
    buffer growing), both stay within storage rounding of each other: they differ only in that
    the decoder's local layers attend to the current token's own key before it is stored (the kernel
    test below checks the kernel itself to 1e-5)."""
    from tests.helpers.models import random_model, tiny_config

    cfg = tiny_config(layers=6, heads=4, kv_heads=2, head_dim=32, hidden=64, window=8)
    fast, ref = quantized_copy(random_model(cfg))
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        cf, cr = fast.new_cache(2, 64, kv_dtype=kv_dtype), ref.new_cache(2, 64, kv_dtype=kv_dtype)
        assert cf.layers[0].view().keys.dtype == {"bf16": torch.bfloat16, "int8": torch.int8}[kv_dtype]
        worst = 0.0
        for t in range(40):
            a = fast(ids[:, t:t + 1], cf, last_only=True)
            b = ref(ids[:, t:t + 1], cr, last_only=True)
            worst = max(worst, rel_err(a, b))
    print(kv_dtype, worst)
    assert worst < 2e-2


@needs_kernels
@pytest.mark.parametrize("kv_dtype,n_seqs", [("fp32", 1), ("fp32", 4), ("bf16", 4), ("int8", 4), ("fp32", 10)])
def test_continuous_batch_decode_matches_model_py(kv_dtype, n_seqs):
    """model.decode over sequences that each own a cache (the server's continuous batch), at
    different lengths on both sides of the window: one decode_attention_list call per layer stores
    every row's key/value and attends, as the decoder's per-sequence loop does. 10 rows take the bf16
    GEMM projections (more than MAX_VNNI_ROWS); a single row takes the one-call step (ops.DecodeStack)."""
    from tests.helpers.models import random_model, tiny_config

    cfg = tiny_config(layers=6, heads=4, kv_heads=2, head_dim=32, hidden=64, window=8)
    fast, ref = quantized_copy(random_model(cfg))
    g = torch.Generator().manual_seed(2)
    lengths = [3, 9, 17, 30, 5, 12, 1, 8, 20, 2][:n_seqs]
    prompts = [torch.randint(0, cfg.vocab_size, (1, n), generator=g) for n in lengths]
    tol = 1e-3 if kv_dtype == "fp32" and n_seqs <= 8 else 2e-2
    with torch.inference_mode():
        caches = {}
        for name, net in (("fast", fast), ("ref", ref)):
            caches[name] = [net.new_cache(1, 64, kv_dtype=kv_dtype) for _ in prompts]
            for c, p in zip(caches[name], prompts):
                net(p, c, last_only=True)
        tokens = torch.randint(0, cfg.vocab_size, (n_seqs,), generator=g)
        for step in range(12):  # every row wraps its ring at least once
            a = fast.decode(tokens, caches["fast"])
            b = ref.decode(tokens, caches["ref"])
            assert a.shape == (n_seqs, cfg.vocab_size)
            assert rel_err(a, b) < tol, step
            tokens = b.argmax(-1)
    assert (fast.decode_stack(caches["fast"][0]) is not None) == (n_seqs == 1)
    for cf, cr in zip(caches["fast"], caches["ref"]):
        assert cf.pos == cr.pos
        for lf, lr in zip(cf.layers, cr.layers):
            assert torch.equal(lf.key_positions(), lr.key_positions())
            for a, b in zip(lf.contents(), lr.contents()):
                assert rel_err(a, b) < tol


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
def test_a_decode_row_gives_the_same_bits_in_any_batch(threads):
    """Batch invariance (a seeded request samples the same text under any load): a row's logits
    are bit-identical alone (the one-call step), beside other rows of other lengths, and in any
    position of the batch — with caches long enough for its attention to be split (200 keys: 3
    splits of 64), which used to be sized by the batch."""
    from tests.helpers.models import random_model, tiny_config

    cfg = tiny_config(layers=4, heads=4, kv_heads=1, head_dim=32, hidden=128, window=256)
    fast, _ = quantized_copy(random_model(cfg), T.Q8_0, in_place=True)  # one layout, as loaded from GGUF
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(3)

    def prefilled(n: int, seed: int):
        ids = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))
        cache = fast.new_cache(1, 300)
        fast(ids, cache)
        return cache

    try:
        with torch.inference_mode():
            alone = fast.decode(torch.tensor([7]), [prefilled(200, 1)])[0]
            for others in ([9], [9, 11], [9, 11, 13, 15]):
                lengths = torch.randint(1, 260, (len(others),), generator=gen).tolist()
                caches = [prefilled(n, 10 + i) for i, n in enumerate(lengths)]
                at = len(others) // 2
                caches.insert(at, prefilled(200, 1))
                tokens = others[:at] + [7] + others[at:]
                row = fast.decode(torch.tensor(tokens), caches)[at]
                assert torch.equal(row, alone), (others, lengths)
    finally:
        torch.set_num_threads(old)
