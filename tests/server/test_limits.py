"""Limits and guards of the real server (uvicorn subprocess, embedded 270M, no API key): Host
allow-list, body size, logit_bias, prompt bytes before tokenizing, slow request heads; and the
engine's chunked prefill keeping outputs exact."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.helpers.server import MODEL_ID, ServerProcess

CTX = 1024


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--ctx", str(CTX), "--max-tokens", "16", "--max-batch", "4", "--head-timeout", "1",
                        "--max-body-mb", "1", "--max-logit-bias", "4")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def local():
    from gemma3 import load

    return load(None, backend="cpu")


def post(server, body, path="/v1/completions", **kw):
    return httpx.post(server.url + path, json=body, timeout=120, **kw)


def error(r, status, code):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"], err
    return err


def test_host_header_must_be_a_loopback_name(server):
    """Bound to 127.0.0.1: a request carrying another name (a DNS-rebinding page's) is refused."""
    for host in ("evil.example", "evil.example:80", "127.0.0.1.nip.io"):
        r = httpx.get(server.url + "/v1/models", headers={"Host": host}, timeout=10)
        assert "not allowed" in error(r, 400, "invalid_host")["message"]
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", "localhost"):
        assert httpx.get(server.url + "/v1/models", headers={"Host": host}, timeout=10).status_code == 200
    assert httpx.get(server.url + "/", headers={"Host": "evil.example"}, timeout=10).status_code == 400


def test_bodies_over_the_limit_are_413(server):
    big = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 1, "padding": "x" * 2**20}
    error(post(server, big), 413, "request_too_large")  # declared Content-Length

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model": "' + MODEL_ID.encode() + b'", "prompt": "hi", "padding": "'
        for _ in range(40):
            yield b"x" * 32768
        yield b'"}'

    r = httpx.post(server.url + "/v1/completions", content=chunks(), timeout=60,
                   headers={"Content-Type": "application/json"})
    error(r, 413, "request_too_large")
    r = post(server, {"model": MODEL_ID, "prompt": "hi", "max_tokens": 1, "padding": "x" * 900_000})
    assert r.status_code == 200, r.text  # under the limit: fine


def test_prompts_beyond_the_byte_limit_are_refused_before_tokenizing(server):
    start = time.perf_counter()
    r = post(server, {"model": MODEL_ID, "prompt": "é" * (4 * CTX + 1), "max_tokens": 1})  # 8 bytes per token + 2
    err = error(r, 400, "context_length_exceeded")
    assert "bytes" in err["message"] and err["param"] == "prompt"
    assert time.perf_counter() - start < 5


def test_logit_bias(server, local):
    prompt = "The capital of France is"
    base = {"model": MODEL_ID, "prompt": prompt, "max_tokens": 3, "temperature": 0}
    plain = post(server, base).json()["choices"][0]["text"]
    model, tok = local
    first = tok.encode(plain, add_bos=False)[0]
    banned = post(server, base | {"logit_bias": {str(first): -100}}).json()["choices"][0]["text"]
    assert tok.encode(banned, add_bos=False)[0] != first
    forced = tok.token_to_id("banana") if "banana" in tok._piece_to_id else tok.encode(" banana", add_bos=False)[0]
    r = post(server, base | {"max_tokens": 2, "logit_bias": {str(forced): 100}, "logprobs": 1})
    assert r.json()["choices"][0]["logprobs"]["tokens"][0] == tok.decode([forced])
    error(post(server, base | {"logit_bias": {str(i): 1 for i in range(5)}}), 400, "too_many_logit_bias")
    error(post(server, base | {"logit_bias": {"abc": 1}}), 400, "invalid_value")
    error(post(server, base | {"logit_bias": {str(tok.vocab_size): 1}}), 400, "invalid_value")
    r = post(server, base | {"logit_bias": {"5": 101}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"


def test_slow_request_heads_are_closed(server):
    """A client that sends its request line and headers slowly is disconnected after
    --head-timeout (1 s here) even though it keeps sending bytes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\n")
        closed_after = None
        start = time.monotonic()
        for _ in range(20):
            time.sleep(0.25)
            try:
                s.sendall(b"X-Slow: 1\r\n")
                if s.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b"":
                    closed_after = time.monotonic() - start
                    break
            except BlockingIOError:
                continue
            except OSError:
                closed_after = time.monotonic() - start
                break
        assert closed_after is not None and closed_after < 3
    # a prompt client on a kept-alive connection is unaffected
    with httpx.Client(base_url=server.url, timeout=10) as c:
        for _ in range(3):
            assert c.get("/health").status_code == 200
            time.sleep(0.5)


def test_long_prompt_is_prefilled_in_chunks_beside_short_requests(server, local):
    """A prompt longer than the sliding window and short requests at once: every output equals
    plain generation (the long one is computed in chunks between decode steps)."""
    import concurrent.futures

    from gemma3 import generate

    long_prompt = " ".join(f"item {i}," for i in range(180))  # ~720 tokens: past the 512 window
    prompts = [long_prompt, "One, two, three,", "The sky is"]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        texts = list(pool.map(lambda p: post(server, {"model": MODEL_ID, "prompt": p, "max_tokens": 8,
                                                      "temperature": 0}).json()["choices"][0]["text"], prompts))
    for p, text in zip(prompts, texts):
        assert text == generate(*local, p, max_tokens=8)
