"""The real server (uvicorn subprocess, embedded 270M model) driven by the official `openai` client
and by raw HTTP for bad input. One server for the whole module; short max_tokens throughout."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

from tests.helpers.server import MODEL_ID, ServerProcess  # noqa: E402

KEY = "test-key"
CTX, CAP = 512, 16  # --ctx and --max-tokens of the test server


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--ctx", str(CTX), "--max-tokens", str(CAP), "--max-batch", "4", "--max-queue", "4",
                        "--api-key", KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local():
    """The same model in this process: the reference the server's output must equal."""
    from gemma3 import load

    return load(None, backend="cpu")


def post(server, path, body, key=KEY, timeout=120):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (dict, list)):
        return httpx.post(server.url + path, json=body, headers=headers, timeout=timeout)
    return httpx.post(server.url + path, content=body, headers={**headers, "Content-Type": "application/json"},
                      timeout=timeout)


def assert_error(r, status, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code


# ------------------------------------------------------------------ the openai client


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_ID]
    assert models[0].input_modalities == ["text"]  # the embedded model has no vision tower: no image attach


def test_completion_greedy_equals_generate(client, local):
    from gemma3.inference.generate import encode_prompt, generate

    model, tok = local
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == generate(model, tok, prompt, max_tokens=10)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(encode_prompt(tok, prompt))
    assert r.usage.completion_tokens == 10 and r.usage.total_tokens == r.usage.prompt_tokens + 10


def test_chat_greedy_equals_generate(client, local):
    from gemma3.formats.tokenizer import apply_chat_template

    model, tok = local
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == generate_text(local, apply_chat_template(messages), 8)
    assert r.usage.prompt_tokens == len(tok.encode(apply_chat_template(messages), add_bos=False, parse_special=True))


def generate_text(local, prompt, n, **kw):
    from gemma3.inference.generate import generate

    return generate(*local, prompt, max_tokens=n, **kw)


def test_concurrent_requests_are_batched_and_exact(client, local, server):
    """Four greedy requests at once share decode steps (continuous batching) and each still equals
    its own single-sequence generation."""
    prompts = ["The capital of France is", "1, 2, 3, 4,", "def fibonacci(n):", "Once upon a time"]
    lengths = [12, 6, 9, 3]  # different lengths: sequences retire and the batch shrinks mid-flight
    out = {}

    def run(i):
        r = client.completions.create(model=MODEL_ID, prompt=prompts[i], max_tokens=lengths[i], temperature=0)
        out[i] = r.choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, p in enumerate(prompts):
        assert out[i] == generate_text(local, p, lengths[i]), p
    assert server.metric('gemma3_decode_batch_size_bucket{le="1"}') < server.metric("gemma3_decode_batch_size_count")


REPEAT = ("Copy the list.\nList: apples, pears, plums, cherries, grapes, lemons, limes.\n"
          "Copy: apples, pears, plums,")
LOOKUP = {"speculative": {"method": "lookup", "ngram": 2, "k": 5}}


def test_speculative_lookup_gives_the_plain_text_and_counts_in_metrics(client, server):
    """Prompt lookup inside the batching engine: greedy text equal to the same request without
    it, alone and while a plain request shares the steps (verify beside a batched decode), and
    acceptance and tokens per step in /metrics."""
    def complete(prompt, **extra):
        r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=CAP, temperature=0,
                                      extra_body=extra or None)
        return r.choices[0].text

    before = server.metric("gemma3_speculative_accepted_tokens_total")
    plain = complete(REPEAT)
    assert complete(REPEAT, **LOOKUP) == plain
    out = {}
    jobs = [threading.Thread(target=lambda: out.__setitem__("spec", complete(REPEAT, **LOOKUP))),
            threading.Thread(target=lambda: out.__setitem__("other", complete("Once upon a time")))]
    for t in jobs:
        t.start()
    for t in jobs:
        t.join()
    assert out["spec"] == plain and out["other"] == complete("Once upon a time")
    chat = [{"role": "user", "content": REPEAT}]
    r = client.chat.completions.create(model=MODEL_ID, messages=chat, max_tokens=CAP, temperature=0, extra_body=LOOKUP)
    assert r.choices[0].message.content == client.chat.completions.create(
        model=MODEL_ID, messages=chat, max_tokens=CAP, temperature=0).choices[0].message.content
    assert server.metric("gemma3_speculative_accepted_tokens_total") > before
    assert 0 < server.metric("gemma3_speculative_acceptance_rate") <= 1
    assert server.metric("gemma3_speculative_tokens_per_step") > 1


def test_speculative_sampling_runs_with_logprobs(client):
    r = client.completions.create(model=MODEL_ID, prompt=REPEAT, max_tokens=CAP, temperature=0.7, seed=3,
                                  logprobs=1, extra_body=LOOKUP)
    assert r.usage.completion_tokens == len(r.choices[0].logprobs.tokens)
    assert all(lp <= 0 for lp in r.choices[0].logprobs.token_logprobs)


@pytest.mark.parametrize("spec,param", [({"method": "beam"}, "speculative.method"),
                                        ({"method": "lookup", "k": 8}, "speculative.k"),
                                        ({"method": "lookup", "ngram": 0}, "speculative.ngram"),
                                        ("lookup", "speculative")])
def test_bad_speculative_options_are_400s_naming_the_param(server, spec, param):
    r = post(server, "/v1/completions", {"model": MODEL_ID, "prompt": "Hi", "max_tokens": 2, "speculative": spec})
    assert_error(r, 400)
    assert r.json()["error"]["param"] == param


def test_draft_requests_need_a_server_with_a_draft_model(server):
    r = post(server, "/v1/completions", {"model": MODEL_ID, "prompt": "Hi", "max_tokens": 2,
                                         "speculative": {"method": "draft", "k": 4}})
    assert_error(r, 400, "unsupported")
    assert r.json()["error"]["param"] == "speculative.method" and "--draft-model" in r.json()["error"]["message"]


def test_chat_streaming(client):
    kw = dict(model=MODEL_ID, messages=[{"role": "user", "content": "Count: one, two,"}], max_tokens=8, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals in (["length"], ["stop"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 8


def test_completion_streaming(client):
    kw = dict(model=MODEL_ID, prompt="The capital of France is", max_tokens=6, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_sequences(client, local):
    prompt = "The capital of France is"
    free = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=10, temperature=0).choices[0].text
    stop = free.strip().split()[2]  # a word from the middle of the greedy continuation
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=10, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == free[: free.index(stop)] == generate_text(local, prompt, 10, stop=[stop])
    chunks = list(client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=10, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text


def test_seeds_are_reproducible(client):
    kw = dict(model=MODEL_ID, prompt="My favourite animal is", max_tokens=8, temperature=1.0, top_p=0.95)
    a = client.completions.create(**kw, seed=1234).choices[0].text
    b = client.completions.create(**kw, seed=1234).choices[0].text
    assert a == b
    others = {client.completions.create(**kw, seed=s).choices[0].text for s in (1, 2, 3)}
    assert len(others | {a}) > 1  # the seed does change the sample


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= 4
    for lp in content:
        assert len(lp.top_logprobs) == 3 and lp.logprob <= 0
        assert lp.top_logprobs[0].token == lp.token  # greedy picks the most likely token
    c = client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=3, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.tokens) == 3 and all(len(t) == 2 for t in c.choices[0].logprobs.top_logprobs)


def test_token_id_prompt_and_echo(client, local):
    from gemma3.inference.generate import encode_prompt

    ids = encode_prompt(local[1], "The capital of France is")
    by_ids = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=4, temperature=0).choices[0].text
    echoed = client.completions.create(model=MODEL_ID, prompt="The capital of France is", max_tokens=4,
                                       temperature=0, echo=True).choices[0].text
    assert echoed == "The capital of France is" + by_ids


# ------------------------------------------------------------------ bad input: status codes, error shape


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.body["code"] == "model_not_found"


def test_bad_api_key_is_401(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert_error(post(server, "/v1/completions", b"{not json", key=None), 401, "invalid_api_key")
    assert httpx.get(server.url + "/health").status_code == 200  # health and the page need no key


@pytest.mark.parametrize("body", [
    b"{not json", b"", b"[1, 2]", b'"just a string"',
    {"model": MODEL_ID},
    {"model": MODEL_ID, "messages": []},
    {"model": MODEL_ID, "messages": "hello"},
    {"model": MODEL_ID, "messages": [{"role": "robot", "content": "hi"}]},
    {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"},
    {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
    {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "temperature": 5},
    {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "top_p": 0},
    {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "n": 2},
    {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "seed": 2**70},
    {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
    {"model": MODEL_ID, "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
    {"model": MODEL_ID, "messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
    {"model": MODEL_ID, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]},
])
def test_bad_chat_requests_are_400(server, body):
    assert_error(post(server, "/v1/chat/completions", body), 400)


@pytest.mark.parametrize("body", [
    {"model": MODEL_ID, "prompt": []},
    {"model": MODEL_ID, "prompt": ""},
    {"model": MODEL_ID, "prompt": [""]},
    {"model": MODEL_ID, "prompt": ["a", "b"]},
    {"model": MODEL_ID, "prompt": [1, -5]},
    {"model": MODEL_ID, "prompt": [10**9]},
    {"model": MODEL_ID, "prompt": "hi", "logprobs": 9},
    {"model": MODEL_ID, "prompt": "hi", "echo": True, "logprobs": 1, "stream": True},
    {"model": MODEL_ID, "prompt": "hi", "max_tokens": 0},
])
def test_bad_completion_requests_are_400(server, body):
    assert_error(post(server, "/v1/completions", body), 400)


def test_stop_lists_beyond_the_limits_are_400(server):
    base = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 1}
    r = post(server, "/v1/completions", base | {"stop": [f"s{i}" for i in range(17)]})
    assert_error(r, 400, "too_many_stop_strings")
    r = post(server, "/v1/completions", base | {"stop": "x" * 257})
    assert_error(r, 400, "stop_string_too_long")
    assert r.json()["error"]["param"] == "stop"
    r = post(server, "/v1/completions", base | {"stop": [f"{i:03d}" + "x" * 253 for i in range(16)]})
    assert r.status_code == 200, r.text  # 16 stop strings of 256 characters: the defaults' limits


def test_over_context_prompts_are_400(server):
    r = post(server, "/v1/completions", {"model": MODEL_ID, "prompt": "x" * 2**20, "max_tokens": 1})
    assert_error(r, 400, "context_length_exceeded")  # 1 MB: refused before tokenizing
    assert r.json()["error"]["param"] == "prompt"
    r = post(server, "/v1/chat/completions", {"model": MODEL_ID, "max_tokens": 1,
                                              "messages": [{"role": "user", "content": "hello " * (CTX + 10)}]})
    assert_error(r, 400, "context_length_exceeded")
    assert str(CTX) in r.json()["error"]["message"] and r.json()["error"]["param"] == "messages"
    assert httpx.get(server.url + "/health").status_code == 200


def test_huge_max_tokens_is_capped(client):
    r = client.completions.create(model=MODEL_ID, prompt="1, 2, 3,", max_tokens=10**9, temperature=0)
    assert r.usage.completion_tokens <= CAP


def test_unknown_route_is_404_in_openai_shape(server):
    assert_error(httpx.get(server.url + "/v1/nope", headers={"Authorization": f"Bearer {KEY}"}), 404)


# ------------------------------------------------------------------ cancellation, queue limit, metrics


def test_client_disconnect_mid_stream_frees_the_sequence(server):
    before = server.metric("gemma3_cancelled_sequences_total")
    body = {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": CAP, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        assert next(l for l in lines if l.startswith("data:"))
    # Closed after the first chunk: the engine drops the sequence (and its KV cache).
    assert server.wait_metric("gemma3_active_sequences", 0) == 0
    # (On a fast machine the 16 tokens can all be generated before the hang-up is noticed.)
    assert server.metric("gemma3_cancelled_sequences_total") in (before, before + 1)


def test_client_timeout_non_streaming_frees_the_sequence(server):
    """The client gives up at once; the server notices within its poll interval and drops the
    sequence before it finishes (a long prompt makes the prefill alone outlast the poll)."""
    before = server.metric("gemma3_cancelled_sequences_total")
    body = {"model": MODEL_ID, "prompt": "Once upon a time " * 100, "max_tokens": CAP, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", body, timeout=0.02)
    assert server.wait_metric("gemma3_active_sequences", 0) == 0
    assert server.wait_metric("gemma3_cancelled_sequences_total", before + 1) == before + 1


def test_full_queue_is_503_and_server_recovers(server):
    """--max-batch 4 --max-queue 4: of 12 simultaneous requests some are refused with 503; the
    clients then hang up and nothing stays allocated."""
    async def one(c):
        body = {"model": MODEL_ID, "prompt": "Count to a hundred: 1, 2,", "max_tokens": CAP, "stream": True}
        async with c.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return r.status_code, json.loads(await r.aread())
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    return 200, None  # hang up after the first chunk

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     headers={"Authorization": f"Bearer {KEY}"}) as c:
            return await asyncio.gather(*(one(c) for _ in range(12)))

    results = asyncio.run(burst())
    refused = [body for status, body in results if status == 503]
    assert refused and all(b["error"]["code"] == "queue_full" for b in refused)
    assert all(status in (200, 503) for status, _ in results)
    assert server.wait_metric("gemma3_active_sequences", 0) == 0
    assert server.wait_metric("gemma3_queue_depth", 0) == 0
    assert 'endpoint="/v1/completions",status="503"' in httpx.get(server.url + "/metrics").text


def test_metrics_and_page(server):
    text = httpx.get(server.url + "/metrics").text
    for name in ("gemma3_requests_total", "gemma3_generation_tokens_total", "gemma3_queue_depth",
                 "gemma3_batch_size", "gemma3_active_sequences", "gemma3_request_latency_seconds_count",
                 "gemma3_time_to_first_token_seconds_bucket"):
        assert name in text
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/v1/chat/completions" in page.text


# ------------------------------------------------------------------ OpenAPI fuzzing


@pytest.mark.skipif(not shutil.which("st", path=str(__import__("pathlib").Path(sys.executable).parent)),
                    reason="schemathesis is not installed (pip install -e '.[test]')")
def test_schemathesis_finds_no_server_errors(server, tmp_path):
    """Schemathesis generates bodies from /openapi.json (valid and invalid, boundary values first)
    for every /v1 route, with the served model's id (hooks); the only check is "no 5xx". The
    server's --max-tokens 16 bounds each valid request (~500 cases, under a minute)."""
    st = str(__import__("pathlib").Path(sys.executable).parent / "st")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "SCHEMATHESIS_HOOKS": "tests.helpers.schemathesis_hooks",
           "GEMMA3_FUZZ_MODEL": MODEL_ID}
    r = subprocess.run([st, "run", server.url + "/openapi.json", "--checks", "not_a_server_error",
                        "--include-path-regex", "^/v1/", "--max-examples", "20", "--phases", "coverage,fuzzing",
                        "--seed", "1", "--request-timeout", "120", "-H", f"Authorization: Bearer {KEY}",
                        "--generation-deterministic", "--no-color"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert httpx.get(server.url + "/health").status_code == 200


# ------------------------------------------------------------------ last: graceful shutdown


def test_the_key_guards_the_tokenizer_routes_but_not_props(server):
    assert_error(post(server, "/tokenize", {"prompt": "hi"}, key=None), 401, "invalid_api_key")
    assert post(server, "/tokenize", {"prompt": "hi"}).json()["count"] == 2  # <bos> hi
    assert httpx.get(server.url + "/props", timeout=10).json()["context"] == CTX


def test_sigterm_finishes_in_flight_stream_and_exits_0(server):
    body = {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 8, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        assert next(l for l in lines if l.startswith("data:"))
        server.proc.terminate()  # SIGTERM while the stream is running
        rest = [l for l in lines if l.startswith("data:")]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][5:])["choices"][0]["finish_reason"] == "length"
    assert server.proc.wait(60) == 0
