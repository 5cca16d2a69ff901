"""The C++ kernels against the pure-PyTorch reference: dequantization, products on random GGUF
blocks of every type with a kernel (odd shapes, batches 1..17: both the int8-VNNI and the bf16-GEMM
paths), repacked and interleaved layouts, huge-page packing, the attention kernels, and the
fallback where the extension cannot be built. The first run builds the extension (~30 s, cached)."""

import pytest
import torch
from gguf import GGMLQuantizationType as T

from gemma3.cpu import kernels
from gemma3.cpu.linear import MAX_VNNI_ROWS, MAX_VNNI_ROWS_INTERLEAVED, GGMLEmbedding, GGMLLinear
from gemma3.formats.ggml import BLOCK_INFO, dequantize
from tests.helpers.kernels import KERNEL_TYPES, dot_err, needs_kernels, random_blocks, rel_err


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
    group_bytes = {T.Q4_0: 72, T.Q5_0: 88, T.Q8_0: 136, T.Q4_K: 76, T.Q6_K: 108}[qtype]
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


# Bytes per row and 256 values of each interleaved layout: the GGUF format's, but Q4_KX, which keeps
# Q4_K's 6-bit scales and mins as bytes.
X16_BYTES_PER_256 = {T.Q4_0: 144, T.Q5_0: 176, T.Q8_0: 272, T.Q4_K: 148, T.Q6_K: 210}


@needs_kernels
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_0, T.Q8_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("rows,cols", [(16, 96), (48, 640), (2048, 640)])  # 96: not a multiple of 128
def test_weights_of_whole_16_row_groups_interleave_their_rows(qtype, rows, cols):
    """A Q4_0, Q5_0, Q8_0, Q4_K or Q6_K weight with a multiple of 16 rows packs to its X layout (16
    rows across the vector lanes): about the same bytes, decoding to exactly the GGUF values (fp32,
    and bf16 rounded as torch does, any row range); one-row products (whole groups read as four
    streams, the groups left over one at a time), a few rows, many rows with int16 and with int8
    activations, and products whose row ranges start inside a group (after a 5-row weight in one
    qmatmul_many call, so the threads' chunks cut groups and hold 15 whole groups: three per stream
    and three left over) all match the reference."""
    if BLOCK_INFO[qtype][0] == 256:
        cols = {96: 256, 640: 768}[cols]  # K-quants: whole super-blocks
    layer = GGMLLinear(random_blocks(qtype, rows, cols, seed=rows), int(qtype), rows, cols)
    layer.pack()
    packed, packed_type = layer.weight_for(1)
    assert packed_type == kernels.INTERLEAVED[int(qtype)][0]
    assert packed.shape == (rows, cols * X16_BYTES_PER_256[qtype] // 256)
    assert layer.weight_for(2) == (layer.blocks, int(qtype))
    want = layer.dequantize()
    out, out16 = torch.empty(rows, cols), torch.empty(rows, cols, dtype=torch.bfloat16)
    kernels.ops().dequant(packed, packed_type, out)
    kernels.ops().dequant(packed, packed_type, out16)
    assert torch.equal(out, want) and torch.equal(out16, want.bfloat16())
    ids = torch.tensor([rows - 1, 0, 7, 15 % rows])
    table = torch.empty(len(ids), cols)
    kernels.ops().lookup(packed, packed_type, rows, ids, table)
    assert torch.equal(table, want[ids])
    g = torch.Generator().manual_seed(3)
    for m in (1, 1, 2, 5, 70):
        x = torch.randn(m, cols, generator=g) * 10 ** torch.empty(1).uniform_(-2, 2, generator=g)
        assert dot_err(layer, x, kernels.ops().qmatmul(x, packed, packed_type, rows)) < 2e-5, m
        # int8 activations: ~2^-8 per value, averaged down over the row
        assert dot_err(layer, x, kernels.ops().qmatmul(x, packed, packed_type, rows, int8=True)) < 2e-3, m
    # Many rows run in 8-row tiles (AVX-512; 4 on AVX2), the tail in 4 and fewer, one row alone: each
    # row's sums are taken in the same order, so its int8 product is the same bits in any batch.
    x = torch.randn(70, cols, generator=g)
    many = kernels.ops().qmatmul(x, packed, packed_type, rows, int8=True)
    assert torch.equal(many, torch.cat([kernels.ops().qmatmul(r[None], packed, packed_type, rows, int8=True) for r in x]))
    first = GGMLLinear(random_blocks(T.Q8_0, 5, cols, seed=1), int(T.Q8_0), 5, cols)
    x = torch.randn(1, cols, generator=g)
    a, b = kernels.ops().qmatmul_many(x, [first.blocks, packed], [int(T.Q8_0), packed_type], [5, rows])
    assert dot_err(first, x, a) < 2e-5 and dot_err(layer, x, b) < 2e-5


@needs_kernels
@pytest.mark.parametrize("amx", [True, False])
def test_many_row_products_take_the_bf16_gemm_with_amx_and_int8_vnni_without(monkeypatch, amx):
    """Beyond the VNNI row limits, interleaved weights go to oneMKL's bf16 GEMM where it has AMX
    tiles and to the int8-activation VNNI kernel elsewhere; row layouts always take the GEMM."""
    monkeypatch.setattr(kernels, "amx_gemm", lambda: amx)
    ops = kernels.ops()
    x = torch.randn(MAX_VNNI_ROWS_INTERLEAVED + 5, 512, generator=torch.Generator().manual_seed(4))
    for rows, interleaved in ((32, True), (5, False)):
        layer = GGMLLinear(random_blocks(T.Q4_K, rows, 512, seed=rows), int(T.Q4_K), rows, 512)
        layer.pack(in_place=True)
        assert (layer.storage_type in kernels.INTERLEAVED_TYPES) == interleaved
        got = layer(x)
        gemm = ops.bf16_linear(x, layer.blocks, layer.storage_type, rows, 2048)
        int8 = ops.qmatmul(x, layer.blocks, layer.storage_type, rows, int8=True)
        assert torch.equal(got, gemm if amx or not interleaved else int8)
        assert dot_err(layer, x, got) < 2e-3


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
def test_decode_attention_list_rejects_mismatched_rows():
    from gemma3.cpu import kernels

    ops = kernels.ops()
    q, k = torch.zeros(2, 4, 32), torch.zeros(2, 2, 32)
    cache = [torch.zeros(1, 2, 8, 32) for _ in range(2)]
    with pytest.raises(RuntimeError, match="one cache, slot and position per row"):
        ops.decode_attention_list(q, k, k, cache, cache, [], [], [], [0], [0, 0], 0, 1.0)
    with pytest.raises(RuntimeError, match="slot out of range"):
        ops.decode_attention_list(q, k, k, cache, cache, [], [], [], [0, 8], [0, 8], 0, 1.0)
