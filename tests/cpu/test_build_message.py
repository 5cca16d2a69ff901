"""The first run builds the C++ kernels (about a minute): it says so on stderr before it starts,
and a run that finds them built says nothing."""

import os
import select
import signal
import subprocess
import sys
import time

import pytest

from gemma3.cpu import kernels

BUILD = [sys.executable, "-c", "from gemma3.cpu import kernels; kernels.ops()"]


def test_a_cold_build_says_so_first(tmp_path):
    try:
        kernels.build_isa()
    except RuntimeError as e:  # no build for this CPU: nothing is compiled, nothing to announce
        pytest.skip(str(e))
    env = dict(os.environ, GEMMA3_KERNEL_CACHE=str(tmp_path))  # an empty cache: the build is cold
    env.pop("GEMMA3_NO_KERNELS", None)
    proc = subprocess.Popen(BUILD, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        ready, _, _ = select.select([proc.stderr], [], [], 120)
        line = proc.stderr.readline() if ready else ""
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the compiler too: the message is what this test is about
        proc.wait()
    assert line == f"gemma3: building CPU kernels, one time, ~1 min (cached in {tmp_path})\n"


def test_a_built_cache_is_silent():
    if not kernels.available():  # builds them here when needed (e.g. a fresh machine)
        pytest.skip(f"no C++ kernels here: {kernels.unavailable_reason()}")
    out = subprocess.run(BUILD, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stderr == ""


def _compiling(pid: int) -> bool:
    """True when a compiler (or ninja driving it) runs under process `pid`."""
    parents = {}
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                comm, rest = f.read().rsplit(")", 1)
            parents[int(d)] = (int(rest.split()[1]), comm.split("(", 1)[1])
        except (OSError, ValueError, IndexError):
            continue
    for p, (_, comm) in parents.items():
        if comm in ("ninja", "cc1plus", "c++", "g++"):
            while p > 1 and p in parents:
                p = parents[p][0]
                if p == pid:
                    return True
    return False


def test_a_build_killed_midway_does_not_wedge_the_next(tmp_path):
    # Ctrl-C during the first build leaves torch's `lock` file behind; the next run used to wait on
    # it forever. It must build again instead.
    try:
        kernels.build_isa()
    except RuntimeError as e:
        pytest.skip(str(e))
    env = dict(os.environ, GEMMA3_KERNEL_CACHE=str(tmp_path))
    env.pop("GEMMA3_NO_KERNELS", None)
    for attempt in ("killed", "next"):
        proc = subprocess.Popen(BUILD, env=env, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not _compiling(proc.pid) and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.2)
            started = _compiling(proc.pid)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert started, f"the {attempt} run never started the compiler"
    assert list(tmp_path.glob("*/lock")), "the killed build left no lock file: the test proves nothing"
