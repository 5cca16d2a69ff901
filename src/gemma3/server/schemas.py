"""Request bodies of the OpenAI API subset we serve. The bounds are the OpenAI API's own (so the
OpenAPI schema tells clients and fuzzers what is valid); top_k, min_p and repetition_penalty are
the usual llama.cpp/vLLM extensions. Unknown fields are ignored, as most OpenAI-compatible
servers do, so clients that send e.g. `user` keep working."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # torch.Generator.manual_seed's range


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Body):
    url: str


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


class FunctionCall(_Body):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[Union[TextPart, ImagePart]], None] = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls (its content may then be null)
    tool_call_id: str | None = None  # a tool message: the call it answers


class FunctionDefinition(_Body):
    name: str
    description: str | None = None
    parameters: dict | None = None  # the JSON schema of the arguments (an object)


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Body):
    include_usage: bool = False


class Speculative(_Body):
    """Per-request speculative decoding (a gemma3 extension; off unless sent): "lookup" drafts up
    to `k` tokens (default 7) by matching the last `ngram` tokens earlier in the prompt or output;
    "draft" has the server's draft model (`serve --draft-model`) draft `k` tokens (default: the
    server's --draft-k)."""

    method: Literal["lookup", "draft"]
    ngram: int = Field(3, ge=1, le=16)
    k: int | None = Field(None, ge=1, le=7)


class JSONSchemaFormat(_Body):
    name: str = Field(..., max_length=64)
    description: str | None = None
    # `schema` would shadow a BaseModel attribute; the JSON key is still "schema".
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: Union[str, list[str], None] = Field(None)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    speculative: Speculative | None = None
    # Structured output (server/structured.py): OpenAI's response_format, and the llama.cpp/vLLM-style
    # extensions grammar (llguidance Lark or GBNF), regex and choice. At most one of them.
    response_format: ResponseFormat | None = None
    grammar: str | None = None
    regex: str | None = None
    choice: list[str] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(..., min_length=1)
    # Tool calling (inference/tools.py): tool_choice None means "auto" when tools are given.
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["auto", "none", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt, generate nothing
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
