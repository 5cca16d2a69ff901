"""Routes around the model rather than through the engine: `/tokenize`, `/detokenize` and
`/tokenizer_info` in vLLM's shapes (lm-evaluation-harness's RemoteTokenizer reads exactly
these, so a harness scores us with our own tokenizer and no hub download) and `/props`
(what llama-server's route of that name answers: what runs, with which limits)."""

from __future__ import annotations

import platform

from fastapi import FastAPI
from pydantic import Field

from .schemas import _Body


class TokenizeRequest(_Body):
    prompt: str
    # vLLM's default: a leading <bos> as the model expects; lm-eval sends false and splits the
    # context from the continuation itself.
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    tokens: list[int] = Field(..., max_length=1 << 20)


def add_routes(app: FastAPI, server, error):
    """`server`: app.Server; `error(status, message, param)`: the APIError to raise."""
    tok = server.tokenizer

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        server._check_length(len(body.prompt.encode("utf-8", "surrogatepass")), "prompt")
        try:
            ids = await server.prepare(lambda: tok.encode(body.prompt, add_bos=body.add_special_tokens,
                                                          parse_special=True))
        except ValueError as e:
            raise error(400, str(e), "prompt") from None
        return {"count": len(ids), "max_model_len": server.ctx, "tokens": ids, "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        bad = next((t for t in body.tokens if not 0 <= t < tok.vocab_size), None)
        if bad is not None:
            raise error(400, f"token id {bad} is not in [0, {tok.vocab_size})", "tokens")
        # Control tokens are kept: /detokenize(/tokenize(text)) gives the text back.
        return {"prompt": tok.decode(body.tokens, skip_special=False)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        def text(i: int) -> str | None:
            return tok.id_to_token(i) if 0 <= i < tok.vocab_size else None

        return {"tokenizer_class": "GemmaTokenizer", "vocab_size": tok.vocab_size, "bos_token": text(tok.bos_id),
                "eos_token": text(tok.eos_id), "pad_token": text(tok.pad_id), "unk_token": text(tok.unk_id),
                "add_bos_token": tok.add_bos, "model_max_length": server.ctx, "chat_template": tok.chat_template}

    @app.get("/props")
    async def props():
        import torch

        from ..cpu import kernels

        engine = server.engine
        return {"model": server.model_id, "context": server.ctx, "max_batch": engine.max_batch,
                "max_queue": engine.max_queue, "max_tokens": server.max_tokens, "vision": engine.vision is not None,
                "prefix_cache": engine.prefix_cache is not None, "threads": torch.get_num_threads(),
                "build": {"torch": torch.__version__, "python": platform.python_version(),
                          "cpu": kernels.cpu_model(), "isa": kernels.isa()}}
