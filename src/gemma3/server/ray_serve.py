"""`gemma3 serve --ray`: engine replicas as a Ray Serve deployment behind one ingress.

Two deployments make one Ray Serve application:

- `Replica` (N of them, or MIN..MAX autoscaled): each loads the model, runs its own Engine on its
  own thread and builds the very FastAPI app `gemma3 serve` serves (create_app: same routes,
  limits, errors). It takes requests as plain data (method, path, headers, body) and runs them
  through that app in-process. A request that does not ask to stream is one plain Ray call that
  returns the whole response; one that does is a Ray streaming call that brings back the
  stream's status and headers and then its events as they come, so streams stay streams.
- `Ingress` (one, no CPU of its own): Ray Serve's HTTP entry. It forwards every request to a
  replica through a deployment handle, whose router (ray_routing.PrefixAffinityRouter) sends
  requests that share a session, user or prompt beginning to the same replica, whose prefix
  cache then holds it, unless that replica is busier than the others.

Owning the forwarding is what lets a replica's death end its requests with an OpenAI-shaped
error instead of a dropped connection: a stream whose replica dies gets a final `data: {"error":
...}` event and `[DONE]`; any other request (no answer seen yet) is sent again (RETRIES), then
gets a 503 JSON error. Ray restarts the dead replica; the others keep serving. Ray's health check
calls the engine's own (Engine.healthy: a loop that stopped coming round is unhealthy, and Ray
replaces the replica).

Only this module and ray_routing import Ray, and only `gemma3 serve --ray` imports them. (No
`from __future__ import annotations` here: Ray Serve's class-based routes need real annotations
for FastAPI to see `request` as the HTTP request.)
"""

import asyncio
import json
import os
import socket
from dataclasses import dataclass
from typing import Callable

import torch
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from .app import create_app
from .arenas import limit_arenas
from .engine import WEDGED_S, Engine
from .guard import Limits
from .ray_routing import SLACK, PrefixAffinityRouter, affinity_key, request_json

APP_NAME = "gemma3"
# A request whose replica fails before answering is sent again (nothing of it was seen yet): until
# Ray's router learns that a replica died it may still pick it.
RETRIES = 2
# Response header naming the replica (and its process) that answered: for logs and fault drills.
REPLICA_HEADER = "x-gemma3-replica"


@dataclass
class Settings:
    """What each replica serves with: `gemma3 serve`'s options, minus the HTTP listener's."""

    load: Callable  # () -> (model, tokenizer, vision, pan_and_scan), run in the replica's process
    model_id: str
    ctx: int | None = None
    limits: Limits = Limits()
    api_key: str | None = None
    hosts: frozenset[str] | None = None
    max_batch: int = 8
    max_queue: int = 64
    prefix_cache_mb: int = 256
    threads: int = 1
    wedged_s: float = WEDGED_S


# Ray's proxy writes one access-log line per HTTP request; the ingress's and the replica's would
# add two more for the same request (internal calls), each a log record formatted and written.
NO_ACCESS_LOG = {"enable_access_log": False}


@serve.deployment(health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_wait_loop_s=1,
                  logging_config=NO_ACCESS_LOG)
class Replica:
    def __init__(self, settings: Settings):
        torch.set_num_threads(settings.threads)
        limit_arenas()
        model, tokenizer, vision, pan_and_scan = settings.load()
        ctx = min(settings.ctx or model.config.max_context, model.config.max_context)
        self.wedged_s = settings.wedged_s
        self.engine = Engine(model, tokenizer, max_batch=settings.max_batch, max_queue=settings.max_queue,
                             prefix_cache_bytes=settings.prefix_cache_mb * 2**20, vision=vision,
                             pan_and_scan=pan_and_scan)
        self.app = create_app(self.engine, settings.model_id, ctx, settings.limits, api_key=settings.api_key,
                              start_engine=False, hosts=settings.hosts)
        # On a thread of its own: a Ray actor's main thread belongs to Ray (see Engine.start for
        # what a second OpenMP pool costs when a replica has more than one thread).
        self.engine.start()
        replica = serve.get_replica_context().replica_id.unique_id
        self.name = f"{replica}@{socket.gethostname()}:{os.getpid()}"

    def check_health(self):
        """Ray's periodic check: raising marks the replica unhealthy, and Ray replaces it."""
        problem = self.engine.healthy(self.wedged_s)
        if problem:
            raise RuntimeError(problem)

    def __del__(self):  # after Ray's drain (graceful_shutdown_timeout_s): end whatever is left
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop(timeout=5)

    async def respond(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
                      client: tuple[str, int] | None, affinity: str | None = None) -> tuple[int, list, bytes]:
        """handle() for a request that did not ask to stream: the whole (status, headers, body) as
        one plain Ray call, which costs Ray less than a streaming call (whose items and end are
        each reported back to the caller)."""
        head, *events = [item async for item in self.handle(method, path, query, headers, body, client)]
        return head[0], head[1], head[2] + b"".join(events)

    async def handle(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
                     client: tuple[str, int] | None, affinity: str | None = None):
        """Runs one HTTP request through this replica's app. Yields (status, headers, body): the
        whole response in one item, except for an SSE stream, whose first item has an empty body
        and whose events follow as they come. Closing the generator (the client left) is a
        disconnect to the app, which cancels the request in the engine. (`affinity` is for the
        router that picked this replica.)"""
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": query,
                 "headers": headers, "client": client, "server": None}
        sent, gone, out = False, asyncio.Event(), asyncio.Queue()

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        task = asyncio.create_task(self.app(scope, receive, out.put))
        task.add_done_callback(lambda _: out.put_nowait(None))
        try:
            head, sse, parts = None, False, []
            while (message := await out.get()) is not None:
                if message["type"] == "http.response.start":
                    head = message["status"], [*message.get("headers", []), (REPLICA_HEADER.encode(),
                                                                              self.name.encode())]
                    sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in head[1])
                    if sse:
                        yield *head, b""
                elif message["type"] == "http.response.body":
                    if sse and message.get("body"):
                        yield message["body"]
                    elif message.get("body"):
                        parts.append(message["body"])
                    if not message.get("more_body"):
                        break
            if task.done():
                task.result()  # an exception the app's own handlers let through
            if head is not None and not sse:
                yield *head, b"".join(parts)
        finally:
            gone.set()
            if not task.done():  # lets the app see the disconnect and cancel its request
                await asyncio.wait({task}, timeout=5)
                task.cancel()


def _error(message: str, code: str) -> dict:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}


ingress_app = FastAPI(title="gemma3 (Ray Serve)", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096, logging_config=NO_ACCESS_LOG)
@serve.ingress(ingress_app)
class Ingress:
    def __init__(self, replicas):
        self.replicas, self.streams = replicas, replicas.options(stream=True)

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                           include_in_schema=False)
    async def forward(self, path: str, request: HTTPRequest):
        from ray.serve.exceptions import BackPressureError

        body = await request.body()
        client = tuple(request.client) if request.client else None
        parsed = request_json(body)
        affinity = affinity_key(request.scope["headers"], parsed)
        # Only a request that asks to stream is a streaming Ray call; any other is answered whole.
        stream = parsed is not None and parsed.get("stream") is True
        for attempt in range(RETRIES + 1):
            call = (self.streams.handle if stream else self.replicas.respond).remote(
                request.method, "/" + path, request.scope.get("query_string", b""), request.scope["headers"], body,
                client, affinity=affinity)
            try:
                status, headers, content = await (call.__anext__() if stream else call)
                break
            except BackPressureError as e:
                return JSONResponse(_error(f"every replica is busy: {e}", "queue_full"), status_code=503,
                                    headers={"Retry-After": "1"})
            except Exception as e:  # the replica died (or could not be reached) before it answered
                if attempt == RETRIES:
                    return JSONResponse(_error(f"the replica serving this request failed before answering "
                                               f"({type(e).__name__}); retry", "replica_failed"), status_code=503,
                                        headers={"Retry-After": "1"})
        if not stream or not any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                 for k, v in headers):  # a whole response (a stream's error is one too)
            response = Response(content, status_code=status)
            response.raw_headers = list(headers)  # the replica's, content-length included
            return response

        async def events():
            try:
                async for chunk in call:
                    yield chunk
            except Exception as e:  # the replica died mid-stream
                message = f"the replica serving this stream failed ({type(e).__name__}); the answer is incomplete"
                yield f"data: {json.dumps(_error(message, 'replica_failed'))}\n\ndata: [DONE]\n\n".encode()

        response = StreamingResponse(events(), status_code=status)
        response.raw_headers = list(headers)
        return response


def application(settings: Settings, replicas: int = 1, autoscale: tuple[int, int] | None = None,
                drain_s: float = 60.0):
    """The Ray Serve application: `replicas` fixed, or `autoscale` (MIN, MAX) replicas scaled on
    ongoing requests per replica (target: the engine's batch). Each replica asks Ray for
    `settings.threads` CPUs; a replica being removed stops taking requests and has `drain_s` to
    finish the ones it has (streams included) before its engine is stopped."""
    from ray.serve.config import RequestRouterConfig

    router = RequestRouterConfig(request_router_class=PrefixAffinityRouter,
                                 request_router_kwargs={"slack": SLACK, "batch": settings.max_batch})
    options = dict(ray_actor_options={"num_cpus": settings.threads}, request_router_config=router,
                   max_ongoing_requests=settings.max_batch + settings.max_queue,
                   graceful_shutdown_timeout_s=drain_s)
    if autoscale:
        low, high = autoscale
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "initial_replicas": low,
                                         "target_ongoing_requests": settings.max_batch}
    else:
        options["num_replicas"] = replicas
    return Ingress.bind(Replica.options(**options).bind(settings))
