"""Every kernel op on fixed random inputs, outputs saved to a file: `python -m
tests.helpers.kernel_outputs OUT` in one process per build (GEMMA3_ISA; a process loads one build),
for tests/cpu/test_isas.py to compare bit for bit. Shapes reach the kernels' full tiles and their
tails: row counts off the 4-row tiles and 16-row groups, every layout, batches 1..9 and 16, int8
activations, head dims with and without a masked tail, a NaN and ties for the argmax."""

import sys

import torch
from gguf import GGMLQuantizationType as T

from gemma3.cpu import kernels
from gemma3.cpu.linear import GGMLLinear
from tests.helpers.kernels import random_blocks


def outputs() -> dict[str, torch.Tensor]:
    ops, g, out = kernels.ops(), torch.Generator().manual_seed(0), {}
    for qt, cols in [(T.Q4_0, 640), (T.Q5_0, 640), (T.Q8_0, 640), (T.Q4_K, 1024), (T.Q6_K, 1024)]:
        for rows in (5, 64, 67):
            name = f"{qt.name}x{rows}"
            layer = GGMLLinear(random_blocks(qt, rows, cols, seed=rows), int(qt), rows, cols)
            for dtype in (torch.float32, torch.bfloat16):
                out[f"dequant {name} {dtype}"] = torch.empty(rows, cols, dtype=dtype)
                ops.dequant(layer.blocks, int(qt), out[f"dequant {name} {dtype}"])
            for batch in (1, 2, 3, 4, 5, 9):
                out[f"qmatmul {name} batch {batch}"] = ops.qmatmul(torch.randn(batch, cols, generator=g) * 3,
                                                                   layer.blocks, int(qt), rows)
            layer.pack()  # the repacked or interleaved layout
            w, t = layer.weight_for(1)
            for batch in (1, 2, 4, 16):  # 16: a batched decode step, four tiles of four rows
                out[f"qmatmul packed {name} batch {batch}"] = ops.qmatmul(torch.randn(batch, cols, generator=g), w, t, rows)
            # int8 activations (prefill without AMX, interleaved layouts): a full tile and a tail
            out[f"qmatmul packed int8 {name}"] = ops.qmatmul(torch.randn(6, cols, generator=g), w, t, rows, int8=True)
            out[f"lookup packed {name}"] = torch.empty(3, cols)
            ops.lookup(w, t, rows, torch.tensor([0, rows - 1, 3]), out[f"lookup packed {name}"])
    F, d = 256, 128
    wg, wu, wd = random_blocks(T.Q8_0, F, d, seed=1), random_blocks(T.Q8_0, F, d, seed=2), random_blocks(T.Q5_0, d, F, seed=3)
    for M in (1, 3, 7):
        out[f"mlp {M}"] = ops.mlp(torch.randn(M, d, generator=g) * 4, wg, int(T.Q8_0), wu, int(T.Q8_0), wd, int(T.Q5_0), F, d)
    for D in (256, 40):
        B, Hq, Hk, S = 2, 4, 2, 77
        q = torch.randn(B, Hq, D, generator=g)
        k, v = torch.randn(B, Hk, S, D, generator=g), torch.randn(B, Hk, S, D, generator=g)
        pos = torch.arange(S)
        out[f"attention fp32 {D}"] = ops.decode_attention(q, k, v, pos, S - 1, 0, D ** -0.5)
        out[f"attention bf16 {D}"] = ops.decode_attention(q, k.bfloat16(), v.bfloat16(), pos, S - 1, 50, D ** -0.5)
        ks, vs = torch.rand(B, Hk, S, 1, generator=g) * 0.02, torch.rand(B, Hk, S, 1, generator=g) * 0.02
        k8, v8 = (torch.randint(-127, 128, (B, Hk, S, D), generator=g, dtype=torch.int8) for _ in range(2))
        out[f"attention int8 {D}"] = ops.decode_attention(q, k8, v8, pos, S - 1, 0, D ** -0.5, ks, vs)
    x = torch.randn(3, 70_001, generator=g)
    x[1, 5], x[2] = float("nan"), 1.0
    out["argmax"] = ops.argmax_rows(x)
    out["rms_norm"] = ops.rms_norm(torch.randn(5, 640, generator=g), torch.randn(640, generator=g), 1e-6)
    return out


if __name__ == "__main__":
    torch.save({"isa": kernels.isa(), "outputs": outputs()}, sys.argv[1])
