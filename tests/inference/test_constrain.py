"""Lazy masking (constrain.sample_lazily) on a byte tokenizer: greedy picks exactly the eager mask's
tokens, temperature sampling draws from the masked distribution (a chi-square test against the
exact masked probabilities), a seed reproduces its tokens, and filters that cut by the whole
distribution keep the eager mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemma3.inference.constrain import Constraint, Guide, allowed_ids, lazy_exact, sample_guided, sample_lazily
from gemma3.inference.sampling import SamplingParams, sample
from tests.helpers.training import byte_tokenizer

TOK = byte_tokenizer()
LETTERS = [TOK.token_to_id(f"<0x{ord(c):02X}>") for c in "abcde"]


def eager(guide: Guide, logits: torch.Tensor, params: SamplingParams, generator) -> int:
    return sample(guide.apply(logits, guide.mask()), params, generator, [])


def test_greedy_lazy_equals_the_eager_mask():
    torch.manual_seed(0)
    params = SamplingParams()
    lazy_guide, eager_guide = (Guide(TOK, Constraint("regex", "[a-e]{2}x[0-9]+")) for _ in range(2))
    refused = 0
    for step in range(12):
        logits = torch.randn(TOK.vocab_size)
        if step % 2:  # the unmasked argmax allowed as often as not
            logits[LETTERS[step % 5]] += 10
        token = sample_lazily([lazy_guide], [logits], [params], [None], [[]], TOK.vocab_size)[0]
        refused += not lazy_guide.allows(int(logits.argmax()))
        assert token == eager(eager_guide, logits, params, None)
        lazy_guide.advance(token)
        eager_guide.advance(token)
    assert 0 < refused < 12  # both paths taken


def test_temperature_sampling_draws_from_the_masked_distribution():
    # Five allowed letters holding about half the unmasked mass: half the draws are refused and
    # drawn again from the masked logits.
    logits = torch.full((TOK.vocab_size,), -30.0)
    logits[LETTERS] = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    logits[TOK.token_to_id("<0x7A>")] = 2.2  # "z": refused, ~half the unmasked mass
    params = SamplingParams(temperature=1.0, seed=7)
    guide = Guide(TOK, Constraint("regex", "[a-e]"))
    generator = params.generator()
    n = 6000
    counts = torch.zeros(TOK.vocab_size)
    for _ in range(n):
        counts[sample_lazily([guide], [logits], [params], [generator], [[]], TOK.vocab_size)[0]] += 1
    assert counts.sum() == counts[LETTERS].sum()  # nothing outside the grammar
    expected = torch.softmax(logits[LETTERS], -1) * n
    chi2 = float(((counts[LETTERS] - expected) ** 2 / expected).sum())
    assert chi2 < 18.47  # 4 degrees of freedom, p = 0.001
    # The bound tells a wrong redraw apart: taking the masked argmax for a refused draw would
    # expect these counts, hundreds over the bound.
    unmasked = torch.softmax(logits, -1)[LETTERS]
    assert 0.4 < unmasked.sum() < 0.6
    argmax_redraw = unmasked * n + (1 - unmasked.sum()) * n * torch.tensor([1.0, 0, 0, 0, 0])
    assert float(((argmax_redraw - expected) ** 2 / expected).sum()) > 100


def test_a_seed_reproduces_its_tokens():
    logits = torch.randn(20, TOK.vocab_size, generator=torch.Generator().manual_seed(1))
    runs = []
    for _ in range(2):
        params = SamplingParams(temperature=0.9, seed=3)
        guide, generator, out = Guide(TOK, Constraint("regex", "[a-e0-9]{20}")), params.generator(), []
        for row in logits:
            out.append(sample_guided(guide, row, params, generator, []))
            guide.advance(out[-1])
        runs.append(out)
    assert runs[0] == runs[1]


@pytest.mark.parametrize("params,lazy", [
    (SamplingParams(), True), (SamplingParams(temperature=0.7, repetition_penalty=1.2), True),
    (SamplingParams(temperature=0.7, top_k=5), False), (SamplingParams(temperature=0.7, top_p=0.9), False),
    (SamplingParams(temperature=0.7, min_p=0.1), False), (SamplingParams(top_k=5), True),
])
def test_filters_over_the_whole_distribution_keep_the_eager_mask(params, lazy):
    assert lazy_exact(params) is lazy


def test_top_k_samples_from_the_masked_top_k():
    # The unmasked top 2 are refused: masked first, top_k=2 keeps the best two allowed letters;
    # cutting before masking would leave nothing allowed to draw.
    logits = torch.full((TOK.vocab_size,), -5.0)
    logits[[TOK.token_to_id("<0x79>"), TOK.token_to_id("<0x7A>")]] = 10.0
    logits[LETTERS] = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    params = SamplingParams(temperature=1.0, top_k=2, seed=0)
    guide, generator = Guide(TOK, Constraint("regex", "[a-e]")), params.generator()
    drawn = {sample_guided(guide, logits, params, generator, []) for _ in range(200)}
    assert drawn == set(LETTERS[:2])


def test_allowed_ids_read_the_bitmask():
    rng = np.random.default_rng(0)
    for density in (0.001, 0.5):
        mask = np.packbits(rng.random(320) < density, bitorder="little").view(np.int32)
        expected = np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")[:300])
        assert allowed_ids(mask, 300).tolist() == expected.tolist()
