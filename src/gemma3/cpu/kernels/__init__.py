"""C++ kernels for the fast CPU path, built on first use and cached.

`ops()` returns the compiled extension, or None where it cannot be used (neither AVX-512 VNNI nor
AVX2, no compiler, a failed build, or GEMMA3_NO_KERNELS=1); callers then take the pure-PyTorch
reference path, so the package works everywhere and is fast where the kernels build. The build
(about a minute at `-O3`, announced on stderr; `make setup` runs it) lands in
~/.cache/gemma3/kernels (or $GEMMA3_KERNEL_CACHE), keyed by the sources, the flags, the torch
version and the CPU, so it happens once per machine; later loads import the cached shared
library directly (milliseconds, no build tool involved).

The kernels are written with AVX-512 intrinsics. CPUs without AVX-512 (Intel's client cores, AMD
before Zen 4) get the same source built for AVX2 + FMA + F16C, where avx2.h emulates the AVX-512
intrinsics exactly (AVX-VNNI's dot products where the CPU has them). `build_isa()` picks the build
for the CPU; GEMMA3_ISA=avx2 forces the AVX2 one on an AVX-512 CPU (to test and measure it there),
and GEMMA3_ISA=avx2-novnni also leaves AVX-VNNI out (the emulation most AVX2 CPUs run).

The kernels are split by responsibility into headers (formats, tiles, attention, the decode step,
...) that bindings.cpp includes in order: one translation unit, so SOURCES is that one file, and
the cache key hashes every header too (HEADERS).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name("bindings.cpp")]  # the one translation unit compiled
HEADERS = sorted(Path(__file__).parent.glob("*.h"))  # included by it: hashed into build_key too
# Per build: the compiler flags, and the /proc/cpuinfo flags it needs (the source refuses to
# compile without them). The AVX2 build names its instruction sets: -march=native would turn
# AVX-512 on where the CPU has it.
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c")
AVX2_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-mbmi2", "-fopenmp"]
AVX2_CPU_FLAGS = ("avx2", "fma", "f16c", "bmi2")
BUILDS = {"avx512": REQUIRED_CPU_FLAGS, "avx2": AVX2_CPU_FLAGS, "avx2-novnni": AVX2_CPU_FLAGS}  # GEMMA3_ISA's values
# GGML types with a kernel; anything else stays on the reference path.
TYPES = frozenset({2, 6, 8, 12, 14})  # Q4_0, Q5_0, Q8_0, Q4_K, Q6_K
Q4_0, Q5_0, Q8_0, Q4_K, Q6_K = 2, 6, 8, 12, 14
# Not GGML types: rows repacked for one-row products (linear.GGMLLinear.pack), by the op named.
Q4_0R, Q5_0R, Q8_0R, Q4_KR, Q6_KR = 1002, 1006, 1008, 1012, 1014
PACKED = {Q4_0: (Q4_0R, "repack_q4_0", 128), Q5_0: (Q5_0R, "repack_q5_0", 128), Q8_0: (Q8_0R, "repack_q8_0", 128),
          Q4_K: (Q4_KR, "repack_q4_k", 256), Q6_K: (Q6_KR, "repack_q6_k", 256)}  # packed type, op, row multiple
# Sixteen rows interleaved (fewer instructions per value, each group's bytes read front to back; a
# row is not contiguous, and table lookups decode it from its group): for weights whose row count
# is a multiple of 16. Others keep PACKED's row layouts.
Q4_0X, Q5_0X, Q8_0X, Q4_KX, Q6_KX = 1102, 1106, 1108, 1112, 1114
INTERLEAVED = {Q4_0: (Q4_0X, "repack_q4_0x", 32), Q5_0: (Q5_0X, "repack_q5_0x", 32),
               Q8_0: (Q8_0X, "repack_q8_0x", 32), Q4_K: (Q4_KX, "repack_q4_kx", 256),
               Q6_K: (Q6_KX, "repack_q6_kx", 256)}  # packed type, op, row multiple
INTERLEAVED_TYPES = frozenset(packed for packed, _, _ in INTERLEAVED.values())

_state: dict[str, object] = {}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                platform.machine())


def build_isa() -> str:
    """The build for this CPU: "avx512", else "avx2" (with AVX-VNNI where the CPU has it), or what
    GEMMA3_ISA asks for; a RuntimeError (the reference path, with a warning) where that cannot run."""
    flags, forced = cpu_flags(), os.environ.get("GEMMA3_ISA", "").lower()
    missing = {build: [f for f in needs if f not in flags] for build, needs in BUILDS.items()}
    if platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError("this CPU lacks x86-64")
    if forced:
        if forced not in BUILDS:
            raise RuntimeError(f"GEMMA3_ISA={forced}: not one of {', '.join(BUILDS)}")
        if missing[forced]:
            raise RuntimeError(f"GEMMA3_ISA={forced}: this CPU lacks {', '.join(missing[forced])}")
        return forced
    for build in ("avx512", "avx2"):  # the fastest build this CPU runs
        if not missing[build]:
            return build
    raise RuntimeError(f"this CPU lacks {', '.join(missing['avx512'])} (AVX-512) and {', '.join(missing['avx2'])} (AVX2)")


def cflags(build: str) -> list[str]:
    if build == "avx512":
        return CFLAGS
    return AVX2_CFLAGS + (["-mavxvnni"] if build == "avx2" and "avx_vnni" in cpu_flags() else [])


def isa() -> str:
    """The instruction set the fast path runs on: "avx512-amx" (the kernels, with prefill GEMMs on
    AMX tiles through oneMKL), "avx512" (the kernels; oneMKL kept off AMX, or no AMX), "avx2" (the
    kernels built for AVX2, with or without AVX-VNNI), or "none" (no kernels: the PyTorch
    reference path)."""
    if ops() is None:
        return "none"
    if _state["build"] != "avx512":
        return "avx2"
    mkl = os.environ.get("MKL_ENABLE_INSTRUCTIONS", "").upper()
    return "avx512-amx" if "amx_bf16" in cpu_flags() and (not mkl or "AMX" in mkl) else "avx512"


@functools.cache
def amx_gemm() -> bool:
    """Whether many-row products go to oneMKL's bf16 GEMM on AMX tiles (isa() "avx512-amx"; read
    once per process). Elsewhere that GEMM runs at fp32 speed and the int8 VNNI kernels win."""
    return isa() == "avx512-amx"


def cache_dir() -> Path:
    root = os.environ.get("GEMMA3_KERNEL_CACHE") or Path.home() / ".cache" / "gemma3" / "kernels"
    return Path(root)


def build_key(build: str) -> str:
    h = hashlib.sha256()
    for src in [*SOURCES, *HEADERS]:
        h.update(src.read_bytes())
    h.update(" ".join([torch.__version__, platform.machine(), *cflags(build), *sorted(cpu_flags())]).encode())
    return h.hexdigest()[:16]


def _load():
    if os.environ.get("GEMMA3_NO_KERNELS"):
        raise RuntimeError("disabled by GEMMA3_NO_KERNELS")
    build = _state["build"] = build_isa()
    name = f"gemma3_kernels_{build.replace('-', '_')}_{build_key(build)}"
    build_dir = cache_dir() / name
    built = build_dir / f"{name}.so"
    if not built.exists():
        build_dir.mkdir(parents=True, exist_ok=True)
        with open(build_dir / "gemma3.lock", "w") as lock:
            # One builder at a time. The OS drops this lock when its holder dies; torch's builder
            # instead leaves a `lock` file behind, and every later run would wait on a build killed
            # by Ctrl-C forever. Holding ours, no live builder can own that file: remove it.
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not built.exists():
                (build_dir / "lock").unlink(missing_ok=True)
                return _build(name, build, build_dir)
    loader = importlib.machinery.ExtensionFileLoader(name, str(built))
    spec = importlib.util.spec_from_loader(name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _build(name: str, build: str, build_dir: Path):
    from torch.utils.cpp_extension import load

    # The first run would otherwise sit silent for the length of the compile.
    print(f"gemma3: building CPU kernels, one time, ~1 min (cached in {cache_dir()})", file=sys.stderr, flush=True)
    return load(name, [str(s) for s in SOURCES], extra_cflags=cflags(build), extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir), verbose=False)


def ops():
    """The compiled kernels, or None (with one warning saying why) when they are unavailable."""
    if "ops" not in _state:
        try:
            _state["ops"] = _load()
        except Exception as e:  # a missing compiler, ninja or CPU feature: the reference path still works
            _state["ops"] = None
            _state["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            if not os.environ.get("GEMMA3_NO_KERNELS"):
                warnings.warn(f"gemma3: C++ kernels unavailable ({_state['error']}); using the PyTorch "
                              "reference path (slower)", RuntimeWarning, stacklevel=2)
    return _state["ops"]


def available() -> bool:
    return ops() is not None


def unavailable_reason() -> str | None:
    ops()
    return _state.get("error")


class HugePages:
    """One allocation on 2 MB pages (ops.huge_empty) for tensors of the given sizes, handed out in
    64-byte aligned slices by take(): the weights a decode step streams, so that reading them
    stops neither the hardware prefetchers nor the TLBs every 4 KB. Without the kernels (or for
    no bytes at all) take() hands out ordinary tensors."""

    ALIGN = 64

    def __init__(self, sizes: list[int], buffer: torch.Tensor | None = None):
        """`buffer`: memory to hand out instead of a new allocation (the repack cache's mapped
        file, holding the tensors already), of bytes_for(sizes) bytes."""
        total, kernels = self.bytes_for(sizes), ops()
        if buffer is not None and buffer.numel() != total:
            raise ValueError(f"HugePages: a buffer of {buffer.numel()} bytes for {total}")
        self.buffer = buffer if buffer is not None else kernels.huge_empty(total) if total and kernels is not None else None
        self.used = 0

    @classmethod
    def bytes_for(cls, sizes: list[int]) -> int:
        return sum(-(-n // cls.ALIGN) * cls.ALIGN for n in sizes if n)

    def take(self, rows: int, cols: int) -> torch.Tensor:
        n = rows * cols
        if self.buffer is None:
            return torch.empty(rows, cols, dtype=torch.uint8)
        if self.used + n > self.buffer.numel():
            raise ValueError(f"HugePages: {n} bytes asked for, {self.buffer.numel() - self.used} left")
        start, self.used = self.used, self.used + -(-n // self.ALIGN) * self.ALIGN
        return self.buffer[start:start + n].view(rows, cols)
