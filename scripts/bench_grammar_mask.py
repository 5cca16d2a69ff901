"""Per-token mask cost of the constrained-decoding libraries on Gemma 3's 262k vocabulary:

    PYTHONPATH=src python scripts/bench_grammar_mask.py [--rounds 2]

Each library that imports (xgrammar, llguidance, outlines-core) gets its tokenizer info built
from our tokenizer (the embedded 270M GGUF's vocabulary: every token's bytes, control tokens as
specials, <eos> and <end_of_turn> as stops), compiles a JSON schema with nested objects, enums,
integer and array bounds, then walks a valid document token by token: at each step it fills the
262k-entry allowed-token mask (what a decode step would wait for) and advances with the next
token. Reported: tokenizer-info build and schema compile times, and the mask time per token
(mean, median, p99). Libraries that are not installed are listed as such."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from gemma3.inference.load import load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "role": "admin", "address": {"city": "London", "zip": "10001"},
            "tags": ["math", "engines"]}


def vocabulary(tok):
    """(bytes per token, control ids, stop ids) of our tokenizer."""
    special = set(tok.special_ids)
    return ([tok.token_bytes(i, skip_special=False) if i in special else tok.token_bytes(i)
             for i in range(tok.vocab_size)], special, [tok.eos_id, tok.end_of_turn_id])


def bench_xgrammar(tok, tokens, steps):
    import torch
    import xgrammar as xgr

    data, special, stops = vocabulary(tok)
    start = time.perf_counter()
    info = xgr.TokenizerInfo([b"" if i in special else d for i, d in enumerate(data)], xgr.VocabType.RAW,
                             vocab_size=tok.vocab_size, stop_token_ids=stops)
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    built = time.perf_counter() - start
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - start
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, tok.vocab_size)
    times = []
    for t in tokens:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        times.append(time.perf_counter() - start)
        assert _allowed(mask.numpy()[0], t), f"xgrammar refused token {t}"
        assert matcher.accept_token(t)
    del torch
    return built, compile_s, times


def bench_llguidance(tok, tokens, steps):
    import llguidance
    import llguidance.numpy as llnp

    data, special, stops = vocabulary(tok)

    class Wrapper:
        eos_token_id, bos_token_id = stops[0], tok.bos_id
        # llguidance's convention: a special token is 0xFF followed by its name.
        tokens = [b"\xff" + d if i in special else d for i, d in enumerate(data)]
        special_token_ids = sorted(special)

        def __call__(self, text):
            return tok.encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text, add_bos=False)

    start = time.perf_counter()
    lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapper()), eos_token=stops)
    built = time.perf_counter() - start
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    matcher = llguidance.LLMatcher(lltok, grammar)
    assert not matcher.is_error(), matcher.get_error()
    compile_s = time.perf_counter() - start
    mask = llnp.allocate_token_bitmask(1, lltok.vocab_size)
    times = []
    for t in tokens:
        start = time.perf_counter()
        llnp.fill_next_token_bitmask(matcher, mask)
        times.append(time.perf_counter() - start)
        assert _allowed(mask[0], t), f"llguidance refused token {t}"
        assert matcher.consume_token(t), matcher.get_error()
    return built, compile_s, times


def bench_outlines(tok, tokens, steps):
    import outlines_core as oc
    from outlines_core.json_schema import build_regex_from_schema

    data, special, stops = vocabulary(tok)
    start = time.perf_counter()
    table: dict[bytes, list[int]] = {}
    for i, d in enumerate(data):
        if i not in special and d:
            table.setdefault(d, []).append(i)
    vocab = oc.Vocabulary(stops[0], table)
    built = time.perf_counter() - start
    start = time.perf_counter()
    index = oc.Index(build_regex_from_schema(json.dumps(SCHEMA)), vocab)
    compile_s = time.perf_counter() - start
    guide = oc.Guide(index)
    mask = np.zeros((tok.vocab_size + 31) // 32, dtype=np.int32)
    times = []
    for t in tokens:
        start = time.perf_counter()
        guide.write_mask_into(mask.ctypes.data, mask.size, mask.itemsize)
        times.append(time.perf_counter() - start)
        assert _allowed(mask, t), f"outlines-core refused token {t}"
        guide.advance(t)
    return built, compile_s, times


def _allowed(mask: np.ndarray, token: int) -> bool:
    return bool((int(mask[token // 32]) >> (token % 32)) & 1)


LIBRARIES = {"xgrammar": bench_xgrammar, "llguidance": bench_llguidance, "outlines-core": bench_outlines}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model whose tokenizer to use (default: the embedded 270M)")
    ap.add_argument("--rounds", type=int, default=2, help="how many times to run each library")
    ap.add_argument("--only", choices=sorted(LIBRARIES), action="append", help="bench only these libraries")
    args = ap.parse_args()
    tok = load_tokenizer(args.model)
    tokens = tok.encode(json.dumps(DOCUMENT), add_bos=False)
    print(f"vocabulary {tok.vocab_size} tokens; document {len(tokens)} tokens")
    for name in args.only or LIBRARIES:
        for r in range(args.rounds):
            try:
                built, compile_s, times = LIBRARIES[name](tok, tokens, len(tokens))
            except ImportError as e:
                print(f"{name}: not installed ({e})")
                break
            ms = sorted(1e3 * t for t in times)
            print(f"{name} round {r + 1}: tokenizer info {built:.2f} s, compile {compile_s * 1e3:.0f} ms, mask per "
                  f"token mean {statistics.mean(ms):.3f} ms, median {statistics.median(ms):.3f} ms, "
                  f"p99 {ms[int(0.99 * (len(ms) - 1))]:.3f} ms, max {ms[-1]:.3f} ms")


if __name__ == "__main__":
    main()
