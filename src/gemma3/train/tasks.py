"""Offline procedural tasks with verifiable answers: samples are dicts with "prompt" and "answer".

- `arithmetic`: built in, seeded: a + b, a − b, a × b with operand sizes by `digits`; scored by
  `rewards.math_reward`. Prompt styles: "question" (an instruction: the 270M base model mostly
  repeats it) or "fewshot" (four solved "Q: … / A: …" lines, then the question after "Q:", so
  that a base model continues with the answer after "A:").
- `reasoning-gym:NAME`: any offline generator of the `reasoning-gym` package (the `rl` extra), e.g.
  `reasoning-gym:basic_arithmetic`, `reasoning-gym:chain_sum`; scored by the dataset's own scorer.
"""

from __future__ import annotations

import random

from .rewards import Score, math_reward

PROMPT = "{question}\nGive only the final number.\n"
FEWSHOT = "Q: 3 + 4\nA: 7\nQ: 12 - 5\nA: 7\nQ: 6 * 3\nA: 18\nQ: 25 + 17\nA: 42\nQ: {a} {op} {b}\nA:"
STYLES = ("question", "fewshot")


def arithmetic(n: int, seed: int = 0, digits: int = 2, ops: str = "+-*", style: str = "question") -> list[dict]:
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}: use {' or '.join(STYLES)}")
    if not ops or set(ops) - set("+-*"):
        raise ValueError(f"arithmetic operators must be a non-empty mix of + - *, got {ops!r}")
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
        op = rng.choice(ops)
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        prompt = (PROMPT.format(question=f"What is {a} {op} {b}?") if style == "question"
                  else FEWSHOT.format(a=a, op=op, b=b))
        samples.append({"prompt": prompt, "answer": str(answer)})
    return samples


def reasoning_gym(name: str, n: int, seed: int = 0) -> list[dict]:
    try:
        import reasoning_gym as rg
    except ImportError:
        raise RuntimeError("reasoning-gym tasks need the package: pip install 'gemma3[rl]'") from None
    dataset = rg.create_dataset(name, size=n, seed=seed)
    return [{"prompt": PROMPT.format(question=e["question"]), "answer": str(e["answer"]), "entry": e,
             "scorer": dataset} for e in dataset]


def load(task: str, n: int, seed: int = 0, **arithmetic_options) -> list[dict]:
    """`arithmetic` (with `arithmetic`'s digits / ops / style) or `reasoning-gym:NAME`, n samples."""
    if task == "arithmetic":
        return arithmetic(n, seed, **arithmetic_options)
    if task.startswith("reasoning-gym:"):
        return reasoning_gym(task.split(":", 1)[1], n, seed)
    raise ValueError(f"unknown task {task!r}: use 'arithmetic' or 'reasoning-gym:NAME'")


def split_held_out(samples: list[dict], eval_size: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) with no problem in both: the held-out set is the first `eval_size` distinct
    prompts, training keeps every other sample (repeats included). Small problem spaces (one-digit
    operands: 100 per operator) repeat problems, so a split by position would evaluate on training
    problems."""
    held_out, seen = [], set()
    for sample in samples:
        if len(held_out) == eval_size:
            break
        if sample["prompt"] not in seen:
            seen.add(sample["prompt"])
            held_out.append(sample)
    if len(held_out) < eval_size:
        raise ValueError(f"only {len(held_out)} distinct problems, fewer than the {eval_size} held out: "
                         "use a larger task (more digits or operators) or a smaller evaluation set")
    train = [s for s in samples if s["prompt"] not in seen]
    if not train:
        raise ValueError(f"no training problems left after holding out {eval_size} distinct ones: "
                         "use a larger task (more digits or operators) or a smaller evaluation set")
    return train, held_out


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
