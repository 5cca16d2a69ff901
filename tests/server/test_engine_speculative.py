"""Speculative decoding inside the continuous batch, on tiny random models in this process: greedy
requests drafting with a draft model or by prompt lookup, sharing decode steps with plain ones,
give plain greedy decoding's tokens; each drafting sequence's draft cache follows its kept tokens
and is dropped with it; a draft request without a draft model is refused."""

import asyncio
import gc
import time
from types import SimpleNamespace

import pytest
import torch

from gemma3.inference.generate import generate_step
from gemma3.inference.sampling import SamplingParams
from gemma3.model.cache import KVCache
from gemma3.server.engine import Done, Engine, Failed, Request
from tests.helpers.models import random_model, tiny_config

WINDOW = 8
VOCAB = 64


def request(ids, max_tokens, speculative=None, params=None):
    return Request(ids=ids, params=params or SamplingParams(temperature=0), max_tokens=max_tokens, stop=[],
                   stop_ids=frozenset(), top_logprobs=0, speculative=speculative)


def run_together(engine, reqs):
    """Submits every request at once (they share decode steps); each one's tokens (from its logprobs)."""
    async def one(req):
        req.loop, req.events = asyncio.get_running_loop(), asyncio.Queue()
        engine.submit(req)
        tokens = []
        while True:
            event = await asyncio.wait_for(req.events.get(), 120)
            assert not isinstance(event, Failed), event.message
            tokens += [lp.token for lp in event.logprobs]
            if isinstance(event, Done):
                return tokens

    async def all_of():
        return await asyncio.gather(*(one(r) for r in reqs))

    return asyncio.run(all_of())


@pytest.fixture(scope="module")
def tok():
    from gemma3.inference.load import load_tokenizer

    return load_tokenizer()  # the tiny ids are valid in its vocabulary


@pytest.fixture
def pair():
    target = random_model(tiny_config(layers=6, window=WINDOW, vocab=VOCAB))
    draft = random_model(tiny_config(layers=2, local_per_global=1, window=WINDOW, vocab=VOCAB), seed=7)
    return target, draft


def test_drafting_rows_in_the_batch_give_plain_greedy_tokens(pair, tok, one_thread):
    target, draft = pair
    engine = Engine(target, tok, max_batch=6, prefix_cache_bytes=0, draft=draft, draft_k=3)
    engine.start()
    try:
        gen = torch.Generator().manual_seed(3)
        prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 9, 12, 7, 20)]
        prompts[3] = prompts[3] * 3  # repeats: prompt lookup finds drafts
        n = 40  # past the window: rewinds restore ring slots
        plain = [list(generate_step(target, p, SamplingParams(), n)) for p in prompts]
        specs = [SimpleNamespace(method="draft", k=None, ngram=3), SimpleNamespace(method="draft", k=6, ngram=3),
                 None, SimpleNamespace(method="lookup", k=5, ngram=2), SimpleNamespace(method="draft", k=2, ngram=3)]
        got = run_together(engine, [request(p, n, s) for p, s in zip(prompts, specs)])
        assert got == plain
        stats = engine.metrics.speculative
        assert stats.verify_steps > 0 and 0 < stats.accepted < stats.drafted
        assert draft_caches_left(engine) == []  # finished sequences drop their draft caches
    finally:
        engine.stop()


def draft_caches_left(engine, layers=2):
    """The draft's KV caches still alive once the engine holds no sequence."""
    deadline = time.monotonic() + 10
    while (engine.active or engine.prefilling) and time.monotonic() < deadline:
        time.sleep(0.01)
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is KVCache and len(o.layers) == layers]


def test_a_cancelled_draft_request_drops_its_draft_cache(pair, tok, one_thread):
    target, draft = pair
    engine = Engine(target, tok, prefix_cache_bytes=0, draft=draft)
    engine.start()
    try:
        async def cancel_after_a_token():
            req = request([1, 2, 3], 10_000, SimpleNamespace(method="draft", k=3, ngram=3))
            req.loop, req.events = asyncio.get_running_loop(), asyncio.Queue()
            engine.submit(req)
            await asyncio.wait_for(req.events.get(), 60)
            req.cancel()

        asyncio.run(cancel_after_a_token())
        deadline = time.monotonic() + 30  # the engine thread drops the sequence at its next step
        while (draft_caches_left(engine) or engine.metrics.cancelled == 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert draft_caches_left(engine) == [] and engine.metrics.cancelled == 1
    finally:
        engine.stop()


def test_sampled_draft_requests_run(pair, tok, one_thread):
    target, draft = pair
    engine = Engine(target, tok, prefix_cache_bytes=0, draft=draft)
    engine.start()
    try:
        params = SamplingParams(temperature=0.8, seed=5)
        got = run_together(engine, [request([1, 2, 3, 4], 20, SimpleNamespace(method="draft", k=4, ngram=3),
                                            params) for _ in range(2)])
        assert got[0] == got[1] and len(got[0]) == 20  # same seed, same tokens, whatever the batch
    finally:
        engine.stop()


def test_draft_requests_need_a_draft_model(pair, tok):
    target, _ = pair
    engine = Engine(target, tok, prefix_cache_bytes=0)
    with pytest.raises(ValueError, match="needs a draft model"):
        engine.submit(request([1, 2], 4, SimpleNamespace(method="draft", k=None, ngram=3)))


def test_a_draft_model_of_another_vocabulary_is_refused(pair, tok):
    target, _ = pair
    other = random_model(tiny_config(layers=2, vocab=VOCAB + 1))
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(target, tok, prefix_cache_bytes=0, draft=other)
