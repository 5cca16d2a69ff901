"""The fast path as a module swap (like gpt-fast's quantize.py): weights stay in their GGUF blocks.

`GGMLLinear` replaces `nn.Linear` and `GGMLEmbedding` the tied embedding / LM head. Both keep the
file's raw blocks (a zero-copy slice of the mmapped GGUF), so the model never holds a float copy of
its weights: peak memory is the file plus activations and the KV cache. Their forward runs the C++
kernels of `gemma3.kernels`:

- a few rows (decode, small batches): activations quantized per block of 32 to int16 and
  multiplied with the weight blocks by AVX-512 VNNI (as llama.cpp does with int8 activations, but
  ~1e-4 instead of a few percent from the fp32 logits); each weight byte is read once per step;
- many rows (prefill): with AMX, weight tiles dequantized to bf16 and multiplied with a bf16 GEMM
  (oneMKL) with fp32 accumulation and output; without it, the interleaved layouts' VNNI kernel
  with activations rounded to int8 per block of 32 (as llama.cpp's Q8_0 activations).

`reference()` is the same product in plain PyTorch (exact dequantization from formats/ggml.py, then an
fp32 matmul); the kernels are tested against it, and it is what runs where the kernels cannot be
built.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats.ggml import BLOCK_INFO, dequantize
from ..formats.gguf import QTensor
from . import kernels

# Up to this many rows the VNNI kernel wins; above, dequantize-to-bf16 + GEMM does (one core of an
# AMX machine: at 8 rows VNNI is ~1.3x faster, at 16 rows bf16 is ~1.5x faster; the VNNI cost grows
# with the rows, the bf16 one is mostly the dequantization).
MAX_VNNI_ROWS = 8
# Weights stored interleaved (a table repacked in place, e.g. the 270M's Q8_0 LM head) decode
# slowly for the GEMM (a gather per row and block), while their VNNI kernel reads them once per 4
# rows: it stays faster up to ~32 rows (the 270M head at 16 rows: 20.7 ms against 36 ms).
MAX_VNNI_ROWS_INTERLEAVED = 32
TILE_ROWS = 2048  # weight rows dequantized to bf16 at a time on the GEMM path (a few MB, transient)


class GGMLLinear(nn.Module):
    """y = x @ W.T with W [out, in] kept as GGUF blocks."""

    def __init__(self, blocks: torch.Tensor, ggml_type: int, out_features: int, in_features: int):
        super().__init__()
        self.ggml_type = int(ggml_type)
        self.storage_type = self.ggml_type  # the layout of `blocks`: the GGUF type, or a repacked one (pack)
        self.out_features, self.in_features = out_features, in_features
        block_values, block_bytes = BLOCK_INFO[self.ggml_type]
        self.register_buffer("blocks", blocks.reshape(out_features, in_features // block_values * block_bytes),
                             persistent=False)
        self.register_buffer("packed", None, persistent=False)  # see pack()
        self.packed_layout: int | None = None  # the type of `packed`'s bytes

    def layout(self) -> tuple[int, str] | None:
        """(type, repack op) of the layout pack() would write, or None: Q4_0, Q5_0 and Q8_0 weights of
        whole 16-row groups interleave their rows (kernels.INTERLEAVED), the rest get PACKED's rows."""
        if kernels.ops() is None or self.storage_type != self.ggml_type:
            return None
        interleaved = kernels.INTERLEAVED.get(self.ggml_type)
        if interleaved and self.out_features % 16 == 0 and self.in_features % interleaved[2] == 0:
            return interleaved[:2]
        packing = kernels.PACKED.get(self.ggml_type)
        return packing[:2] if packing and self.in_features % packing[2] == 0 else None

    def packed_nbytes(self) -> int:
        """Bytes pack() writes: 0 where the weight has no repacked layout (or no kernels)."""
        layout = self.layout()
        return self.out_features * kernels.ops().layout_row_bytes(layout[0], self.in_features) if layout else 0

    def pack(self, in_place: bool = False, drop_source: bool = False, memory: kernels.HugePages | None = None,
             repacked: bool = False):
        """Repacks Q4_0 / Q5_0 / Q8_0 / Q4_K / Q6_K weights into a one-row kernel's layout
        (kernels.INTERLEAVED: 16 rows across the vector lanes; PACKED: 128 values per group,
        unsigned values for vpdpbusd): single-row products (batch-1 decode) read it at a third to
        a quarter of the GGUF layout's instructions. By default as a copy, the weight's size again
        (Q4_KR 76/72 of it), and everything else keeps reading `blocks`; `in_place` replaces
        `blocks` instead (every kernel and lookup reads the repacked layouts). `drop_source` (in place only)
        vouches that `blocks` lie in a private, unmodified file mapping (the GGUF's) whose pages
        this process may let go (ops.drop_file_pages). `memory`: where the repacked rows go
        (2 MB pages; a new tensor otherwise). `repacked` (in place only): `memory` holds this
        weight's repacked rows already (the repack cache's file): they are taken as they are."""
        layout = self.layout()
        if layout is None:
            return
        (packed_type, op), ops = layout, kernels.ops()
        repack = getattr(ops, op)
        shape = (self.out_features, ops.layout_row_bytes(packed_type, self.in_features))
        packed = memory.take(*shape) if memory is not None else torch.empty(shape, dtype=torch.uint8)
        if repacked:
            self.blocks, self.storage_type = packed, packed_type
            return
        if not in_place:
            self.packed = repack(self.blocks, self.out_features, self.in_features, out=packed)
            self.packed_layout = packed_type
            return
        # In row slices (of whole 16-row groups), each slice's source pages let go as soon as it is
        # repacked (with `drop_source`, for blocks read from the GGUF file mapping): memory never
        # holds both, beyond one slice. 64 MB slices: each drop is an madvise whose TLB flushes
        # stall the repacking threads; with 8 MB ones a 4B model's layers took ~2x longer to load.
        step = max(16, (64 << 20) // self.blocks.shape[1] // 16 * 16)
        for r0 in range(0, self.out_features, step):
            source = self.blocks[r0:r0 + step]
            repack(source, source.shape[0], self.in_features, out=packed[r0:r0 + step])
            if drop_source:
                ops.drop_file_pages(source)
        self.blocks, self.storage_type = packed, packed_type

    @property
    def packed_type(self) -> int:
        return self.packed_layout if self.packed is not None else self.storage_type

    def weight_for(self, rows: int) -> tuple[torch.Tensor, int]:
        """The bytes and type the kernels read for a product with `rows` activation rows."""
        if rows == 1 and self.packed is not None:
            return self.packed, self.packed_type
        return self.blocks, self.storage_type

    @classmethod
    def from_qtensor(cls, t: QTensor) -> "GGMLLinear":
        return cls(t.data, t.ggml_type, *t.shape)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, type={self.type_name}"

    @property
    def type_name(self) -> str:
        from ..formats.ggml_types import GGMLQuantizationType

        return GGMLQuantizationType(self.ggml_type).name

    def dequantize(self) -> torch.Tensor:
        """float32 weight, exactly as formats/ggml.py decodes it (repacked blocks through the kernels'
        decoder, which tests hold bit-exact with it)."""
        if self.storage_type == self.ggml_type:
            return dequantize(self.blocks.reshape(-1), self.ggml_type, (self.out_features, self.in_features))
        out = torch.empty(self.out_features, self.in_features)
        kernels.ops().dequant(self.blocks, self.storage_type, out)
        return out

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() @ self.dequantize().T).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = kernels.ops()
        if ops is None or self.ggml_type not in kernels.TYPES or x.device.type != "cpu":
            return self.reference(x)
        x2 = x.reshape(-1, self.in_features).float()
        interleaved = self.storage_type in kernels.INTERLEAVED_TYPES
        if x2.shape[0] <= (MAX_VNNI_ROWS_INTERLEAVED if interleaved else MAX_VNNI_ROWS):
            y = ops.qmatmul(x2, *self.weight_for(x2.shape[0]), self.out_features)
        elif interleaved and not kernels.amx_gemm():
            # Without AMX, oneMKL's bf16 GEMM runs at fp32 FMA speed (and slower on AMD): the
            # interleaved kernel with int8 activations does ~1.7x that (4B shapes, 512 rows).
            y = ops.qmatmul(x2, self.blocks, self.storage_type, self.out_features, int8=True)
        else:
            y = ops.bf16_linear(x2, self.blocks, self.storage_type, self.out_features, TILE_ROWS)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class GGMLEmbedding(GGMLLinear):
    """The tied embedding table in GGUF blocks: rows are dequantized on lookup (exact), and
    `attend(hidden)` is the LM head, hidden @ table.T, through the same kernels as GGMLLinear."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        ops = kernels.ops()
        if ops is None or self.ggml_type not in kernels.TYPES:
            rows = self.blocks[flat]
            out = dequantize(rows.reshape(-1), self.ggml_type, (rows.shape[0], self.in_features))
        else:  # the same values (the kernel's decoders are bit-exact with formats/ggml.py), ~4x faster per token
            out = torch.empty(flat.shape[0], self.in_features)
            ops.lookup(self.blocks, self.storage_type, self.out_features, flat.to(torch.int64).contiguous(), out)
        return out.reshape(*ids.shape, self.in_features)

    def attend(self, hidden: torch.Tensor) -> torch.Tensor:
        return GGMLLinear.forward(self, hidden)
