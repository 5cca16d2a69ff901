"""The compiled tokenizer loops (cpu kernels' SpmVocab and TextSet) give exactly the ids of the
Python loops they replace, on the real vocabulary: corpus text, random Unicode, special-token
texts mixed in, with and without parse_special."""

from __future__ import annotations

import json
import random

import pytest

from gemma3 import cpu
from gemma3.formats.gguf import read_gguf
from gemma3.formats.tokenizer import Tokenizer
from gemma3.inference.load import embedded_gguf_path
from tests.helpers import DATA


@pytest.fixture(scope="module")
def pair():
    if not cpu.available():
        pytest.skip("the C++ kernels do not build on this machine (no AVX2/AVX-512 or no compiler)")
    metadata = read_gguf(embedded_gguf_path()).metadata
    python, native = (Tokenizer.from_gguf_metadata(metadata) for _ in range(2))
    assert cpu.accelerate_tokenizer(native)
    return python, native


def _texts(python) -> list[str]:
    rng = random.Random(0)
    specials = ["<start_of_turn>", "<end_of_turn>", "<bos>", "<table>", "\n\n", "  ", "\t\t", "<unused3>"]
    pools = [(32, 127), (0xA0, 0x800), (0x4E00, 0x9FFF), (0x1F300, 0x1F6FF), (0x2581, 0x2582), (0, 32)]
    texts = [(DATA / "tokenizer_corpus.txt").read_text(), (DATA / "gpl-3.0.txt").read_text()[:20000]]
    for _ in range(400):
        parts = []
        for _ in range(rng.randrange(1, 30)):
            if rng.random() < 0.15:
                parts.append(rng.choice(specials))
            else:
                lo, hi = rng.choice(pools)
                parts.append("".join(chr(rng.randrange(lo, hi)) for _ in range(rng.randrange(1, 6))))
        texts.append("".join(parts))
    return texts


def test_native_loops_equal_the_python_loops(pair):
    python, native = pair
    for text in _texts(python):
        for special in (False, True):
            assert native.encode(text, parse_special=special) == python.encode(text, parse_special=special), text


def test_native_loops_match_llama_cpp_golden_ids(pair):
    _, native = pair
    with open(DATA / "tokenizer_golden.jsonl", encoding="utf-8") as f:
        for row in map(json.loads, f):
            assert native.encode(row["text"], parse_special=row["parse_special"]) == row["ids"], row["text"]


def test_lone_surrogates_are_a_value_error_on_both_paths(pair):
    for tok in pair:
        with pytest.raises(ValueError, match="lone surrogate U\\+D800 at character 1"):
            tok.encode("a\ud800b <start_of_turn>", parse_special=True)


def test_native_index_finds_every_piece(pair):
    """After accelerate_tokenizer, lookups by text go to SpmVocab's hash table (the Python hash
    arrays are dropped): the same id for every piece, the last one for a duplicate."""
    python, native = pair
    ids = {python.id_to_token(i): i for i in range(python.vocab_size)}
    assert [native.token_to_id(text) for text in ids] == list(ids.values())
    assert all(native.id_to_token(i) == python.id_to_token(i) for i in range(0, native.vocab_size, 997))
    with pytest.raises(KeyError):
        native.token_to_id("no such token")
