"""`gemma3 serve --ray`: the real 270M model as Ray Serve replicas on a local Ray cluster bound to
127.0.0.1 (started here, stopped at the end), driven through the official openai client."""

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'gemma3[ray]')")
from ray import serve  # noqa: E402

from gemma3.cli import ray_app, serve_ray  # noqa: E402
from gemma3.server.ray_serve import APP_NAME, REPLICA_HEADER  # noqa: E402
from tests.helpers.server import MODEL_ID, free_port  # noqa: E402

N = 12


@pytest.fixture(scope="module")
def cluster():
    serve_ray.start_local(num_cpus=2, log_to_driver=False)  # what `gemma3 serve --ray` starts
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def deploy(url, argv: str):
    """The application `serve run gemma3.cli.ray_app:build` would deploy, replacing the last one."""
    import openai

    serve.run(ray_app.build({"argv": f"--threads 1 --ctx 1024 {argv}"}), name=APP_NAME, route_prefix="/")
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local():
    from gemma3 import load

    return load(None, backend="cpu")


def replica_states() -> dict:
    return dict(serve.status().applications[APP_NAME].deployments["Replica"].replica_states)


def wait_for_replicas(n: int, timeout: float) -> dict:
    """Replica states once `n` are running and no others are left (a redeploy stops the old ones
    after the new ones run), or as they are at the timeout."""
    deadline = time.monotonic() + timeout
    while (states := replica_states()) != {"RUNNING": n} and time.monotonic() < deadline:
        time.sleep(0.5)
    return states


@contextmanager
def cli(*args: str):
    """`gemma3 serve --ray --ray-address ADDR ...` deploying to the test's cluster, until Ctrl-C."""
    cmd = [sys.executable, "-m", "gemma3", "serve", "--ray", "--ray-address", ray.get_runtime_context().gcs_address,
           *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not any("OpenAI API" in line for line in lines) and proc.poll() is None:
            lines.append(proc.stderr.readline())
        assert proc.poll() is None, "".join(lines)[-3000:]
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)


def test_ray_cli_serves_the_openai_routes_equal_to_single_process_generate(cluster, local):
    """`gemma3 serve --ray` deploys one replica to a running cluster; through the openai client,
    completions, chat and their streams equal `generate`; on Ctrl-C it removes its application
    and leaves the cluster running."""
    import openai

    from gemma3.formats.tokenizer import apply_chat_template
    from gemma3.inference.generate import generate

    with cli("--threads", "1", "--ctx", "1024") as proc:
        client = openai.OpenAI(base_url=cluster + "/v1", api_key="none", max_retries=0, timeout=60)
        prompt = "The capital of France is"
        done = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=N, temperature=0)
        assert done.choices[0].text == generate(*local, prompt, max_tokens=N)
        assert done.usage.completion_tokens == N
        streamed = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=N, temperature=0,
                                             stream=True)
        assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text

        messages = [{"role": "user", "content": "Name a colour."}]
        chat = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=N, temperature=0)
        assert chat.choices[0].message.content == generate(*local, apply_chat_template(messages), max_tokens=N)
        chunks = list(client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=N,
                                                     temperature=0, stream=True))
        assert len(chunks) > 3  # streamed piece by piece, not as one body
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content

        # The replica's own errors and health come through the ingress unchanged.
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.completions.create(model="nope", prompt=prompt, max_tokens=1)
        health = httpx.get(cluster + "/health", timeout=30)
        assert health.json()["status"] == "ok" and health.json()["model"] == MODEL_ID
        assert health.headers[REPLICA_HEADER]  # which replica (and process) answered

        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    assert APP_NAME not in serve.status().applications


def test_ray_redeploy_drains_the_old_replica_s_stream(cluster):
    """A new version of the deployment (here: another --max-batch) replaces the replica. The old
    one is told to stop while its stream is open, stops taking requests, and finishes the stream
    (all of it, no error) before its engine is stopped."""
    from concurrent.futures import ThreadPoolExecutor

    client = deploy(cluster, "--replicas 1")
    stream = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=160, temperature=0,
                                       stream=True)
    old = stream.response.headers[REPLICA_HEADER]
    pieces = iter(stream)
    next(pieces)
    with ThreadPoolExecutor(1) as pool:
        redeploy = pool.submit(deploy, cluster, "--replicas 1 --max-batch 4")
        deadline = time.monotonic() + 30
        while "STOPPING" not in replica_states() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "STOPPING" in replica_states()  # the old replica drains while its stream is still open
        chunks = list(pieces)  # raises if the stream is cut
        client = redeploy.result(120)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert wait_for_replicas(1, 60) == {"RUNNING": 1}
    r = client.completions.with_raw_response.create(model=MODEL_ID, prompt="Hi", max_tokens=2)
    assert r.headers[REPLICA_HEADER] != old


def test_ray_killed_replica_ends_its_stream_with_an_error_and_comes_back(cluster):
    """Two replicas x 1 thread: SIGKILL the process serving a stream. The stream ends with an
    OpenAI-shaped error (not a hang), the next 20 requests succeed on the other replica, and Ray
    has two replicas running again within 60 s."""
    import openai

    client = deploy(cluster, "--replicas 2")
    assert wait_for_replicas(2, 60) == {"RUNNING": 2}
    stream = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=600, temperature=0,
                                       stream=True)
    pid = int(stream.response.headers[REPLICA_HEADER].rsplit(":", 1)[1])
    pieces = iter(stream)
    next(pieces)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(openai.APIError, match="replica serving this stream failed"):
        for _ in pieces:
            assert time.monotonic() - killed < 30
    assert time.monotonic() - killed < 30

    for i in range(20):
        r = client.completions.create(model=MODEL_ID, prompt=f"Count to {i}:", max_tokens=2, temperature=0)
        assert r.usage.completion_tokens == 2

    assert wait_for_replicas(2, killed + 60 - time.monotonic()) == {"RUNNING": 2}


def prefix_hits(url: str, replica: str) -> int:
    """`replica`'s prefix-cache hit counter (its /metrics): the session header picks the replica
    /metrics goes to, so sessions are tried until one's home is `replica`."""
    for session in range(64):
        r = httpx.get(url + "/metrics", headers={"x-gemma3-session": f"probe-{session}"}, timeout=30)
        if r.headers[REPLICA_HEADER] == replica:
            return int(next(line.split()[-1] for line in r.text.splitlines()
                            if line.startswith("gemma3_prefix_cache_hits_total")))
    raise AssertionError(f"no session reached {replica}")


def test_ray_routes_a_shared_prefix_to_one_replica_and_its_prefix_cache(cluster):
    """Two replicas: the turns of a conversation (each prompt continues the last) all go to one
    replica (Ray's default router would spread them) and resume from its prefix cache; a
    session's requests stay on one replica until it holds SLACK more than the other, and then go
    to the other."""
    from gemma3.server.ray_routing import SLACK

    client = deploy(cluster, "--replicas 2 --max-queue 48")  # a new version: fresh replicas, counters at 0
    assert wait_for_replicas(2, 60) == {"RUNNING": 2}
    prompt = "You are a careful assistant who answers questions about geography in one short sentence.\n" * 3
    served = []
    for country in ("France", "Japan", "Peru", "Kenya", "Norway", "Chile"):
        prompt += f"Capital of {country}?\n"
        r = client.completions.with_raw_response.create(model=MODEL_ID, prompt=prompt, max_tokens=1, temperature=0)
        served.append(r.headers[REPLICA_HEADER])
    assert len(set(served)) == 1, served
    assert prefix_hits(cluster, served[0]) == len(served) - 1  # every request after the first resumed

    streams, homes = [], []
    try:
        for _ in range(SLACK + 2):  # each opened (and counted by the replica) before the next is routed
            stream = client.completions.create(model=MODEL_ID, prompt="Tell me a story.", max_tokens=500,
                                               stream=True, extra_headers={"x-gemma3-session": "busy"})
            next(iter(stream))
            streams.append(stream)
            homes.append(stream.response.headers[REPLICA_HEADER])
    finally:
        for stream in streams:
            stream.close()
    assert len(set(homes[:SLACK + 1])) == 1 and homes[SLACK + 1] != homes[0], homes


def test_ray_affinity_key_prefers_session_then_user_then_the_prompt_s_beginning_and_homes_spill():
    import json

    from gemma3.server.ray_routing import PREFIX_CHARS, affinity_key, goes_home, request_json, weight

    long = "x" * PREFIX_CHARS

    def key(headers, request):
        return affinity_key(headers, request_json(json.dumps(request).encode()))

    body = {"prompt": long + "tail one", "user": "ann"}
    assert key([(b"X-Gemma3-Session", b"s1")], body) == "session:s1"
    assert key([], body) == "user:ann"
    assert key([], {"prompt": long + "tail one"}) == key([], {"prompt": long + "tail two"}) == "prefix:" + long
    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}
    assert key([], chat) == "prefix:Be brief.\nHi"
    assert key([], {"prompt": ["first", "second"]}) == "prefix:first"
    assert key([], {"input": "embed me"}) is None
    for nothing in (b"", b"not json", b"[1]"):
        assert request_json(nothing) is None and affinity_key([], request_json(nothing)) is None
    # Home keeps a request within the slack, unless its batch is full and another's has a free row.
    assert goes_home(3, 1, slack=2, batch=8) and not goes_home(4, 1, slack=2, batch=8)
    assert not goes_home(8, 7, slack=2, batch=8) and goes_home(8, 8, slack=2, batch=8)
    assert goes_home(9, 8, slack=2, batch=8) and not goes_home(11, 8, slack=2, batch=8)
    # Rendezvous homes: keys spread over the replicas, and removing one replica moves only its keys.
    home = {i: max(("r1", "r2", "r3"), key=lambda r: weight(f"k{i}", r)) for i in range(30)}
    assert set(home.values()) == {"r1", "r2", "r3"}
    for i, r in home.items():
        assert max(("r1", "r2"), key=lambda x: weight(f"k{i}", x)) == r or r == "r3"


def test_ray_options_are_checked_and_build_the_autoscaling_config():
    from gemma3.cli import build_parser

    parse = build_parser().parse_args
    with pytest.raises(ValueError, match="--replicas needs --ray"):
        serve_ray.check(parse(["serve", "--replicas", "2"]))
    with pytest.raises(ValueError, match="--tp is not served"):
        serve_ray.check(parse(["serve", "--ray", "--tp", "2"]))
    for bad in ("4", "3:2", "x:2", "0:0"):
        with pytest.raises(Exception, match="MIN:MAX"):
            serve_ray.autoscale(bad)
    replica = ray_app.build({"argv": "--autoscale 1:3 --threads 2 --max-batch 4 --drain-timeout 20"})
    replica = replica._bound_deployment.init_args[0]._bound_deployment  # Ingress(Replica(settings))
    config = replica._deployment_config
    auto = config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 3, 4)
    assert config.graceful_shutdown_timeout_s == 20
    assert replica.ray_actor_options["num_cpus"] == 2


def test_ray_health_check_fails_for_a_wedged_engine_loop(tiny):
    """Ray's check_health asks the engine: a live process whose loop is stuck in a step is
    unhealthy (Ray then replaces the replica); once the loop comes round again it is healthy."""
    import threading
    from types import SimpleNamespace

    from gemma3.server.engine import Engine
    from gemma3.server.ray_serve import Replica

    engine = Engine(tiny, None, prefix_cache_bytes=0)
    replica = SimpleNamespace(engine=engine, wedged_s=0.5)
    check = Replica.func_or_class.check_health
    with pytest.raises(RuntimeError, match="not running"):
        check(replica)
    engine.start()
    try:
        time.sleep(0.1)
        check(replica)
        stuck = threading.Event()
        job = engine.call(lambda model: stuck.wait(30))  # a step that never returns, as a hung kernel would
        time.sleep(1.0)
        with pytest.raises(RuntimeError, match="wedged"):
            check(replica)
        stuck.set()
        job.result(5)
        time.sleep(0.1)
        check(replica)
    finally:
        engine.stop(5)
