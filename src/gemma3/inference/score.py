"""Scoring given text instead of sampling: the log-probability of every prompt token (what the
server's `echo` + `logprobs` returns) and of a multiple-choice continuation (what
lm-evaluation-harness asks for). Both the server and `gemma3 eval choices` call these, so
the two agree by construction, not by two implementations kept in step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Rows of logits turned into log-probabilities at once: a row is the whole vocabulary
# (262k floats, 1 MiB), so a long prompt is not materialised as [length, vocab] in one go.
ROWS = 64


@dataclass
class TokenScore:
    token: int
    logprob: float | None  # None for the first token: nothing precedes it
    top: list[tuple[int, float]]  # (token id, logprob) of the k most likely, most likely first


def prompt_scores(model, ids: list[int], top: int = 0, max_len: int | None = None, adapter: int | None = None):
    """(scores, cache, last logits): each token's log-probability given the tokens before it,
    with the `top` most likely alternatives, plus the filled cache (room for `max_len` tokens)
    and the logits after the last token, so generation can go on from there. `adapter`: the LoRA
    adapter slot the cache's rows use (model/adapters.py)."""
    with torch.inference_mode():
        cache = model.new_cache(1, max_len=max(max_len or len(ids), len(ids)))
        if adapter is not None:  # else the cache's own None: the default adapter, if any
            cache.use_adapter(adapter)
        hidden = model.forward_hidden(torch.tensor([ids], device=model.device), cache)[0]
        scores = [TokenScore(ids[0], None, [])]
        last = None
        for start in range(0, len(ids), ROWS):
            logits = model.logits(hidden[start:start + ROWS]).float()
            last = logits[-1]
            lp = torch.log_softmax(logits, -1)
            targets = ids[start + 1:start + 1 + len(lp)]
            picked = lp[torch.arange(len(targets)), torch.tensor(targets, dtype=torch.long)].tolist()
            best = torch.topk(lp[:len(targets)], top) if top else None
            for i, (token, value) in enumerate(zip(targets, picked)):
                alts = [] if best is None else list(zip(best.indices[i].tolist(), best.values[i].tolist()))
                scores.append(TokenScore(token, value, alts))
    return scores, cache, last


def split_pair(tokenize, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids the way lm-evaluation-harness splits them (TemplateLM.
    _encode_pair): trailing spaces of the context move to the continuation, the whole text is
    tokenized once, and the continuation is what follows the context's own tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, n = tokenize(context + continuation), len(tokenize(context))
    return whole[:n], whole[n:]


def continuation_logprob(model, context: list[int], continuation: list[int], room: int = 1) -> tuple[float, bool]:
    """(sum of the continuation's token log-probabilities, whether each was the argmax).

    `room`: free cache rows after the text, as a server request with max_tokens=room leaves
    (lm-eval sends 1). The attention kernels' blocking follows the cache's capacity, and without
    <bos> (lm-eval's requests) Gemma's large activations turn that into differences of ~3e-3 in a
    sum, so the capacity is matched rather than left to chance."""
    ids = context + continuation
    scores, _, _ = prompt_scores(model, ids, top=1, max_len=len(ids) + room)
    tail = scores[len(context):]
    return sum(s.logprob for s in tail), all(s.logprob >= s.top[0][1] for s in tail)
