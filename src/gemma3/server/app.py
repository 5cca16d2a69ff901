"""HTTP routes of the OpenAI-compatible server. Handlers validate and tokenize, hand a
Request to the engine and turn its events into OpenAI-shaped JSON or SSE chunks. Every error is
`{"error": {"message", "type", "param", "code"}}` with a 4xx status for bad input."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib.resources import files

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..formats.tokenizer import encode_chat
from ..inference import functiongemma, tools
from ..inference.generate import encode_prompt
from ..inference.multimodal import IMAGE_MARK, ImageError, decode_image, encode_chat_with_images, without_marks
from ..inference.sampling import SamplingParams
from ..model import adapters
from . import embeddings, structured, tokens
from .engine import Delta, Done, Engine, Failed, PromptScores, QueueFull, Request, ShuttingDown
from .guard import Gate, Limits
from .ranks import Leader
from .schemas import ChatCompletionRequest, CompletionRequest

# How often a non-streaming handler checks whether its client is still connected.
DISCONNECT_POLL_S = 0.1  # how often a non-streaming request checks that its client is still there


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=headers)


# Declared MIME type of a data URL → the Pillow format its bytes must have.
IMAGE_MIME = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP",
              "image/gif": "GIF", "image/bmp": "BMP"}
MAX_IMAGE_URL_CHARS = 32 * 2**20  # 24 MB of base64-encoded image per part


def image_from_url(url: str, where: str):
    """The RGB image of a `data:image/…;base64,…` URL; anything else is a 400 naming the part.
    Remote URLs are never fetched (a server that fetches is an SSRF vector)."""
    import base64
    import binascii

    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if ":" in url[:12] else "a bare string"
        raise APIError(400, f"{where}: image_url must be a base64 data URL (data:image/png;base64,...); "
                            f"{scheme} URLs are not fetched", param=where, code="invalid_image_url")
    if len(url) > MAX_IMAGE_URL_CHARS:
        raise APIError(400, f"{where}: image data URL is larger than {MAX_IMAGE_URL_CHARS // 2**20} MiB",
                       param=where, code="invalid_image")
    header, _, payload = url[5:].partition(",")
    mime, *options = header.split(";")
    mime = mime.strip().lower()
    if mime not in IMAGE_MIME:
        raise APIError(400, f"{where}: unsupported image type {mime or '(none)'!r}; send one of "
                            f"{', '.join(sorted(set(IMAGE_MIME) - {'image/jpg'}))}", param=where, code="invalid_image")
    if "base64" not in options:
        raise APIError(400, f"{where}: image data URL must be base64-encoded (data:{mime};base64,...)",
                       param=where, code="invalid_image")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: image data is not valid base64", param=where, code="invalid_image") from None
    try:
        return decode_image(data, where, formats=[IMAGE_MIME[mime]])
    except ImageError as e:
        raise APIError(400, str(e), param=where, code="invalid_image") from None


def _token_text(tokenizer, token: int) -> tuple[str, list[int]]:
    data = tokenizer.token_bytes(token, skip_special=False)
    return data.decode("utf-8", errors="replace"), list(data)


def _background_priority():
    """Prompt preparation (tokenizing, decoding images) runs on threads at a lower CPU priority
    than the engine: on a 2-core machine a 1 MB prompt tokenized beside the engine made its decode
    steps 3x slower (its OpenMP threads wait for the core the tokenizer holds); niced, 1.15x."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not allowed: the work still gets done
        pass


class Server:
    """The state routes share: engine, tokenizer, the limits set on the command line, and the
    threads that prepare prompts."""

    def __init__(self, engine: Engine, model_id: str, ctx: int, limits: Limits = Limits()):
        self.engine, self.tokenizer, self.model_id = engine, engine.tokenizer, model_id
        # LoRA adapters served by name (`serve --adapter NAME=DIR`), as vLLM's --lora-modules: a
        # request's `model` picks one; the model's own id runs the base (or the bare --adapter).
        bank = adapters.bank(engine.model)
        self.adapters = {} if bank is None else {n: i for i, n in enumerate(bank.names) if i != bank.default}
        self.models = [model_id, *self.adapters]
        self.ctx, self.limits = ctx, limits
        self.max_tokens = min(limits.max_tokens or ctx, ctx)
        self.max_prompt_bytes = ctx * limits.prompt_bytes_per_token
        self.created = int(time.time())
        self.prep = ThreadPoolExecutor(2, thread_name_prefix="gemma3-prep", initializer=_background_priority)

    async def prepare(self, fn, *args):
        """fn(*args) on a prompt-preparation thread."""
        return await asyncio.get_running_loop().run_in_executor(self.prep, fn, *args)

    # ---------------------------------------------------------------- request → engine Request

    def _check_length(self, text_bytes: int, param: str):
        """Checked before tokenizing: a prompt of a megabyte took 8 s of the tokenizer to be refused."""
        if text_bytes > self.max_prompt_bytes:
            raise APIError(400, f"the prompt is {text_bytes} bytes; this server tokenizes at most "
                                f"{self.max_prompt_bytes} ({self.limits.prompt_bytes_per_token} per token of its "
                                f"{self.ctx}-token context; serve --prompt-bytes-per-token)", param=param,
                           code="context_length_exceeded")

    def tool_calling(self, body: ChatCompletionRequest) -> tools.Calling | None:
        """How the request may call its tools (None: it is not told of any), its functions' schemas
        checked; a 400 naming the field when they are bad."""
        try:
            calling = tools.calling([t.model_dump() for t in body.tools] if body.tools else None,
                                    body.tool_choice if isinstance(body.tool_choice, (str, type(None)))
                                    else body.tool_choice.model_dump(), body.parallel_tool_calls)
            if calling is not None and functiongemma.supported(self.tokenizer):
                calling = replace(calling, native=True)  # its own tool tokens: FunctionGemma's format
            if calling is not None:
                calling.check(self.tokenizer)
            return calling
        except tools.ToolError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_value") from None

    def _chat_ids(self, body: ChatCompletionRequest, calling: tools.Calling | None = None) -> tuple[list[int], list]:
        """Prompt ids and the decoded images of a chat request. A content list renders like Gemma
        3's chat template: text parts trimmed and concatenated, each image where its part is.
        Tools, tool calls and tool results are rendered as inference/tools.py describes."""
        messages, images = [], []
        for i, m in enumerate(body.messages):
            role = "system" if m.role == "developer" else m.role
            if role == "system" and i != 0:
                raise APIError(400, "a system message is only supported as the first message", param=f"messages.{i}")
            if isinstance(m.content, list):
                pieces = []
                for j, part in enumerate(m.content):
                    if part.type == "text":
                        pieces.append(without_marks(part.text).strip())
                        continue
                    if self.engine.vision is None:
                        raise APIError(400, f"model '{self.model_id}' is text-only and cannot read images; serve a "
                                            "multimodal model (an HF directory with vision weights, or a GGUF with "
                                            "--mmproj) to send image_url parts", param=f"messages.{i}.content",
                                       code="unsupported_content")
                    images.append(image_from_url(part.image_url.url, f"messages.{i}.content.{j}"))
                    pieces.append(IMAGE_MARK)
                text = "".join(pieces)
            else:
                text = without_marks(m.content or "")
            calls = [c.model_dump() for c in m.tool_calls] if m.tool_calls and role == "assistant" else None
            messages.append({"role": role, "content": text, "tool_calls": calls, "tool_call_id": m.tool_call_id})
        try:
            if calling is not None and calling.native:
                if images:
                    raise APIError(400, "images cannot be sent with tools in FunctionGemma's format", param="messages")
                self._check_length(sum(len((m["content"] or "").encode("utf-8", "surrogatepass")) for m in messages),
                                   "messages")
                return functiongemma.encode(self.tokenizer, messages, calling), []
            messages = tools.chat_messages(messages, calling)
        except tools.ToolError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_value") from None
        self._check_length(sum(len(m["content"].encode("utf-8", "surrogatepass")) for m in messages), "messages")
        try:
            if not images:
                return encode_chat(self.tokenizer, messages), []  # message text never becomes control tokens
            pas = self.engine.pan_and_scan
            crops = [len(pas.boxes(*im.size)) if pas else 0 for im in images]
            mm_tokens = self.engine.vision.config.mm_tokens_per_image
            return encode_chat_with_images(self.tokenizer, messages, crops, mm_tokens), images
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None

    def _completion_ids(self, body: CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if not prompt:  # "" or []: a model given only <bos> writes whatever starts its training documents
            raise APIError(400, "prompt is empty", param="prompt")
        if isinstance(prompt, str):
            self._check_length(len(prompt.encode("utf-8", "surrogatepass")), "prompt")
            try:
                return encode_prompt(self.tokenizer, prompt)
            except ValueError as e:
                raise APIError(400, str(e), param="prompt") from None
        if any(not 0 <= t < self.tokenizer.vocab_size for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {self.tokenizer.vocab_size})", param="prompt")
        return list(prompt)

    def build(self, body, ids: list[int], top_logprobs: int | None, images=(), prompt_top: int | None = None) -> Request:
        if body.model not in self.models:
            raise APIError(404, f"The model '{body.model}' does not exist (this server serves "
                                f"{', '.join(repr(m) for m in self.models)})", param="model", code="model_not_found")
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        if len(ids) >= self.ctx:
            raise APIError(400, f"This model's maximum context length is {self.ctx} tokens, but the prompt has "
                                f"{len(ids)} tokens (the completion needs at least one more).",
                           param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        requested = getattr(body, "max_completion_tokens", None) or body.max_tokens
        # Documented: max_tokens above what is left of the context is capped, not refused.
        max_tokens = min(self.max_tokens if requested is None else requested, self.max_tokens, self.ctx - len(ids))
        try:
            params = SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                                    min_p=body.min_p, repetition_penalty=body.repetition_penalty, seed=body.seed,
                                    logit_bias=self._logit_bias(body.logit_bias))
        except ValueError as e:
            raise APIError(400, str(e), param="logit_bias" if "logit_bias" in str(e) else None) from None
        if body.speculative is not None and isinstance(self.engine.model, Leader):
            # A verify step and a cache rewind are not among the calls the leader mirrors to its ranks.
            raise APIError(400, "speculative decoding is not served under tensor parallelism (--tp)",
                           param="speculative", code="unsupported")
        if body.speculative is not None and body.speculative.method == "draft" and self.engine.draft is None:
            raise APIError(400, "speculative method 'draft' needs a draft model, and this server has none (start "
                                "it with --draft-model FILE); method 'lookup' needs none",
                           param="speculative.method", code="unsupported")
        limits = self.limits
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > limits.max_stop:
            raise APIError(400, f"{len(stop)} stop strings; this server takes at most {limits.max_stop} (--max-stop)",
                           param="stop", code="too_many_stop_strings")
        if any(len(s) > limits.max_stop_chars for s in stop):
            raise APIError(400, f"a stop string is {max(map(len, stop))} characters long; this server takes at most "
                                f"{limits.max_stop_chars} (--max-stop-chars)", param="stop",
                           code="stop_string_too_long")
        return Request(ids=ids, params=params, max_tokens=max_tokens, stop=[s for s in stop if s],
                       stop_ids=frozenset((self.tokenizer.eos_id, self.tokenizer.end_of_turn_id)),
                       top_logprobs=top_logprobs, images=list(images), prompt_top=prompt_top,
                       speculative=body.speculative, adapter=self.adapters.get(body.model))

    def _logit_bias(self, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
        if not bias:
            return ()
        if len(bias) > self.limits.max_logit_bias:
            raise APIError(400, f"logit_bias has {len(bias)} entries; this server takes at most "
                                f"{self.limits.max_logit_bias} (--max-logit-bias)", param="logit_bias",
                           code="too_many_logit_bias")
        out = []
        for key, value in bias.items():
            token = int(key) if key.strip().lstrip("-").isdigit() else -1
            if not 0 <= token < self.tokenizer.vocab_size:
                raise APIError(400, f"logit_bias key {key!r} is not a token id in [0, {self.tokenizer.vocab_size})",
                               param="logit_bias", code="invalid_value")
            out.append((token, float(value)))
        return tuple(out)

    def guide(self, body, calling: tools.Calling | None = None):
        """The Guide of a request's response_format / grammar / regex / choice or forced tool call
        (None: free text); a 400 naming the field when it is invalid. On a preparation thread (see
        structured.py)."""
        try:
            return structured.guide(self.tokenizer, body, calling)
        except structured.InvalidConstraint as e:
            raise APIError(400, str(e), param=e.param, code="invalid_value") from None

    async def submit(self, req: Request):
        req.loop, req.events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            self.engine.submit(req)
        except QueueFull as e:
            raise APIError(503, str(e), type="server_overloaded", code="queue_full") from None
        except ShuttingDown as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None

    # ---------------------------------------------------------------- engine events → responses

    async def collect(self, req: Request, http: HTTPRequest):
        """(text, Done, logprobs, prompt scores or None) for a non-streaming request; cancels it if
        the client leaves."""
        text, logprobs, finished, prompt = [], [], False, None
        loop = asyncio.get_running_loop()
        checked = loop.time()
        try:
            while True:
                try:
                    event = await asyncio.wait_for(req.events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    event = None
                # Checked on a clock, not only when the engine is quiet: tokens arrive every few
                # milliseconds, and a long generation for a client that left is wasted work.
                if loop.time() - checked >= DISCONNECT_POLL_S:
                    checked = loop.time()
                    if await http.is_disconnected():
                        return None
                if event is None:
                    continue
                if isinstance(event, PromptScores):
                    prompt = event.scores
                    continue
                if isinstance(event, Failed):
                    finished = True
                    raise APIError(500, event.message, type="server_error")
                text.append(event.text)
                logprobs += event.logprobs
                if isinstance(event, Done):
                    finished = True
                    return "".join(text), event, logprobs, prompt
        finally:
            if not finished:
                req.cancel()

    async def stream(self, req: Request, chunk, include_usage: bool, first: dict | None = None):
        """SSE lines: `first` (the role delta), then `chunk(event)` per engine event, then the usage
        chunk when asked for, then [DONE]. Closing the generator (client gone) cancels the request."""
        finished = False
        try:
            if first is not None:
                yield _sse(first)
            while True:
                event = await req.events.get()
                if isinstance(event, Failed):
                    finished = True
                    yield _sse({"error": {"message": event.message, "type": "server_error", "param": None,
                                          "code": None}})
                    break
                for payload in chunk(event):
                    yield _sse(payload)
                if isinstance(event, Done):
                    finished = True
                    if include_usage:
                        yield _sse(chunk.usage_chunk(event))
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not finished:
                req.cancel()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(done: Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


class _ChatChunks:
    """`calling`: the request's tools. A reply that may be a call (its first visible character
    opens JSON: the grammar then holds it to a call, tools.AUTO_GRAMMAR) is held back until it ends; a call is then sent as OpenAI streams
    one (a delta with its index, id, type, name and empty arguments, then its arguments), with
    finish_reason tool_calls. Any other reply streams as text."""

    def __init__(self, server: Server, cid: str, created: int, include_usage: bool, logprobs: bool, model: str,
                 calling: tools.Calling | None = None):
        self.server, self.logprobs, self.calling = server, logprobs, calling
        self.held = None if calling is None else Delta("", [])
        self.base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        if include_usage:
            self.base["usage"] = None

    def make(self, delta: dict, finish_reason=None, logprobs=None) -> dict:
        lp = {"content": chat_logprobs(self.server.tokenizer, logprobs)} if self.logprobs and logprobs else None
        return {**self.base, "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}]}

    def __call__(self, event):
        if self.held is not None:
            held = self.held = Delta(self.held.text + event.text, self.held.logprobs + event.logprobs)
            start = held.text.lstrip()[:1]
            if not isinstance(event, Done):
                if start and start not in self.calling.opening:  # text, not a call: send what was held and go on
                    self.held = None
                    yield self.make({"content": held.text}, logprobs=held.logprobs)
                return
            self.held = None
            calls = self.calling.parse(held.text) if event.finish_reason == "stop" else None
            if calls:
                for i, call in enumerate(calls):
                    fn = call["function"]
                    yield self.make({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                                     "function": {"name": fn["name"], "arguments": ""}}]})
                    yield self.make({"tool_calls": [{"index": i, "function": {"arguments": fn["arguments"]}}]})
                yield self.make({}, "tool_calls")
                return
            event = Done(held.text, event.finish_reason, event.prompt_tokens, event.completion_tokens, held.logprobs)
        if event.text or event.logprobs:
            yield self.make({"content": event.text}, logprobs=event.logprobs)
        if isinstance(event, Done):
            yield self.make({}, event.finish_reason)

    def usage_chunk(self, done: Done) -> dict:
        return {**self.base, "choices": [], "usage": _usage(done)}


class _CompletionChunks:
    def __init__(self, server: Server, cid: str, created: int, include_usage: bool, logprobs: bool, model: str):
        self.server, self.logprobs, self.offset = server, logprobs, 0
        self.base = {"id": cid, "object": "text_completion", "created": created, "model": model}
        if include_usage:
            self.base["usage"] = None

    def make(self, text: str, finish_reason=None, logprobs=None) -> dict:
        lp = None
        if self.logprobs and logprobs:
            lp = completion_logprobs(self.server.tokenizer, logprobs, self.offset)
        self.offset += len(text)
        return {**self.base, "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish_reason}]}

    def __call__(self, event):
        if event.text or event.logprobs:
            yield self.make(event.text, logprobs=event.logprobs)
        if isinstance(event, Done):
            yield self.make("", event.finish_reason)

    def usage_chunk(self, done: Done) -> dict:
        return {**self.base, "choices": [], "usage": _usage(done)}


def chat_logprobs(tokenizer, lps) -> list[dict]:
    out = []
    for lp in lps:
        token, data = _token_text(tokenizer, lp.token)
        top = []
        for t, v in lp.top:
            s, b = _token_text(tokenizer, t)
            top.append({"token": s, "logprob": v, "bytes": b})
        out.append({"token": token, "logprob": lp.logprob, "bytes": data, "top_logprobs": top})
    return out


def completion_logprobs(tokenizer, lps, offset: int = 0) -> dict:
    tokens, offsets = [], []
    for lp in lps:
        offsets.append(offset)
        tokens.append(_token_text(tokenizer, lp.token)[0])
        # Offsets index the returned text, in which control tokens (an echoed <bos>) take no room.
        offset += len(tokenizer.token_bytes(lp.token).decode("utf-8", errors="replace"))
    # An echoed prompt's first token has nothing before it: its logprob and top_logprobs are null.
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [None if lp.logprob is None else {_token_text(tokenizer, t)[0]: v for t, v in lp.top}
                             for lp in lps],
            "text_offset": offsets}


def create_app(engine: Engine, model_id: str, ctx: int, limits: Limits = Limits(), api_key: str | None = None,
               start_engine: bool = True, hosts: frozenset[str] | None = None) -> FastAPI:
    """`start_engine=False`: the caller runs `engine.run()` on a thread of its own (serve does, on
    the main thread); shutdown still stops it. `hosts`: the Host header names answered (None: any;
    see guard.allowed_hosts)."""
    server = Server(engine, model_id, ctx, limits)

    @asynccontextmanager
    async def lifespan(app):
        if start_engine:
            engine.start()
        yield
        await run_in_threadpool(engine.stop)
        server.prep.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="gemma3", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible Gemma 3 server with continuous batching.")
    app.add_middleware(Gate, api_key=api_key, metrics=engine.metrics, hosts=hosts,
                       max_body_bytes=limits.max_body_bytes)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return APIError(400, f"invalid JSON body: {err.get('ctx', {}).get('error', err['msg'])}").response()
        where = ".".join(loc)
        return APIError(400, f"{where}: {err['msg']}" if where else err["msg"], param=where or None,
                        code="invalid_value").response()

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def internal_error(_, exc: Exception):
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return files("gemma3.server").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health():
        problem = engine.healthy()
        if problem:
            raise APIError(503, problem, type="server_error")
        return {"status": "ok", "model": model_id, "active_sequences": engine.metrics.active_sequences,
                "queue_depth": engine.metrics.queue_depth}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return engine.metrics.render()

    # input_modalities (not in OpenAI's schema; clients ignore it) tells the chat page whether to
    # offer image attach: "image" only when vision weights are loaded.
    modalities = ["text"] if engine.vision is None else ["text", "image"]

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model", "created": server.created,
                                            "owned_by": "gemma3", "max_model_len": ctx, "input_modalities": modalities,
                                            **({"parent": model_id} if m != model_id else {})}
                                           for m in server.models]}

    tokens.add_routes(app, server, lambda status, message, param: APIError(status, message, param=param,
                                                                            code="invalid_value"))
    embeddings.add_routes(app, server, lambda status, message, param, code: APIError(
        status, message, type="server_overloaded" if status == 503 else "invalid_request_error", param=param,
        code=code))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        calling = await server.prepare(server.tool_calling, body)
        ids, images = await server.prepare(server._chat_ids, body, calling)
        req = server.build(body, ids, (body.top_logprobs or 0) if body.logprobs else None, images)
        if calling is not None and calling.native:  # the call markers are text to parse; the model stops for results
            req.keep_ids, req.stop_ids = functiongemma.decoding(server.tokenizer)
        req.guide = await server.prepare(server.guide, body, calling)
        await server.submit(req)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            chunks = _ChatChunks(server, cid, created, include_usage, body.logprobs, body.model, calling)
            first = chunks.make({"role": "assistant", "content": ""})
            return _event_stream(server.stream(req, chunks, include_usage, first))
        result = await server.collect(req, http)
        if result is None:
            return JSONResponse({}, status_code=499)
        text, done, lps, _ = result
        calls = calling.parse(text) if calling is not None and done.finish_reason == "stop" else None
        message = {"role": "assistant", "content": None, "tool_calls": calls} if calls else \
            {"role": "assistant", "content": text}
        return {"id": cid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": message,
                             "logprobs": {"content": chat_logprobs(server.tokenizer, lps)} if body.logprobs else None,
                             "finish_reason": "tool_calls" if calls else done.finish_reason}],
                "usage": _usage(done)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        ids = await server.prepare(server._completion_ids, body)
        scored = body.echo and body.logprobs is not None
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 only makes sense with echo (the prompt is all the answer has)",
                           param="max_tokens")
        if scored and body.stream:
            raise APIError(400, "echo with logprobs is not supported when streaming; send stream=false",
                           param="stream")
        req = server.build(body, ids, body.logprobs, prompt_top=body.logprobs if scored else None)
        req.guide = await server.prepare(server.guide, body)
        await server.submit(req)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = server.tokenizer.decode(ids) if body.echo else ""
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            chunks = _CompletionChunks(server, cid, created, include_usage, body.logprobs is not None, body.model)
            first = chunks.make(echo) if echo else None
            return _event_stream(server.stream(req, chunks, include_usage, first))
        result = await server.collect(req, http)
        if result is None:
            return JSONResponse({}, status_code=499)
        text, done, lps, prompt = result
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(server.tokenizer, (prompt or []) + lps)
        return {"id": cid, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "text": echo + text, "finish_reason": done.finish_reason,
                             "logprobs": logprobs}],
                "usage": _usage(done)}

    return app


def _event_stream(lines) -> StreamingResponse:
    return StreamingResponse(lines, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
