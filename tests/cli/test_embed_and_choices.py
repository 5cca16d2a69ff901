"""`gemma3 embed` and `gemma3 eval choices` on a tiny random model: output shapes, and the
numbers equal to the library functions they print."""

import json

import pytest

from tests.helpers.cli import run_cli
from tests.helpers.training import tiny_model_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("embed") / "model")


def test_embed_json_gives_unit_vectors_and_human_output_a_similarity_table(model, capsys):
    code, out, _ = run_cli(["embed", "a cat", "a car", "--model", str(model), "--json"], capsys)
    assert code == 0
    vectors = json.loads(out)["embeddings"]
    assert len(vectors) == 2 and all(abs(sum(x * x for x in v) - 1) < 1e-4 for v in vectors)
    code, out, _ = run_cli(["embed", "a cat", "a car", "--model", str(model), "--pooling", "last"], capsys)
    assert code == 0 and "cosine similarity" in out and out.count("dims") == 2


def test_eval_choices_scores_each_choice(model, tmp_path, capsys):
    from gemma3 import load
    from gemma3.eval.choices import read_items, score_items

    items = tmp_path / "items.jsonl"
    items.write_text('{"question": "2 + 2?", "choices": ["4", "5"], "answer": 0}\n'
                     '{"question": "Sky?", "choices": ["blue", "red", "green"], "answer": 0}\n')
    code, out, _ = run_cli(["eval", "choices", str(items), "--model", str(model), "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    expected = score_items(*load(model), read_items(items))
    assert result["items"] == 2 and [len(x) for x in result["loglikelihoods"]] == [2, 3]
    assert result["loglikelihoods"] == [s.loglikelihoods for s in expected]


def test_eval_choices_names_a_bad_item(model, tmp_path, capsys):
    items = tmp_path / "items.jsonl"
    items.write_text('{"question": "2 + 2?", "choices": ["4"], "answer": 3}\n')
    code, _, err = run_cli(["eval", "choices", str(items), "--model", str(model)], capsys)
    assert code == 1 and "items.jsonl:1: answer 3" in err
