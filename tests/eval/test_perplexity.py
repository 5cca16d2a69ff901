"""Perplexity: the llama-perplexity indexing, the sliding-window mode, and input errors."""

import math

import pytest
import torch

from gemma3.eval.perplexity import EvalInputError, perplexity, read_text
from gemma3.inference.load import load_tokenizer
from tests.helpers.models import random_model, tiny_config

TEXT = "The quick brown fox jumps over the lazy dog. " * 40 + "Pack my box with five dozen liquor jugs. " * 30


@pytest.fixture(scope="module")
def setup():
    tok = load_tokenizer()
    model = random_model(tiny_config(vocab=tok.vocab_size, hidden=32, window=8))
    return model, tok


def _nll(model, ids, positions):
    """Brute force: one full forward, NLL of ids[p + 1] given the logits at p, for each p."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    return sum(-logp[p, ids[p + 1]].item() for p in positions)


def test_llama_cpp_method_indexing(setup):
    model, tok = setup
    ctx = 32
    tokens = tok.encode(TEXT, add_bos=True)
    result = perplexity(model, tok, TEXT, ctx=ctx, progress=False)
    n_chunks = len(tokens) // ctx
    expected, count = 0.0, 0
    for i in range(n_chunks):
        ids = [tok.bos_id] + tokens[i * ctx + 1:(i + 1) * ctx]  # first token replaced by BOS
        expected += _nll(model, ids, range(ctx // 2, ctx - 1))
        count += ctx - 1 - ctx // 2
    assert result.tokens == count and len(result.chunks) == n_chunks
    assert result.nll == pytest.approx(expected / count, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(expected / count), rel=1e-5)


def test_sliding_window_scores_every_token_once(setup):
    model, tok = setup
    tokens = tok.encode(TEXT, add_bos=True)
    result = perplexity(model, tok, TEXT, ctx=40, stride=16, progress=False)
    assert result.tokens == len(tokens) - 1
    positions = range(len(tokens) - 1)
    assert result.nll * result.tokens == pytest.approx(_windowed_nll(model, tokens, 40, 16), rel=1e-5)
    short = perplexity(model, tok, TEXT, ctx=40, stride=39, progress=False)  # 1 token of overlap
    assert short.tokens == len(positions) and short.ppl != result.ppl


def _windowed_nll(model, tokens, ctx, stride):
    total, last = 0.0, 0
    while last < len(tokens) - 1:
        end = min(last + stride, len(tokens) - 1)
        start = max(0, end - ctx + 1)
        total += _nll(model, tokens[start:end + 1], range(last - start, end - start))
        last = end
    return total


def test_errors_name_the_problem(setup, tmp_path):
    model, tok = setup
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(EvalInputError, match="empty"):
        read_text(tmp_path / "empty.txt")
    with pytest.raises(EvalInputError, match="not UTF-8"):
        read_text(tmp_path / "latin1.txt")
    with pytest.raises(EvalInputError, match="cannot read"):
        read_text(tmp_path / "missing.txt")
    with pytest.raises(EvalInputError, match="fewer than one chunk"):
        perplexity(model, tok, "short text", ctx=512, progress=False)
    with pytest.raises(EvalInputError, match="--stride"):
        perplexity(model, tok, TEXT, ctx=32, stride=32, progress=False)
