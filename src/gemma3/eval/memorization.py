"""`gemma3 eval memorization`: how often the model reproduces a document it was trained on.

The Gemma 3 report's method (§6 "Memorization and Privacy", Fig. 9; from Gemma 2 and Carlini et
al. 2022): take windows of a training document, prompt with the first `prefix` (50) tokens,
greedy-decode `suffix` (50) tokens. A window is *exactly* memorized when the generated tokens are
the true suffix, *approximately* memorized when their edit distance to it is at most 10% of the
suffix length (so exact ⊂ approximate, as in the report's figure). Distances are counted in tokens
— the unit the model generates in; the report does not say which unit it uses.

Windows do not overlap (each one a distinct piece of evidence), start at a seeded random offset and
are sampled with a fixed seed; each prompt starts with <bos>, as a document does in training. Rates
come with Wilson score intervals, which stay inside [0, 1] and are meaningful at 0 of n.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from tqdm import tqdm

from .perplexity import EvalInputError

PREFIX = 50
SUFFIX = 50
APPROX_THRESHOLD = 0.10  # normalized edit distance at or below which a window is approximately memorized
Z_95 = 1.959964  # two-sided 95% normal quantile


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def normalized_edit_distance(generated: Sequence, target: Sequence) -> float:
    """Edit distance as a fraction of the true suffix's length."""
    if not target:
        raise ValueError("the true suffix is empty")
    return edit_distance(generated, target) / len(target)


def classify(generated: Sequence, target: Sequence, threshold: float = APPROX_THRESHOLD) -> tuple[bool, bool]:
    """(exact, approximate) memorization of `target` by `generated`."""
    exact = list(generated) == list(target)
    return exact, exact or normalized_edit_distance(generated, target) <= threshold


def verbatim_tokens(generated: Sequence, target: Sequence) -> int:
    """How many leading tokens of `target` were generated verbatim: a finer signal than exact
    memorization for models that reproduce a text only in short runs."""
    return next((i for i, (a, b) in enumerate(zip(generated, target)) if a != b), min(len(generated), len(target)))


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion of k successes in n trials."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)  # exact at the ends


def sample_windows(n_tokens: int, samples: int, window: int, seed: int) -> tuple[list[int], int]:
    """(sorted start offsets of up to `samples` non-overlapping windows, windows available)."""
    available = n_tokens // window
    if available < 1:
        raise EvalInputError(f"text has {n_tokens} tokens, fewer than one window of prefix + suffix = {window}")
    rng = random.Random(seed)
    offset = rng.randint(0, n_tokens - available * window)
    return sorted(offset + i * window for i in rng.sample(range(available), min(samples, available))), available


def greedy_continuations(model, prompts: list[list[int]], n_tokens: int, batch_size: int = 16,
                         progress: bool = False) -> list[list[int]]:
    """Greedy `n_tokens` after each prompt. Prompts of one length go through the model together:
    one batched prefill, then one batched step per token, sharing one KV cache."""
    out: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    batches = [idx[s:s + batch_size] for idx in by_length.values() for s in range(0, len(idx), batch_size)]
    with torch.inference_mode():
        for idx in tqdm(batches, desc="memorization", unit="batch", disable=not progress):
            x = torch.tensor([prompts[i] for i in idx])
            cache = model.new_cache(len(idx), max_len=x.shape[1] + n_tokens)
            for _ in range(n_tokens):
                x = model(x, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
                for row, i in enumerate(idx):
                    out[i].append(int(x[row, 0]))
    return out


@dataclass
class DatasetResult:
    name: str
    tokens: int  # tokens of the document (no <bos>)
    windows_available: int  # non-overlapping prefix + suffix windows it holds
    samples: int
    exact: int
    approximate: int
    exact_rate: float
    exact_ci: tuple[float, float]
    approximate_rate: float
    approximate_ci: tuple[float, float]
    mean_edit_distance: float  # normalized, over the sampled windows
    mean_verbatim_tokens: float  # leading suffix tokens reproduced exactly, averaged over the windows
    windows: list[dict] = field(default_factory=list)  # per window: start, normalized edit distance, verbatim tokens
    example: dict | None = None  # the closest window's prefix, true suffix and generation, as text


def evaluate(model, tokenizer, text: str, name: str, samples: int = 100, prefix: int = PREFIX,
             suffix: int = SUFFIX, seed: int = 0, batch_size: int = 16, threshold: float = APPROX_THRESHOLD,
             progress: bool = True) -> DatasetResult:
    if prefix < 1 or suffix < 1:
        raise EvalInputError(f"--prefix and --suffix must be positive, got {prefix} and {suffix}")
    if samples < 1:
        raise EvalInputError(f"--samples must be positive, got {samples}")
    if 1 + prefix + suffix > model.config.max_context:
        raise EvalInputError(f"prefix + suffix exceed the model's context of {model.config.max_context}")
    tokens = tokenizer.encode(text, add_bos=False)
    try:
        starts, available = sample_windows(len(tokens), samples, prefix + suffix, seed)
    except EvalInputError as e:
        raise EvalInputError(f"{name}: {e}") from None
    prompts = [[tokenizer.bos_id] + tokens[s:s + prefix] for s in starts]
    targets = [tokens[s + prefix:s + prefix + suffix] for s in starts]
    generated = greedy_continuations(model, prompts, suffix, batch_size, progress)
    windows, n_exact, n_approx = [], 0, 0
    for s, gen, target in zip(starts, generated, targets):
        exact, approx = classify(gen, target, threshold)
        n_exact += exact
        n_approx += approx
        windows.append({"start": s, "edit_distance": round(normalized_edit_distance(gen, target), 4),
                        "verbatim": verbatim_tokens(gen, target)})
    n = len(starts)
    best = min(range(n), key=lambda i: windows[i]["edit_distance"])
    example = {"prefix": tokenizer.decode(prompts[best][1:]), "suffix": tokenizer.decode(targets[best]),
               "generated": tokenizer.decode(generated[best]), "edit_distance": windows[best]["edit_distance"]}
    return DatasetResult(name, len(tokens), available, n, n_exact, n_approx, n_exact / n, wilson_interval(n_exact, n),
                         n_approx / n, wilson_interval(n_approx, n),
                         sum(w["edit_distance"] for w in windows) / n, sum(w["verbatim"] for w in windows) / n,
                         windows, example)


def shuffled_words(text: str, seed: int) -> str:
    """A freshly generated control text: `text`'s words in a random order. Same vocabulary and
    length, but no 50-token run of it can be in any training set."""
    words = text.split()
    random.Random(seed).shuffle(words)
    return "\n".join(" ".join(words[i:i + 12]) for i in range(0, len(words), 12))


def to_json(results: list[DatasetResult], model: str, prefix: int, suffix: int, seed: int,
            threshold: float) -> dict:
    return {"model": model, "prefix": prefix, "suffix": suffix, "threshold": threshold, "seed": seed,
            "datasets": [asdict(r) for r in results]}


def plot(result: dict, path) -> None:
    """Exact and approximate memorization rate per text, log scale, Wilson 95% intervals (Fig. 9)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = result["datasets"]
    floor = 0.5 * min(100 / d["samples"] for d in data)  # a 0% bar has no height on a log axis: draw to here
    fig, ax = plt.subplots(figsize=(2.2 + 1.8 * len(data), 4.5))
    width = 0.38
    for j, (kind, colour) in enumerate((("exact", "tab:blue"), ("approximate", "tab:orange"))):
        xs = [i + (j - 0.5) * width for i in range(len(data))]
        rates = [100 * d[f"{kind}_rate"] for d in data]
        lo = [max(floor, 100 * d[f"{kind}_ci"][0]) for d in data]
        hi = [100 * d[f"{kind}_ci"][1] for d in data]
        tops = [max(r, floor) for r in rates]  # a 0 bar ends at the floor: only its upper bound shows
        ax.bar(xs, tops, width, label=f"{kind} memorization", color=colour)
        ax.errorbar(xs, tops, yerr=[[t - l for t, l in zip(tops, lo)], [h - t for t, h in zip(tops, hi)]],
                    fmt="none", ecolor="black", capsize=3, linewidth=1)
        for x, d, r in zip(xs, data, rates):
            ax.annotate(f"{d[kind]}/{d['samples']}", (x, max(r, floor)), textcoords="offset points",
                        xytext=(0, 3), ha="center", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(floor, 100)
    ax.set_xticks(range(len(data)), [d["name"] for d in data], fontsize=8)
    ax.set_ylabel("% of windows memorized (log scale)")
    ax.set_title(f"Memorization, {result['prefix']}-token prefix → {result['suffix']} greedy tokens\n"
                 f"({result['model']}; bars: 95% Wilson intervals)", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
