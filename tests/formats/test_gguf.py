"""gemma3.gguf_file: correct parsing, zero-copy tensors, and one-line GGUFErrors for bad files."""

from __future__ import annotations

import struct
import time
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from gemma3.formats.gguf import GGUFError, QTensor, read_gguf
from gemma3.inference.load import embedded_gguf_path as gemma_270m_path

# ---- a small valid file written by gguf.GGUFWriter ---------------------------------

F32_DATA = np.arange(6, dtype=np.float32).reshape(2, 3)
Q8_SOURCE = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
Q6_K_BYTES = np.random.default_rng(1).integers(0, 256, (3, 210), dtype=np.uint8)
Q6_K_BYTES[:, 208:210] = np.full((3, 1), 0.01, np.float16).view(np.uint8)  # finite scale d

EXPECTED_METADATA = {
    "general.architecture": "test",
    "test.u32": 7,
    "test.i64": -(2**40),
    "test.f32": 0.5,
    "test.bool": True,
    "test.str": "héllo",
    "test.tokens": ["<pad>", "a", "ü", ""],
    "test.ints": [1, -2, 3],
    "test.floats": [0.25, -1.5],
    "test.nested": [[1, 2], [3]],
}


def write_small_gguf(path: Path) -> Path:
    w = gguf.GGUFWriter(path, "test")
    w.add_uint32("test.u32", 7)
    w.add_int64("test.i64", -(2**40))
    w.add_float32("test.f32", 0.5)
    w.add_bool("test.bool", True)
    w.add_string("test.str", "héllo")
    w.add_array("test.tokens", ["<pad>", "a", "ü", ""])
    w.add_array("test.ints", [1, -2, 3])
    w.add_array("test.floats", [0.25, -1.5])
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_tensor("f32.weight", F32_DATA)
    w.add_tensor("q8.weight", gguf.quants.quantize(Q8_SOURCE, T.Q8_0), raw_dtype=T.Q8_0)
    w.add_tensor("q6k.weight", Q6_K_BYTES, raw_dtype=T.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def small_bytes(tmp_path_factory) -> bytes:
    return write_small_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf").read_bytes()


@pytest.fixture
def write(tmp_path):
    """Write bytes to a fresh file and return its path."""

    def _write(data: bytes, name: str = "bad.gguf") -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    return _write


def patch(data: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def after(data: bytes, marker: bytes) -> int:
    """Offset just past the (unique) string ``marker`` in the header."""
    at = data.index(marker)
    assert data.find(marker, at + 1) == -1
    return at + len(marker)


def read_expecting_error(path: Path, *fragments: str) -> str:
    """read_gguf must fail fast, without big allocations, with a one-line message naming the file."""
    start = time.perf_counter()
    with pytest.raises(GGUFError) as info:
        read_gguf(path)
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert elapsed < 1.0, f"took {elapsed:.2f}s: {message}"
    assert message.startswith(f"{path}: ") and "\n" not in message
    for fragment in fragments:
        assert fragment in message

    # Again under tracemalloc (which slows Python down, hence not timed) to bound allocations.
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError):
            read_gguf(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"allocated {peak} bytes: {message}"
    return message


# ---- valid files -------------------------------------------------------------------


def test_small_file_metadata_and_tensors(tmp_path):
    gf = read_gguf(write_small_gguf(tmp_path / "small.gguf"))
    assert gf.metadata == EXPECTED_METADATA
    assert type(gf.metadata["test.bool"]) is bool and type(gf.metadata["test.u32"]) is int
    assert list(gf.tensors) == ["f32.weight", "q8.weight", "q6k.weight"]

    f32, q8, q6k = gf.tensors.values()
    assert (f32.ggml_type, f32.shape, f32.nbytes) == (T.F32, (2, 3), 24)
    assert torch.equal(f32.dequantize(), torch.from_numpy(F32_DATA))
    assert f32.dequantize(torch.bfloat16).dtype == torch.bfloat16

    assert (q8.ggml_type, q8.shape, q8.nbytes) == (T.Q8_0, (4, 64), 4 * 2 * 34)
    expected = gguf.quants.dequantize(gguf.quants.quantize(Q8_SOURCE, T.Q8_0), T.Q8_0)
    assert torch.equal(q8.dequantize(), torch.from_numpy(expected))

    assert (q6k.ggml_type, q6k.shape) == (T.Q6_K, (3, 256))
    assert torch.equal(q6k.dequantize(), torch.from_numpy(gguf.quants.dequantize(Q6_K_BYTES, T.Q6_K)))


def test_small_file_agrees_with_gguf_reader(tmp_path):
    path = write_small_gguf(tmp_path / "small.gguf")
    gf, reader = read_gguf(path), gguf.GGUFReader(path)
    assert_same_as_reader(gf, reader, skip_keys={"test.nested"})  # GGUFReader flattens nested arrays


def assert_same_as_reader(gf, reader: gguf.GGUFReader, skip_keys=frozenset()) -> None:
    expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.") and k not in skip_keys}
    assert {k: v for k, v in gf.metadata.items() if k not in skip_keys} == expected
    assert list(gf.tensors) == [t.name for t in reader.tensors]
    for rt in reader.tensors:
        qt = gf.tensors[rt.name]
        assert qt.ggml_type == rt.tensor_type
        assert qt.shape == tuple(reversed(rt.shape.tolist()))
        assert qt.nbytes == rt.n_bytes
        assert np.array_equal(qt.data.numpy(), rt.data.reshape(-1).view(np.uint8))


def test_tensors_share_one_file_mapping(tmp_path):
    gf = read_gguf(write_small_gguf(tmp_path / "small.gguf"))
    storages = {qt.data.untyped_storage().data_ptr() for qt in gf.tensors.values()}
    assert len(storages) == 1
    # The mapping is private: writing to a tensor never changes the file.
    before = gf.path.read_bytes()
    gf.tensors["f32.weight"].data.fill_(0)
    assert gf.path.read_bytes() == before


def test_copies_read_the_same_bytes_outside_the_mapping(tmp_path):
    gf = read_gguf(write_small_gguf(tmp_path / "small.gguf"))
    names = ["q8.weight", "f32.weight"]
    copies = gf.copies(names)
    mapping = gf.tensors["f32.weight"].data.untyped_storage().data_ptr()
    for name, c in zip(names, copies):
        t = gf.tensors[name]
        assert (c.name, c.ggml_type, c.shape) == (t.name, t.ggml_type, t.shape)
        assert torch.equal(c.data, t.data)
        assert c.data.untyped_storage().data_ptr() != mapping
    assert torch.equal(copies[1].dequantize(), torch.from_numpy(F32_DATA))


def test_repr_is_short(tmp_path):
    gf = read_gguf(write_small_gguf(tmp_path / "small.gguf"))
    assert len(repr(gf)) < 200 and "tensor(" not in repr(gf.tensors["q8.weight"])


def test_real_gemma_270m_agrees_with_gguf_reader():
    path = gemma_270m_path()
    start = time.perf_counter()
    gf = read_gguf(path)
    elapsed = time.perf_counter() - start
    assert gf.metadata["general.architecture"] == "gemma3"
    assert len(gf.metadata["tokenizer.ggml.tokens"]) == 262144
    assert len(gf.tensors) == 236
    embedding = gf.tensors["token_embd.weight"]
    assert (embedding.ggml_type, embedding.shape) == (T.Q8_0, (262144, 640))
    assert isinstance(embedding, QTensor)
    assert elapsed < 5.0  # ~0.15 s in practice; GGUFReader takes ~9 s on this file
    assert_same_as_reader(gf, gguf.GGUFReader(path))


# ---- missing, foreign and unsupported files --------------------------------------------


def test_missing_file(tmp_path):
    read_expecting_error(tmp_path / "nope.gguf", "no such file")


def test_directory(tmp_path):
    read_expecting_error(tmp_path, "cannot read")


def test_flipped_magic(small_bytes, write):
    read_expecting_error(write(b"GGUG" + small_bytes[4:]), "not a GGUF file (magic b'GGUG')")


def test_random_bytes(write):
    data = np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    read_expecting_error(write(data), "not a GGUF file")


def test_random_bytes_after_magic(write):
    data = np.random.default_rng(6).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    read_expecting_error(write(b"GGUF" + data))


@pytest.mark.parametrize("version", [1, 4, 0xFFFFFFFF])
def test_unsupported_version(small_bytes, write, version):
    read_expecting_error(write(patch(small_bytes, 4, "<I", version)), f"unsupported GGUF version {version}")


def test_big_endian(small_bytes, write):
    read_expecting_error(write(patch(small_bytes, 4, ">I", 3)), "big-endian")


# ---- truncation --------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, -100])
def test_truncated_small_file(small_bytes, write, keep):
    # A fraction of the file, or all but the last 100 bytes (which cuts the last tensor, not just padding).
    n = int(len(small_bytes) * keep) if keep >= 0 else len(small_bytes) + keep
    message = read_expecting_error(write(small_bytes[:n]), "corrupt GGUF")
    assert "truncated" in message or "past the end" in message


def real_prefix(n: int) -> bytes:
    with open(gemma_270m_path(), "rb") as f:
        return f.read(n)


def real_data_start() -> int:
    # output_norm.weight is the first tensor; its data starts the data section.
    gf = read_gguf(gemma_270m_path())
    first = gf.tensors["output_norm.weight"].data
    return first.storage_offset()


@pytest.mark.parametrize("where", ["3", "100", "half header", "end of header", "mid tensor data"])
def test_truncated_real_file(write, where):
    data_start = real_data_start()
    n = {
        "3": 3,
        "100": 100,
        "half header": data_start // 2,
        "end of header": data_start,  # header intact, first tensor's data missing
        "mid tensor data": data_start + 2560 + 1000,  # inside token_embd.weight
    }[where]
    message = read_expecting_error(write(real_prefix(n)), "corrupt GGUF")
    if where == "mid tensor data":
        assert "token_embd.weight" in message and "past the end of the file" in message


def test_empty_file(write):
    read_expecting_error(write(b""), "truncated")


# ---- lying headers -----------------------------------------------------------------


def test_huge_tensor_count(small_bytes, write):
    read_expecting_error(write(patch(small_bytes, 8, "<Q", 2**40)), "claims 1099511627776 tensors")


def test_huge_kv_count(small_bytes, write):
    read_expecting_error(write(patch(small_bytes, 16, "<Q", 2**62)), "metadata entries")


def test_huge_key_length(small_bytes, write):
    read_expecting_error(write(patch(small_bytes, 24, "<Q", 2**60)), "truncated", "metadata entry 0")


def test_huge_string_value_length(small_bytes, write):
    at = after(small_bytes, b"test.str") + 4  # skip the value type
    read_expecting_error(write(patch(small_bytes, at, "<Q", 2**60)), "truncated", "'test.str'")


def test_huge_numeric_array_count(small_bytes, write):
    # GGUFReader would loop over 2**60 items here.
    at = after(small_bytes, b"test.ints") + 8  # skip value type and item type
    read_expecting_error(write(patch(small_bytes, at, "<Q", 2**60)), "claims", "array items", "'test.ints'")


def test_huge_string_array_count(small_bytes, write):
    at = after(small_bytes, b"test.tokens") + 8
    read_expecting_error(write(patch(small_bytes, at, "<Q", 2**60)), "array items")


def test_array_count_the_file_could_hold_is_still_capped(small_bytes, write):
    """A count the bytes left could back (a large file of zeros: every item an empty string or a
    zero) is refused beyond the reader's cap instead of building a list of tens of millions."""
    at = after(small_bytes, b"test.ints") + 8
    n = (1 << 22) + 1
    data = patch(small_bytes, at, "<Q", n) + bytes(8 * n)
    read_expecting_error(write(data), "array items", "4194304", "'test.ints'")


def test_unknown_value_type(small_bytes, write):
    read_expecting_error(write(patch(small_bytes, after(small_bytes, b"test.u32"), "<I", 99)), "unknown value type 99")


def test_invalid_utf8_string(small_bytes, write):
    data = small_bytes.replace("héllo".encode(), b"h\xff\xfello")
    read_expecting_error(write(data), "not valid UTF-8", "'test.str'")


def test_duplicate_key(small_bytes, write):
    read_expecting_error(write(small_bytes.replace(b"test.i64", b"test.u32")), "duplicate key")


def test_duplicate_tensor_name(small_bytes, write):
    read_expecting_error(write(small_bytes.replace(b"q6k.weight", b"f32.weight")), "duplicate tensor name")


@pytest.mark.parametrize("n_dims", [0, 5, 2**31])
def test_bad_dimension_count(small_bytes, write, n_dims):
    at = after(small_bytes, b"q8.weight")
    read_expecting_error(write(patch(small_bytes, at, "<I", n_dims)), "dimensions", "'q8.weight'")


def test_unknown_tensor_type(small_bytes, write):
    at = after(small_bytes, b"q8.weight") + 4 + 2 * 8  # n_dims, 2 dims
    read_expecting_error(write(patch(small_bytes, at, "<I", 4)), "unknown GGML type 4", "'q8.weight'")


def test_row_not_whole_blocks(small_bytes, write):
    at = after(small_bytes, b"q8.weight") + 4  # first dim = row length
    read_expecting_error(write(patch(small_bytes, at, "<Q", 33)), "multiple of 32", "'q8.weight'")


def test_huge_tensor_dims(small_bytes, write):
    at = after(small_bytes, b"q8.weight") + 4 + 8  # second dim = rows
    read_expecting_error(write(patch(small_bytes, at, "<Q", 2**62)), "past the end of the file", "'q8.weight'")


def test_misaligned_tensor_offset(small_bytes, write):
    at = after(small_bytes, b"q8.weight") + 4 + 2 * 8 + 4
    offset = struct.unpack_from("<Q", small_bytes, at)[0]
    read_expecting_error(write(patch(small_bytes, at, "<Q", offset + 1)), "not a multiple of the alignment")


def test_bad_alignment(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "a.gguf", "test")
    w.add_uint32("general.alignment", 24)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    read_expecting_error(tmp_path / "a.gguf", "power of two")


def test_random_header_mutations_only_raise_gguf_error(small_bytes, write):
    """Fuzz: flip bytes in the header; reading must succeed or raise GGUFError, never anything else."""
    rng = np.random.default_rng(7)
    header_end = small_bytes.index(F32_DATA.tobytes())
    path = write(small_bytes)
    for _ in range(300):
        data = bytearray(small_bytes)
        for at in rng.integers(4, header_end, rng.integers(1, 4)):
            data[at] = rng.integers(0, 256)
        path.write_bytes(bytes(data))
        try:
            read_gguf(path)
        except GGUFError as e:
            assert str(e).startswith(f"{path}: ")
