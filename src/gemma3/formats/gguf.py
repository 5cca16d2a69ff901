"""Read GGUF files into plain Python metadata and zero-copy raw tensors, with clear errors.

GGUF layout (little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x   (key: string, value_type: u32, value)
    tensor_count x (name: string, n_dims: u32, dims: u64[n_dims], ggml_type: u32, offset: u64)
    padding to `general.alignment` (default 32)
    tensor data; each tensor starts at data_start + offset

where a string is (length u64, utf-8 bytes) and an array value is
(item_type u32, count u64, items).

We parse the header ourselves instead of with ``gguf.GGUFReader`` because
every length and count in the header is untrusted: GGUFReader trusts them
(an array claiming 2**60 items makes it loop practically forever) and fails on
corrupt files with bare numpy errors. Our parser checks each length against
the bytes that are left before using it, so a corrupt or truncated file costs
at most one pass over its header and ends in a one-line ``GGUFError``. It is
also much faster on big tokenizer arrays (GGUFReader builds one numpy view per
array item): 0.15 s instead of 9 s for Gemma 3 270M. The ``gguf`` package still
supplies the type enums and block sizes.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import ggml as quants
from .ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)  # v2 and v3 share the layout; v3 only added big-endian files
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ARRAY_NESTING = 8  # arrays of arrays are legal but unused in practice; bounds recursion
# Counts are also capped outright: bounded by the bytes left alone, a lying count in a large file
# of zeros still built lists of tens of millions of items (found by fuzzing: +630 MB for one
# 253 MB file). Real files hold ~1k tensors, ~50 metadata entries and < 1M array items (a 262k
# vocabulary's tokens, scores and types).
_MAX_TENSORS = 1 << 16
_MAX_KV = 1 << 16
_MAX_ARRAY_ITEMS = 1 << 22  # in all the metadata's arrays together

# Smallest possible encodings, used to bound counts by the bytes left in the file.
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset
_MIN_STRING_BYTES = 8
_MIN_ARRAY_BYTES = 4 + 8

_SCALAR_DTYPES: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"),
    GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.BOOL: np.dtype("?"),
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GGUFError(ValueError):
    """A GGUF file is missing, not GGUF, unsupported or corrupt. The message names the file."""


@dataclass
class QTensor:
    """One tensor of a GGUF file, still in its on-disk (possibly quantized) encoding.

    ``shape`` is in PyTorch order (GGUF dims reversed): the last dim is the
    contiguous one that quantization splits into blocks. ``data`` holds the raw
    bytes as a 1-D uint8 tensor that shares memory with the file mapping.
    """

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: torch.Tensor = field(repr=False)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decode to a new ``dtype`` tensor of ``shape`` (ValueError for unsupported types)."""
        return quants.dequantize(self.data, self.ggml_type, self.shape).to(dtype)


@dataclass
class GGUFFile:
    """A parsed GGUF file.

    ``metadata`` maps each key to a plain Python value: str, int, float or bool
    for scalars, and a list for arrays (list[str] for string arrays, a list of
    Python numbers for numeric arrays, nested lists for arrays of arrays).
    ``tensors`` maps names to tensors in file order.
    """

    path: Path
    metadata: dict[str, object] = field(repr=False)  # the vocabulary alone has ~262k entries
    tensors: dict[str, QTensor] = field(repr=False)
    # key → (value type, item type of an array or None): what a writer needs to copy a key exactly
    # (llama.cpp rejects a key stored with another type, e.g. an int32 where it expects uint32).
    value_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = field(default_factory=dict, repr=False)

    def copies(self, names: list[str]) -> list[QTensor]:
        """Tensors `names` with their bytes read from the file (pread) into memory of their own,
        never through the mapping: for small tensors lying between big ones that a loader lets go
        as it goes. A read through the mapping maps whole page-cache folios, so up to 2 MB of the
        neighbours per small tensor (~65 MB for the 270M's 109 norms) would become resident again."""
        out = []
        with open(self.path, "rb", buffering=0) as f:
            for name in names:
                t = self.tensors[name]
                start, raw = t.data.storage_offset(), bytearray()  # data: a view of the whole file's bytes
                while len(raw) < t.nbytes:
                    part = os.pread(f.fileno(), t.nbytes - len(raw), start + len(raw))
                    if not part:
                        raise GGUFError(f"{self.path}: truncated while reading tensor {name!r}")
                    raw += part
                out.append(QTensor(t.name, t.ggml_type, t.shape, torch.frombuffer(raw, dtype=torch.uint8)))
        return out


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse the GGUF file at ``path``; tensor data is memory-mapped, not read.

    Raises GGUFError (a ValueError) with a one-line message for a missing file,
    a non-GGUF file, an unsupported version, or any corruption or truncation.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(_MAGIC))
            if head != _MAGIC:
                if len(head) < len(_MAGIC) and _MAGIC.startswith(head):
                    raise GGUFError(f"{path}: corrupt GGUF: truncated, file is only {len(head)} bytes")
                raise GGUFError(f"{path}: not a GGUF file (magic {head!r})")
            # A private (copy-on-write) mapping: reads share the page cache, and torch
            # gets a writable buffer, so writes to a tensor can never reach the file.
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except FileNotFoundError:
        raise GGUFError(f"{path}: no such file") from None
    except OSError as e:
        raise GGUFError(f"{path}: cannot read: {e.strerror or e}") from None

    header = _Header(path, buf)
    metadata, infos = header.parse()
    file_bytes = torch.frombuffer(buf, dtype=torch.uint8)
    tensors = {
        name: QTensor(name, ggml_type, shape, file_bytes[start : start + nbytes])
        for name, ggml_type, shape, start, nbytes in infos
    }
    return GGUFFile(path, metadata, tensors, header.value_types)


class _Header:
    """Bounds-checked parser for the header of one GGUF file held in ``buf``."""

    def __init__(self, path: Path, buf: mmap.mmap):
        self.path = path
        self.buf = buf
        self.size = len(buf)
        self.pos = len(_MAGIC)
        self.context = "file header"  # what is being parsed, for error messages
        self.value_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
        self.array_items = 0  # read so far, in every array

    def error(self, problem: str) -> GGUFError:
        return GGUFError(f"{self.path}: corrupt GGUF: {problem} (in {self.context})")

    def parse(self) -> tuple[dict[str, object], list[tuple[str, GGMLQuantizationType, tuple[int, ...], int, int]]]:
        """Return (metadata, tensor infos as (name, type, torch shape, data start, nbytes))."""
        self.read_version()
        tensor_count = self.count(self.u64(), _MIN_TENSOR_INFO_BYTES, "tensors", _MAX_TENSORS)
        kv_count = self.count(self.u64(), _MIN_KV_BYTES, "metadata entries", _MAX_KV)

        metadata: dict[str, object] = {}
        for i in range(kv_count):
            self.context = f"metadata entry {i}"
            key = self.string()
            self.context = f"metadata key {key!r}"
            if key in metadata:
                raise self.error("duplicate key")
            raw_type, item_at = self.u32(), self.pos
            metadata[key] = self.value(raw_type, depth=0)
            item_type = GGUFValueType(_U32.unpack_from(self.buf, item_at)[0]) if raw_type == GGUFValueType.ARRAY else None
            self.value_types[key] = (GGUFValueType(raw_type), item_type)

        self.context = "general.alignment"
        alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise self.error(f"alignment must be a positive power of two, got {alignment!r}")

        raw_infos = [self.tensor_info(i) for i in range(tensor_count)]
        data_start = -(-self.pos // alignment) * alignment
        infos = []
        names: set[str] = set()
        for name, ggml_type, shape, offset in raw_infos:
            self.context = f"tensor {name!r}"
            if name in names:
                raise self.error("duplicate tensor name")
            names.add(name)
            if offset % alignment:
                raise self.error(f"data offset {offset} is not a multiple of the alignment {alignment}")
            try:
                nbytes = quants.tensor_nbytes(ggml_type, shape)
            except ValueError as e:
                raise self.error(str(e)) from None
            start = data_start + offset
            if start + nbytes > self.size:
                raise self.error(
                    f"data [{start}, {start + nbytes}) extends past the end of the file ({self.size} bytes); truncated?"
                )
            infos.append((name, ggml_type, shape, start, nbytes))
        return metadata, infos

    def read_version(self) -> None:
        version = self.u32()
        if version in _SUPPORTED_VERSIONS:
            return
        if version & 0xFFFF == 0 and int.from_bytes(version.to_bytes(4, "little"), "big") in _SUPPORTED_VERSIONS:
            raise GGUFError(f"{self.path}: big-endian GGUF files are not supported")
        raise GGUFError(f"{self.path}: unsupported GGUF version {version} (supported: 2, 3)")

    def count(self, n: int, min_item_bytes: int, what: str, most: int) -> int:
        """Check a header count against the bytes left and a cap, so a lying count fails here, not
        in a huge loop or a huge list."""
        left = self.size - self.pos
        if n * min_item_bytes > left:
            raise self.error(f"header claims {n} {what} but only {left} bytes follow")
        if n > most:
            raise self.error(f"header claims {n} {what}, more than the {most} this reader accepts")
        return n

    def items(self, min_item_bytes: int) -> int:
        """The length of an array, counted against the cap on all arrays' items."""
        n = self.count(self.u64(), min_item_bytes, "array items", _MAX_ARRAY_ITEMS)
        self.array_items += n
        if self.array_items > _MAX_ARRAY_ITEMS:
            raise self.error(f"metadata arrays hold more than the {_MAX_ARRAY_ITEMS} items this reader accepts")
        return n

    def take(self, n: int) -> int:
        """Consume ``n`` bytes; return where they start."""
        if n > self.size - self.pos:
            raise self.error(f"truncated: needs {n} bytes at offset {self.pos}, file is {self.size} bytes")
        start = self.pos
        self.pos += n
        return start

    def u32(self) -> int:
        return _U32.unpack_from(self.buf, self.take(4))[0]

    def u64(self) -> int:
        return _U64.unpack_from(self.buf, self.take(8))[0]

    def string(self) -> str:
        n = self.u64()
        start = self.take(n)
        try:
            return self.buf[start : start + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.error(f"string at offset {start} is not valid UTF-8 ({e.reason})") from None

    def strings(self, n: int) -> list[str]:
        """n strings in a row (a tokenizer's 262k-token vocabulary): string() in one tight loop,
        a third of the time; any problem is reported by string() itself."""
        buf, pos, size, unpack, out = self.buf, self.pos, self.size, _U64.unpack_from, []
        try:
            for _ in range(n):
                (k,) = unpack(buf, pos)
                if k > size - pos - 8:
                    raise ValueError
                out.append(buf[pos + 8 : pos + 8 + k].decode("utf-8"))
                pos += 8 + k
        except (ValueError, struct.error):  # a bad length, bad UTF-8, or the file's end
            self.pos = pos
            self.string()  # raises the precise error for the string at pos
            raise AssertionError("unreachable: string() accepted what strings() refused") from None
        self.pos = pos
        return out

    def value_type(self, raw: int) -> GGUFValueType:
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.error(f"unknown value type {raw}") from None

    def value(self, raw_type: int, depth: int) -> object:
        vtype = self.value_type(raw_type)
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            return self.array(depth + 1)
        dtype = _SCALAR_DTYPES[vtype]
        return np.frombuffer(self.buf, dtype, 1, self.take(dtype.itemsize)).item()

    def array(self, depth: int) -> list:
        if depth > _MAX_ARRAY_NESTING:
            raise self.error(f"arrays nested deeper than {_MAX_ARRAY_NESTING} levels")
        item_type = self.value_type(self.u32())
        if item_type == GGUFValueType.STRING:
            return self.strings(self.items(_MIN_STRING_BYTES))
        if item_type == GGUFValueType.ARRAY:
            n = self.items(_MIN_ARRAY_BYTES)
            return [self.array(depth + 1) for _ in range(n)]
        dtype = _SCALAR_DTYPES[item_type]
        n = self.items(dtype.itemsize)
        return np.frombuffer(self.buf, dtype, n, self.take(n * dtype.itemsize)).tolist()

    def tensor_info(self, index: int) -> tuple[str, GGMLQuantizationType, tuple[int, ...], int]:
        self.context = f"tensor info {index}"
        name = self.string()
        self.context = f"tensor {name!r}"
        n_dims = self.u32()
        if not 1 <= n_dims <= _MAX_DIMS:
            raise self.error(f"{n_dims} dimensions (must be 1 to {_MAX_DIMS})")
        dims = [self.u64() for _ in range(n_dims)]
        raw_type = self.u32()
        if raw_type not in GGML_QUANT_SIZES:
            raise self.error(f"unknown GGML type {raw_type}")
        offset = self.u64()
        # GGUF lists dims innermost first; torch order is outermost first.
        return name, GGMLQuantizationType(raw_type), tuple(reversed(dims)), offset
