"""Repacked weights kept on disk, so that a model loads from the page cache as llama.cpp's does.

Loading repacks every weight a decode step streams (linear.GGMLLinear.pack) into fresh memory. On
the VMs we measure on, the first touch of memory the guest has not used lately runs at 0.9-2 GB/s
(the hypervisor backing it), and that touch, not the repacking, was most of a load: the 1B loaded
in 1.9 s against llama.cpp's 0.7 s, which maps its file and touches no fresh memory for it.

So the first load of a GGUF file writes its repacked bytes to a cache file, and later loads map
that file (private, copy-on-write: nothing writes to it). Its pages come from the page cache, where
ext4 and XFS on recent kernels keep them in 2 MB folios that the mapping takes with 2 MB entries,
as the huge pages of a repacking load: decode reads them as fast, and 800 MB map in ~5 ms. The
file is also shared: two processes serving one model hold its weights once.

A cache file is named by its source (path, size, modification time), the kernel build (whose
sources define the layouts) and the layout of every weight, so any change writes a new one (and
removes the source's stale ones); it is written under a temporary name and renamed, so a reader
never sees a partial file. GEMMA3_REPACK_CACHE=DIR puts the files elsewhere, =off disables them.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from . import kernels

# Smaller sources load fast enough from memory (the test suite's tiny models): no file for them.
MIN_BYTES = 32 << 20
CHUNK = 64 << 20  # bytes per write: large writes keep the page cache's folios large


def cache_dir() -> Path | None:
    where = os.environ.get("GEMMA3_REPACK_CACHE", "")
    if where.lower() in ("off", "0", "no", "false"):
        return None
    return Path(where) if where else Path.home() / ".cache" / "gemma3" / "repacked"


class RepackCache:
    """The cache file for one source and layout: load() maps it if it is there, save() writes it."""

    def __init__(self, source: Path, layout: list[tuple], total: int):
        self.total, where = total, cache_dir()
        self.path = None
        if where is None or total < MIN_BYTES or not source.is_file():
            return
        source = source.resolve()
        st = source.stat()
        key = hashlib.sha256(repr((str(source), st.st_size, st.st_mtime_ns, kernels.build_key(kernels.build_isa()),
                                   layout)).encode()).hexdigest()[:24]
        # Stale files are this source's for this build (ISA): an AVX2 and an AVX-512 cache of one
        # file coexist (GEMMA3_ISA=avx2 on an AVX-512 machine no longer evicts the other's).
        self.prefix = hashlib.sha256(f"{source}\0{kernels.build_isa()}".encode()).hexdigest()[:12]
        self.path = where / f"{source.stem[:64]}-{self.prefix}-{key}.bin"

    def load(self) -> torch.Tensor | None:
        """The cached bytes as a uint8 tensor over a private mapping of the file, or None."""
        if self.path is None or not self.path.is_file() or self.path.stat().st_size != self.total:
            return None
        with open(self.path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), self.total, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        return torch.frombuffer(mapped, dtype=torch.uint8)  # keeps the mapping alive

    def save(self, data: torch.Tensor) -> None:
        """Writes `data` (the repacked bytes) as the cache file; a failure (a full or read-only
        disk) warns once and leaves the load as it was."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(self.path.parent).free < 2 * self.total:
                return  # not worth filling the disk for
            for stale in self.path.parent.glob(f"*-{self.prefix}-*.bin"):
                stale.unlink(missing_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    view = memoryview(data.numpy())
                    for start in range(0, self.total, CHUNK):
                        f.write(view[start:start + CHUNK])
                os.replace(tmp, self.path)
            finally:
                Path(tmp).unlink(missing_ok=True)  # gone already where the rename happened
        except OSError as e:
            warnings.warn(f"gemma3: could not write the repacked-weight cache {self.path} ({e}); "
                          "loads repack each time", RuntimeWarning, stacklevel=2)
