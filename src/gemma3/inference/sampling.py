"""Next-token selection from logits, kept out of the model's forward."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..cpu import kernels

# Temperatures below this are greedy (vLLM's threshold). Logits divided by 1e-30, let alone a
# denormal such as 1e-45, overflow float32 to inf, and softmax turns that into NaN: such requests
# returned a garbage token for every step.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 (or below MIN_TEMPERATURE) means greedy. Filters follow vLLM/transformers
    order: temperature first, then top-k, top-p (nucleus) and min-p on the tempered distribution."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # llama.cpp semantics: divide positive logits, multiply negative ones
    repetition_window: int = 64  # how many recent tokens the penalty looks at
    seed: int | None = None
    # (token id, bias) pairs added to the logits before anything else (OpenAI's logit_bias:
    # -100 bans a token, +100 all but forces it).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # What the output must match (a JSON schema, grammar, regex, choice): see constrain.py.
    constraint: object | None = None  # a constrain.Constraint (constrain imports this module)

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for token, bias in self.logit_bias:
            if not (math.isfinite(bias) and -100 <= bias <= 100):
                raise ValueError(f"logit_bias for token {token} must be in [-100, 100], got {bias}")

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that needs the logits: a model may take the argmax itself."""
        return self.greedy and self.repetition_penalty == 1.0 and not self.logit_bias and self.constraint is None

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(self.seed if self.seed is not None else torch.seed())
        return g


def apply_repetition_penalty(logits: torch.Tensor, history: list[int], penalty: float) -> torch.Tensor:
    if penalty == 1.0 or not history:
        return logits
    ids = torch.tensor(sorted(set(history)), dtype=torch.long)
    ids = ids[ids < logits.numel()]  # image soft tokens (id 262144) can lie past a 262,144-entry vocabulary
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def apply_logit_bias(logits: torch.Tensor, bias: tuple[tuple[int, float], ...]) -> torch.Tensor:
    if not bias:
        return logits
    ids, values = zip(*bias)
    return logits.index_add(0, torch.tensor(ids), torch.tensor(values, dtype=logits.dtype))


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Tempered logits, less their maximum, with everything outside top-k / top-p / min-p set to
    -inf (1-D input). The maximum subtracted, every kept value is finite and <= 0 however hot or
    cold the temperature (a huge one leaves a uniform distribution); min-p compares log
    probabilities, so a tiny min_p or top_p never underflows into dropping every token: the best
    token is always kept."""
    logits = logits.float() / params.temperature
    logits = logits - logits.max()
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p; the first token always (a top_p of
        # 1e-300 is 0 in float32, and "mass before it >= 0" would drop it too).
        drop = probs.cumsum(-1) - probs >= params.top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if params.min_p > 0.0:
        logprobs = logits.log_softmax(-1)
        logits = logits.masked_fill(logprobs < logprobs.max() + math.log(params.min_p), float("-inf"))
    return logits


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Index of the largest logit along the last dim (the first one on ties, like argmax). Over a
    262k vocabulary torch's argmax takes ~0.3 ms and max(dim) ~0.13 ms, ~1-2% of a decode step; the
    kernel's one-pass scan ~25 us."""
    ops = kernels.ops()
    if ops is None or logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.dim() == 0:
        return logits.max(-1).indices
    return ops.argmax_rows(logits.reshape(-1, logits.shape[-1])).reshape(logits.shape[:-1])


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           history: list[int] | None = None) -> int:
    """One token id from a 1-D logits vector."""
    logits = adjusted(logits, params, history)
    if params.greedy:
        return int(greedy(logits))
    return draw(filter_logits(logits, params).softmax(-1), generator)


def adjusted(logits: torch.Tensor, params: SamplingParams, history: list[int] | None) -> torch.Tensor:
    """Logits with the logit bias and the repetition penalty over `history` applied."""
    logits = apply_logit_bias(logits, params.logit_bias)
    return apply_repetition_penalty(logits, history[-params.repetition_window:] if history else [],
                                    params.repetition_penalty)


def distribution(logits: torch.Tensor, params: SamplingParams, history: list[int] | None = None) -> torch.Tensor:
    """The probabilities `sample` draws from (not greedy), for speculative sampling's acceptance test."""
    return filter_logits(adjusted(logits, params, history), params).softmax(-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One index with probability `probs[i]` (a 1-D vector): `draw_rows` of one row."""
    return int(draw_rows(probs[None], generator)[0])


def draw_rows(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of `probs` [rows, vocab], with probability probs[r, i], by inverting each
    row's CDF with a single uniform number.

    torch.multinomial spends ~5 ms on a 262k vocabulary (it draws per category), and the
    exponential race (argmax of p / Exp(1) noise) draws 262k exponentials per row: 95 ms per step
    for 16 rows, half of an RL rollout's time. A cumulative sum and a binary search take ~0.2 ms per row.
    """
    cdf = torch.cumsum(probs, -1)
    u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, dtype=cdf.dtype) * cdf[..., -1:]
    # The first index whose cumulative mass exceeds u: a zero-probability id never qualifies,
    # because its cumulative mass equals its predecessor's.
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    for r in (idx >= probs.shape[-1]).nonzero().flatten().tolist():  # u rounded up to the total:
        idx[r] = torch.nonzero(probs[r]).max()                          # the last id with any mass
    return idx
