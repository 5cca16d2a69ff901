"""Perplexity of a text file.

Default method = llama.cpp's `llama-perplexity`, so figures are comparable with it: the text is
tokenized once (with BOS), cut into chunks of `ctx` tokens, the first token of every chunk is
replaced by BOS, and only the second half of each chunk is scored (tokens first+1 … ctx-1 with
first = ctx/2), so every scored token has at least ctx/2 tokens of context.
The `stride` mode is the usual sliding window: windows of `ctx` tokens advanced by `stride`,
each scoring only its last `stride` tokens, so every token after the first is scored exactly once
with at least ctx - stride tokens of context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm


class EvalInputError(ValueError):
    """The evaluation input cannot be used (empty, too short, not UTF-8)."""


def read_text(path: str | Path) -> str:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EvalInputError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EvalInputError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    if not text.strip():
        raise EvalInputError(f"{path}: file is empty")
    return text


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    chunks: list[float] = field(default_factory=list)  # per-chunk perplexity

    def to_dict(self):
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "chunks": self.chunks}


def _score(model, ids: list[int], first: int, kv_dtype=None) -> tuple[float, int]:
    """Summed NLL of ids[first+1:] given ids[:k], one forward over `ids` from a fresh cache."""
    x = torch.tensor([ids])
    with torch.inference_mode():
        hidden = model.forward_hidden(x, model.new_cache(1, max_len=len(ids), kv_dtype=kv_dtype))[0, first:-1]
        targets = x[0, first + 1:]
        total = 0.0
        # Logits are vocab-sized (262k): score in slices so memory stays small.
        for s in range(0, hidden.shape[0], 128):
            logp = torch.log_softmax(model.logits(hidden[s:s + 128]).float(), dim=-1)
            total -= logp.gather(1, targets[s:s + 128, None]).sum().item()
    return total, targets.numel()


def perplexity(model, tokenizer, text: str, ctx: int = 512, stride: int | None = None,
               max_chunks: int | None = None, progress: bool = True, kv_dtype=None) -> PerplexityResult:
    if ctx < 4 or ctx > model.config.max_context:
        raise EvalInputError(f"--ctx must be in [4, {model.config.max_context}], got {ctx}")
    tokens = tokenizer.encode(text, add_bos=True)
    windows = []
    if stride is None:
        n_chunks = len(tokens) // ctx
        if n_chunks < 1:
            raise EvalInputError(f"text has {len(tokens)} tokens, fewer than one chunk of --ctx {ctx}")
        for i in range(n_chunks if max_chunks is None else min(n_chunks, max_chunks)):
            chunk = tokens[i * ctx:(i + 1) * ctx]
            windows.append(([tokenizer.bos_id] + chunk[1:], ctx // 2))
    else:
        if not 0 < stride < ctx:
            raise EvalInputError(f"--stride must be in [1, ctx-1={ctx - 1}], got {stride}")
        if len(tokens) < 2:
            raise EvalInputError("text has fewer than 2 tokens")
        last = 0  # tokens[1 : last + 1] are scored; each window predicts the next `stride` tokens
        while last < len(tokens) - 1 and (max_chunks is None or len(windows) < max_chunks):
            end = min(last + stride, len(tokens) - 1)
            start = max(0, end - ctx + 1)
            windows.append((tokens[start:end + 1], last - start))
            last = end
    nll_sum, count, per_chunk = 0.0, 0, []
    for ids, first in tqdm(windows, desc="perplexity", unit="chunk", disable=not progress):
        total, n = _score(model, ids, first, kv_dtype)
        nll_sum += total
        count += n
        per_chunk.append(math.exp(total / n))
    nll = nll_sum / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=count, chunks=per_chunk)
