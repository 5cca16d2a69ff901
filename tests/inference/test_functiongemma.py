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
