"""Verifiable rewards: math answers, format (regex), code execution — and their weighted sum.

A reward function maps (completion text, task sample) to a `Score`: a value in [0, 1] and a reason, so
that every zero can be explained in the logs. `Weighted` combines several and keeps each component.
A task sample is a dict: "prompt", and what the scorers need ("answer" for math, "tests" for code).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Callable

from .sandbox import Limits, run_python


@dataclass(frozen=True)
class Score:
    value: float
    reason: str


RewardFn = Callable[[str, dict], Score]

# ---- math ---------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_IS = re.compile(r"(?:answer|result)\s*(?:is|=|:)\s*\$?\s*(-?[\d.,/]+)", re.IGNORECASE)


def normalise_number(text: str) -> str | None:
    """'1,234.50' → '1234.5', '-3/6' → '-1/2', '7.0' → '7'; None if it is not a number."""
    from fractions import Fraction

    text = text.strip().rstrip(".").replace(",", "").replace(" ", "")
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None
    if value.denominator == 1:
        return str(value.numerator)
    as_float = float(value)
    return repr(as_float) if Fraction(repr(as_float)) == value else f"{value.numerator}/{value.denominator}"


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion: a \\boxed{...}, else 'the answer is X', else the last number."""
    for pattern in (_BOXED, _ANSWER_IS):
        found = pattern.findall(completion)
        if found:
            return found[-1]
    numbers = _NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def math_reward(completion: str, sample: dict, use_math_verify: bool = False) -> Score:
    """1 when the completion's final answer equals sample["answer"] as a number (exact match after
    normalisation). With `use_math_verify`, Hugging Face's math-verify judges instead (symbolic
    equivalence: fractions, LaTeX, sets), which needs the `rl` extra."""
    if use_math_verify:
        from math_verify import parse, verify

        gold, pred = parse(str(sample["answer"])), parse(completion)
        if not pred:
            return Score(0.0, "no answer found")
        return Score(1.0, "correct") if verify(gold, pred) else Score(0.0, "wrong answer")
    raw = extract_answer(completion)
    if raw is None:
        return Score(0.0, "no answer found")
    got, want = normalise_number(raw), normalise_number(str(sample["answer"]))
    if got is None:
        return Score(0.0, f"answer {raw!r} is not a number")
    return Score(1.0, "correct") if got == want else Score(0.0, f"wrong answer {got} (want {want})")


# ---- format -------------------------------------------------------------------------------------

def format_reward(pattern: str, full: bool = False) -> RewardFn:
    """1 when the completion matches `pattern` (re.search; re.fullmatch with `full`), with DOTALL."""
    compiled = re.compile(pattern, re.DOTALL)
    match = compiled.fullmatch if full else compiled.search

    def score(completion: str, sample: dict) -> Score:
        return Score(1.0, "matches") if match(completion) else Score(0.0, f"does not match {pattern!r}")
    return score


# ---- code ---------------------------------------------------------------------------------------

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)

# Runs the program, then each test in the program's namespace; one line with a per-run secret reports
# how many passed, so a program cannot forge the count by printing (it could still read this file:
# the sandbox limits harm, not reward hacking by a program that inspects its own harness).
_HARNESS = '''
import sys
_source = {source!r}
_tests = {tests!r}
_ns = {{"__name__": "__main__"}}
try:
    exec(compile(_source, "solution.py", "exec"), _ns)
except BaseException as e:
    print("{nonce} error", type(e).__name__, str(e)[:200], file=sys.stderr, flush=True)
    sys.exit(3)
_passed = 0
for _t in _tests:
    try:
        exec(compile(_t, "test.py", "exec"), _ns)
        _passed += 1
    except BaseException as e:
        print("test failed:", _t[:100], type(e).__name__, str(e)[:200], file=sys.stderr)
print("{nonce}", _passed, len(_tests), flush=True)
'''


def extract_code(completion: str) -> str:
    """The last fenced Python block of a completion, or the whole completion if it has none."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def run_tests(source: str, tests: list[str], limits: Limits = Limits()) -> Score:
    """Fraction of `tests` (Python statements, e.g. asserts) that pass after running `source` in the
    sandbox; 0 with the sandbox's reason when the program fails or breaks a limit."""
    nonce = secrets.token_hex(16)
    result = run_python(_HARNESS.format(source=source, tests=list(tests), nonce=nonce), limits)
    for line in result.stdout.splitlines()[::-1]:
        parts = line.split()
        if len(parts) == 3 and parts[0] == nonce:
            passed, total = int(parts[1]), int(parts[2])
            return Score(passed / max(1, total), f"{passed}/{total} tests passed")
    if result.reason == "ok" or result.reason.startswith("error"):
        last = result.stderr.strip().splitlines()[-1:] or ["no output"]
        return Score(0.0, f"program failed: {last[0][-200:]}")
    return Score(0.0, result.reason)


def code_reward(limits: Limits = Limits()) -> RewardFn:
    """Runs the completion's program against sample["tests"] in the sandbox (see `run_tests`)."""
    def score(completion: str, sample: dict) -> Score:
        return run_tests(extract_code(completion), sample["tests"], limits)
    return score


# ---- combination --------------------------------------------------------------------------------

class Weighted:
    """Σ wᵢ·rᵢ over named reward functions; `__call__` returns the total and every component's Score."""

    def __init__(self, components: dict[str, tuple[float, RewardFn]]):
        if not components:
            raise ValueError("Weighted needs at least one reward component")
        self.components = components

    def __call__(self, completion: str, sample: dict) -> tuple[float, dict[str, Score]]:
        scores = {name: fn(completion, sample) for name, (_, fn) in self.components.items()}
        return sum(w * scores[name].value for name, (w, _) in self.components.items()), scores
