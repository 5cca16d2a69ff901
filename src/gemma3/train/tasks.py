"""Offline procedural tasks with verifiable answers: samples are dicts with "prompt" and "answer".

- `arithmetic`: built in, seeded: a + b, a − b, a × b with operand sizes by `digits`; scored by
  `rewards.math_reward`.
- `reasoning-gym:NAME`: any offline generator of the `reasoning-gym` package (the `rl` extra), e.g.
  `reasoning-gym:basic_arithmetic`, `reasoning-gym:chain_sum`; scored by the dataset's own scorer.
"""

from __future__ import annotations

import random

from .rewards import Score, math_reward

PROMPT = "{question}\nGive only the final number.\n"


def arithmetic(n: int, seed: int = 0, digits: int = 2, ops: str = "+-*") -> list[dict]:
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
        op = rng.choice(ops)
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        samples.append({"prompt": PROMPT.format(question=f"What is {a} {op} {b}?"), "answer": str(answer)})
    return samples


def reasoning_gym(name: str, n: int, seed: int = 0) -> list[dict]:
    try:
        import reasoning_gym as rg
    except ImportError:
        raise RuntimeError("reasoning-gym tasks need the package: pip install 'gemma3[rl]'") from None
    dataset = rg.create_dataset(name, size=n, seed=seed)
    return [{"prompt": PROMPT.format(question=e["question"]), "answer": str(e["answer"]), "entry": e,
             "scorer": dataset} for e in dataset]


def load(task: str, n: int, seed: int = 0) -> list[dict]:
    """`arithmetic` or `reasoning-gym:NAME`, n samples."""
    if task == "arithmetic":
        return arithmetic(n, seed)
    if task.startswith("reasoning-gym:"):
        return reasoning_gym(task.split(":", 1)[1], n, seed)
    raise ValueError(f"unknown task {task!r}: use 'arithmetic' or 'reasoning-gym:NAME'")


def task_reward(completion: str, sample: dict) -> Score:
    """The task's own scorer: reasoning-gym's for its samples, the numeric match otherwise. The first
    line of the completion is scored (the prompt asks for only the number)."""
    answer_text = completion.strip().split("\n", 1)[0] if completion.strip() else ""
    if "scorer" in sample:
        value = float(sample["scorer"].score_answer(answer_text, sample["entry"]))
        return Score(value, "correct" if value == 1 else f"scored {value:g}")
    return math_reward(answer_text, sample)


def arithmetic_pairs(n: int, seed: int = 0, digits: int = 2, ops: str = "+-") -> list[dict]:
    """Preference pairs from the arithmetic task with *constructed* answers: chosen is the correct
    result, rejected the result off by 1..10 either way (a near miss, not an obviously wrong
    string); both end with the newline a completion stops at."""
    rng = random.Random(seed)
    pairs = []
    for sample in arithmetic(n, seed, digits, ops):
        answer = int(sample["answer"])
        wrong = answer + rng.choice([-1, 1]) * rng.randint(1, 10)
        pairs.append({"prompt": sample["prompt"], "chosen": f"{answer}\n", "rejected": f"{wrong}\n"})
    return pairs
