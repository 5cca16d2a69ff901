"""The repack cache (cpu/repack_cache.py): a second load maps the first one's repacked bytes and
computes the same bits; stale, partial or disabled caches never change what a model computes."""

import gc
import os
import shutil

import pytest
import torch

from gemma3.cpu import kernels
from gemma3.inference.load import embedded_gguf_path, load

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the C++ kernels do not build here")

IDS = torch.tensor([[2, 651, 6037, 576, 6081, 563, 1126, 496]])


def logits_and_mapped(path, cache_dir) -> tuple[torch.Tensor, int]:
    """The model's logits for IDS, and the kB of cache files this process has resident."""
    model, _ = load(path, backend="cpu")
    with torch.inference_mode():
        out = model(IDS)
    out = out[0] if isinstance(out, tuple) else out
    resident, current = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if not line[0].isupper():  # a mapping's header line: address range, ..., path
                current = str(cache_dir) in line
            elif current and line.startswith("Rss:"):
                resident += int(line.split()[1])
    del model
    gc.collect()
    return out.clone(), resident


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    where = tmp_path / "repacked"
    monkeypatch.setenv("GEMMA3_REPACK_CACHE", str(where))
    return where


def test_a_second_load_maps_the_cache_and_computes_the_same_bits(cache_dir):
    first, mapped_first = logits_and_mapped(embedded_gguf_path(), cache_dir)
    files = list(cache_dir.glob("*"))
    assert len(files) == 1 and files[0].suffix == ".bin"  # no temporary file left
    second, mapped_second = logits_and_mapped(embedded_gguf_path(), cache_dir)
    assert torch.equal(first, second)
    # Both loads read the weights from the file's mapping (the first repacked onto its pages):
    # (most of) its bytes are resident.
    for mapped in (mapped_first, mapped_second):
        assert mapped * 1024 > 0.5 * files[0].stat().st_size


def test_the_first_load_leaves_the_file_alone_once_written(cache_dir):
    """The repacking writes the file through a shared mapping, which commit() maps again private:
    a write to a weight afterwards changes the process's copy, never the file later loads map."""
    model, _ = load(embedded_gguf_path(), backend="cpu")
    (path,) = cache_dir.glob("*.bin")
    before = path.read_bytes()
    weight = model.layers[0].mlp.down_proj.blocks
    weight.view(-1)[:4096].fill_(0x5A)
    assert path.read_bytes() == before
    assert bool((weight.view(-1)[:4096] == 0x5A).all())


def test_a_partial_cache_file_is_replaced(cache_dir):
    want, _ = logits_and_mapped(embedded_gguf_path(), cache_dir)
    (path,) = cache_dir.glob("*.bin")
    whole = path.read_bytes()
    with open(path, "r+b") as f:
        f.truncate(len(whole) // 2)
    got, _ = logits_and_mapped(embedded_gguf_path(), cache_dir)
    assert torch.equal(want, got)  # repacked, not read from the half file
    assert path.read_bytes() == whole  # and written again whole


def test_a_changed_source_gets_a_new_file_and_the_stale_one_goes(cache_dir, tmp_path):
    source = tmp_path / "model.gguf"
    shutil.copyfile(embedded_gguf_path(), source)
    logits_and_mapped(source, cache_dir)
    (old,) = cache_dir.glob("*.bin")
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file "changed"
    logits_and_mapped(source, cache_dir)
    (new,) = cache_dir.glob("*.bin")
    assert new != old


def test_off_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA3_REPACK_CACHE", "off")
    monkeypatch.setenv("HOME", str(tmp_path))  # where the default directory would be
    logits_and_mapped(embedded_gguf_path(), tmp_path)
    assert not list(tmp_path.rglob("*.bin"))


def test_caches_of_two_builds_of_one_file_coexist(cache_dir, tmp_path, monkeypatch):
    """GEMMA3_ISA=avx2 on an AVX-512 machine writes its own file without evicting the native one's."""
    from gemma3.cpu.repack_cache import MIN_BYTES, RepackCache

    if "avx2" not in kernels.cpu_flags():
        pytest.skip("this CPU lacks AVX2: one build only")
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF")
    saved = []
    for isa in ("", "avx2", ""):
        monkeypatch.setenv("GEMMA3_ISA", isa)
        cache = RepackCache(source, [("w", 1)], MIN_BYTES)
        buffer = cache.create()
        buffer.zero_()
        cache.commit(buffer)
        saved.append(cache.path)
    assert saved[0] == saved[2] != saved[1] and all(p.is_file() for p in saved)


def test_an_unwritable_cache_directory_warns_and_loads_as_before(tmp_path, monkeypatch):
    """No cache file can be made (here the directory's place is taken by a file): the weights are
    repacked into memory of their own, with one warning, and compute the same bits."""
    monkeypatch.setenv("GEMMA3_REPACK_CACHE", "off")
    want, _ = logits_and_mapped(embedded_gguf_path(), tmp_path)
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    monkeypatch.setenv("GEMMA3_REPACK_CACHE", str(blocked / "repacked"))
    with pytest.warns(RuntimeWarning, match="could not write the repacked-weight cache"):
        got, _ = logits_and_mapped(embedded_gguf_path(), tmp_path)
    assert torch.equal(want, got)
