"""Needle in a haystack: can the model retrieve a fact planted at a given depth of a long context?

Completion-style, so it works for base models too: the haystack (filler text) holds
"The secret number is N." at `depth` (0 = start, 1 = end) and the prompt ends with the question
"… The secret number is"; greedy decoding must produce N. Besides success we record the log
probability of N's tokens, a smoother signal than exact match.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from .perplexity import EvalInputError

NEEDLE = " The secret number is {n}. Remember it."
QUESTION = "\n\nQuestion: what is the secret number? Answer: The secret number is"
ANSWER_ROOM = 8  # tokens of `ctx` kept free for the answer: a 5-digit number and a little more


@dataclass
class NeedleResult:
    ctx: int
    depth: float
    answer: str
    generated: str
    found: bool
    answer_logprob: float  # sum of log-probabilities of the answer's tokens


def build_prompt(tokenizer, haystack_ids: list[int], ctx: int, depth: float, answer: str) -> list[int]:
    """bos + haystack (cut to fit) with the needle inserted at `depth`, then the question; the
    answer's tokens still fit in `ctx` (so --ctx may be the model's whole context)."""
    needle = tokenizer.encode(NEEDLE.format(n=answer), add_bos=False)
    question = tokenizer.encode(QUESTION, add_bos=False)
    room = ctx - 1 - len(needle) - len(question) - ANSWER_ROOM
    if room < 1:
        raise EvalInputError(f"context {ctx} is too short for the needle and the question")
    if len(haystack_ids) < room:
        reps = -(-room // len(haystack_ids))
        haystack_ids = (haystack_ids * reps)
    hay = haystack_ids[:room]
    at = round(depth * room)
    return [tokenizer.bos_id] + hay[:at] + needle + hay[at:] + question


def run_needle(model, tokenizer, haystack: str, ctxs: list[int], depths: list[float], seed: int = 0,
               progress: bool = True) -> list[NeedleResult]:
    from ..inference.generate import generate_step
    from ..inference.prefix_cache import PrefixCache
    from ..inference.sampling import SamplingParams

    for c in ctxs:
        if c > model.config.max_context:
            raise EvalInputError(f"--ctx {c} exceeds the model's context of {model.config.max_context}")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise EvalInputError(f"depth {d} is outside [0, 1]")
    hay_ids = tokenizer.encode(haystack, add_bos=False)
    if not hay_ids:
        raise EvalInputError("the haystack text is empty")
    rng = random.Random(seed)
    results = []
    jobs = [(c, d) for c in ctxs for d in sorted(depths, reverse=True)]
    prefix_cache, cached_ctx = None, None
    for ctx, depth in tqdm(jobs, desc="needle", unit="prompt", disable=not progress):
        if ctx != cached_ctx:
            # Deeper needles share a longer haystack prefix: reuse it through the prefix cache.
            # Ring snapshots every ctx/8 tokens bound the stored bytes to a few per prompt.
            block = max(model.config.sliding_window, ctx // 8 // model.config.sliding_window * model.config.sliding_window)
            prefix_cache, cached_ctx = PrefixCache(model, max_bytes=2 * 2**30, block=block), ctx
        answer = str(rng.randrange(10_000, 100_000))
        ids = build_prompt(tokenizer, hay_ids, ctx, depth, answer)
        answer_ids = tokenizer.encode(" " + answer, add_bos=False)
        out = list(generate_step(model, ids, SamplingParams(), len(answer_ids) + 2, prefix_cache))
        generated = tokenizer.decode(out)
        with torch.inference_mode():
            cache, logits = prefix_cache.prefill(ids, len(ids) + len(answer_ids))
            logp = torch.log_softmax(logits.float(), -1)[answer_ids[0]].item()
            if len(answer_ids) > 1:
                rest = model(torch.tensor([answer_ids[:-1]]), cache)[0].float().log_softmax(-1)
                logp += rest.gather(1, torch.tensor(answer_ids[1:])[:, None]).sum().item()
        results.append(NeedleResult(ctx, depth, answer, generated, answer in generated, logp))
    return results


def plot_heatmap(results: list[NeedleResult], path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctxs = sorted({r.ctx for r in results})
    depths = sorted({r.depth for r in results})
    grid = [[next(r.answer_logprob for r in results if r.ctx == c and r.depth == d) for c in ctxs] for d in depths]
    found = {(r.ctx, r.depth): r.found for r in results}
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(ctxs), 1.2 + 0.7 * len(depths)))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=-20, vmax=0, aspect="auto")
    ax.set_xticks(range(len(ctxs)), [f"{c // 1024}K" if c >= 1024 else str(c) for c in ctxs])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    for i, d in enumerate(depths):
        for j, c in enumerate(ctxs):
            ax.text(j, i, "✓" if found[(c, d)] else "✗", ha="center", va="center")
    ax.set_xlabel("context length")
    ax.set_ylabel("needle depth")
    ax.set_title("Needle in a haystack (colour: log p(answer); ✓ = greedy retrieval)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def to_json(results: list[NeedleResult]) -> dict:
    return {"results": [asdict(r) for r in results],
            "accuracy": sum(r.found for r in results) / len(results)}
