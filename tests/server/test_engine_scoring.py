"""The engine's scoring paths on a tiny random model: a scored prompt's logprobs equal a plain
full forward's log_softmax (the naive reference), max_tokens 0 generates nothing, and work
handed to Engine.call runs on the engine's thread and fails cleanly once it stops."""

import asyncio
import threading
from concurrent.futures import Future

import pytest
import torch

from gemma3.inference.sampling import SamplingParams
from gemma3.server.engine import Done, Engine, Failed, PromptScores, Request, ShuttingDown


def scored(engine, ids, max_tokens):
    async def run():
        req = Request(ids=ids, params=SamplingParams(temperature=0), max_tokens=max_tokens, stop=[],
                      stop_ids=frozenset(), top_logprobs=1, prompt_top=2)
        req.loop, req.events = asyncio.get_running_loop(), asyncio.Queue()
        engine.submit(req)
        events = []
        while not isinstance(events[-1] if events else None, (Done, Failed)):
            events.append(await asyncio.wait_for(req.events.get(), 60))
        assert not isinstance(events[-1], Failed), events[-1].message
        return events

    return asyncio.run(run())


def test_scored_prompts_match_a_full_forward(tiny, one_thread):
    from gemma3.inference.load import load_tokenizer

    engine = Engine(tiny, load_tokenizer(), prefix_cache_bytes=0)  # the tiny ids are valid in its vocabulary
    engine.start()
    try:
        ids = [5, 9, 3, 17, 4, 11, 8, 22, 6, 13]
        events = scored(engine, ids, max_tokens=0)
        assert isinstance(events[0], PromptScores) and events[-1].completion_tokens == 0 and len(events) == 2
        scores = events[0].scores
        with torch.inference_mode():
            lp = torch.log_softmax(tiny(torch.tensor([ids]))[0].float(), -1)
        assert scores[0].logprob is None
        for i in range(1, len(ids)):
            assert abs(scores[i].logprob - float(lp[i - 1, ids[i]])) < 1e-4
            assert [t for t, _ in scores[i].top] == lp[i - 1].topk(2).indices.tolist()
        again = scored(engine, ids, max_tokens=3)
        assert again[-1].completion_tokens == 3

        thread = Future()
        assert engine.call(lambda model: thread.set_result(threading.current_thread().name)).result(60) is None
        assert thread.result() == "gemma3-engine"
    finally:
        engine.stop()
    with pytest.raises(ShuttingDown):
        engine.call(lambda model: None)
