"""FunctionGemma's tool format (inference/functiongemma.py) on a byte tokenizer that has its control
tokens: the prompt matches Google's documented example exactly, calls written by the model parse
back to what was rendered, and the forced-call grammar takes exactly the calls it should."""

from __future__ import annotations

import json

import pytest

from gemma3.formats.tokenizer import BYTE, CONTROL, UNKNOWN, USER_DEFINED, Tokenizer
from gemma3.inference import functiongemma as fg
from gemma3.inference import tools
from gemma3.inference.constrain import Constraint, Guide
from tests.helpers.training import SPECIALS, byte_tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_current_weather", "description": "Gets the current weather in a given location.",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": 'The city and state, e.g. "San Francisco, CA" or "Tokyo, JP"'},
        "unit": {"type": "string", "description": "The unit to return the temperature in.",
                 "enum": ["celsius", "fahrenheit"]}},
        "required": ["location"]}}}
# Google's "formatting and best practices" page for FunctionGemma, turns 1-4 of its weather example.
REFERENCE = (
    "<bos><start_of_turn>developer\nYou are a model that can do function calling with the following functions"
    "<start_function_declaration>declaration:get_current_weather{description:<escape>Gets the current weather in a "
    "given location.<escape>,parameters:{properties:{location:{description:<escape>The city and state, e.g. "
    '"San Francisco, CA" or "Tokyo, JP"<escape>,type:<escape>STRING<escape>},unit:{description:<escape>The unit to '
    "return the temperature in.<escape>,enum:[<escape>celsius<escape>,<escape>fahrenheit<escape>],type:<escape>STRING"
    "<escape>}},required:[<escape>location<escape>],type:<escape>OBJECT<escape>}}<end_function_declaration>"
    "<end_of_turn>\n<start_of_turn>user\nHey, what's the weather in Tokyo right now?<end_of_turn>\n"
    "<start_of_turn>model\n")
CALL = "<start_function_call>call:get_current_weather{location:<escape>Tokyo, Japan<escape>}<end_function_call>"
RESULT = ("<start_function_response>response:get_current_weather{temperature:15,weather:<escape>sunny<escape>}"
          "<end_function_response>")
ASKED = [{"role": "user", "content": "Hey, what's the weather in Tokyo right now?"}]
CALLED = ASKED + [
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_current_weather", "arguments": '{"location": "Tokyo, Japan"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 15, "weather": "sunny"}'}]


def functiongemma_tokenizer() -> Tokenizer:
    """The byte tokenizer's pieces plus FunctionGemma's control tokens."""
    extra = list(fg.TOKENS)
    pieces = SPECIALS + extra + ["\n"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [CONTROL, CONTROL, CONTROL, UNKNOWN, CONTROL, CONTROL] + [CONTROL] * len(extra) + [USER_DEFINED] + \
        [BYTE] * 256
    return Tokenizer(pieces, [0.0] * len(pieces), types, bos_id=2, eos_id=1, unk_id=3, pad_id=0)


TOK = functiongemma_tokenizer()


def test_only_tokenizers_with_the_tokens_use_it():
    assert fg.supported(TOK) and not fg.supported(byte_tokenizer())


def test_prompt_matches_googles_example():
    auto = tools.calling([WEATHER])
    assert fg.render(ASKED, auto) == REFERENCE
    # The call and its result continue the model's turn; the model answers after them.
    assert fg.render(CALLED, auto) == REFERENCE + CALL + RESULT
    answered = CALLED + [{"role": "assistant", "content": "It is sunny, 15 degrees."}]
    assert fg.render(answered, auto) == REFERENCE + CALL + RESULT + "It is sunny, 15 degrees.<end_of_turn>\n" \
        "<start_of_turn>model\n"


def test_control_tokens_are_ids_and_user_text_stays_text():
    ids = fg.encode(TOK, [{"role": "user", "content": "say <escape> please"}], tools.calling([WEATHER]))
    escape = TOK.token_to_id("<escape>")
    user = ids[ids.index(TOK.token_to_id("<end_function_declaration>")):]
    assert escape not in user and TOK.decode(user, skip_special=False).count("<escape>") == 1
    # (the byte tokenizer writes spaces as "▁", and decodes them so)
    assert TOK.decode(ids, skip_special=False).replace("\u2581", " ") == fg.render(
        [{"role": "user", "content": "say <escape> please"}], tools.calling([WEATHER]))


def test_calls_parse_back():
    auto = tools.calling([WEATHER])
    content, [call] = fg.parse(CALL + "<start_function_response>", auto)
    assert content == "" and call["function"] == {"name": "get_current_weather",
                                                  "arguments": '{"location": "Tokyo, Japan"}'}
    args = {"location": "a, b {c}: d", "unit": "celsius", "n": 3, "flags": [True, None], "deep": {"x": 1.5}}
    written = "<start_function_call>" + fg.call_text("get_current_weather", args) + "<end_function_call>"
    content, calls = fg.parse("Sure." + written * 2, auto)
    assert content == "Sure." and [json.loads(c["function"]["arguments"]) for c in calls] == [args, args]
    _, [call] = fg.parse('<start_function_call>call:get_current_weather{"location":"x","n":[1,2]}'
                         "<end_function_call>", auto)  # JSON, as llama.cpp reads it
    assert json.loads(call["function"]["arguments"]) == {"location": "x", "n": [1, 2]}
    assert fg.parse("no call here", auto) is None
    assert fg.parse(CALL.replace("get_current_weather", "other"), auto) is None  # not a known function
    assert fg.parse(CALL[:-len("<end_function_call>")], auto) is None  # cut off
    assert fg.parse(CALL * 2, tools.calling([WEATHER], parallel=False)) is None


def written_ids(text: str) -> list[int]:
    return TOK.encode(text, add_bos=False, parse_special=True)


@pytest.mark.parametrize("text,ok", [
    (CALL, True),
    ("<start_function_call>call:get_current_weather{location:<escape>Paris<escape>,unit:<escape>celsius<escape>}"
     "<end_function_call>", True),
    ("<start_function_call>call:get_current_weather{unit:<escape>celsius<escape>}<end_function_call>", False),
    ("<start_function_call>call:get_current_weather{location:<escape>Paris<escape>,unit:<escape>kelvin<escape>}"
     "<end_function_call>", False),
    ("<start_function_call>call:get_current_weather{location:3}<end_function_call>", False),
    ("Sure." + CALL, False),
])
def test_forced_calls_are_constrained(text, ok):
    required = tools.calling([WEATHER], "required", parallel=False)
    guide = Guide(TOK, Constraint("grammar", fg.grammar(required)))
    ids = written_ids(text)
    taken = guide.matcher.try_consume_tokens(ids)
    assert (taken == len(ids) and guide.accepting) is ok


def test_optional_arguments_and_json_values_in_the_grammar():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"},
                                               "c": {"type": "boolean"}}, "required": ["c"]}
    named = tools.calling([{"type": "function", "function": {"name": "f", "parameters": schema}}],
                          {"type": "function", "function": {"name": "f"}})
    grammar = fg.grammar(named)
    for args, ok in [({"c": True}, True), ({"a": 1, "c": False}, True), ({"b": "x", "c": True}, True),
                     ({"a": 1, "b": "x", "c": True}, True), ({"a": 1}, False), ({"c": "yes"}, False)]:
        guide = Guide(TOK, Constraint("grammar", grammar))
        ids = written_ids("<start_function_call>" + fg.call_text("f", args) + "<end_function_call>")
        assert (guide.matcher.try_consume_tokens(ids) == len(ids) and guide.accepting) is ok, args


def test_server_uses_the_format_end_to_end(one_thread):
    """A tiny random model behind the real app (in process): a named call comes back as a parsed
    tool call (its markers decoded, the grammar holding the random model to the call), and the
    conversation with its result goes on in FunctionGemma's format."""
    from starlette.testclient import TestClient

    from gemma3.server.app import create_app
    from gemma3.server.engine import Engine
    from tests.helpers.models import random_model, tiny_config

    engine = Engine(random_model(tiny_config(vocab=TOK.vocab_size)), TOK, prefix_cache_bytes=0)
    # The bias closes each string as soon as it opens (a random model would fill it to max_tokens).
    body = {"model": "tiny", "messages": ASKED, "tools": [WEATHER], "max_tokens": 120, "temperature": 0,
            "tool_choice": {"type": "function", "function": {"name": "get_current_weather"}},
            "logit_bias": {str(TOK.token_to_id("<escape>")): 100}, "parallel_tool_calls": False}
    with TestClient(create_app(engine, "tiny", 1024)) as client:
        reply = client.post("/v1/chat/completions", json=body).json()
        assert "choices" in reply, reply
        choice = reply["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        [call] = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "get_current_weather"
        assert "location" in json.loads(call["function"]["arguments"])
        body["messages"] = ASKED + [{"role": "assistant", "content": None, "tool_calls": [call]},
                                    {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]
        body["tool_choice"] = "auto"
        reply = client.post("/v1/chat/completions", json=body).json()
        assert "choices" in reply, reply
        # The prompt was the call and its result in FunctionGemma's format, the model's turn left open.
        prompt = fg.encode(TOK, body["messages"], tools.calling([WEATHER]))
        assert fg.render(body["messages"], tools.calling([WEATHER])).endswith(
            "<start_function_response>response:get_current_weather{value:<escape>sunny<escape>}"
            "<end_function_response>")
        assert reply["usage"]["prompt_tokens"] == len(prompt)


@pytest.mark.parametrize("text,ok", [
    ("It is sunny.", True), ("", True), (CALL, True), (CALL + "<start_function_response>", True),
    ("<start_function_call>call:get_current_weather{unit:<escape>celsius<escape>}<end_function_call>", False),
    ("Sure." + CALL, False),  # text or calls, as the JSON format's auto grammar
])
def test_auto_answers_are_text_or_valid_calls(text, ok):
    from dataclasses import replace

    auto = replace(tools.calling([WEATHER]), native=True)
    guide = Guide(TOK, auto.constraint())
    ids = written_ids(text)
    assert (guide.matcher.try_consume_tokens(ids) == len(ids) and guide.accepting) is ok
    if ok and text.startswith("<start_function_call>"):
        assert [c["function"]["name"] for c in auto.parse(text)] == ["get_current_weather"]


def test_cli_forced_call_in_the_format(tmp_path, capsys):
    """`gemma3 generate --chat --tools` with a tiny random model whose tokenizer has the tokens:
    the named call comes back parsed (the grammar holds the model to it, the markers are decoded,
    <start_function_response> or the grammar's end stops it)."""
    from gemma3.formats.checkpoint import save_hf_dir
    from tests.helpers.cli import run_cli
    from tests.helpers.models import random_model, tiny_config

    cfg = tiny_config(vocab=TOK.vocab_size, layers=2)
    save_hf_dir(tmp_path, cfg, random_model(cfg).state_dict())
    TOK.save(tmp_path)
    (tmp_path / "tools.json").write_text(json.dumps([WEATHER, {"type": "function", "function": {"name": "now"}}]))
    code, out, err = run_cli(["generate", "--model", str(tmp_path), "--chat", "What time is it?", "--tools",
                              str(tmp_path / "tools.json"), "--tool-choice", "now", "-n", "40", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["finish_reason"] == "tool_calls", result
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in result["tool_calls"]] == [("now", "{}")]
    assert result["text"].startswith("<start_function_call>call:now{}<end_function_call>")
