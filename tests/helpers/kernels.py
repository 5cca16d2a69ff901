"""Random GGUF blocks and quantized copies of tiny models, for the cpu/ tests."""

import pytest
import torch
from gguf import GGMLQuantizationType as T

from gemma3.cpu import kernels
from gemma3.cpu.linear import GGMLEmbedding, GGMLLinear
from gemma3.formats.ggml import BLOCK_INFO
from tests.helpers import DATA

TEXT = (DATA / "gpl-3.0.txt").read_text()


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


def quantized_copy(model, qtype=T.Q8_0, in_place: bool = False):
    """(fast, reference): every Linear and the embedding re-encoded as `qtype` GGUF blocks; the fast
    copy holds the blocks (GGMLLinear + make_fast), the reference the same values dequantized.
    `in_place`: the weights repacked in place, as the GGUF loader does (one layout for every
    product); by default a repacked copy for one-row products beside the blocks."""
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
                q.pack(in_place=in_place)
            parent, _, child = name.rpartition(".")
            setattr(fast.get_submodule(parent) if parent else fast, child, q)
            ref.get_submodule(name).weight.data = q.dequantize()
    return make_fast(fast), ref
