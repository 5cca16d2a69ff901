"""Repacked weights kept on disk, so that a model loads from the page cache as llama.cpp's does.

Loading repacks every weight a decode step streams (linear.GGMLLinear.pack) into fresh memory. On
the VMs we measure on, the first touch of memory the guest has not used lately runs at 0.9-2 GB/s
(the hypervisor backing it), and that touch, not the repacking, was most of a load: the 1B loaded
in 1.9 s against llama.cpp's 0.7 s, which maps its file and touches no fresh memory for it.

So the first load of a GGUF file repacks into a new cache file, mapped shared: the repacked bytes
are written once, onto the page cache's pages they will live on, and the kernel writes them to disk
in the background (writing them out after repacking into fresh memory touched 2.4 GB twice and
added ~3 s to the 4B's first load). When it is filled, the file is mapped again over the same
addresses, private, and renamed into place. Later loads map that file (private, copy-on-write:
nothing writes to it). Its pages come from the page cache in 2 MB folios, mapped with 2 MB
entries as the huge pages of a repacking load: decode reads them as fast, and 800 MB map in ~5
ms. The file is also shared: two processes serving one model hold its weights once.

A cache file is named by its source (path, size, modification time), the kernel build (whose
sources define the layouts) and the layout of every weight, so any change writes a new one (and
removes the source's stale ones); it is filled under a temporary name and renamed, so a reader
never sees a partial file. GEMMA3_REPACK_CACHE=DIR puts the files elsewhere, =off disables them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from . import kernels

# Smaller sources load fast enough from memory (the test suite's tiny models): no file for them.
MIN_BYTES = 32 << 20


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
        self.pending: tuple[int, str] | None = None  # create()'s temporary file: descriptor, path
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
            return kernels.ops().map_file(f.fileno(), self.total, False)  # the tensor keeps the mapping

    def create(self) -> torch.Tensor | None:
        """A new cache file's bytes (uninitialised), mapped shared, for the repacking to fill; then
        commit(it). None where there is no cache file to write (disabled, too small a source, a full
        or read-only disk: that warns once), and the caller repacks into memory of its own."""
        if self.path is None:
            return None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(self.path.parent).free < 2 * self.total:
                return None  # not worth filling the disk for
            for stale in self.path.parent.glob(f"*-{self.prefix}-*.bin"):
                stale.unlink(missing_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
            self.pending = fd, tmp
            # The blocks reserved now: a disk that fills up fails here, where a write to a mapped
            # page past the end of the space would kill the process (SIGBUS).
            os.posix_fallocate(fd, 0, self.total)
            return kernels.ops().map_file(fd, self.total, True)
        except (OSError, RuntimeError) as e:
            self.close()
            self.warn(e)
            return None

    def commit(self, buffer: torch.Tensor) -> None:
        """`buffer` (create()'s), filled, becomes the cache file: mapped private over the same
        addresses (the views of it stay valid; nothing written to them reaches the file any more)
        and renamed into place."""
        fd, tmp = self.pending
        try:
            kernels.ops().remap_private(buffer, fd)
            os.replace(tmp, self.path)
        except (OSError, RuntimeError) as e:
            self.warn(e)
        finally:
            self.close()

    def close(self) -> None:
        """create()'s temporary file closed, and removed unless commit() renamed it into place
        (also where the repacking failed)."""
        if self.pending is not None:
            fd, tmp = self.pending
            self.pending = None
            os.close(fd)
            Path(tmp).unlink(missing_ok=True)

    def warn(self, e: Exception) -> None:
        warnings.warn(f"gemma3: could not write the repacked-weight cache {self.path} ({e}); "
                      "loads repack each time", RuntimeWarning, stacklevel=3)
