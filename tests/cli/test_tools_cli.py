"""`gemma3 generate --chat --tools FILE` on the embedded 270M: a forced call is printed parsed (a
line per call, or JSON with --json) and validates; bad tool options are one-line errors."""

import json

import pytest

from tests.helpers.cli import one_line_error, run_cli

jsonschema = pytest.importorskip("jsonschema")

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 20}},
           "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time now"}}]


@pytest.fixture
def tools_file(tmp_path):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(TOOLS))
    return str(path)


def test_forced_call_json_and_human(tools_file, capsys):
    args = ["generate", "--chat", "Weather in Paris?", "--tools", tools_file, "-n", "48"]
    code, out, err = run_cli(args + ["--tool-choice", "required", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["finish_reason"] == "tool_calls", result
    for call in result["tool_calls"]:
        assert call["function"]["name"] in ("get_weather", "get_time")
        if call["function"]["name"] == "get_weather":
            jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)
    code, out, err = run_cli(args + ["--tool-choice", "get_time"], capsys)
    assert code == 0 and out.strip().splitlines()[0] == "get_time({})", out


def test_bad_tool_options_are_one_line_errors(tools_file, tmp_path, capsys):
    one_line_error(*run_cli(["generate", "hi", "--tools", tools_file], capsys), "--tools needs --chat")
    one_line_error(*run_cli(["generate", "--chat", "hi", "--tools", tools_file, "--tool-choice", "nope"], capsys),
                   "tool_choice names function 'nope'")
    one_line_error(*run_cli(["generate", "--chat", "hi", "--tools", tools_file, "--regex", "a"], capsys),
                   "--regex cannot be combined with --tools")
    (tmp_path / "bad.json").write_text(json.dumps([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "frob"}}}}}]))
    one_line_error(*run_cli(["generate", "--chat", "hi", "--tools", str(tmp_path / "bad.json")], capsys),
                   "tools.0.function.parameters", "frob")


def test_chat_answers_a_call_with_result(tools_file, tmp_path):
    import subprocess
    import sys

    saved = tmp_path / "c.json"
    out = subprocess.run([sys.executable, "-m", "gemma3", "chat", "--tools", tools_file, "--tool-choice",
                          "get_time", "-n", "24"], input=f"What time is it?\n/result 12:30\n/save {saved}\n",
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "(tool call get_time({}): answer with /result TEXT)" in out.stderr
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[2] == {"role": "tool", "tool_call_id": messages[1]["tool_calls"][0]["id"], "content": "12:30"}
