"""FunctionGemma's tool format, for tokenizers that have its control tokens (FunctionGemma, Google's
Gemma 3 270M fine-tune for function calling; ai.google.dev/gemma/docs/functiongemma). Models without
them keep the prompted JSON format of tools.py.

The functions are declared in a developer turn opened by the sentence the model was trained to
switch on function calling with:

    <start_of_turn>developer
    You are a model that can do function calling with the following functions<start_function_declaration>
    declaration:NAME{description:<escape>...<escape>,parameters:{properties:{...},required:[...],
    type:<escape>OBJECT<escape>}}<end_function_declaration><end_of_turn>

(one line in the prompt). Values are written in FunctionGemma's syntax: strings between <escape>
tokens, objects as {key:value,...} with unquoted keys (sorted, as in Google's example), lists in
brackets, numbers and booleans as in JSON, and a schema's `type` in capitals. A call and a result
are

    <start_function_call>call:NAME{key:<escape>text<escape>,n:3}<end_function_call>
    <start_function_response>response:NAME{...}<end_function_response>

both inside the model's turn: the model stops at <start_function_response> (a stop token here),
the application appends the result, and the model goes on in the same turn with its answer. A
result that is not a JSON object is sent as {value:<escape>TEXT<escape>}.

Arguments the model writes are read in that syntax, JSON's quoted strings and keys accepted too
(llama.cpp's FunctionGemma parser reads JSON values). A forced call (tool_choice
"required" or named) is constrained by a Lark grammar over the same syntax: each function's
parameters in their schema's order, the optional ones optional, string values free text without
<escape>, the others the JSON their schema allows.
"""

from __future__ import annotations

import json
import uuid

TOKENS = ("<start_function_declaration>", "<end_function_declaration>", "<start_function_call>",
          "<end_function_call>", "<start_function_response>", "<end_function_response>", "<escape>")
ESCAPE = "<escape>"
CALL, END_CALL, RESPONSE = "<start_function_call>", "<end_function_call>", "<start_function_response>"
TRIGGER = "You are a model that can do function calling with the following functions"


class ToolError(ValueError):
    """A bad tool definition, tool_choice or tool message; `param` names the field (OpenAI's
    dotted path, e.g. tools.0.function.parameters)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def call_arguments(function: dict, where: str):
    """An earlier turn's call's `function.arguments` (a JSON string) parsed; a ToolError naming
    `where`.function.arguments when it is not JSON."""
    try:
        return json.loads(function.get("arguments") or "{}")
    except json.JSONDecodeError as e:
        raise ToolError(f"{where}.function.arguments is not JSON: {e}", f"{where}.function.arguments") from None


def supported(tokenizer) -> bool:
    """Whether `tokenizer` has FunctionGemma's control tokens (each one token of its own)."""
    specials = tokenizer.special_ids
    try:
        return all(tokenizer.token_to_id(t) in specials for t in TOKENS)
    except (KeyError, ValueError):
        return False


class Control(str):
    """A piece of the prompt that is one control token (encoded by id, never from user text)."""


def value(v, schema: bool = False) -> str:
    """`v` in FunctionGemma's syntax; `schema`: a JSON schema, whose `type` names are capitalized."""
    if isinstance(v, str):
        return ESCAPE + v + ESCAPE
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_schema_value(k, x) if schema else value(x)}" for k, x in sorted(v.items())) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(value(x, schema) for x in v) + "]"
    return json.dumps(v)


def _schema_value(key: str, v) -> str:
    if key == "type" and isinstance(v, str):
        return value(v.upper())
    if key == "properties" and isinstance(v, dict):  # property names are not schema keywords
        return "{" + ",".join(f"{k}:{value(x, True)}" for k, x in v.items()) + "}"
    return value(v, True)


def declaration(function) -> str:
    """One function (tools.Function) declared as FunctionGemma reads it (without its tokens)."""
    fields = {"description": function.description}
    if function.parameters:
        fields["parameters"] = function.parameters
    return f"declaration:{function.name}" + value(fields, schema=True)


def call_text(name: str, arguments: dict) -> str:
    """A call as the model writes it (without its tokens); arguments in their given order."""
    return f"call:{name}{{" + ",".join(f"{k}:{value(v)}" for k, v in arguments.items()) + "}"


def response_text(name: str, content: str) -> str:
    """A tool result (without its tokens): a JSON object's fields, anything else as `value`."""
    try:
        parsed = json.loads(content)
    except json.JSONDecodeError:
        parsed = None
    fields = parsed if isinstance(parsed, dict) else {"value": content}
    return f"response:{name}{{" + ",".join(f"{k}:{value(v)}" for k, v in fields.items()) + "}"


def pieces(messages: list[dict], calling, add_generation_prompt: bool = True) -> list[str]:
    """The prompt as text pieces and Control tokens. `messages`: OpenAI-style, role system /
    developer / user / assistant / tool, an assistant's tool_calls as [{"id", "function": {"name",
    "arguments"}}], a tool message's tool_call_id naming one of them (ToolError otherwise)."""
    out: list[str] = [Control("<bos>")]
    system = None
    if messages and messages[0].get("role") in ("system", "developer"):
        system, messages = messages[0].get("content") or "", messages[1:]
    if calling is not None or system is not None:
        out += [Control("<start_of_turn>"), "developer\n" + (system.strip() if system is not None else TRIGGER)]
        for f in calling.functions if calling is not None else ():
            out += [Control("<start_function_declaration>"), *_escaped(declaration(f)),
                    Control("<end_function_declaration>")]
        out += [Control("<end_of_turn>"), "\n"]
    names, open_turn = {}, False  # open_turn: a model turn with calls, waiting for their results
    for i, m in enumerate(messages):
        role, content = m.get("role"), (m.get("content") or "").strip()
        if role == "tool":
            name = names.get(m.get("tool_call_id"))
            if name is None or not open_turn:
                raise ToolError(f"messages.{i}: a tool message must answer a tool call of the assistant message "
                                f"before it (tool_call_id {m.get('tool_call_id')!r} is not one)",
                                f"messages.{i}.tool_call_id")
            out += [Control(RESPONSE), *_escaped(response_text(name, m.get("content") or "")),
                    Control("<end_function_response>")]
            continue
        role = "assistant" if role == "model" else role  # the CLI keeps replies as "model"
        if role == "assistant" and open_turn:  # the answer after the results, in the same turn
            out += [content, Control("<end_of_turn>"), "\n"]
            open_turn = False
            continue
        if open_turn:
            out += [Control("<end_of_turn>"), "\n"]
            open_turn = False
        if role not in ("user", "assistant"):
            raise ToolError(f"messages.{i}: role {role!r} can only be the first message", f"messages.{i}.role")
        out += [Control("<start_of_turn>"), ("model" if role == "assistant" else "user") + "\n" + content]
        if role == "assistant" and m.get("tool_calls"):
            for j, c in enumerate(m["tool_calls"]):
                fn = c.get("function") or {}
                names[c.get("id")] = fn.get("name")
                args = call_arguments(fn, f"messages.{i}.tool_calls.{j}")
                out += [Control(CALL), *_escaped(call_text(fn.get("name"), args)), Control(END_CALL)]
            open_turn = True
            continue
        out += [Control("<end_of_turn>"), "\n"]
    if open_turn:  # the results are in: the model answers in the same turn
        return out
    if add_generation_prompt:
        out += [Control("<start_of_turn>"), "model\n"]
    return out


def _escaped(text: str) -> list[str]:
    """`text` with each <escape> as its Control token (the values between them stay text)."""
    parts = text.split(ESCAPE)
    out = []
    for k, part in enumerate(parts):
        if k:
            out.append(Control(ESCAPE))
        if part:
            out.append(part)
    return out


def decoding(tokenizer) -> tuple[frozenset[int], frozenset[int]]:
    """(the control tokens written into a reply's text, so its calls can be parsed; the tokens it
    stops at: <eos>, <end_of_turn>, and <start_function_response>, where it waits for results)."""
    keep = frozenset(tokenizer.token_to_id(t) for t in TOKENS)
    return keep, frozenset((tokenizer.eos_id, tokenizer.end_of_turn_id, tokenizer.token_to_id(RESPONSE)))


def render(messages: list[dict], calling, add_generation_prompt: bool = True) -> str:
    """The prompt's text (control tokens written out), as FunctionGemma's template renders it."""
    return "".join(pieces(messages, calling, add_generation_prompt))


def encode(tokenizer, messages: list[dict], calling, add_generation_prompt: bool = True) -> list[int]:
    """The prompt's ids: control tokens by id, every other piece encoded as plain text, so a user
    who types "<escape>" gets those characters, not the token."""
    ids = []
    for piece in pieces(messages, calling, add_generation_prompt):
        ids += [tokenizer.token_to_id(piece)] if isinstance(piece, Control) else tokenizer.encode(piece, add_bos=False)
    return ids


def parse(text: str, calling) -> tuple[str, list[dict]] | None:
    """(the text before the calls, the calls as OpenAI tool_calls entries) of a reply whose control
    tokens are written out, or None when it holds no call. A call of a function the request does
    not allow, or one that does not parse, leaves the whole reply as text (None)."""
    start = text.find(CALL)
    if start < 0:
        return None
    content, rest = text[:start].strip(), text[start:]
    allowed = {f.name for f in calling.allowed}
    calls = []
    while rest.startswith(CALL):
        end = rest.find(END_CALL)
        if end < 0:
            return None
        parsed = _parse_call(rest[len(CALL):end])
        if parsed is None or parsed[0] not in allowed:
            return None
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": parsed[0], "arguments": json.dumps(parsed[1], ensure_ascii=False)}})
        rest = rest[end + len(END_CALL):].lstrip()
    if rest and not rest.startswith(RESPONSE) or (len(calls) > 1 and not calling.parallel):
        return None
    return content, calls


def _parse_call(body: str) -> tuple[str, dict] | None:
    """(name, arguments) of "call:NAME{key:value,...}"."""
    if not body.startswith("call:") or "{" not in body:
        return None
    name, args = body[len("call:"):].split("{", 1)
    try:
        out, end = _read("{" + args, 0)
    except (ValueError, IndexError):
        return None
    return (name, out) if end == len(args) + 1 and isinstance(out, dict) else None


def _read(text: str, i: int):
    """(the value at text[i:], the index after it): FunctionGemma's syntax (value()), where JSON's
    own strings and quoted keys are read too."""
    if text.startswith(ESCAPE, i):
        end = text.index(ESCAPE, i + len(ESCAPE))
        return text[i + len(ESCAPE):end], end + len(ESCAPE)
    if text[i] == '"':
        return json.JSONDecoder().raw_decode(text, i)
    if text[i] in "{[":
        close, out = ("}", {}) if text[i] == "{" else ("]", [])
        i += 1
        while text[i] != close:
            if close == "}":
                colon = text.index(":", i)
                key = text[i:colon].strip()
                key = json.loads(key) if key.startswith('"') else key
                out[key], i = _read(text, colon + 1)
            else:
                item, i = _read(text, i)
                out.append(item)
            if text[i] == ",":
                i += 1
            elif text[i] != close:
                raise ValueError(f"expected , or {close} at {i}")
        return out, i + 1
    end = i
    while end < len(text) and text[end] not in ",}]":
        end += 1
    return json.loads(text[i:end]), end


def grammar(calling) -> str:
    """The Lark grammar (llguidance) of a reply that is one call of an allowed function, or several
    when parallel calls are allowed, then the model's <start_function_response> (where it stops
    for the results) or the end."""
    rules = []
    for k, f in enumerate(calling.allowed):
        rules.append(f'call_{k}: "call:{f.name}{{" args_{k}_0 "}}"')
        rules += _arguments(f.parameters, f"args_{k}")
    one = " | ".join(f"call_{k}" for k in range(len(calling.allowed)))
    calls = f"({CALL} ({one}) {END_CALL})" + ("+" if calling.parallel else "")
    return "\n".join([f"start: {calls} {RESPONSE}?", *rules])


def auto_grammar(calling) -> str:
    """tool_choice "auto": text (no control token in it), or calls as `grammar` holds them."""
    return grammar(calling).replace("start: ", "start: text | ", 1) + "\ntext: TEXT?\nTEXT: /[\\s\\S]+/"


def _arguments(schema: dict, prefix: str) -> list[str]:
    """Lark rules for "key:value,..." of an object schema, its properties in order, the optional
    ones optional: {prefix}_i, the arguments from the i-th on when none was written before them,
    and {prefix}_more_i, the same after one was (each then follows a comma)."""
    props = list(((schema or {}).get("properties") or {}).items())
    required = set((schema or {}).get("required") or [])
    n = len(props)
    rules = [f'{prefix}_{n}: ""', f'{prefix}_more_{n}: ""']
    for i in reversed(range(n)):
        key, sub = props[i]
        arg = f'"{key}:" {_value(sub)}'
        first = f"{arg} {prefix}_more_{i + 1}"
        more = f'"," {arg} {prefix}_more_{i + 1}'
        if key not in required:
            first += f" | {prefix}_{i + 1}"
            more += f" | {prefix}_more_{i + 1}"
        rules += [f"{prefix}_{i}: {first}", f"{prefix}_more_{i}: {more}"]
    return rules


def _value(schema: dict) -> str:
    """Lark for one argument's value: strings between <escape>s (free text without <escape>, or
    one of its enum), anything else the JSON its schema allows."""
    if isinstance(schema, dict) and schema.get("type") == "string" and set(schema) <= {"type", "description", "enum"}:
        if schema.get("enum"):
            return f"{ESCAPE} (" + " | ".join(json.dumps(e) for e in schema["enum"]) + f") {ESCAPE}"
        return f"{ESCAPE} /[^<]*/ {ESCAPE}"
    return "%json " + json.dumps(schema or {}, separators=(",", ":"))
