"""Training data: files → documents (token ids + loss mask) → one packed token stream cut into
fixed-length sequences → a deterministic, resumable order of global batches.

Formats, chosen by file suffix:
- `.jsonl` lines holding "text": a plain document; every token is a target;
- `.jsonl` lines holding "messages": a conversation rendered with the Gemma 3 chat template; only
  the model turns (the reply tokens and their `<end_of_turn>`) are targets (SFT);
- any other file: UTF-8 text, one document.
A directory stands for its *.txt, *.md and *.jsonl files, sorted by name.

Text documents are `<bos> text <eos>`. Packing concatenates all documents; sequence i holds stream
tokens [i·L, i·L + L] (L + 1 tokens: L inputs, L shifted targets), so consecutive sequences
overlap by one token and every stream token after the first is a target exactly once. Documents
attend to the documents packed before them in a sequence (no per-document masks), as in
GPT-style pre-training; a BOS is never a target.

The order of sequences is epoch after epoch of `permutation(seed, epoch)`; global batch `step`
is positions [step·B, (step+1)·B) of that order. The data position is therefore a function of
the step alone, which is what makes resuming exact and independent of the number of ranks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..formats.tokenizer import Tokenizer, apply_chat_template

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


class DataError(ValueError):
    """Training data that cannot be used (missing file, bad JSONL line, too few tokens)."""


@dataclass
class Document:
    ids: np.ndarray  # int32 [n]
    mask: np.ndarray  # bool [n]: token i is a target (predicted from tokens < i)


def text_document(tok: Tokenizer, text: str) -> Document:
    ids = [tok.bos_id] + tok.encode(text, add_bos=False) + [tok.eos_id]
    mask = np.ones(len(ids), dtype=bool)
    mask[0] = False
    return Document(np.asarray(ids, dtype=np.int32), mask)


def chat_document(tok: Tokenizer, messages: list[dict]) -> Document:
    """Tokens of the rendered conversation; targets are the model turns' replies + <end_of_turn>.

    The template is encoded piece by piece at turn boundaries. Every boundary touches a special
    token (<bos>, <start_of_turn>, <end_of_turn>) or the "\\n" that Gemma's vocabulary always
    splits out, so the pieces' ids concatenate to exactly the ids of the whole string
    (tests/train/test_train.py checks this).
    """
    full = apply_chat_template(messages, add_generation_prompt=False)
    ids, mask, pos = [], [], 0
    marker = "<start_of_turn>model\n"
    while True:
        start = full.find(marker, pos)
        if start < 0:
            break
        head = full[pos:start + len(marker)]
        end = full.index("<end_of_turn>", start) + len("<end_of_turn>")
        for piece, target in ((head, False), (full[start + len(marker):end], True)):
            piece_ids = tok.encode(piece, add_bos=False, parse_special=True)
            ids += piece_ids
            mask += [target] * len(piece_ids)
        pos = end
    tail = tok.encode(full[pos:], add_bos=False, parse_special=True)
    ids += tail
    mask += [False] * len(tail)
    return Document(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool))


def data_files(paths) -> list[Path]:
    files = []
    for p in map(Path, [paths] if isinstance(paths, (str, Path)) else paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES and f.is_file())
            if not found:
                raise DataError(f"{p}: no {', '.join(TEXT_SUFFIXES)} files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    return files


def read_documents(paths, tok: Tokenizer) -> list[Document]:
    docs = []
    for path in data_files(paths):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
        if path.suffix != ".jsonl":
            docs.append(text_document(tok, text))
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            if isinstance(record, dict) and isinstance(record.get("messages"), list):
                try:
                    docs.append(chat_document(tok, record["messages"]))
                except (KeyError, TypeError, ValueError) as e:
                    raise DataError(f"{path}:{n}: bad conversation ({e})") from None
            elif isinstance(record, dict) and isinstance(record.get("text"), str):
                docs.append(text_document(tok, record["text"]))
            else:
                raise DataError(f"{path}:{n}: expected an object with \"text\" or \"messages\"")
    return docs


class PackedDataset:
    """Documents packed into `n` sequences of `seq_len` inputs (+1 shifted target token)."""

    def __init__(self, docs: list[Document], seq_len: int):
        if not docs:
            raise DataError("no documents")
        self.tokens = np.concatenate([d.ids for d in docs])
        self.mask = np.concatenate([d.mask for d in docs])
        self.seq_len = seq_len
        self.n = (len(self.tokens) - 1) // seq_len
        if self.n < 1:
            raise DataError(f"data has {len(self.tokens)} tokens, fewer than one sequence of --seq-len {seq_len} + 1")
        if not self.mask[1:self.n * seq_len + 1].any():
            raise DataError("data has no target tokens (a chat file without model turns?)")

    @classmethod
    def from_files(cls, paths, tok: Tokenizer, seq_len: int) -> "PackedDataset":
        return cls(read_documents(paths, tok), seq_len)

    def __len__(self):
        return self.n

    @property
    def fingerprint(self) -> str:
        """Identifies the packed sequences: a checkpoint or a target store made for other data is refused."""
        h = hashlib.sha256(str(self.seq_len).encode())
        h.update(self.tokens[:self.n * self.seq_len + 1].tobytes())
        h.update(self.mask[:self.n * self.seq_len + 1].tobytes())
        return h.hexdigest()[:16]

    def sequences(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs [b, L] long, targets [b, L] long, target mask [b, L] bool) for sequence indices."""
        L = self.seq_len
        rows = np.asarray(indices, dtype=np.int64)[:, None] * L + np.arange(L + 1)
        tokens = torch.from_numpy(self.tokens[rows].astype(np.int64))
        mask = torch.from_numpy(self.mask[rows[:, 1:]])
        return tokens[:, :-1], tokens[:, 1:], mask

    def target_count(self, indices) -> int:
        rows = np.asarray(indices, dtype=np.int64)[:, None] * self.seq_len + np.arange(1, self.seq_len + 1)
        return int(self.mask[rows].sum())


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Sequence indices of global batch `step`: positions [step·B, (step+1)·B) of the epoch-by-epoch
    shuffled order (epoch e is permutation(seed, e))."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    return np.array([_permutation(n, seed, int(p // n))[p % n] for p in positions], dtype=np.int64)
