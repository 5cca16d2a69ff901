"""Sampling filters and the generate layers (stop tokens, stop strings, streaming, limits)."""

from types import SimpleNamespace

import pytest
import torch

from gemma3.inference.generate import generate, stream_generate
from gemma3.inference.load import load_tokenizer
from gemma3.inference.sampling import SamplingParams, apply_repetition_penalty, draw, draw_rows, filter_logits, sample


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


class ScriptedModel:
    """Stands in for Gemma3: emits a fixed token sequence, so stop handling can be tested exactly."""

    def __init__(self, script, vocab):
        self.script, self.vocab, self.step = list(script), vocab, 0
        self.config = SimpleNamespace(max_context=1000)
        self.device = torch.device("cpu")

    def new_cache(self, batch_size=1, max_len=None, kv_dtype=None):
        return None

    def __call__(self, ids, cache=None, last_only=False, **prefill):
        logits = torch.zeros(1, 1, self.vocab)
        logits[0, 0, self.script[min(self.step, len(self.script) - 1)]] = 1.0
        self.step += 1
        return logits

    def greedy_next(self, ids, cache):
        return self(ids, cache, last_only=True)[:, -1].argmax(-1)


def test_greedy_is_argmax():
    logits = torch.randn(100)
    assert sample(logits, SamplingParams()) == int(logits.argmax())


@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 1000, 262144])
def test_greedy_kernel_matches_torch_max_on_ties_nans_and_infinities(vocab):
    """sampling.greedy's one-pass kernel (ops.argmax_rows) gives torch.max(dim)'s index: the first
    maximum on ties, the first NaN where there is one, 0 for an all -inf row; 1-D or batched (a
    262k row is split over the threads: ties and NaNs across the split)."""
    from gemma3.inference.sampling import greedy

    g = torch.Generator().manual_seed(vocab)
    rows = [torch.randn(vocab, generator=g), torch.randint(-2, 2, (vocab,), generator=g).float(),
            torch.full((vocab,), float("-inf"))]
    with_nan = torch.randn(vocab, generator=g)
    with_nan[vocab // 2] = with_nan[-1] = float("nan")
    rows.append(with_nan)
    late = torch.full((vocab,), float("-inf"))  # the kernel scans a long row in slices, one per thread:
    late[-1] = 0.0  # a maximum only in the last one
    rows.append(late)
    batch = torch.stack(rows)
    assert torch.equal(greedy(batch), batch.max(-1).indices)
    for row in rows:
        assert int(greedy(row)) == int(row.max(-1).indices)


def test_top_k_1_is_greedy_even_when_hot():
    logits = torch.randn(100)
    params = SamplingParams(temperature=5.0, top_k=1, seed=0)
    g = params.generator()
    assert {sample(logits, params, g) for _ in range(20)} == {int(logits.argmax())}


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = filter_logits(probs.log(), SamplingParams(temperature=1.0, top_p=0.8)).isfinite()
    assert kept.tolist() == [True, True, False, False]
    kept = filter_logits(probs.log(), SamplingParams(temperature=1.0, top_p=0.81)).isfinite()
    assert kept.tolist() == [True, True, True, False]


def test_min_p_is_relative_to_the_best_token():
    probs = torch.tensor([0.6, 0.3, 0.07, 0.03])
    kept = filter_logits(probs.log(), SamplingParams(temperature=1.0, min_p=0.1)).isfinite()
    assert kept.tolist() == [True, True, True, False]


def test_sampling_follows_the_distribution_and_seed():
    probs = torch.tensor([0.5, 0.3, 0.2])
    params = SamplingParams(temperature=1.0, seed=123)
    draws = [sample(probs.log(), params, g) for g in [params.generator()] for _ in range(4000)]
    freq = torch.bincount(torch.tensor(draws), minlength=3).float() / len(draws)
    assert (freq - probs).abs().max() < 0.03
    again = [sample(probs.log(), params, g) for g in [params.generator()] for _ in range(4000)]
    assert draws == again


def test_draw_never_picks_a_filtered_token_and_matches_frequencies():
    # Zeros between, before and after the mass (what top-k / top-p leave behind), and a tail of
    # zeros so that a u rounded up to the total must fall back to the last id with mass.
    probs = torch.zeros(1000)
    probs[[3, 500, 501, 998]] = torch.tensor([0.1, 0.45, 0.05, 0.4])
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([draw(probs, g) for _ in range(6000)])
    assert set(draws.tolist()) <= {3, 500, 501, 998}
    freq = torch.bincount(draws, minlength=1000).float() / len(draws)
    assert (freq - probs).abs().max() < 0.02
    assert draw(torch.tensor([0.0, 1.0, 0.0]), g) == 1


def test_draw_rows_samples_each_row_from_its_own_distribution():
    # What RL rollouts sample with: one uniform per row, each row its own distribution (with
    # zero-mass ids), frequencies within 0.02 over 6000 draws of each row.
    rows = torch.tensor([[0.0, 0.7, 0.0, 0.3, 0.0], [0.25, 0.25, 0.25, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    draws = draw_rows(rows.repeat(6000, 1), g).view(6000, 3)
    for r in range(3):
        freq = torch.bincount(draws[:, r], minlength=5).float() / 6000
        assert ((freq > 0) <= (rows[r] > 0)).all() and (freq - rows[r]).abs().max() < 0.02


def test_repetition_penalty_like_llama_cpp():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_invalid_params_are_rejected():
    for bad in [dict(temperature=-1), dict(temperature=float("nan")), dict(temperature=float("inf")), dict(top_p=0),
                dict(top_p=float("nan")), dict(min_p=2), dict(min_p=float("nan")), dict(top_k=-1),
                dict(repetition_penalty=0)]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def allowed_tokens(logits: torch.Tensor, params: SamplingParams) -> set[int]:
    """The tokens a sampler could return, from the definition in float64: the argmax (and its
    ties) below MIN_TEMPERATURE, else the support of the tempered distribution after top-k, top-p
    and min-p, every token whose probability reaches the last one kept (ties at the cut count as kept)."""
    z = logits.double()
    if params.greedy:
        return set(torch.nonzero(z == z.max()).flatten().tolist())
    p = (z / params.temperature - (z / params.temperature).max()).softmax(-1)
    keep = p > 0
    if params.top_k:
        keep &= p >= torch.topk(p, params.top_k).values[-1]
    if params.top_p < 1.0:
        ps = torch.sort(p * keep, descending=True).values
        last = max(1, int(((ps.cumsum(-1) - ps) < params.top_p).sum()))
        keep &= p >= ps[last - 1] * (1 - 1e-4)
    if params.min_p > 0.0:
        q = p * keep / (p * keep).sum()
        keep &= q >= params.min_p * q.max() * (1 - 1e-4)
    keep[p.argmax()] = True  # the best token is always a candidate
    return set(torch.nonzero(keep).flatten().tolist())


@pytest.mark.parametrize("temperature", [0.0, 1e-45, 1e-300, 1e-30, 1e-6, 1e-5, 0.7, 1.0, 1e4, 1e30, 1e300])
@pytest.mark.parametrize("top_p, min_p, top_k", [(1.0, 0.0, 0), (1e-300, 0.0, 0), (1e-45, 0.0, 0), (0.5, 0.0, 0),
                                                (1.0, 1e-300, 0), (1.0, 1e-45, 0), (1.0, 0.5, 0), (1.0, 1.0, 0),
                                                (0.9, 0.05, 40)])
def test_extreme_sampling_values_only_give_tokens_the_distribution_allows(temperature, top_p, min_p, top_k):
    """Denormal, tiny and huge temperatures, top_p and min_p: every token drawn is one that greedy
    decoding or the well-defined tempered distribution could give (1e-45 used to give garbage)."""
    logits = torch.randn(500, generator=torch.Generator().manual_seed(0)) * 4
    params = SamplingParams(temperature=temperature, top_p=top_p, min_p=min_p, top_k=top_k)
    allowed = allowed_tokens(logits, params)
    drawn = {sample(logits, params, torch.Generator().manual_seed(seed)) for seed in range(30)}
    assert drawn <= allowed, (sorted(drawn - allowed), len(allowed))
    if params.greedy:
        assert drawn == {int(logits.argmax())}


def _ids(tok, text):
    return tok.encode(text, add_bos=False)


def test_stops_at_end_of_turn_without_emitting_it(tok):
    script = _ids(tok, "Hello there") + [tok.end_of_turn_id] + _ids(tok, " never")
    chunks = list(stream_generate(ScriptedModel(script, tok.vocab_size), tok, "hi", 50))
    assert "".join(c.text for c in chunks) == "Hello there"
    assert chunks[-1].finish_reason == "stop" and chunks[-1].completion_tokens == 3  # the stop token counts as generated


def test_stop_string_cuts_before_it_even_across_tokens(tok):
    script = _ids(tok, "alpha beta STOP gamma")
    text = generate(ScriptedModel(script, tok.vocab_size), tok, "x", 50, stop=["ST" + "OP"])
    assert text == "alpha beta "


def test_pending_stop_prefix_is_released_when_it_does_not_match(tok):
    script = _ids(tok, "one STO two") + [tok.eos_id]
    chunks = list(stream_generate(ScriptedModel(script, tok.vocab_size), tok, "x", 50, stop=["STOP"]))
    assert "".join(c.text for c in chunks) == "one STO two"


def test_length_limit_and_utf8_streaming(tok):
    script = _ids(tok, "日本語のテキスト 🎉🎉 done")
    chunks = list(stream_generate(ScriptedModel(script, tok.vocab_size), tok, "x", len(script)))
    assert "".join(c.text for c in chunks) == "日本語のテキスト 🎉🎉 done"
    assert chunks[-1].finish_reason == "length"
    assert all("\ufffd" not in c.text for c in chunks)
