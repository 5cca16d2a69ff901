"""What stands between a client and the engine: the limits one request may ask for (`Limits`, each
a `serve` flag), the ASGI middleware that checks what can be checked before the body is parsed
(`Gate`: Host allow-list, API key, body size; per-endpoint counts for /metrics), and uvicorn's
HTTP protocol with a deadline for the request head (`protocol`), so slow clients are closed."""

from __future__ import annotations

import ipaddress
import json
import secrets
from dataclasses import dataclass

from uvicorn.protocols.http.h11_impl import H11Protocol

ENDPOINTS = ("/", "/health", "/metrics", "/props", "/tokenizer_info", "/tokenize", "/detokenize", "/v1/models",
             "/v1/chat/completions", "/v1/completions", "/v1/embeddings")
# Outside /v1 but doing work on request text, so behind the key too (lm-eval sends it to them).
KEYED = ("/tokenize", "/detokenize")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Limits:
    """Per-request limits, with the defaults `serve` documents. Each bounds work that one client
    could otherwise push onto every other client (matching 100,000 stop strings on the engine's
    thread held a concurrent 16-token request up for 13 s)."""

    max_tokens: int | None = None  # a request's max_tokens at most (None: what the context leaves)
    max_stop: int = 16  # stop strings per request (OpenAI allows 4)
    max_stop_chars: int = 256  # characters per stop string
    max_logit_bias: int = 1024  # logit_bias entries per request
    max_body_bytes: int = 64 * 2**20  # request body (base64 images are most of a large one)
    prompt_bytes_per_token: int = 8  # prompt text accepted per token of context, checked before tokenizing


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind: str, extra: list[str] | None) -> frozenset[str] | None:
    """Host header names the server answers to; None = any. Bound to loopback, only loopback
    names (plus `extra`): a web page the user visits cannot reach the API through a DNS name
    rebound to 127.0.0.1, because its requests carry that name. Bound elsewhere, any name unless
    `extra` lists them; "*" in `extra` allows any."""
    extra = [h.strip().lower() for h in extra or [] if h.strip()]
    if "*" in extra:
        return None
    if is_loopback(bind):
        return frozenset(LOOPBACK_NAMES) | frozenset(extra)
    return frozenset(extra) if extra else None


def host_name(header: bytes) -> str:
    """The name in a Host header, without its port ("[::1]:8000" -> "::1")."""
    host = header.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Gate:
    """ASGI middleware in front of everything. In order: the Host allow-list (400), the API key
    on /v1/* (401), the body size (413: a declared Content-Length at once, a chunked body as soon
    as it passes the limit; the body is read here and replayed to the app). All before a byte of
    JSON is parsed, so a bad request costs nothing; and every response is counted for /metrics."""

    def __init__(self, app, api_key: str | None, metrics, hosts: frozenset[str] | None = None,
                 max_body_bytes: int | None = None):
        self.app, self.api_key, self.metrics = app, api_key, metrics
        self.hosts, self.max_body_bytes = hosts, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        status = [500]

        async def counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is None and self.max_body_bytes is not None and scope["method"] in ("POST", "PUT", "PATCH"):
                receive, refusal = await self._read_body(scope, receive)
            if refusal is not None:
                await _error(counted, *refusal)
                return
            await self.app(scope, receive, counted)
        finally:
            self.metrics.count_request(endpoint, status[0])

    def _refusal(self, scope) -> tuple | None:
        headers = dict(scope["headers"])
        if self.hosts is not None and host_name(headers.get(b"host", b"")) not in self.hosts:
            return (400, f"Host header {headers.get(b'host', b'').decode('latin-1')!r} is not allowed: this "
                         "server answers to " + ", ".join(sorted(self.hosts)) + " (serve --allowed-hosts)",
                    "invalid_host")
        if self.api_key and (scope["path"].startswith("/v1/") or scope["path"] in KEYED):
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {self.api_key}".encode()):
                return 401, "Incorrect API key provided: pass it as 'Authorization: Bearer KEY'", "invalid_api_key"
        declared = headers.get(b"content-length")
        if self.max_body_bytes is not None and declared is not None and declared.isdigit() \
                and int(declared) > self.max_body_bytes:
            return self._too_large(int(declared))
        return None

    def _too_large(self, size: int) -> tuple:
        return (413, f"request body is {size} bytes or more; this server takes at most {self.max_body_bytes} "
                     "(serve --max-body-mb)", "request_too_large")

    async def _read_body(self, scope, receive):
        """(a receive that replays the body, None) or (None, the 413) once it passes the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                chunks.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return None, self._too_large(size)
            chunks.append(message)
            if not message.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in chunks if m["type"] == "http.request")
        replay = [{"type": "http.request", "body": body, "more_body": False}]
        replay += [m for m in chunks if m["type"] != "http.request"]

        async def replayed():
            return replay.pop(0) if replay else await receive()

        return replayed, None


async def _error(send, status: int, message: str, code: str):
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 413:
        headers.append((b"connection", b"close"))  # the rest of the body is not read
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _HeadDeadline(H11Protocol):
    """uvicorn's h11 protocol closes idle keep-alive connections but not one that sends its
    request line and headers slowly (one byte every few seconds resets the idle timer): 100 such
    connections stayed open for a whole minute. Here each request's head must arrive within
    `head_timeout` seconds of the connection opening or of the previous response."""

    head_timeout = 10.0

    def connection_made(self, transport):
        super().connection_made(transport)
        self._deadline, self._armed_cycle = None, None
        self._arm()

    def _arm(self):
        self._disarm()
        self._armed_cycle = self.cycle
        self._deadline = self.loop.call_later(self.head_timeout, self._expired)

    def _disarm(self):
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def handle_events(self):
        super().handle_events()
        if self._deadline is not None and self.cycle is not self._armed_cycle:
            self._disarm()  # a new request's head is in

    def on_response_complete(self):
        self._arm()  # before super(): it may start a pipelined request, which disarms
        super().on_response_complete()

    def _expired(self):
        self._deadline = None
        if self.cycle is self._armed_cycle and not self.transport.is_closing():
            self.transport.close()  # no request head in time: nothing was started, nothing is lost

    def connection_lost(self, exc):
        self._disarm()
        super().connection_lost(exc)


def protocol(head_timeout: float) -> type[H11Protocol]:
    """The HTTP protocol class for uvicorn.Config(http=...), with this head deadline."""
    return type("HeadDeadlineProtocol", (_HeadDeadline,), {"head_timeout": head_timeout})
