"""Start the real `gemma3 serve` (uvicorn) in a subprocess on a free 127.0.0.1 port."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx

MODEL_ID = "gemma-3-270m-q4_k_m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str, startup_s: float = 240.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.devnull, "w") if not os.environ.get("GEMMA3_SERVER_LOG") else None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gemma3", "serve", "--port", str(self.port), "--log-level", "warning", *args],
            stdout=self.log, stderr=subprocess.PIPE if self.log else None, text=True)
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not become healthy in time")

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(m.group(1))

    def wait_metric(self, name: str, value: float, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        while (got := self.metric(name)) != value and time.monotonic() < deadline:
            time.sleep(0.2)
        return got

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log:
            self.log.close()
        return self.proc.returncode
