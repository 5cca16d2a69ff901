"""Draft-model speculative decoding through the real server (uvicorn subprocess, embedded 270M on
the CPU kernels) and the official `openai` client. The draft is a tiny random model with the
270M's vocabulary: it is almost always wrong, so nearly every step rejects drafted tokens and
rewinds both caches, and the text must still be the plain request's, alone and with drafting,
lookup and plain requests sharing decode steps (their verify rows batched with the plain rows)."""

from __future__ import annotations

import threading

import pytest

openai = pytest.importorskip("openai")

from tests.helpers.server import MODEL_ID, ServerProcess  # noqa: E402
from tests.helpers.training import tiny_model_dir  # noqa: E402

CAP = 16
REPEAT = ("Copy the list.\nList: apples, pears, plums, cherries, grapes, lemons, limes.\n"
          "Copy: apples, pears, plums,")
STORY = "Once upon a time"
DRAFT = {"speculative": {"method": "draft", "k": 4}}
LOOKUP = {"speculative": {"method": "lookup", "ngram": 2, "k": 7}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    draft = tiny_model_dir(tmp_path_factory.mktemp("draft") / "tiny", vocab=262144, layers=2, window=64)
    srv = ServerProcess("--ctx", "512", "--max-tokens", str(CAP), "--max-batch", "4", "--draft-model", str(draft),
                        "--draft-k", "3")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


def complete(client, prompt, **extra):
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=CAP, temperature=0,
                                  extra_body=extra or None)
    return r.choices[0].text


def test_draft_requests_give_the_plain_text_alone_and_in_a_shared_batch(client, server):
    before = {name: server.metric(f"gemma3_speculative_{name}_total") for name in ("draft_tokens", "verify_steps")}
    plain = {p: complete(client, p) for p in (REPEAT, STORY)}
    assert complete(client, STORY, speculative={"method": "draft"}) == plain[STORY]  # k: the server's --draft-k
    jobs = [(REPEAT, DRAFT), (STORY, DRAFT), (REPEAT, LOOKUP), (STORY, {})]
    out = [None] * len(jobs)

    def run(i, prompt, extra):
        out[i] = complete(client, prompt, **extra)

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [plain[p] for p, _ in jobs]
    assert server.metric("gemma3_speculative_draft_tokens_total") > before["draft_tokens"]
    assert server.metric("gemma3_speculative_verify_steps_total") > before["verify_steps"]
    assert 0 <= server.metric("gemma3_speculative_acceptance_rate") < 1  # a random draft is mostly rejected


def test_sampled_draft_requests_are_reproducible(client):
    def sampled():
        r = client.completions.create(model=MODEL_ID, prompt=STORY, max_tokens=CAP, temperature=0.8, seed=11,
                                      logprobs=1, extra_body=DRAFT)
        return r.choices[0].text, r.choices[0].logprobs.token_logprobs

    text, logprobs = sampled()
    assert sampled() == (text, logprobs) and all(lp <= 0 for lp in logprobs)
