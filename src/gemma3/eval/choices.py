"""Multiple-choice scoring by log-likelihood, the protocol of lm-evaluation-harness's
`multiple_choice` tasks: each choice is the continuation `" " + choice` of the item's prompt,
scored as the sum of its token log-probabilities; the prediction is the highest. The shipped
task (tasks/gemma3_choices.yaml + .jsonl) runs the same items through `lm_eval --model
local-completions` against `gemma3 serve`, so the two can be compared item by item."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from ..inference.score import continuation_logprob, split_pair

TARGET_DELIMITER = " "  # lm-eval's default target_delimiter


def default_items() -> Path:
    return Path(str(files("gemma3.eval").joinpath("tasks/gemma3_choices.jsonl")))


def prompt(item: dict) -> str:
    """The task YAML's doc_to_text."""
    return f"Question: {item['question']}\nAnswer:"


def read_items(path: str | Path) -> list[dict]:
    items = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        missing = {"question", "choices", "answer"} - set(item)
        if missing:
            raise ValueError(f"{path}:{n}: item lacks {', '.join(sorted(missing))}")
        if not 0 <= item["answer"] < len(item["choices"]):
            raise ValueError(f"{path}:{n}: answer {item['answer']} is not an index into its {len(item['choices'])} choices")
        items.append(item)
    return items


@dataclass
class Scored:
    loglikelihoods: list[float]
    answer: int

    @property
    def predicted(self) -> int:
        return max(range(len(self.loglikelihoods)), key=self.loglikelihoods.__getitem__)


def score_items(model, tokenizer, items: list[dict]) -> list[Scored]:
    # lm-eval's remote tokenizer asks /tokenize with add_special_tokens=false: no <bos> here either.
    def tokenize(text: str) -> list[int]:
        return tokenizer.encode(text, add_bos=False, parse_special=True)

    out = []
    for item in items:
        lls = [continuation_logprob(model, *split_pair(tokenize, prompt(item), TARGET_DELIMITER + choice))[0]
               for choice in item["choices"]]
        out.append(Scored(lls, item["answer"]))
    return out


def accuracy(scored: list[Scored]) -> float:
    return sum(s.predicted == s.answer for s in scored) / len(scored)
