"""Tool calling on the real server (uvicorn subprocess, embedded 270M base model) through the
official `openai` client: a required call's arguments validate against the function's schema, a
named function is the one called, the conversation goes on after a tool result, a streamed call
reassembles (by the client's stream helper) to the non-streamed one, tool_choice none never
returns a call, and bad tools are 400s naming the field."""

from __future__ import annotations

import json

import httpx
import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from tests.helpers.server import MODEL_ID, ServerProcess  # noqa: E402

# Bounded strings and integers: a whole call fits in MAX_TOKENS however the model fills it.
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                                        "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                            "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "The sum of two integers",
                                           "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--ctx", "1024", "--max-tokens", str(MAX_TOKENS), "--max-batch", "4")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


def chat(client, messages=QUESTION, **kwargs):
    return client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS, **{"temperature": 0, **kwargs})


def check_calls(choice, names=tuple(SCHEMAS)) -> list:
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names, call
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return choice.message.tool_calls


@pytest.fixture(scope="module")
def required(client):
    return chat(client, tool_choice="required", parallel_tool_calls=False).choices[0]


def test_required_call_validates_and_the_conversation_goes_on(client, required):
    calls = check_calls(required)
    assert len(calls) == 1  # parallel_tool_calls false: exactly one
    follow = chat(client, QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": json.dumps({"temperature": 21, "sky": "clear"})}],
        max_tokens=16)
    choice = follow.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls


def test_sampled_required_calls_validate(client):
    # One call each (as in every request here): with parallel calls allowed, the base model, greedy
    # or sampled, goes on adding calls to its list until max_tokens cuts it (then the reply is
    # text, finish_reason length); the list form is checked in tests/inference/test_tools.py.
    for seed in range(2):
        check_calls(chat(client, tool_choice="required", temperature=0.9, seed=seed, parallel_tool_calls=False
                         ).choices[0])


def test_named_function_is_the_one_called(client):
    choice = chat(client, [{"role": "user", "content": "What is 12 plus 30?"}],
                  tool_choice={"type": "function", "function": {"name": "add"}}, parallel_tool_calls=False).choices[0]
    assert check_calls(choice, names=("add",))


def test_streamed_call_reassembles_to_the_whole_one(client, required):
    with client.chat.completions.stream(model=MODEL_ID, messages=QUESTION, tools=TOOLS, temperature=0,
                                        tool_choice="required", parallel_tool_calls=False) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in required.message.tool_calls]


def test_auto_streams_like_the_whole_reply(client):
    whole = chat(client, max_tokens=16).choices[0]
    chunks = list(chat(client, stream=True, max_tokens=16))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed_calls = [c for ch in chunks if ch.choices for c in ch.choices[0].delta.tool_calls or []]
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason
    if whole.message.tool_calls:
        assert [c.function.name for c in streamed_calls if c.function.name] == \
            [c.function.name for c in whole.message.tool_calls]
    else:
        assert text == whole.message.content and not streamed_calls


def test_tool_choice_none_never_returns_a_call(client):
    # The reply is forced to be the very text of a call: with tool_choice none it stays text.
    call = '{"name":"get_weather","parameters":{"city":"Paris","unit":"celsius"}}'
    choice = chat(client, tool_choice="none", extra_body={"regex": call.replace("{", r"\{").replace("}", r"\}")
                                                          }).choices[0]
    assert choice.message.content == call and not choice.message.tool_calls and choice.finish_reason == "stop"


BAD_SCHEMA = [{"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"x": {"type": "frob"}}}}}]


@pytest.mark.parametrize("body,param,words", [
    ({"tools": BAD_SCHEMA}, "tools.0.function.parameters", "frob"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters", "object"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools.0.function.name", "letters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", "nope"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format", "cannot be combined"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]},
     "messages.1.tool_call_id", "call_x"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{oops"}}]}]},
     "messages.1.tool_calls.0.function.arguments", "not JSON"),
])
def test_invalid_tools_are_400s_naming_the_field(server, body, param, words):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
