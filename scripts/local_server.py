"""Start and stop `gemma3 serve` on a free 127.0.0.1 port, for the load scripts (load_test.py,
soak.py, worst_case_latency.py): the server they measure is a real subprocess, as users run it."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx


def start_server(*serve_args: str, startup_s: float = 300) -> tuple[subprocess.Popen, str]:
    """(process, base URL) of `gemma3 serve SERVE_ARGS...` once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gemma3", "serve", "--port", str(port), "--log-level", "warning",
                             *serve_args])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start")


def stop_server(proc: subprocess.Popen | None):
    """SIGTERM (the server drains and exits), killed after a minute."""
    if proc is None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
