"""Memorization eval: the criteria on constructed cases, window sampling, batched greedy decoding
against the one-sequence path, and the command end to end with a model that knows the text."""

import itertools
import json
import random

import pytest
import torch

from gemma3.eval.memorization import (
    classify,
    edit_distance,
    evaluate,
    greedy_continuations,
    normalized_edit_distance,
    sample_windows,
    shuffled_words,
    verbatim_tokens,
    wilson_interval,
)
from gemma3.eval.perplexity import EvalInputError
from gemma3.inference.generate import generate_step
from gemma3.inference.sampling import SamplingParams
from tests.helpers.cli import run_cli
from tests.helpers.models import random_model, tiny_config

N_WORDS = 600
DOC = " ".join(f"w{i}" for i in range(N_WORDS))  # every token distinct: the next one is always id + 1


class WordTokenizer:
    """One id per word of DOC (1…N_WORDS), <bos> = 0, a junk word the document never holds."""
    bos_id = 0
    junk = N_WORDS + 1

    def encode(self, text, add_bos=False):
        return [0] * add_bos + [int(w[1:]) + 1 for w in text.split()]

    def decode(self, ids):
        return " ".join("?" if i == self.junk else f"w{i - 1}" for i in ids)


class Oracle:
    """Has memorized DOC: after token t it predicts t + 1, except at the generated steps in `wrong_at`
    (1-based), where it says the junk word and then goes on with the true text (substitutions)."""

    def __init__(self, wrong_at=()):
        self.config = tiny_config(vocab=N_WORDS + 2)
        self.wrong_at = set(wrong_at)

    def new_cache(self, batch, max_len):
        return {"next": None, "step": 0}

    def __call__(self, x, cache, last_only=True):
        cache["next"] = x[:, -1] + 1 if cache["next"] is None else cache["next"] + 1
        cache["step"] += 1
        out = torch.full_like(cache["next"], WordTokenizer.junk) if cache["step"] in self.wrong_at else cache["next"]
        return torch.nn.functional.one_hot(out.clamp(max=N_WORDS + 1), N_WORDS + 2).float()[:, None]


def _levenshtein(a, b):
    """Textbook recursion, memoized: the reference for edit_distance."""
    from functools import lru_cache

    @lru_cache(None)
    def d(i, j):
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


def test_edit_distance_constructed_and_against_the_recursion():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == edit_distance("abc", "") == 3
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert edit_distance([1, 2, 3, 4], [2, 3, 4, 5]) == 2  # a shift: one deletion + one insertion
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.randrange(4) for _ in range(rng.randrange(9))]
        b = [rng.randrange(4) for _ in range(rng.randrange(9))]
        assert edit_distance(a, b) == edit_distance(b, a) == _levenshtein(tuple(a), tuple(b)), (a, b)


def test_exact_and_approximate_criteria():
    target = list(range(100, 150))  # a 50-token suffix: 10% = 5 edits

    def substituted(n):
        return [-1 if i < n else t for i, t in enumerate(target)]

    assert classify(target, target) == (True, True)
    assert classify(substituted(1), target) == (False, True)
    assert normalized_edit_distance(substituted(5), target) == pytest.approx(0.10)
    assert classify(substituted(5), target) == (False, True)  # at the threshold: approximate
    assert classify(substituted(6), target) == (False, False)
    assert classify(target[1:] + [7], target) == (False, True)  # shifted by one: 2 edits
    assert classify(target[:44], target) == (False, False)  # 6 tokens missing
    assert classify(target[:45], target) == (False, True)
    assert classify([], target) == (False, False)
    assert verbatim_tokens(target, target) == 50 and verbatim_tokens(substituted(1), target) == 0
    assert verbatim_tokens(target[:7] + [-1] + target[8:], target) == 7 and verbatim_tokens(target[:3], target) == 3
    with pytest.raises(ValueError, match="empty"):
        normalized_edit_distance([1], [])


def test_wilson_interval():
    z2 = 1.959964 ** 2
    lo, hi = wilson_interval(0, 10)
    assert lo == 0 and hi == pytest.approx(z2 / (10 + z2))  # closed form at k = 0
    lo, hi = wilson_interval(5, 10)
    assert lo + hi == pytest.approx(1) and lo == pytest.approx(0.2366, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1 and lo == pytest.approx(10 / (10 + z2))
    for k, n in itertools.product(range(0, 30, 7), (30, 300)):
        lo, hi = wilson_interval(k, n)
        assert 0 <= lo <= k / n <= hi <= 1
    assert wilson_interval(3, 300)[1] - wilson_interval(3, 300)[0] < wilson_interval(1, 100)[1] - wilson_interval(1, 100)[0]
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_windows_do_not_overlap_and_are_seeded():
    starts, available = sample_windows(1050, 8, 100, seed=3)
    assert available == 10 and len(starts) == 8 and starts == sorted(starts)
    assert all(b - a >= 100 for a, b in zip(starts, starts[1:])) and starts[-1] + 100 <= 1050
    assert sample_windows(1050, 8, 100, seed=3) == (starts, available)
    assert sample_windows(1050, 8, 100, seed=4)[0] != starts
    assert len(sample_windows(1050, 50, 100, seed=0)[0]) == 10  # capped at what the text holds
    with pytest.raises(EvalInputError, match="fewer than one window"):
        sample_windows(99, 8, 100, seed=0)


def test_batched_greedy_equals_one_sequence_decoding():
    model = random_model(tiny_config())
    rng = random.Random(0)
    prompts = [[2] + [rng.randrange(3, 257) for _ in range(n)] for n in (20, 20, 20, 33, 20)]
    batched = greedy_continuations(model, prompts, 12, batch_size=2)
    single = [list(generate_step(model, p, SamplingParams(), 12)) for p in prompts]
    assert batched == single
    assert len({tuple(b) for b in batched}) > 1  # the prompts really lead to different continuations


@pytest.mark.parametrize("wrong_at, exact, approximate", [((), 1, 1), ((10, 30), 0, 1), (range(1, 7), 0, 0)])
def test_evaluate_counts_what_the_model_reproduces(wrong_at, exact, approximate):
    r = evaluate(Oracle(wrong_at), WordTokenizer(), DOC, "doc", samples=4, progress=False)
    assert r.samples == 4 and r.windows_available == N_WORDS // 100
    assert (r.exact, r.approximate) == (4 * exact, 4 * approximate)
    assert r.exact_rate == exact and r.exact_ci == wilson_interval(4 * exact, 4)
    assert r.mean_edit_distance == pytest.approx(len(set(wrong_at)) / 50)
    assert r.mean_verbatim_tokens == min(wrong_at, default=51) - 1
    start = r.windows[0]["start"]  # all windows tie: the example is the first
    assert r.example["suffix"] == " ".join(f"w{i}" for i in range(start + 50, start + 100))
    assert r.example["generated"].count("?") == len(set(wrong_at))


def test_evaluate_rejects_short_text_and_bad_lengths():
    with pytest.raises(EvalInputError, match="fewer than one window"):
        evaluate(Oracle(), WordTokenizer(), " ".join(DOC.split()[:99]), "short", progress=False)
    with pytest.raises(EvalInputError, match="--prefix"):
        evaluate(Oracle(), WordTokenizer(), DOC, "doc", prefix=0, progress=False)
    with pytest.raises(EvalInputError, match="--samples"):
        evaluate(Oracle(), WordTokenizer(), DOC, "doc", samples=0, progress=False)


def test_control_text_is_the_same_words_in_another_order():
    control = shuffled_words(DOC, seed=1)
    assert sorted(control.split()) == sorted(DOC.split()) and control.split() != DOC.split()
    assert shuffled_words(DOC, seed=1) == control


def test_command_end_to_end(tmp_path, capsys, monkeypatch):
    import gemma3.cli.options

    monkeypatch.setattr(gemma3.cli.options, "load_model", lambda args: (Oracle(), WordTokenizer()))
    (tmp_path / "doc.txt").write_text(DOC)
    args = ["eval", "memorization", "--data", str(tmp_path / "doc.txt"), "--control", "--samples", "5",
            "--plot", str(tmp_path / "mem.png"), "--results", str(tmp_path / "r.jsonl")]
    code, out, err = run_cli(args + ["--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    doc, control = result["datasets"]
    assert (doc["samples"], doc["exact"], doc["approximate"]) == (5, 5, 5)
    assert control["exact_rate"] < doc["exact_rate"] and "shuffled" in control["name"]
    assert (tmp_path / "mem.png").stat().st_size > 1000
    entry = json.loads((tmp_path / "r.jsonl").read_text())
    assert entry["kind"] == "memorization" and entry["results"] == result
    code, out, _ = run_cli(args, capsys)  # human output: one row per text
    assert code == 0 and "100.0%" in out and "words shuffled" in out


def test_command_input_errors_are_one_line(tmp_path, capsys, monkeypatch):
    import gemma3.cli.options

    monkeypatch.setattr(gemma3.cli.options, "load_model", lambda args: (Oracle(), WordTokenizer()))
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 w1 w2".encode("latin-1"))
    (tmp_path / "short.txt").write_text("w1 w2 w3")
    for name, message in (("empty.txt", "empty"), ("latin1.txt", "not UTF-8"), ("short.txt", "fewer than one window"),
                          ("missing.txt", "cannot read")):
        code, out, err = run_cli(["eval", "memorization", "--data", str(tmp_path / name)], capsys)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
