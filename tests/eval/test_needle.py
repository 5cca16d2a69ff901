"""Needle-in-a-haystack mechanics on a tiny model (the real figures come from `gemma3 eval needle`)."""

import pytest

from gemma3.eval.needle import ANSWER_ROOM, build_prompt, plot_heatmap, run_needle, to_json
from gemma3.eval.perplexity import EvalInputError
from gemma3.inference.load import load_tokenizer
from tests.helpers.models import random_model, tiny_config


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_prompt_places_the_needle_at_depth(tok):
    hay = tok.encode("grass " * 50, add_bos=False)
    needle = tok.encode(" The secret number is 12345. Remember it.", add_bos=False)
    for depth in (0.0, 0.5, 1.0):
        ids = build_prompt(tok, hay, 120, depth, "12345")
        assert len(ids) == 120 - ANSWER_ROOM and ids[0] == tok.bos_id
        at = next(i for i in range(len(ids)) if ids[i:i + len(needle)] == needle)
        room = 120 - 1 - len(needle) - len(tok.encode(
            "\n\nQuestion: what is the secret number? Answer: The secret number is", add_bos=False)) - ANSWER_ROOM
        assert at == 1 + round(depth * room)


def test_run_needle_end_to_end_on_a_tiny_model(tok, tmp_path):
    model = random_model(tiny_config(vocab=tok.vocab_size, hidden=32, window=16))
    results = run_needle(model, tok, "The grass is green. The sky is blue. ", [96, 160], [0.0, 0.5, 1.0],
                         progress=False)
    assert [(r.ctx, r.depth) for r in results] == [(c, d) for c in (96, 160) for d in (1.0, 0.5, 0.0)]
    assert all(r.answer_logprob < 0 for r in results)
    assert 0.0 <= to_json(results)["accuracy"] <= 1.0
    plot_heatmap(results, tmp_path / "needle.png")
    assert (tmp_path / "needle.png").stat().st_size > 1000


def test_needle_errors(tok):
    model = random_model(tiny_config(vocab=tok.vocab_size, hidden=32, ctx=128))
    with pytest.raises(EvalInputError, match="exceeds"):
        run_needle(model, tok, "hay", [256], [0.5], progress=False)
    with pytest.raises(EvalInputError, match="outside"):
        run_needle(model, tok, "hay", [64], [1.5], progress=False)
    # --ctx equal to the model's whole context: the prompt leaves room for the answer.
    results = run_needle(model, tok, "The grass is green. ", [128], [0.5], progress=False)
    assert len(results) == 1 and results[0].answer_logprob < 0
    with pytest.raises(EvalInputError, match="too short"):
        build_prompt(tok, [5, 6], 10, 0.5, "12345")
