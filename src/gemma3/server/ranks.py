"""`gemma3 serve --tp N`: one HTTP server over N tensor-parallel ranks (tp.py shards the model).

Only rank 0 runs the engine and the HTTP server. A sharded forward is a sequence of collectives
that every rank must enter in the same order with the same shapes, so rank 0's model is wrapped in
a `Leader` that broadcasts each call the engine makes (new cache, prefill chunks, batched decode) before
running it; the other ranks `follow`, repeating each call on their shard with their own copy of
every cache. Caches are named by a number; when rank 0 drops one (a finished or cancelled
request), the next message tells the followers to drop theirs.

Served under TP: text requests with continuous batching. Not served: images (the vision tower is
not sharded) and the prefix cache (it restores caches by copying them, which would need mirroring
too); both are refused or switched off with a message rather than silently diverging.

`gemma3 serve --tp N` starts ranks 1..N-1 itself (`start_ranks`), like vLLM's
--tensor-parallel-size; `torchrun --nproc-per-node N -m gemma3 serve` works the same way.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist

# Followers wait in a broadcast for as long as the server is idle: gloo's default 30-minute
# timeout would end an idle server. A dead leader still ends them at once (its sockets close).
IDLE_TIMEOUT = timedelta(days=365)


class Leader:
    """Rank 0's model: the calls the engine makes, broadcast to the followers first. Everything
    else (config, device, dtype, ...) is the wrapped model's."""

    def __init__(self, model):
        self.model = model
        self._next = 0
        self._names: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> its number
        self._freed: list[int] = []  # appended by weakref finalizers, sent with the next message

    def __getattr__(self, name):
        return getattr(self.model, name)

    def _send(self, *cmd):
        freed, self._freed = self._freed, []
        dist.broadcast_object_list([(freed, cmd)], src=0)

    def new_cache(self, batch_size: int = 1, max_len: int | None = None, kv_dtype=None):
        n, self._next = self._next, self._next + 1
        self._send("new_cache", n, batch_size, max_len, kv_dtype)
        cache = self.model.new_cache(batch_size, max_len=max_len, kv_dtype=kv_dtype)
        self._names[cache] = n
        weakref.finalize(cache, self._freed.append, n)
        return cache

    def __call__(self, input_ids, cache, last_only: bool = False, **kwargs):
        self._send("forward", input_ids, self._names[cache], last_only, kwargs)
        return self.model(input_ids, cache, last_only=last_only, **kwargs)

    def forward_hidden(self, input_ids, cache, **kwargs):  # a prompt chunk before the last one
        self._send("hidden", input_ids, self._names[cache], kwargs)
        return self.model.forward_hidden(input_ids, cache, **kwargs)

    def decode(self, tokens, caches):
        self._send("decode", tokens, [self._names[c] for c in caches])
        return self.model.decode(tokens, caches)

    def close(self):
        """Tells the followers to exit (they return from `follow`)."""
        self._send("stop")


def follow(model):
    """Ranks 1..N-1: repeat rank 0's calls until it says stop. Signals are left to rank 0, which
    drains its requests and then stops everyone (Ctrl-C reaches the whole process group)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    caches = {}
    torch.set_grad_enabled(False)
    while True:
        msg = [None]
        dist.broadcast_object_list(msg, src=0)
        freed, cmd = msg[0]
        for n in freed:
            caches.pop(n, None)
        op, rest = cmd[0], cmd[1:]
        if op == "stop":
            return
        try:
            with torch.inference_mode():
                if op == "new_cache":
                    n, batch_size, max_len, kv_dtype = rest
                    caches[n] = model.new_cache(batch_size, max_len=max_len, kv_dtype=kv_dtype)
                elif op == "forward":
                    ids, n, last_only, kwargs = rest
                    model(ids, caches[n], last_only=last_only, **kwargs)
                elif op == "hidden":
                    ids, n, kwargs = rest
                    model.forward_hidden(ids, caches[n], **kwargs)
                elif op == "decode":
                    tokens, ns = rest
                    model.decode(tokens, [caches[n] for n in ns])
        except Exception as e:  # e.g. a context overflow: rank 0 raised the same error and reports it
            print(f"gemma3 serve rank {dist.get_rank()}: {op} failed: {type(e).__name__}: {e}", file=sys.stderr)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(world: int, argv: list[str], threads: int | None) -> list[subprocess.Popen]:
    """Starts ranks 1..world-1 as `python -m gemma3 <argv>` on this machine and makes this process
    rank 0 (the torchrun environment variables, set here and in theirs). The cores are shared out:
    `threads` per rank, else the machine's cores divided by the ranks."""
    per_rank = threads or max(1, (os.cpu_count() or 1) // world)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": str(per_rank)}
    procs = [subprocess.Popen([sys.executable, "-m", "gemma3", *argv],
                              env=os.environ | env | {"RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(1, world)]
    os.environ.update(env | {"RANK": "0", "LOCAL_RANK": "0"})
    torch.set_num_threads(per_rank)
    return procs


def stop_ranks(procs: list[subprocess.Popen], timeout: float = 30.0):
    """Waits for the followers (told to stop, or left without a leader); kills any that hang and
    says so, like any that failed."""
    for rank, p in enumerate(procs, start=1):
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p.returncode:
            print(f"gemma3 serve: rank {rank} exited with status {p.returncode}", file=sys.stderr)
