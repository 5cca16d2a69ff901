"""`/v1/embeddings` (OpenAI's shape): each input's pooled, L2-normalised last hidden states
(inference/embed.py), computed on the engine thread between decode steps. `pooling` ("mean" or
"last") is our extension; `encoding_format: "base64"` is little-endian float32, as OpenAI's."""

from __future__ import annotations

import asyncio
import base64
from typing import Literal, Union

from fastapi import FastAPI

from ..inference.embed import embed
from ..inference.generate import encode_prompt
from .engine import QueueFull, ShuttingDown
from .schemas import _Body

MAX_INPUTS = 256


class EmbeddingRequest(_Body):
    model: str
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    pooling: Literal["mean", "last"] = "mean"


def add_routes(app: FastAPI, server, error):
    """`server`: app.Server; `error(status, message, param, code)`: the APIError to raise."""
    tok = server.tokenizer

    def token_ids(body: EmbeddingRequest) -> list[list[int]]:
        raw = body.input
        texts = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
        if not texts or len(texts) > MAX_INPUTS:
            raise error(400, f"input must hold 1 to {MAX_INPUTS} texts, not {len(texts)}", "input", "invalid_value")
        out = []
        for i, text in enumerate(texts):
            if isinstance(text, str):
                if not text:
                    raise error(400, f"input.{i} is empty", "input", "invalid_value")
                server._check_length(len(text.encode("utf-8", "surrogatepass")), "input")
                try:
                    ids = encode_prompt(tok, text)
                except ValueError as e:
                    raise error(400, f"input.{i}: {e}", "input", "invalid_value") from None
            else:
                if not text or any(not 0 <= t < tok.vocab_size for t in text):
                    raise error(400, f"input.{i}: token ids must be a non-empty list in [0, {tok.vocab_size})",
                                "input", "invalid_value")
                ids = list(text)
            if len(ids) > server.ctx:
                raise error(400, f"input.{i} has {len(ids)} tokens; this server's context is {server.ctx}",
                            "input", "context_length_exceeded")
            out.append(ids)
        return out

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        if body.model != server.model_id:
            raise error(404, f"The model '{body.model}' does not exist (this server serves '{server.model_id}')",
                        "model", "model_not_found")
        inputs = await server.prepare(token_ids, body)
        try:
            future = server.engine.call(lambda model: [embed(model, ids, body.pooling) for ids in inputs])
        except (QueueFull, ShuttingDown) as e:
            raise error(503, str(e), None, "server_busy") from None
        vectors = await asyncio.wrap_future(future)
        data = []
        for i, v in enumerate(vectors):
            value = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() \
                if body.encoding_format == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(map(len, inputs))
        return {"object": "list", "data": data, "model": server.model_id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
