"""What evaluation harnesses need from the server: prompt scoring (`echo` + `logprobs`, as
lm-evaluation-harness's local-completions sends it), the tokenizer routes, /props, and the
proof: lm_eval run against the real `gemma3 serve` scores the shipped multiple-choice task
exactly as `gemma3 eval choices` does in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

from tests.helpers.server import MODEL_ID, ServerProcess  # noqa: E402

ROOT = Path(__file__).parents[2]
HARNESS_ITEMS = 12  # of the shipped 100 (all 100 agree exactly: docs/evaluation.md)


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--ctx", "512", "--max-batch", "2")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local():
    from gemma3 import load

    return load(None, backend="cpu")


def test_echo_logprobs_score_every_prompt_token(client, local):
    from gemma3.inference.score import prompt_scores

    model, tok = local
    ids = tok.encode("The capital of France is Paris", add_bos=True)
    r = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=1, logprobs=1, echo=True, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected, _, _ = prompt_scores(model, ids, top=1)
    for got, want, top in zip(lp.token_logprobs[1:len(ids)], expected[1:], lp.top_logprobs[1:]):
        assert abs(got - want.logprob) < 1e-4
        assert len(top) == 1 and max(top.values()) >= got - 1e-6
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[:2] == [0, 0]  # <bos> takes no text
    text = r.choices[0].text
    assert all(text[o:].startswith(t.replace("▁", " ")) for o, t in zip(lp.text_offset[1:], lp.tokens[1:]))
    assert r.choices[0].text.startswith("The capital of France is Paris")

    zero = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=0, logprobs=0, echo=True)
    assert zero.usage.completion_tokens == 0 and len(zero.choices[0].logprobs.token_logprobs) == len(ids)
    assert zero.choices[0].logprobs.token_logprobs[1:] == lp.token_logprobs[1:len(ids)]


def test_tokenizer_routes_round_trip(server, local):
    _, tok = local
    text = "Question: What is 2 plus 2?\nAnswer: 4"
    r = httpx.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode(text, add_bos=False) and r["count"] == len(r["tokens"])
    assert httpx.post(server.url + "/tokenize", json={"prompt": text}).json()["tokens"][0] == tok.bos_id
    assert httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == text
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == "<eos>" and info["bos_token"] == "<bos>" and info["model_max_length"] == 512
    eos = httpx.post(server.url + "/tokenize", json={"prompt": "<eos>", "add_special_tokens": False}).json()
    assert eos["tokens"] == [tok.eos_id]  # how lm-eval's RemoteTokenizer finds eos_token_id


def test_props_say_what_runs(server):
    props = httpx.get(server.url + "/props").json()
    assert props["model"] == MODEL_ID and props["context"] == 512 and props["max_batch"] == 2
    assert props["build"]["isa"] in ("avx512-amx", "avx512", "avx2", "none")


@pytest.mark.parametrize("path, body, param", [
    ("/detokenize", {"tokens": [10**9]}, "tokens"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
])
def test_bad_input_is_an_openai_shaped_400(server, path, body, param):
    r = httpx.post(server.url + path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]


def test_lm_eval_harness_scores_as_we_do(server, local, tmp_path):
    pytest.importorskip("lm_eval", reason="lm_eval is not installed (pip install -e '.[test]')")
    from gemma3.eval.choices import accuracy, default_items, read_items, score_items

    items = default_items()
    task = (items.parent / "gemma3_choices.yaml").read_text().replace(
        "src/gemma3/eval/tasks/gemma3_choices.jsonl", str(items))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "gemma3_choices.yaml").write_text(task)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
                    f"model={MODEL_ID},base_url={server.url}/v1/completions,tokenizer_backend=remote,"
                    "num_concurrent=1,max_retries=1", "--tasks", "gemma3_choices",
                    "--include_path", str(tmp_path / "tasks"), "--limit", str(HARNESS_ITEMS), "--log_samples",
                    "--output_path", str(tmp_path / "out")], env=env, check=True, cwd=tmp_path, timeout=600)
    [samples] = list((tmp_path / "out").rglob("samples_gemma3_choices_*.jsonl"))
    harness = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda s: s["doc_id"])
    ours = score_items(*local, read_items(items)[:HARNESS_ITEMS])
    assert len(harness) == len(ours) == HARNESS_ITEMS
    for sample, scored in zip(harness, ours):
        lls = [float(resp[0][0]) for resp in sample["resps"]]  # lm_eval logs numbers as str(float)
        assert max(abs(a - b) for a, b in zip(lls, scored.loglikelihoods)) < 1e-3, (sample["doc_id"], lls, scored)
        assert sample["acc"] == float(scored.predicted == scored.answer)
    assert abs(sum(s["acc"] for s in harness) / len(harness) - accuracy(ours)) < 1e-9


def test_embeddings_are_unit_vectors_in_either_encoding(client, local):
    import base64

    import numpy as np

    from gemma3.inference.embed import embed

    model, tok = local
    texts = ["a cat", "a kitten", "a car"]
    floats = client.embeddings.create(model=MODEL_ID, input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2] and floats.usage.prompt_tokens == sum(
        len(tok.encode(t, add_bos=True)) for t in texts)
    raw = client.with_options().embeddings.with_raw_response.create(model=MODEL_ID, input=texts[0],
                                                                    encoding_format="base64")
    packed = np.frombuffer(base64.b64decode(json.loads(raw.text)["data"][0]["embedding"]), "<f4")
    assert np.allclose(packed, floats.data[0].embedding, atol=0)
    mine = embed(model, tok.encode(texts[0], add_bos=True))
    assert np.allclose(floats.data[0].embedding, mine.numpy(), atol=1e-5)
    assert abs(np.linalg.norm(floats.data[0].embedding) - 1) < 1e-5
    last = client.embeddings.create(model=MODEL_ID, input=texts[0], extra_body={"pooling": "last"})
    assert not np.allclose(last.data[0].embedding, floats.data[0].embedding)


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [[10**9]]}, "input"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "hi", "pooling": "max"}, "pooling"),
])
def test_bad_embedding_requests_are_400(server, body, param):
    r = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL_ID, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
