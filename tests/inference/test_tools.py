"""inference/tools.py without a model: tool definitions and tool_choice checked, calls parsed from
replies, tool calls and results rendered into a conversation Gemma 3's template takes."""

from __future__ import annotations

import json

import pytest

from gemma3.formats.tokenizer import apply_chat_template
from gemma3.inference import tools

ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Sum", "parameters": ADD}},
         {"type": "function", "function": {"name": "now"}}]


def test_tool_choice_modes():
    assert tools.calling(TOOLS, "none") is None and tools.calling(None) is None
    auto = tools.calling(TOOLS)
    assert not auto.forced and auto.constraint().kind == "grammar" and [f.name for f in auto.allowed] == ["add", "now"]
    required = tools.calling(TOOLS, "required", parallel=False)
    assert required.forced and required.schema() == {"anyOf": [f.call_schema() for f in required.functions]}
    named = tools.calling(TOOLS, {"type": "function", "function": {"name": "now"}})
    assert [f.name for f in named.allowed] == ["now"] and [f.name for f in named.functions] == ["add", "now"]
    # parallel: one call or a list of them; "now" takes no arguments: an empty object
    assert named.schema()["anyOf"][1] == {"type": "array", "items": named.allowed[0].call_schema(), "minItems": 1}
    assert named.allowed[0].call_schema()["properties"]["parameters"]["additionalProperties"] is False


@pytest.mark.parametrize("tools_,choice,param", [
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], None,
     "tools.0.function.parameters"),
    ([{"type": "function", "function": {"name": "bad name"}}], None, "tools.0.function.name"),
    (TOOLS + [TOOLS[0]], None, "tools.2.function.name"),
    (TOOLS, {"type": "function", "function": {"name": "missing"}}, "tool_choice.function.name"),
    (TOOLS, "sometimes", "tool_choice"),
    (None, "required", "tool_choice"),
])
def test_bad_tools_name_the_field(tools_, choice, param):
    with pytest.raises(tools.ToolError) as e:
        tools.calling(tools_, choice)
    assert e.value.param == param


def test_parse_reads_calls_and_leaves_text():
    calling = tools.calling(TOOLS)
    [call] = calling.parse(' {"name": "add", "parameters": {"a": 1, "b": 2}}\n')
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    listed = calling.parse('[{"name":"now","parameters":{}},{"name":"add","arguments":"{\\"a\\":3}"}]')
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in listed] == \
        [("now", {}), ("add", {"a": 3})]
    # A fenced call is text: the auto grammar keeps calls unfenced, so their arguments are checked.
    for text in ["It is 3.", '```tool_code\n{"name":"now","parameters":{}}\n```', '{"name": "sub", "parameters": {}}', '{"name": "add", "parameters": 5}',
                 '{"name": "add", "parameters": {}} and more', '{"name": "add", "parameters": {}, "x": 1}', "[]"]:
        assert calling.parse(text) is None, text
    single = tools.calling(TOOLS, parallel=False)
    assert single.parse('[{"name":"now","parameters":{}},{"name":"now","parameters":{}}]') is None


def test_history_renders_calls_and_results_as_gemma_turns():
    calling = tools.calling(TOOLS, parallel=False)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+2?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": " 3 "},
                {"role": "user", "content": "Thanks; and the time?"}]
    rendered = tools.chat_messages(messages, calling)
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "user"]
    assert rendered[0]["content"].startswith(tools.INSTRUCTIONS) and rendered[0]["content"].endswith("\n\nBe brief.")
    assert '"name": "add"' in rendered[0]["content"] and tools.PARALLEL not in rendered[0]["content"]
    assert rendered[2]["content"] == '{"name":"add","parameters":{"a":1,"b":2}}'
    assert rendered[3]["content"] == "```tool_output\n3\n```\nThanks; and the time?"
    prompt = apply_chat_template(rendered)  # alternates as the template requires
    assert prompt.endswith("<start_of_turn>model\n") and prompt.count("<start_of_turn>user") == 2
    with pytest.raises(tools.ToolError) as e:
        tools.chat_messages([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c9", "content": "1"}])
    assert e.value.param == "messages.1.tool_call_id"


@pytest.mark.parametrize("text,ok", [
    ("It is 3.", True), ("", True), (" Sure: {x}", True),
    ('{"name":"add","parameters":{"a":1,"b":2}}', True),
    ('[{"name":"now","parameters":{}},{"name":"add","parameters":{"a":1,"b":2}}]', True),
    ('{"name":"add","parameters":{"a":1}}', False),  # b is required
    ('{"name":"add","parameters":{"a":"1","b":2}}', False),  # a is an integer
    ('{"name":"sub","parameters":{}}', False),  # no such function
    ('{"a": 1}', False),
])
def test_auto_answers_are_text_or_calls_that_follow_the_schema(text, ok):
    from gemma3.inference.constrain import Guide
    from tests.helpers.training import byte_tokenizer

    tok = byte_tokenizer()
    guide = Guide(tok, tools.calling(TOOLS).constraint())
    ids = tok.encode(text, add_bos=False)
    assert (guide.matcher.try_consume_tokens(ids) == len(ids) and guide.accepting) is ok
