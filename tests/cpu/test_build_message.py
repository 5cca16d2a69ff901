"""The first run builds the C++ kernels (about a minute): it says so on stderr before it starts,
and a run that finds them built says nothing."""

import os
import select
import signal
import subprocess
import sys

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
