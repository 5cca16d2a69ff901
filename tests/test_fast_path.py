"""The fast CPU path (cpu/linear.py + kernels/) against its pure-PyTorch reference.

Kernel tests run on random GGUF blocks of every type with a kernel, odd shapes and batch sizes
1..17 (both the int8-VNNI and the bf16-GEMM paths); end-to-end tests compare the fast 270M model
with the fp32 reference (perplexity, greedy decoding). The first test run builds the C++ extension
(~30 s, cached afterwards); where it cannot be built, kernel tests are skipped and the fallback test
still runs.
"""

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as T

from gemma3.cpu import kernels
from gemma3.cpu.linear import MAX_VNNI_ROWS, MAX_VNNI_ROWS_INTERLEAVED, GGMLEmbedding, GGMLLinear
from gemma3.formats.ggml import BLOCK_INFO, dequantize

TEXT = (Path(__file__).parent / "data" / "gpl-3.0.txt").read_text()
KERNEL_TYPES = [T.Q4_0, T.Q8_0, T.Q5_0, T.Q4_K, T.Q6_K]
# Byte offsets of the f16 scale fields in each block (random bytes there could be inf/NaN).
SCALE_FIELDS = {T.Q4_0: [0], T.Q8_0: [0], T.Q5_0: [0], T.Q4_K: [0, 2], T.Q6_K: [208]}

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"C++ kernels unavailable: {kernels.unavailable_reason()}")


def random_blocks(qtype, rows, cols, seed=0):
    """Random bytes in the block layout of `qtype`, with finite f16 scales of realistic size."""
    g = torch.Generator().manual_seed(seed)
    values, nbytes = BLOCK_INFO[qtype]
    n = rows * cols // values
    data = torch.randint(0, 256, (n, nbytes), generator=g, dtype=torch.uint8)
    for off in SCALE_FIELDS[qtype]:
        scale = (torch.rand(n, generator=g) * 0.02 + 1e-3).half()
        data[:, off:off + 2] = scale.view(torch.uint8).reshape(n, 2)
    return data.reshape(-1)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def dot_err(layer, x, got):
    """Error of x @ W.T relative to the size of the products summed (|x| @ |W|.T): random weights
    cancel a lot, so this, not the result's own norm, is the scale rounding errors live on."""
    w = layer.dequantize().double()
    want = x.double() @ w.T
    return ((got.double() - want).norm() / (x.double().abs() @ w.abs().T).norm()).item()


@needs_kernels
@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda t: t.name)
def test_dequant_kernel_is_exact(qtype):
    rows, cols = 37, 512
    data = random_blocks(qtype, rows, cols)
    ref = dequantize(data, qtype, (rows, cols))
    out = torch.empty(rows, cols)
    kernels.ops().dequant(data, int(qtype), out)
    assert torch.equal(out, ref)
    out16 = torch.empty(rows, cols, dtype=torch.bfloat16)
    kernels.ops().dequant(data, int(qtype), out16)
    assert torch.equal(out16, ref.bfloat16())


@needs_kernels
@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 5, 67])  # not multiples of the 4-row tile
def test_quant_linear_matches_reference(qtype, rows):
    cols = 768 if BLOCK_INFO[qtype][0] == 256 else 96
    layer = GGMLLinear(random_blocks(qtype, rows, cols, seed=rows), int(qtype), rows, cols)
    g = torch.Generator().manual_seed(1)
    for batch in range(1, 18):  # 1..MAX_VNNI_ROWS on the int8 path, the rest on the bf16 GEMM
        x = torch.randn(batch, cols, generator=g)
        got = layer(x)
        assert got.shape == (batch, rows)
        # Two-digit int8 activations are ~16-bit; bf16 rounds activations and weights (2^-9 each).
        tol = 2e-5 if batch <= MAX_VNNI_ROWS else 2e-3
        assert dot_err(layer, x, got) < tol, (batch, dot_err(layer, x, got))
        assert dot_err(layer, x, layer.reference(x)) < 1e-6


@needs_kernels
@pytest.mark.parametrize("qtype,cols", [(T.Q4_0, 640), (T.Q5_0, 640), (T.Q8_0, 640), (T.Q4_K, 1024), (T.Q6_K, 2048)],
                         ids=["Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("rows", [1, 5, 67])
def test_repacked_weights_are_the_same_weight_and_product(qtype, cols, rows):
    """GGMLLinear.pack (Q4_0/Q5_0/Q8_0 rows of a multiple of 128 values, Q4_K and Q6_K rows) adds a one-row
    kernel's layout: it decodes to exactly the GGUF blocks' values, and one-row products through
    it match the reference like every kernel (more rows keep reading the blocks)."""
    layer = GGMLLinear(random_blocks(qtype, rows, cols, seed=rows), int(qtype), rows, cols)
    layer.pack()
    packed, packed_type = layer.weight_for(1)
    want_type, _, _ = kernels.PACKED[int(qtype)]
    group_bytes = {T.Q4_0: 72, T.Q5_0: 88, T.Q8_0: 136, T.Q4_K: 96, T.Q6_K: 108}[qtype]
    assert packed_type == want_type and packed.shape == (rows, cols // 128 * group_bytes)
    assert layer.weight_for(2) == (layer.blocks, int(qtype))
    out = torch.empty(rows, cols)
    kernels.ops().dequant(packed, packed_type, out)
    assert torch.equal(out, layer.dequantize())
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(1, cols, generator=g) * 10 ** torch.empty(1).uniform_(-2, 2, generator=g)
        assert dot_err(layer, x, layer(x)) < 2e-5
    for m in (2, 3, 4, 7):  # a repacked LM head (pack(in_place=True)) takes batches of up to 8 rows too
        x = torch.randn(m, cols, generator=g)
        assert dot_err(layer, x, kernels.ops().qmatmul(x, packed, packed_type, rows)) < 2e-5, m


@needs_kernels
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_0, T.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("rows,cols", [(16, 96), (48, 640), (2048, 640)])  # 96: not a multiple of 128
def test_weights_of_whole_16_row_groups_interleave_their_rows(qtype, rows, cols):
    """A Q4_0, Q5_0 or Q8_0 weight with a multiple of 16 rows packs to Q4_0X / Q5_0X / Q8_0X (16 rows across the
    vector lanes): the same bytes' worth, decoding to exactly the GGUF values (fp32, and bf16
    rounded as torch does); one-row products (whole groups read as four streams, the groups left
    over one at a time), a few rows, and products whose row ranges start inside a group (after a
    5-row weight in one qmatmul_many call, so the threads' chunks cut groups and hold 15 whole
    groups: three per stream and three left over) all match the reference."""
    layer = GGMLLinear(random_blocks(qtype, rows, cols, seed=rows), int(qtype), rows, cols)
    layer.pack()
    packed, packed_type = layer.weight_for(1)
    assert packed_type == kernels.INTERLEAVED[int(qtype)][0]
    assert packed.shape == (rows, cols // 32 * BLOCK_INFO[qtype][1])
    assert layer.weight_for(2) == (layer.blocks, int(qtype))
    want = layer.dequantize()
    out, out16 = torch.empty(rows, cols), torch.empty(rows, cols, dtype=torch.bfloat16)
    kernels.ops().dequant(packed, packed_type, out)
    kernels.ops().dequant(packed, packed_type, out16)
    assert torch.equal(out, want) and torch.equal(out16, want.bfloat16())
    g = torch.Generator().manual_seed(3)
    for m in (1, 1, 2, 5):
        x = torch.randn(m, cols, generator=g) * 10 ** torch.empty(1).uniform_(-2, 2, generator=g)
        assert dot_err(layer, x, kernels.ops().qmatmul(x, packed, packed_type, rows)) < 2e-5, m
    first = GGMLLinear(random_blocks(T.Q8_0, 5, cols, seed=1), int(T.Q8_0), 5, cols)
    x = torch.randn(1, cols, generator=g)
    a, b = kernels.ops().qmatmul_many(x, [first.blocks, packed], [int(T.Q8_0), packed_type], [5, rows])
    assert dot_err(first, x, a) < 2e-5 and dot_err(layer, x, b) < 2e-5


@needs_kernels
@pytest.mark.parametrize("qtype,rows,layout", [(T.Q4_0, 70_000, kernels.Q4_0X), (T.Q8_0, 70_000, kernels.Q8_0X),
                                               (T.Q4_0, 69_999, kernels.Q4_0R)], ids=["Q4_0", "Q8_0", "Q4_0-rows"])
def test_embedding_repacked_in_place_from_a_file_mapping_keeps_every_path_exact(tmp_path, qtype, rows, layout):
    """The GGUF loader repacks the tied table in place (whole 16-row groups interleave their rows,
    other row counts get the row layout) and lets go of the file pages it read, slice by slice:
    lookups stay bit-exact (rows decoded from their 16-row group where interleaved), the LM head
    matches the reference for one row and a few (repacked kernel) and for many (bf16 GEMM over the
    repacked layout), and the file mapping still reads the file's bytes afterwards."""
    import mmap

    cols = 256  # 10 / 19 MB: two or three of pack()'s 8 MB slices
    raw = random_blocks(qtype, rows, cols, seed=9)
    path = tmp_path / "table.bin"
    path.write_bytes(raw.numpy().tobytes())
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    mapped = torch.frombuffer(buf, dtype=torch.uint8)
    table = GGMLEmbedding(mapped, int(qtype), rows, cols)
    want = table.dequantize()
    ids = torch.randint(0, rows, (7, 5), generator=torch.Generator().manual_seed(0))
    ids[0, :3] = torch.tensor([0, 15, rows - 1])  # a group's first and last rows, the table's last
    table.pack(in_place=True, drop_source=True)
    assert table.storage_type == layout and table.weight_for(1) == (table.blocks, layout)
    assert torch.equal(table.dequantize(), want)
    assert torch.equal(table(ids), want[ids])
    with pytest.raises(RuntimeError, match=f"token id {rows} is not in"):
        table(torch.tensor([3, rows]))
    for n in (1, 3, MAX_VNNI_ROWS + 4, MAX_VNNI_ROWS_INTERLEAVED + 4):  # an interleaved table: VNNI up to 32 rows
        x = torch.randn(n, cols, generator=torch.Generator().manual_seed(n))
        gemm = n > (MAX_VNNI_ROWS_INTERLEAVED if layout in kernels.INTERLEAVED_TYPES else MAX_VNNI_ROWS)
        assert dot_err(table, x, table.attend(x)) < (2e-3 if gemm else 2e-5), n
    assert torch.equal(mapped, raw)  # dropped pages come back from the file


@needs_kernels
def test_packing_into_huge_pages_writes_the_same_bytes_in_disjoint_aligned_slices():
    """kernels.HugePages: one buffer (2 MB aligned, from ops.huge_empty) sized for the given packs;
    pack(memory=...) writes exactly what a separate pack writes, each weight in a 64-byte aligned
    slice of its own; a pack that does not fit is an error, not a silent second allocation."""
    shapes = [(T.Q5_0, 5, 640), (T.Q4_K, 3, 1024), (T.Q6_K, 7, 2048), (T.Q8_0, 1, 640), (T.Q4_0, 9, 256),
              (T.Q5_0, 32, 96), (T.Q8_0, 16, 640)]
    layers = [GGMLLinear(random_blocks(q, r, c, seed=r), int(q), r, c) for q, r, c in shapes]
    memory = kernels.HugePages([layer.packed_nbytes() for layer in layers])
    assert memory.buffer.data_ptr() % (2 << 20) == 0
    spans = []
    for layer in layers:
        alone = GGMLLinear(layer.blocks, layer.ggml_type, layer.out_features, layer.in_features)
        alone.pack()
        layer.pack(memory=memory)
        assert torch.equal(layer.packed, alone.packed) and layer.packed.numel() == layer.packed_nbytes()
        start = layer.packed.data_ptr() - memory.buffer.data_ptr()
        assert start % 64 == 0 and 0 <= start and start + layer.packed.numel() <= memory.buffer.numel()
        spans.append((start, start + layer.packed.numel()))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    with pytest.raises(ValueError, match="left"):
        layers[0].packed = None
        layers[0].pack(memory=memory)
    with pytest.raises(RuntimeError, match="out must be contiguous uint8 with"):
        kernels.ops().repack_q5_0(layers[0].blocks, 5, 640, out=torch.empty(5, 10, dtype=torch.uint8))


@needs_kernels
def test_repack_refuses_rows_without_whole_groups():
    odd = GGMLLinear(random_blocks(T.Q5_0, 3, 96), int(T.Q5_0), 3, 96)
    odd.pack()  # 96 values per row: no four-block groups, stays on the blocks
    assert odd.packed is None
    with pytest.raises(RuntimeError, match="multiple of 128"):
        kernels.ops().repack_q5_0(odd.blocks, 3, 96)
    with pytest.raises(RuntimeError, match="3 rows is not a multiple of 16"):
        kernels.ops().repack_q5_0x(odd.blocks, 3, 96)
    with pytest.raises(RuntimeError, match="whole groups of 16 rows"):
        kernels.ops().qmatmul(torch.randn(1, 96), odd.blocks, kernels.Q5_0X, 3)
    with pytest.raises(RuntimeError, match="3 rows is not a multiple of 16"):
        kernels.ops().repack_q4_0x(random_blocks(T.Q4_0, 3, 96), 3, 96)
    odd8 = random_blocks(T.Q8_0, 3, 96)
    with pytest.raises(RuntimeError, match="3 rows is not a multiple of 16"):
        kernels.ops().repack_q8_0x(odd8, 3, 96)
    with pytest.raises(RuntimeError, match="whole groups of 16 rows"):
        kernels.ops().dequant(odd8, kernels.Q8_0X, torch.empty(3, 96))
    with pytest.raises(RuntimeError, match="multiple of 256"):
        kernels.ops().repack_q4_k(torch.zeros(3 * 144, dtype=torch.uint8), 3, 128)
    with pytest.raises(RuntimeError, match="multiple of 256"):
        kernels.ops().repack_q6_k(torch.zeros(3 * 210, dtype=torch.uint8), 3, 128)


@needs_kernels
def test_quant_linear_keeps_leading_dims_and_dtype():
    layer = GGMLLinear(random_blocks(T.Q8_0, 8, 64), int(T.Q8_0), 8, 64)
    x = torch.randn(2, 3, 64)
    assert layer(x).shape == (2, 3, 8)
    assert rel_err(layer(x), layer.reference(x)) < 2e-4


def test_quant_embedding_lookup_is_exact_and_attend_is_the_lm_head():
    emb = GGMLEmbedding(random_blocks(T.Q8_0, 50, 64), int(T.Q8_0), 50, 64)
    table = emb.dequantize()
    ids = torch.tensor([[3, 49, 0], [7, 7, 1]])
    assert torch.equal(emb(ids), table[ids])
    h = torch.randn(2, 64)
    assert rel_err(emb.attend(h), h @ table.T) < 2e-4


def test_fallback_without_kernels(monkeypatch):
    """With the extension unavailable, GGMLLinear runs its reference and load(backend="cpu")
    returns the fp32 reference model."""
    monkeypatch.setitem(kernels._state, "ops", None)
    monkeypatch.setitem(kernels._state, "error", "simulated")
    layer = GGMLLinear(random_blocks(T.Q5_0, 4, 64), int(T.Q5_0), 4, 64)
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), layer.reference(x))

    from gemma3.inference.load import load

    model, _ = load(backend="cpu")
    assert not any(isinstance(m, GGMLLinear) for m in model.modules())


# ---- the real 270M model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    from gemma3.inference.load import load

    fast, tok = load(backend="cpu")
    ref, _ = load(backend="torch")
    return fast, ref, tok


@needs_kernels
def test_fast_model_holds_no_float_weights(models):
    fast, _, _ = models
    floats = sum(p.numel() for p in fast.parameters())
    assert floats < 100_000  # norms only
    assert isinstance(fast.embed_tokens, GGMLEmbedding)


@needs_kernels
def test_loader_puts_every_streamed_weight_in_one_huge_page_buffer(models):
    """What a decode step reads (the layers' repacked copies and the LM head repacked in place)
    lies in one 2 MB-aligned allocation, packed back to back."""
    fast, _, _ = models
    linears = [m for m in fast.modules() if type(m) is GGMLLinear]
    tensors = [m.packed for m in linears if m.packed is not None] + [fast.embed_tokens.blocks]
    assert len(tensors) == 7 * len(fast.layers) + 1
    assert {m.packed_type for m in linears if m.ggml_type == T.Q5_0} == {kernels.Q5_0X}  # all 16-row multiples
    assert {m.packed_type for m in linears if m.ggml_type == T.Q8_0} == {kernels.Q8_0X}
    assert fast.embed_tokens.storage_type == kernels.Q8_0X
    bases = {t.untyped_storage().data_ptr() for t in tensors}
    assert len(bases) == 1 and bases.pop() % (2 << 20) == 0
    used = sum(-(-t.numel() // 64) * 64 for t in tensors)
    assert used == tensors[0].untyped_storage().nbytes()


@needs_kernels
def test_fast_perplexity_within_1_percent_of_fp32(models):
    from gemma3.eval.perplexity import perplexity

    fast, ref, tok = models
    a = perplexity(fast, tok, TEXT, ctx=512, max_chunks=2, progress=False).ppl
    b = perplexity(ref, tok, TEXT, ctx=512, max_chunks=2, progress=False).ppl
    print(f"perplexity fast {a:.4f} vs fp32 {b:.4f} ({(a / b - 1):+.3%})")
    assert abs(a / b - 1) < 0.01


@needs_kernels
def test_fast_greedy_matches_fp32(models):
    from gemma3.inference.generate import generate_step
    from gemma3.inference.sampling import SamplingParams

    fast, ref, tok = models
    prompts = ["The history of the printing press begins", "def fibonacci(n):",
               "The capital of France is", "Once upon a time, in a small village,",
               "Photosynthesis is the process by which"]
    same = 0
    for prompt in prompts:
        ids = tok.encode(prompt)
        a = list(generate_step(fast, ids, SamplingParams(), max_tokens=64))
        b = list(generate_step(ref, ids, SamplingParams(), max_tokens=64))
        same += a == b
    print(f"{same}/5 greedy continuations identical")
    assert same >= 4


@needs_kernels
def test_fast_prefill_then_decode_matches_fp32_logits(models):
    fast, ref, tok = models
    ids = tok.encode(TEXT)[:600]  # past the 512 window: ring wrap-around on local layers
    with torch.inference_mode():
        cf, cr = fast.new_cache(1, 700), ref.new_cache(1, 700)
        a = fast(torch.tensor([ids[:-4]]), cf, last_only=True)
        b = ref(torch.tensor([ids[:-4]]), cr, last_only=True)
        assert rel_err(a, b) < 0.03  # bf16 prefill
        for t in ids[-4:]:
            a = fast(torch.tensor([[t]]), cf, last_only=True)
            b = ref(torch.tensor([[t]]), cr, last_only=True)
            assert rel_err(a, b) < 0.03
            assert a.argmax() == b.argmax()


# ---- module swaps on a tiny random model -------------------------------------------------------


def quantized_copy(model, qtype=T.Q8_0):
    """(fast, reference): every Linear and the embedding re-encoded as `qtype` GGUF blocks; the fast
    copy holds the blocks (GGMLLinear + make_fast), the reference the same values dequantized."""
    import copy

    import numpy as np
    from gguf import quants

    from gemma3.cpu.fused import make_fast

    fast, ref = copy.deepcopy(model), copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) or name == "embed_tokens":
            w = module.weight.detach().numpy().astype(np.float32)
            blocks = torch.from_numpy(quants.quantize(w, qtype)).reshape(-1)
            cls = GGMLEmbedding if name == "embed_tokens" else GGMLLinear
            q = cls(blocks, int(qtype), *w.shape)
            if cls is GGMLLinear:
                q.pack()  # as the GGUF loader does (Q5_0 rows of 128k values)
            parent, _, child = name.rpartition(".")
            setattr(fast.get_submodule(parent) if parent else fast, child, q)
            ref.get_submodule(name).weight.data = q.dequantize()
    return make_fast(fast), ref


@needs_kernels
@pytest.mark.parametrize("kv_heads,qtype,batch", [(1, T.Q8_0, 3), (2, T.Q8_0, 3), (2, T.Q4_0, 3), (1, T.Q5_0, 1)],
                         ids=["kv1-Q8_0", "kv2-Q8_0", "kv2-Q4_0", "kv1-Q5_0-packed"])
def test_fast_modules_match_model_py_on_tiny_model(kv_heads, qtype, batch):
    """Prefill chunks, then one-token steps far past the window (ring wrap-around, local and global
    layers, GQA): the swapped modules give model.py's logits. Q4_0 is what `gemma3 quantize --to
    int4-block32` writes; Q4_0, Q5_0 and Q8_0 weights get interleaved copies, which batch 1 reads inside
    FastBlock's one-call layer; batch 3 shares one cache and takes the per-module path."""
    from conftest import random_model, tiny_config

    from gemma3.cpu.fused import FastAttention, FastBlock, FastMLP, FastRMSNorm

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
    tensors: model.py's logits all the way past GROW_CHUNK, where the global layers' buffers are
    reallocated and the stack has to be rebuilt (exactly once)."""
    from conftest import random_model, tiny_config

    from gemma3.model.cache import GROW_CHUNK

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
    (model.py's loop over the FastBlocks, model.embed, FastRMSNorm, the GGMLEmbedding head),
    across a RoPE table boundary; forward_hidden takes it too; a token id outside the vocabulary
    is refused by name."""
    from conftest import random_model, tiny_config

    from gemma3.cpu.fused import ROPE_BLOCK
    from gemma3.model.decoder import Gemma3

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
    from conftest import random_model, tiny_config

    from gemma3.inference.sampling import greedy

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
    model.py's path dequantizes a copy. Decoding far past the window (ring wrap-around, global
    buffer growing), both stay within storage rounding of each other: they differ only in that
    model.py's local layers attend to the current token's own key before it is stored (the kernel
    test below checks the kernel itself to 1e-5)."""
    from conftest import random_model, tiny_config

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
def test_decode_attention_kernel_int8_equals_dequantized_fp32():
    """Direct kernel check: int8 storage + scales gives the attention of the dequantized fp32 cache."""
    from gemma3.cpu import kernels
    from gemma3.model.cache import LinearKV

    g = torch.Generator().manual_seed(0)
    b, hq, hk, s, d = 2, 4, 2, 50, 32
    q = torch.randn(b, hq, d, generator=g)
    layer = LinearKV.empty(b, hk, d, s, torch.int8, torch.float32, "cpu")
    layer.store(torch.randn(b, hk, s, d, generator=g) * 3, torch.randn(b, hk, s, d, generator=g))
    k8, v8 = layer.view(), layer.contents()
    pos = torch.arange(s)
    ops = kernels.ops()
    for window in (0, 16):
        got = ops.decode_attention(q, k8.keys, k8.values, pos, s - 1, window, 0.125, k8.k_scale, k8.v_scale)
        want = ops.decode_attention(q, *v8, pos, s - 1, window, 0.125)
        assert (got - want).abs().max() < 1e-5
    with pytest.raises(RuntimeError, match="scales"):
        ops.decode_attention(q, k8.keys, k8.values, pos, s - 1, 0, 0.125)


@needs_kernels
@pytest.mark.parametrize("head_dim", [256, 80, 16])
def test_decode_attention_kernel_matches_softmax_attention(head_dim):
    """The kernel's full-width loops (head_dim 256: 64-float score chunks, 128-float value chunks),
    its masked tails (80 = 64 + 16) and short heads (16), against plain softmax attention over
    the visible slots of a ring (a window, empty slots, two splits of the keys)."""
    from gemma3.cpu import kernels

    g = torch.Generator().manual_seed(3)
    hq, hk, slots = 8, 2, 300
    q = torch.randn(1, hq, head_dim, generator=g)
    k = torch.randn(1, hk, slots, head_dim, generator=g)
    v = torch.randn(1, hk, slots, head_dim, generator=g)
    key_pos = torch.arange(slots)
    key_pos[250:] = -1  # empty slots
    pos, window, scale = 240, 200, head_dim ** -0.5
    got = kernels.ops().decode_attention(q, k, v, key_pos, pos, window, scale)
    seen = (key_pos >= 0) & (key_pos <= pos) & (key_pos > pos - window)
    kk = k[:, :, seen].repeat_interleave(hq // hk, dim=1)
    vv = v[:, :, seen].repeat_interleave(hq // hk, dim=1)
    want = torch.softmax((q[:, :, None] @ kk.transpose(-1, -2)) * scale, -1) @ vv
    assert (got - want[:, :, 0]).abs().max() < 1e-5


@needs_kernels
@pytest.mark.parametrize("kv_dtype,n_seqs", [("fp32", 1), ("fp32", 4), ("bf16", 4), ("int8", 4), ("fp32", 10)])
def test_continuous_batch_decode_matches_model_py(kv_dtype, n_seqs):
    """model.decode over sequences that each own a cache (the server's continuous batch), at
    different lengths on both sides of the window: one decode_attention_list call per layer stores
    every row's key/value and attends, as model.py's per-sequence loop does. 10 rows take the bf16
    GEMM projections (more than MAX_VNNI_ROWS); a single row takes the one-call step (ops.DecodeStack)."""
    from conftest import random_model, tiny_config

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
def test_decode_attention_list_rejects_mismatched_rows():
    from gemma3.cpu import kernels

    ops = kernels.ops()
    q, k = torch.zeros(2, 4, 32), torch.zeros(2, 2, 32)
    cache = [torch.zeros(1, 2, 8, 32) for _ in range(2)]
    with pytest.raises(RuntimeError, match="one cache, slot and position per row"):
        ops.decode_attention_list(q, k, k, cache, cache, [], [], [], [0], [0, 0], 0, 1.0)
    with pytest.raises(RuntimeError, match="slot out of range"):
        ops.decode_attention_list(q, k, k, cache, cache, [], [], [], [0, 8], [0, 8], 0, 1.0)
