"""Prefix-affinity routing for `gemma3 serve --ray`: a Ray Serve request router (Ray's own
`RequestRouter` API, run inside the ingress's deployment handle, no process of its own).

Each replica has its own prefix cache, so requests that share a prompt's beginning should land
on one replica. The ingress derives an affinity key per request (`affinity_key`): the
`x-gemma3-session` header, else the OpenAI `user` field, else the prompt's first PREFIX_CHARS
characters (the text of the chat messages, in order, for chat). The key picks a home replica by
rendezvous hashing (the replica whose hash with the key is highest), so every ingress replica
agrees without shared state, and a replica coming or going only moves the keys whose home it
was. The request goes home unless home has more than `slack` requests more than the least
loaded of two other replicas picked at random (Ray's power of two choices), or home's batch is
full and that replica's is not (the request would wait in home's queue while a batch elsewhere
has a free row): then it goes to the least loaded of the three. A request without a key is
routed by power of two choices alone.

Only ray_serve.py imports this module.
"""

import hashlib
import json
import random

# Ray's default router, for requests without a key (not in ray.serve.request_router's public names).
from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

# A prompt resumes from the prefix cache where it continues an earlier prompt (the next turn of
# a conversation) or shares whole sliding windows with one (a long system prompt or document):
# either way its beginning is another prompt's. 256 characters tell system prompts and documents
# apart and stay within what a conversation's turns share.
PREFIX_CHARS = 256
SESSION_HEADER = b"x-gemma3-session"
# How many requests more than the least-loaded alternative a home replica may hold before a
# request is sent elsewhere: affinity saves a shared prefix's prefill, imbalance costs decode
# steps of a fuller batch on one replica while another idles.
SLACK = 2


def goes_home(home: int, alternative: int, slack: int, batch: int) -> bool:
    """Whether a request goes to its home replica, given the ongoing requests of home and of the
    least loaded alternative and the engines' batch size: a shared prefix saves its prefill, but
    not waiting in a queue for a batch row that another replica has free."""
    return home <= alternative + slack and (home < batch or alternative >= batch)


def request_json(body: bytes) -> dict | None:
    """A request body's JSON object, or None (no body, not JSON, not an object). The ingress
    parses each body once, for the affinity key and whether it streams."""
    if not body:
        return None
    try:
        request = json.loads(body)
    except ValueError:
        return None
    return request if isinstance(request, dict) else None


def affinity_key(headers: list[tuple[bytes, bytes]], request: dict | None) -> str | None:
    """The request's affinity key (see the module's docstring) from its headers and its body's
    JSON object (request_json), or None when it has none (a GET, no prompt or messages)."""
    for name, value in headers:
        if name.lower() == SESSION_HEADER and value:
            return "session:" + value.decode("latin-1")
    if request is None:
        return None
    if isinstance(request.get("user"), str) and request["user"]:
        return "user:" + request["user"]
    text = _prompt_text(request.get("prompt"), request.get("messages"))
    return "prefix:" + text[:PREFIX_CHARS] if text else None


def _prompt_text(prompt, messages) -> str:
    """The start of a completion's prompt (the first, if a list) or a chat's message texts."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if not isinstance(messages, list):
        return ""
    text = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        parts = content if isinstance(content, list) else [content]
        text += [p if isinstance(p, str) else p.get("text") for p in parts if isinstance(p, (str, dict))]
        text = [t for t in text if isinstance(t, str)]
        if sum(map(len, text)) >= PREFIX_CHARS:
            break
    return "\n".join(text)


def weight(key: str, replica: str) -> int:
    """Rendezvous hash of (key, replica): stable across processes (unlike hash() of a str)."""
    return int.from_bytes(hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest(), "big")


class PrefixAffinityRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """Home replica by rendezvous hash of the request's `affinity` keyword argument, least loaded
    of home and two random others when home is `slack` requests busier than them or its `batch`
    is full while theirs is not (goes_home)."""

    def initialize_state(self, slack: int = SLACK, batch: int = 8):
        self.slack, self.batch = slack, batch

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        key = pending_request.kwargs.get("affinity") if pending_request is not None else None
        if not key or len(candidate_replicas) < 2:
            return await PowerOfTwoChoicesRequestRouter.choose_replicas(self, candidate_replicas, pending_request)
        home = max(candidate_replicas, key=lambda r: weight(key, r.replica_id.unique_id))
        others = random.sample([r for r in candidate_replicas if r is not home], min(2, len(candidate_replicas) - 1))
        loads = await self._loads([home, *others])
        if home not in loads:  # it did not answer in time (dying, or swamped): Ray's usual choice
            return [others]
        alternative = min(others, key=lambda r: loads.get(r, float("inf")))
        if alternative not in loads or goes_home(loads[home], loads[alternative], self.slack, self.batch):
            return [[home], others]  # a home that turns the request down (full) falls through to the others
        return [[alternative], [r for r in (home, *others) if r is not alternative]]

    async def _loads(self, replicas: list[RunningReplica]) -> dict[RunningReplica, int]:
        """Ongoing requests of each replica: Ray's cached figure where it keeps one, else asked."""
        loads, ask = {}, []
        for r in replicas:
            cached = self._replica_queue_len_cache.get(r.replica_id) if self._use_replica_queue_len_cache else None
            if cached is None:
                ask.append(r)
            else:
                loads[r] = cached
        for r, queue_len in await self._probe_queue_lens(ask, 0):
            if queue_len is not None:
                loads[r] = queue_len
        return loads
