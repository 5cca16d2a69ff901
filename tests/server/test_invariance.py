"""Same seed, same text: a sampled request's tokens and logprobs depend only on its own prompt,
parameters and seed — not on what else is in the batch, not on prefix-cache hits, not on the
server instance. Two real servers (uvicorn subprocesses, embedded 270M model on the CPU kernels),
compared bit for bit.

The prompt is long enough (~700 tokens) to be computed in several prefill pieces and to resume
from the prefix cache (block boundary 512); the neighbours are long and short prompts, so the
request is prefilled in busy turns and decoded in batches of changing size."""

from __future__ import annotations

import pathlib
import threading
import time

import httpx
import pytest

pytest.importorskip("uvicorn")

from tests.helpers.server import MODEL_ID, ServerProcess  # noqa: E402

TEXT = (pathlib.Path(__file__).parents[1] / "data" / "gpl-3.0.txt").read_text()
PROMPT = TEXT[:3000]
REQUEST = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 24, "temperature": 1.0, "top_p": 0.95,
           "seed": 1234, "logprobs": 3}


def _start(*args):
    return ServerProcess("--ctx", "1024", "--max-tokens", "64", "--max-batch", "12", "--max-queue", "32", *args)


@pytest.fixture(scope="module")
def servers():
    """Two instances: `a` with the prefix cache, `b` without (every prompt computed in full)."""
    a = _start()
    try:
        b = _start("--prefix-cache-mb", "0")
    except BaseException:
        a.stop()
        raise
    yield a, b
    a.stop()
    b.stop()


def complete(server, body) -> tuple[str, list[int | None], list]:
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"] or {}
    return choice["text"], lp.get("token_logprobs"), lp.get("top_logprobs")


def neighbours(n: int) -> list[dict]:
    """Other work for the batch: long prompts (prefilled in turns beside the decoding rows) and
    short ones, sampled and greedy, of different lengths."""
    out = []
    for i in range(n):
        start = 4000 + 1500 * i
        prompt = TEXT[start:start + (2500 if i % 2 else 200)]
        out.append({"model": MODEL_ID, "prompt": prompt, "max_tokens": 16 + 6 * i,
                    "temperature": 0.0 if i % 3 == 0 else 0.8, "seed": i})
    return out


def beside(server, others: list[dict], body: dict):
    """`body` sent while `others` are in flight (started first, so it joins a running batch)."""
    threads = [threading.Thread(target=complete, args=(server, o)) for o in others]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while server.metric("gemma3_active_sequences") < len(others) // 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    got = complete(server, body)
    for t in threads:
        t.join()
    return got


def test_seeded_request_is_batch_invariant(servers):
    a, b = servers
    alone = complete(a, REQUEST)  # the first request: nothing cached, nothing beside it
    assert alone[0] and len(alone[1]) == 24
    assert a.metric("gemma3_prefix_cache_hits_total") == 0

    assert complete(b, REQUEST) == alone  # another server instance
    for _ in range(2):  # prefilled in busy turns, decoded in batches of changing size
        assert beside(b, neighbours(8), REQUEST) == alone

    # Stored after the first request: now resumed from the prefix cache at position 512.
    assert complete(a, REQUEST) == alone
    assert beside(a, neighbours(8), REQUEST) == alone
    assert a.metric("gemma3_prefix_cache_hits_total") >= 2
    assert a.metric("gemma3_prefix_cache_reused_tokens_total") >= 2 * 512

    # The seed matters: the comparisons above could fail.
    assert complete(a, {**REQUEST, "seed": 4321})[0] != alone[0]
