"""Generation, layered like mlx-lm: generate_step (token ids) → stream_generate (text pieces with
stop handling) → generate (one string). `prefill` and `StopMatcher` are shared with the server's
engine, so both start and stop a sequence the same way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from ..formats.tokenizer import StreamDecoder
from ..model.cache import KVCache
from .prompt import MultimodalPrompt, Prompt, encode_prompt
from .sampling import SamplingParams, sample
from .speculative import DraftModel, PromptLookup, speculative_steps

if TYPE_CHECKING:  # constrain imports llguidance: loaded only where a constraint is used
    from .constrain import Constraint, Guide


@dataclass(frozen=True)
class Chunk:
    text: str  # new text since the previous chunk (may be empty while a stop string is pending)
    token: int | None
    finish_reason: str | None = None  # "stop" or "length" on the last chunk
    prompt_tokens: int = 0
    completion_tokens: int = 0


def prefill(model, prompt: Sequence[int] | MultimodalPrompt, max_len: int, prefix_cache=None,
            kv_dtype=None, adapter: int | None = None) -> tuple[KVCache, torch.Tensor]:
    """A new cache holding the prompt, and the logits [vocab] of its last token. A MultimodalPrompt
    is prefilled with its image features and bidirectional image groups; a text prompt with a
    `PrefixCache` resumes after the longest stored prefix it shares (images are not keyed by ids,
    so they never use it). `adapter`: the LoRA adapter slot of the new cache (model/adapters.py)."""
    with torch.inference_mode():
        if isinstance(prompt, MultimodalPrompt):
            cache = model.new_cache(1, max_len=max_len, kv_dtype=kv_dtype)
            if adapter is not None:  # else the cache's own None: the default adapter, if any
                cache.use_adapter(adapter)
            ids = torch.tensor([prompt.ids], device=model.device)
            return cache, model(ids, cache, last_only=True, embeds=prompt.embeds, groups=prompt.groups)[0, -1]
        if prefix_cache is not None:
            return prefix_cache.prefill(list(prompt), max_len, adapter)
        cache = model.new_cache(1, max_len=max_len, kv_dtype=kv_dtype)
        if adapter is not None:  # else the cache's own None: the default adapter, if any
            cache.use_adapter(adapter)
        return cache, model(torch.tensor([list(prompt)], device=model.device), cache, last_only=True)[0, -1]


def generate_step(model, prompt_ids: Sequence[int] | MultimodalPrompt, params: SamplingParams, max_tokens: int,
                  prefix_cache=None, kv_dtype=None,
                  speculative: PromptLookup | DraftModel | None = None, guide: Guide | None = None) -> Iterator[int]:
    """Yields up to `max_tokens` sampled token ids after prefilling the prompt. With `speculative`,
    speculative decoding drafts by prompt lookup or a draft model (the same greedy tokens; the
    same distribution when sampling); its counts accumulate in `speculative.stats`. With `guide`,
    every token is drawn from those its grammar allows (params.constraint compiled for the
    tokenizer: stream_generate makes it)."""
    ids = prompt_ids.ids if isinstance(prompt_ids, MultimodalPrompt) else list(prompt_ids)
    if not ids:
        raise ValueError("empty prompt: at least one token (e.g. <bos>) is needed")
    if guide is not None and speculative is not None:
        raise ValueError("speculative decoding cannot be combined with a constraint (its drafts are not masked)")
    limit = model.config.max_context
    if len(ids) >= limit:
        raise ValueError(f"prompt has {len(ids)} tokens but the context is {limit} tokens")
    max_tokens = min(max_tokens, limit - len(ids))
    generator = params.generator()
    history = list(ids)
    cache, logits = prefill(model, prompt_ids, len(ids) + max_tokens, prefix_cache, kv_dtype)
    plain_greedy = params.plain_greedy and guide is None  # no logits needed: the model may take the argmax

    def pick(logits: torch.Tensor) -> int:
        logits = logits.cpu()  # the generator lives on the CPU
        if guide is None:
            return sample(logits, params, generator, history)
        from .constrain import sample_guided  # imports llguidance: only when a constraint is used

        token = sample_guided(guide, logits, params, generator, history)
        guide.advance(token)
        return token

    with torch.inference_mode():
        token = pick(logits)
        if speculative is not None:
            yield from speculative_steps(model, cache, token, history, params, generator, max_tokens, speculative)
            return
        for i in range(max_tokens):
            yield token
            history.append(token)
            if i + 1 == max_tokens:
                break
            step = torch.tensor([[token]], device=model.device)
            if plain_greedy:
                token = int(model.greedy_next(step, cache))
            else:
                token = pick(model(step, cache, last_only=True)[0, -1])


class StopMatcher:
    """Generated tokens → text pieces that end a sequence at a stop token (not emitted) or before a
    stop string: text that could still grow into a stop string is held back until it cannot."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), stop_ids: Sequence[int] | None = None,
                 keep: frozenset[int] = frozenset()):
        """`keep`: control tokens whose text is emitted (FunctionGemma's call markers, parsed after)."""
        self.stop = [s for s in stop if s]
        self.stop_ids = frozenset((tokenizer.eos_id, tokenizer.end_of_turn_id) if stop_ids is None else stop_ids)
        self.decoder = StreamDecoder(tokenizer, keep=keep)
        self.pending = ""

    def feed(self, token: int) -> tuple[str, bool]:
        """(text that can be sent now, whether the sequence stops here)."""
        if token in self.stop_ids:
            return self.pending, True
        self.pending += self.decoder.feed(token)
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            return self.pending[: min(hits)], True
        keep = self.held_back()
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out, False

    def flush(self) -> str:
        """Held-back text, for a sequence that ends without a stop."""
        rest, self.pending = self.pending + self.decoder.flush(), ""
        return rest

    def held_back(self) -> int:
        """Length of the longest suffix of the pending text that could still grow into a stop string."""
        best, text = 0, self.pending
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if s.startswith(text[-n:]):
                    best = n
                    break
        return best


def stream_generate(model, tokenizer, prompt: Prompt, max_tokens: int = 256,
                    params: SamplingParams = SamplingParams(), stop: Sequence[str] = (),
                    stop_ids: Sequence[int] | None = None, prefix_cache=None, kv_dtype=None,
                    speculative: PromptLookup | DraftModel | None = None,
                    keep: frozenset[int] = frozenset()) -> Iterator[Chunk]:
    """Text as it is generated. Stops on eos / <end_of_turn> (not emitted), a stop string (cut
    before it) or `max_tokens` (finish_reason "length"). `keep`: control tokens written into the
    text (StopMatcher)."""
    ids = encode_prompt(tokenizer, prompt)
    matcher = StopMatcher(tokenizer, stop, stop_ids, keep)
    n = 0
    source = prompt if isinstance(prompt, MultimodalPrompt) else ids
    guide = None
    if params.constraint is not None:
        from .constrain import Guide  # imports llguidance: only when a constraint is used

        guide = Guide(tokenizer, params.constraint)
    for token in generate_step(model, source, params, max_tokens, prefix_cache, kv_dtype, speculative, guide):
        n += 1
        text, stopped = matcher.feed(token)
        yield Chunk(text, token, "stop" if stopped else None, len(ids), n)
        if stopped:
            return
    yield Chunk(matcher.flush(), None, "length", len(ids), n)


def generate(model, tokenizer, prompt: Prompt, max_tokens: int = 256,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, seed: int | None = None, stop: Sequence[str] = (),
             speculative: PromptLookup | DraftModel | None = None, constraint: Constraint | None = None) -> str:
    """`speculative=PromptLookup()` or `DraftModel(smaller_model)`: speculative decoding (the same
    text when greedy). `constraint`: what the text must match, e.g. `Constraint.json_schema({...})`
    (constrain.py)."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty, seed=seed, constraint=constraint)
    return "".join(c.text for c in stream_generate(model, tokenizer, prompt, max_tokens, params, stop,
                                                   speculative=speculative))
