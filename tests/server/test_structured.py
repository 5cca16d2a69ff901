"""Structured output on the real server (uvicorn subprocess, embedded 270M base model) through the
official `openai` client: sampled json_schema responses parse and validate, json_object ones
parse, grammar / regex / choice hold, and bad constraints are 400s naming the field."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from tests.helpers.server import MODEL_ID, ServerProcess  # noqa: E402

# Every string, array and number is bounded, so a complete document fits in MAX_TOKENS however
# the model samples (a character is at most 4 byte tokens): the grammar must close it.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "country": {"enum": ["FR", "DE", "US"]}},
            "required": ["city", "country"],
            "additionalProperties": False,
        },
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 10},
                   "minItems": 1, "maxItems": 4},
    },
    "required": ["name", "age", "role", "address", "scores"],
    "additionalProperties": False,
}
MAX_TOKENS = 192
PROMPT = "Write the record of one user of our web site as JSON."


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--ctx", "512", "--max-tokens", str(MAX_TOKENS), "--max-batch", "10", "--max-queue", "32")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


def chat(client, **kwargs):
    return client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": PROMPT}], **kwargs)


def test_sampled_json_schema_responses_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "user", "schema": SCHEMA, "strict": True}}
    with ThreadPoolExecutor(10) as pool:
        replies = list(pool.map(lambda seed: chat(client, temperature=0.8, seed=seed, response_format=fmt),
                                range(20)))
    texts = [r.choices[0].message.content for r in replies]
    for r, text in zip(replies, texts):
        assert r.choices[0].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 10  # sampled with different seeds, not one forced answer


def test_json_object_responses_parse(client):
    # json_object bounds nothing, and the 270M base model sampled at 0.8 often nests objects until
    # max_tokens (a cut document cannot parse): these prompts are ones it closes greedily.
    prompts = ["Give the weather in Berlin as JSON.", "Give the weather in Rome as JSON.",
               "Return the status of the server as JSON."]
    for prompt in prompts:
        r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": prompt}],
                                           temperature=0, response_format={"type": "json_object"})
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_streamed_json_schema_equals_the_whole_response(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "user", "schema": SCHEMA}}
    whole = chat(client, temperature=0.8, seed=7, response_format=fmt).choices[0].message.content
    stream = chat(client, temperature=0.8, seed=7, response_format=fmt, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole


def test_grammar_regex_and_choice(client):
    grammar = 'start: "The answer is " ("yes" | "no") "."'
    r = client.completions.create(model=MODEL_ID, prompt="Is water wet?", max_tokens=20, extra_body={"grammar": grammar})
    assert re.fullmatch(r"The answer is (yes|no)\.", r.choices[0].text)
    gbnf = 'root ::= [0-9] [0-9] "-" [a-z] [a-z] [a-z]'  # llama.cpp's GBNF works too
    r = client.completions.create(model=MODEL_ID, prompt="Code:", max_tokens=8, temperature=0.8, seed=1,
                                  extra_body={"grammar": gbnf})
    assert re.fullmatch(r"[0-9]{2}-[a-z]{3}", r.choices[0].text)
    # Seeded: unseeded sampling could pick full-width digits (`\d` admits every Unicode digit, as in
    # Python), several tokens each, and run out of max_tokens mid-match.
    r = chat(client, max_tokens=20, seed=1, extra_body={"regex": r"\d{3}-\d{4}"})
    assert re.fullmatch(r"\d{3}-\d{4}", r.choices[0].message.content)
    choices = ["red", "green", "blue"]
    for seed in range(3):
        r = chat(client, temperature=1.0, seed=seed, max_tokens=10, extra_body={"choice": choices})
        assert r.choices[0].message.content in choices and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body,param,words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format.json_schema.schema", "frob"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema",
     "schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ({"grammar": "start: missing_rule"}, "grammar", "missing_rule"),
    ({"regex": "(unclosed"}, "regex", "unclosed"),
    ({"choice": []}, "choice", "non-empty"),
    ({"regex": "a", "choice": ["a"]}, "choice", "only one"),
    ({"regex": "a+", "speculative": {"method": "lookup"}}, "speculative", "cannot be combined"),
])
def test_invalid_constraints_are_400s_naming_the_problem(server, body, param, words):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
