"""Tool (function) calling for Gemma 3: OpenAI tool definitions rendered into the prompt, the
call the model writes parsed back, and the constraint that makes it always a valid call.

Gemma 3 has no tool tokens and its chat template only user and model turns; Google documents
function calling for it as prompting (ai.google.dev/gemma/docs/capabilities/function-calling).
Of the two output formats that page gives we use the JSON one, because the same JSON schema then
both describes the functions to the model and constrains its answer (llguidance):

    You have access to functions. If you decide to invoke any of the function(s), you MUST put it
    in the format of
    {"name": function name, "parameters": dictionary of argument name and its value}

    You SHOULD NOT include any other text in the response if you call a function
    [{"name": ..., "description": ..., "parameters": {...}}, ...]

That text goes where the page puts it, at the start of the first user turn (before the user's
system prompt, which Gemma 3 also merges into that turn). Several calls at once (parallel tool
calls) are a JSON list of such objects, which the prompt then also says. A tool's result goes back
as a user turn wrapped in a ```tool_output``` block, as Google's Gemma function-calling guides
return results; an earlier call in the history is rendered as the JSON the model would have
written, so the model sees its own format.

With `tool_choice` "required" or a named function the answer is grammar-constrained to the
calls' JSON schema (anyOf over the allowed functions, the name a const, the arguments the
function's own `parameters` schema), so it always parses and validates. With "auto" the model
writes text or a call: an answer that opens with { or [ is held to that schema to its end
(AUTO_GRAMMAR), so a call it returns validates too; any other answer is text.

Tokenizers with FunctionGemma's control tokens use its own format instead (functiongemma.py).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from . import functiongemma
from .functiongemma import ToolError  # raised by both prompt formats

CHOICES = ("auto", "none", "required")
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names

INSTRUCTIONS = ('You have access to functions. If you decide to invoke any of the function(s), you MUST put it in '
                'the format of\n{"name": function name, "parameters": dictionary of argument name and its value}\n')
PARALLEL = ('To call several functions at once, put the calls in a JSON list: [{"name": ..., "parameters": ...}, '
            '{"name": ..., "parameters": ...}]\n')
NO_TEXT = "\nYou SHOULD NOT include any other text in the response if you call a function\n"
# tool_choice "auto": an answer that opens with { or [ is a call and follows the calls' schema to
# its end; any other answer is text (leading whitespace aside). llama-server constrains a call
# the same way once its opening appears (its "lazy grammar"); without it a call whose arguments
# break the function's schema was returned as a call.
AUTO_GRAMMAR = "start: call | text\ncall: %json {schema}\ntext: TEXT?\nTEXT: /\\s*[^\\s{{\\[][\\s\\S]*/\n"


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict  # a JSON schema of an object; {} stands for "no arguments"

    def call_schema(self) -> dict:
        """The JSON schema of one call of this function, in the format the prompt asks for."""
        params = self.parameters or {"type": "object", "properties": {}, "additionalProperties": False}
        return {"type": "object", "properties": {"name": {"const": self.name}, "parameters": params},
                "required": ["name", "parameters"], "additionalProperties": False}


def functions(tools: list[dict]) -> list[Function]:
    """The functions of OpenAI tool definitions ({"type": "function", "function": {"name",
    "description", "parameters"}}); ToolError naming the bad one."""
    if not isinstance(tools, list):
        raise ToolError("tools must be a list of tool definitions", "tools")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ToolError(f"{where}: only tools of type 'function' are supported", f"{where}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ToolError(f"{where}.function must be an object with a name", f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ToolError(f"{where}.function.name must be 1-64 letters, digits, _ or -, got {name!r}",
                            f"{where}.function.name")
        if name in seen:
            raise ToolError(f"{where}: two tools are named {name!r}", f"{where}.function.name")
        seen.add(name)
        params = fn.get("parameters") or {}
        if not isinstance(params, dict) or (params and params.get("type", "object") != "object"):
            raise ToolError(f"{where}.function.parameters must be the JSON schema of an object "
                            "(\"type\": \"object\")", f"{where}.function.parameters")
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise ToolError(f"{where}.function.description must be a string", f"{where}.function.description")
        out.append(Function(name, description, params))
    return out


@dataclass(frozen=True)
class Calling:
    """How a request may call tools: the functions described to the model, those it may call,
    whether it must call one (required / named: the answer is constrained), and whether it may
    call several at once."""

    functions: tuple[Function, ...]
    allowed: tuple[Function, ...]
    forced: bool
    parallel: bool = True
    native: bool = False  # FunctionGemma's control-token format (functiongemma.py), not the prompted JSON

    @property
    def opening(self) -> str:
        """The first visible characters a call can start with (streaming holds such replies)."""
        return "<" if self.native else "{["

    def prompt(self) -> str:
        """The text that describes the functions to the model (Google's JSON format)."""
        described = [{"name": f.name, "description": f.description, "parameters": f.parameters}
                     for f in self.functions]
        # One function per line: Google's example indents the list, which costs ~3x the tokens.
        listed = ",\n".join(json.dumps(d, ensure_ascii=False) for d in described)
        return INSTRUCTIONS + (PARALLEL if self.parallel else "") + NO_TEXT + f"[\n{listed}\n]"

    def schema(self) -> dict:
        """The JSON schema of an answer that is a call: one object, or a list of them when
        parallel calls are allowed."""
        one = self.allowed[0].call_schema() if len(self.allowed) == 1 else \
            {"anyOf": [f.call_schema() for f in self.allowed]}
        if not self.parallel:
            return one
        return {"anyOf": [one, {"type": "array", "items": one, "minItems": 1}]}

    def constraint(self):
        """The Constraint of the answer: a forced call, the calls' schema; "auto", text or a call,
        the call held to its schema once the answer opens one (AUTO_GRAMMAR)."""
        from .constrain import Constraint  # imports llguidance: only where tools are used

        if self.native:
            return Constraint("grammar", functiongemma.grammar(self) if self.forced else functiongemma.auto_grammar(self))
        if self.forced:
            return Constraint.json_schema(self.schema())
        schema = {**self.schema(), "x-guidance": {"whitespace_flexible": False}}  # compact, as constrain.py's JSON
        return Constraint("grammar", AUTO_GRAMMAR.format(schema=json.dumps(schema)))

    def check(self, tokenizer):
        """Compiles every function's call schema against the tokenizer: ToolError naming the tool
        whose parameters are not a JSON schema llguidance can follow."""
        from .constrain import Constraint, compile_grammar

        if self.native:  # one grammar of all the allowed calls (the declared ones that cannot be called aside)
            try:
                compile_grammar(tokenizer, self.constraint())
            except ValueError as e:
                raise ToolError(f"tools: {e}", "tools") from None
            return
        for i, f in enumerate(self.functions):
            try:
                compile_grammar(tokenizer, Constraint.json_schema(f.call_schema()))
            except ValueError as e:
                raise ToolError(f"tools.{i}.function.parameters: {e}", f"tools.{i}.function.parameters") from None

    def parse(self, text: str) -> list[dict] | None:
        """The calls in a reply, as OpenAI `tool_calls` entries (arguments a JSON string), or None
        when the reply is text. A reply is a call when all of it is one call object, or a list of
        them, of allowed functions (the grammar of `constraint` makes every finished reply that
        opens with { or [ one); "arguments" is read as "parameters" (models trained on OpenAI's
        format write it)."""
        if self.native:
            parsed = functiongemma.parse(text, self)
            return parsed[1] if parsed is not None and not parsed[0] else None
        try:
            value = json.loads(text.strip())
        except json.JSONDecodeError:
            return None
        calls = value if isinstance(value, list) else [value]
        if not calls or (len(calls) > 1 and not self.parallel):
            return None
        names = {f.name for f in self.allowed}
        out = []
        for call in calls:
            if not isinstance(call, dict) or call.get("name") not in names or not set(call) <= {
                    "name", "parameters", "arguments"}:
                return None
            args = call.get("parameters", call.get("arguments", {}))
            if isinstance(args, str):  # OpenAI's own format: the arguments as a JSON string
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    return None
            if not isinstance(args, dict):
                return None
            out.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                        "function": {"name": call["name"], "arguments": json.dumps(args, ensure_ascii=False)}})
        return out


def calling(tools: list[dict] | None, tool_choice=None, parallel: bool = True) -> Calling | None:
    """The Calling of a request's `tools`, `tool_choice` ("auto", "none", "required" or
    {"type": "function", "function": {"name": ...}}; None: "auto" with tools, as OpenAI) and
    `parallel_tool_calls`; None when the model is not told of any tool."""
    found = functions(tools) if tools else []
    choice = tool_choice if tool_choice is not None else "auto"
    if isinstance(choice, str):
        if choice not in CHOICES:
            raise ToolError(f"tool_choice must be one of {', '.join(CHOICES)} or a named function, got {choice!r}",
                            "tool_choice")
        if choice == "required" and not found:
            raise ToolError("tool_choice 'required' needs tools", "tool_choice")
        if choice == "none" or not found:
            return None
        return Calling(tuple(found), tuple(found), choice == "required", parallel)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type", "function") != "function" or not isinstance(name, str):
        raise ToolError('tool_choice must be "auto", "none", "required" or {"type": "function", "function": '
                        '{"name": ...}}', "tool_choice")
    named = [f for f in found if f.name == name]
    if not named:
        raise ToolError(f"tool_choice names function {name!r}, which is not in tools "
                        f"({', '.join(f.name for f in found) or 'none given'})", "tool_choice.function.name")
    return Calling(tuple(found), tuple(named), True, parallel)


def chat_messages(messages: list[dict], calling: Calling | None = None) -> list[dict]:
    """A conversation with tools in it as the plain user/model messages Gemma 3's chat template
    takes. `messages`: OpenAI-style dicts, role system / user / assistant / tool, an assistant's
    `tool_calls` as [{"id", "function": {"name", "arguments"}}]. The tools' description goes in
    front of the first user turn; tool results become user turns (merged with the user message
    that may follow them, as the template wants the roles to alternate)."""
    out, ids, tool_turn = [], set(), False  # tool_turn: the last turn holds tool results
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            content = "\n".join(filter(None, [content.strip(), _written_calls(m["tool_calls"], f"messages.{i}")]))
            ids.update(c.get("id") for c in m["tool_calls"])
        elif role == "tool":
            if m.get("tool_call_id") not in ids:
                raise ToolError(f"messages.{i}: a tool message must answer a tool call of an earlier assistant "
                                f"message (tool_call_id {m.get('tool_call_id')!r} is not one)",
                                f"messages.{i}.tool_call_id")
            role, content = "user", f"```tool_output\n{content.strip()}\n```"
        if role == "user" and out and out[-1]["role"] == "user" and (tool_turn or m.get("role") == "tool"):
            out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + content}
        else:
            out.append({"role": role, "content": content})
        tool_turn = role == "user" and (m.get("role") == "tool" or tool_turn)
    if calling is not None:
        system = out[0]["content"] if out and out[0]["role"] == "system" else None
        prompt = calling.prompt() + ("\n\n" + system if system else "")
        out = [{"role": "system", "content": prompt}] + out[1 if system is not None else 0:]
    return out


def _written_calls(calls: list[dict], where: str) -> str:
    """An earlier turn's tool calls as the model writes them."""
    written = []
    for j, call in enumerate(calls):
        fn = call.get("function") or {}
        written.append({"name": fn.get("name"),
                        "parameters": functiongemma.call_arguments(fn, f"{where}.tool_calls.{j}")})
    # Compact, as a constrained call is written (its grammar allows no free whitespace).
    return json.dumps(written[0] if len(written) == 1 else written, ensure_ascii=False, separators=(",", ":"))
