"""Generation, layered like mlx-lm: generate_step (token ids) → stream_generate (text pieces with
stop handling) → generate (one string)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .multimodal import MultimodalPrompt
from .sampling import SamplingParams, greedy_step, sample
from ..formats.tokenizer import StreamDecoder


@dataclass(frozen=True)
class Chunk:
    text: str  # new text since the previous chunk (may be empty while a stop string is pending)
    token: int | None
    finish_reason: str | None = None  # "stop" or "length" on the last chunk
    prompt_tokens: int = 0
    completion_tokens: int = 0


def encode_prompt(tokenizer, prompt: str | Sequence[int] | MultimodalPrompt) -> list[int]:
    """Strings are tokenized with special-token parsing on (like llama.cpp's CLI and transformers),
    so chat-formatted prompts work; a leading <bos> is added only if the text lacks one."""
    if isinstance(prompt, MultimodalPrompt):
        return list(prompt.ids)
    if not isinstance(prompt, str):
        return list(prompt)
    ids = tokenizer.encode(prompt, add_bos=False, parse_special=True)
    if tokenizer.add_bos and (not ids or ids[0] != tokenizer.bos_id):
        ids = [tokenizer.bos_id] + ids
    return ids


def generate_step(model, prompt_ids: Sequence[int] | MultimodalPrompt, params: SamplingParams, max_tokens: int,
                  prefix_cache=None, kv_dtype=None) -> Iterator[int]:
    """Yields up to `max_tokens` sampled token ids; the prompt is prefilled in chunks first (a
    MultimodalPrompt with its image features and bidirectional image groups). With a
    `PrefixCache`, a text prompt resumes after the longest stored prefix it shares."""
    prefill = {}
    if isinstance(prompt_ids, MultimodalPrompt):
        prefill = {"embeds": prompt_ids.embeds, "groups": prompt_ids.groups}
        prompt_ids = prompt_ids.ids
        prefix_cache = None  # stored prefixes are keyed by token ids, which do not identify images
    if not prompt_ids:
        raise ValueError("empty prompt: at least one token (e.g. <bos>) is needed")
    limit = model.config.max_context
    if len(prompt_ids) >= limit:
        raise ValueError(f"prompt has {len(prompt_ids)} tokens but the context is {limit} tokens")
    max_tokens = min(max_tokens, limit - len(prompt_ids))
    max_len = len(prompt_ids) + max_tokens
    generator = params.generator()
    history = list(prompt_ids)
    if prefix_cache is not None:
        cache, logits = prefix_cache.prefill(history, max_len)
    else:
        cache = model.new_cache(1, max_len=max_len, kv_dtype=kv_dtype)
        with torch.inference_mode():
            logits = model(torch.tensor([history], device=model.device), cache, last_only=True, **prefill)[0, -1]
    # Plain greedy decoding needs no logits: greedy_step lets a fast model take the argmax itself.
    plain_greedy = params.temperature == 0.0 and params.repetition_penalty == 1.0
    with torch.inference_mode():
        token = sample(logits.cpu(), params, generator, history)  # the generator lives on the CPU
        for i in range(max_tokens):
            yield token
            history.append(token)
            if i + 1 == max_tokens:
                break
            ids = torch.tensor([[token]], device=model.device)
            if plain_greedy:
                token = int(greedy_step(model, ids, cache))
            else:
                token = sample(model(ids, cache, last_only=True)[0, -1].cpu(), params, generator, history)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-n:]):
                best = n
                break
    return best


def stream_generate(model, tokenizer, prompt: str | Sequence[int] | MultimodalPrompt, max_tokens: int = 256,
                    params: SamplingParams = SamplingParams(), stop: Sequence[str] = (),
                    stop_ids: Sequence[int] | None = None, prefix_cache=None, kv_dtype=None) -> Iterator[Chunk]:
    """Text as it is generated. Stops on eos / <end_of_turn> (not emitted), a stop string (cut
    before it) or `max_tokens` (finish_reason "length")."""
    ids = encode_prompt(tokenizer, prompt)
    stop_ids = set((tokenizer.eos_id, tokenizer.end_of_turn_id) if stop_ids is None else stop_ids)
    stop = [s for s in stop if s]
    decoder = StreamDecoder(tokenizer)
    pending, n = "", 0
    source = prompt if isinstance(prompt, MultimodalPrompt) else ids
    for token in generate_step(model, source, params, max_tokens, prefix_cache, kv_dtype):
        n += 1
        if token in stop_ids:
            yield Chunk(pending, token, "stop", len(ids), n)
            return
        pending += decoder.feed(token)
        hits = [i for i in (pending.find(s) for s in stop) if i >= 0]
        if hits:
            yield Chunk(pending[: min(hits)], token, "stop", len(ids), n)
            return
        keep = _held_back(pending, stop)
        out, pending = pending[: len(pending) - keep], pending[len(pending) - keep:]
        yield Chunk(out, token, None, len(ids), n)
    yield Chunk(pending + decoder.flush(), None, "length", len(ids), n)


def generate(model, tokenizer, prompt: str | Sequence[int] | MultimodalPrompt, max_tokens: int = 256,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, seed: int | None = None, stop: Sequence[str] = ()) -> str:
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty, seed=seed)
    return "".join(c.text for c in stream_generate(model, tokenizer, prompt, max_tokens, params, stop))
