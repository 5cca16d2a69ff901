"""The kernels' builds: which one a CPU gets (kernels.build_isa), and the AVX2 builds on an AVX-512
machine, where CI runs. A process loads one build, so each AVX2 build (GEMMA3_ISA=avx2, with
AVX-VNNI where the CPU has it, and avx2-novnni, the emulation most AVX2 CPUs run) gets processes of
its own: its outputs of every kernel op must be bit for bit those of this process's build, and
tests/cpu/test_kernels.py must pass on it. The first run builds each (~45 s, cached)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gemma3.cpu import kernels
from tests.helpers.kernels import needs_kernels

ROOT = Path(__file__).parents[2]
AVX512_CPU = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2", "fma", "f16c", "bmi2"}
AVX2_CPU = {"avx2", "fma", "f16c", "bmi2", "avx_vnni"}


@pytest.mark.parametrize("flags,env,want", [
    (AVX512_CPU, "", "avx512"),
    (AVX2_CPU, "", "avx2"),
    (AVX512_CPU, "avx2", "avx2"),
    (AVX512_CPU, "avx2-novnni", "avx2-novnni"),
    (AVX2_CPU, "avx512", "GEMMA3_ISA=avx512: this CPU lacks avx512f"),
    (AVX2_CPU, "sse2", "GEMMA3_ISA=sse2: not one of"),
    ({"avx", "f16c"}, "", "lacks avx512f.*and avx2, fma, bmi2"),
])
def test_build_isa_picks_the_fastest_build_the_cpu_runs(monkeypatch, flags, env, want):
    monkeypatch.setattr(kernels, "cpu_flags", lambda: flags)
    monkeypatch.setenv("GEMMA3_ISA", env)
    if want in kernels.BUILDS:
        assert kernels.build_isa() == want
    else:
        with pytest.raises(RuntimeError, match=want):
            kernels.build_isa()


def test_avx2_builds_name_their_instruction_sets(monkeypatch):
    """Not -march=native, which would turn AVX-512 on where the CPU has it; AVX-VNNI only where the
    CPU has it and the build wants it. Each build caches apart (its own key)."""
    monkeypatch.setattr(kernels, "cpu_flags", lambda: AVX512_CPU | {"avx_vnni"})
    assert "-march=native" in kernels.cflags("avx512")
    assert "-march=native" not in kernels.cflags("avx2") and "-mavxvnni" in kernels.cflags("avx2")
    assert "-mavx2" in kernels.cflags("avx2-novnni") and "-mavxvnni" not in kernels.cflags("avx2-novnni")
    assert len({kernels.build_key(b) for b in kernels.BUILDS}) == 3
    monkeypatch.setattr(kernels, "cpu_flags", lambda: AVX2_CPU - {"avx_vnni"})
    assert "-mavxvnni" not in kernels.cflags("avx2")


def run_with(build: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env={**os.environ, "GEMMA3_ISA": build},
                          capture_output=True, text=True, timeout=1200)


needs_avx2 = pytest.mark.skipif(not set(kernels.AVX2_CPU_FLAGS) <= kernels.cpu_flags(), reason="this CPU lacks AVX2")


@pytest.fixture(scope="module")
def reference_outputs(tmp_path_factory):
    """This process's build's outputs (in a fresh process too: same inputs, same threads)."""
    path = tmp_path_factory.mktemp("kernels") / "default.pt"
    done = run_with(os.environ.get("GEMMA3_ISA", ""), "-m", "tests.helpers.kernel_outputs", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(path)


@needs_kernels
@needs_avx2
@pytest.mark.parametrize("build", ["avx2", "avx2-novnni"])
def test_avx2_build_gives_the_same_bits(build, reference_outputs, tmp_path):
    path = tmp_path / f"{build}.pt"
    done = run_with(build, "-m", "tests.helpers.kernel_outputs", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(path)
    assert got["isa"] == "avx2"
    want = reference_outputs["outputs"]
    assert got["outputs"].keys() == want.keys()
    differ = [k for k, v in want.items() if not torch.equal(got["outputs"][k].view(torch.uint8), v.view(torch.uint8))]
    assert not differ, differ


@needs_kernels
@needs_avx2
@pytest.mark.parametrize("build", ["avx2", "avx2-novnni"])
def test_kernel_tests_pass_on_avx2_build(build):
    done = run_with(build, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/cpu/test_kernels.py")
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout and " skipped" not in done.stdout, done.stdout[-500:]
