"""Gemma 3 tokenizer: a pure-Python port of llama.cpp's SPM ("llama") tokenizer.

`Tokenizer.encode` returns the same ids as llama.cpp's `llama_tokenize` on the same
GGUF vocabulary (checked against llama-cpp-python by tests/formats/test_tokenizer.py). The
pipeline mirrors `llama_vocab::impl::tokenize` for LLAMA_VOCAB_TYPE_SPM:

1. `tokenizer_st_partition` splits the text on special-token texts, longest first;
2. each remaining raw-text fragment has its spaces escaped to U+2581
   (`llama_escape_whitespace`) and goes through `llm_tokenizer_spm_session`: split
   into characters, repeatedly merge the adjacent pair whose concatenation is the
   vocabulary piece with the highest score (ties: leftmost), then emit the piece ids,
   falling back to `<0xXX>` byte tokens for characters missing from the vocabulary.

Known, deliberate limits:
- text containing a literal U+2581 ("▁") encodes exactly like a space, so it decodes
  back to a space (llama.cpp and SentencePiece behave the same);
- token attributes are taken from the token types plus the one text-based override
  that matters for SPM vocabularies (end-of-generation texts such as "</s>" become
  CONTROL, see `_EOG_TEXTS`); llama.cpp's other per-model overrides (FIM tokens,
  LSTRIP/RSTRIP for phi-3/jina/modern-bert, Gemma 4's normal "</s>") concern other
  model families.
"""

from __future__ import annotations

import codecs
import functools
import heapq
import json
import operator
import struct
from array import array
from pathlib import Path

import numpy as np

# GGUF token types (gguf.TokenType); SentencePiece's piece types use the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPACE_MARK = "\u2581"  # "▁", SentencePiece's visible space
_SPACE_MARK_UTF8 = SPACE_MARK.encode()  # E2 96 81: in valid UTF-8 these bytes are this character only

# llama_vocab::impl::load marks every token whose text is a known end-of-generation
# marker as CONTROL ("control-looking token ... its type will be overridden"). In the
# Gemma 3 vocabulary this turns the user-defined "</s>" (id 212) into a control token:
# it is then only split out of text when parse_special=True, and decode drops it.
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>",
    "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>",
    "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>",
    "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
})

# Fragments repeat a lot (chat turns, code indentation); memoising the SPM session
# per fragment is exact because the session depends only on the fragment text.
_SPM_CACHE_SIZE = 1 << 16
_SPM_CACHED_CHARS = 1024


class _SpecialTokens:
    """Special tokens in the order `tokenizer_st_partition` tries them.

    llama.cpp keeps `cache_special_tokens` sorted by text length in bytes, longest
    first. Its std::sort leaves equal lengths in no defined order; that only matters
    when two equal-length texts can overlap, which no Gemma special token does, so
    ties are broken by id here.
    """

    def __init__(self, specials: list[tuple[str, int]]):
        ordered = sorted(specials, key=lambda s: (-len(s[0].encode()), s[1]))
        self._ordered = ordered
        self._scan = None  # a compiled `occurring` (Tokenizer.use_native)
        self._rank = {text: (rank, token_id) for rank, (text, token_id) in enumerate(ordered)}
        lengths: dict[str, set[int]] = {}
        for text, _ in ordered:
            lengths.setdefault(text[0], set()).add(len(text))
        self._lengths = {first: sorted(ls) for first, ls in lengths.items()}

    def occurring_in(self, text: str) -> list[tuple[str, int]]:
        """The special tokens whose text occurs in `text`, in partition order.

        Tokens absent from the whole text cannot occur in any of its fragments, so
        skipping them (instead of running 6,000+ searches per call) changes nothing.
        """
        if self._scan is not None:
            try:
                return [self._ordered[i] for i in self._scan(text)]
            except (UnicodeError, TypeError):  # a lone surrogate is not UTF-8: the Python scan takes it
                pass
        found = {}
        rank, lengths, n = self._rank, self._lengths, len(text)
        for i, ch in enumerate(text):
            for length in lengths.get(ch, ()):
                if i + length > n:
                    break
                hit = rank.get(text[i:i + length])
                if hit is not None:
                    found[text[i:i + length]] = hit
        return [(t, token_id) for t, (_, token_id) in sorted(found.items(), key=lambda kv: kv[1][0])]


class _Pieces:
    """The vocabulary's texts held once and compactly: their UTF-8 bytes back to back in one blob,
    an offsets array, and a sorted array of their hashes to find an id by text.

    A list of 262k Python strings and a dict from them to ids took ~40 MB resident on every load
    (the 270M's whole process is ~510 MB); this takes ~8 MB. Lookups by text cost a binary search
    (a few microseconds), which is what the few at load and `token_to_id` need; the pure-Python
    merge loop, which looks up every candidate pair, builds a dict on first use instead
    (`Tokenizer._piece_to_id`), so it stays as fast as it was where the kernels are unavailable.
    """

    def __init__(self, texts: list[str]):
        n = len(texts)
        # surrogatepass: a tokenizer.json may carry a lone surrogate (a "\ud800" escape); its
        # bytes are then those Python's own UTF-8 codec would write with that handler.
        encode = operator.methodcaller("encode", "utf-8", "surrogatepass")
        lengths = np.fromiter(map(len, map(encode, texts)), np.int64, n)
        self.blob = "".join(texts).encode("utf-8", "surrogatepass")
        self.offsets = array("q", bytes(8))
        self.offsets.frombytes(np.cumsum(lengths).tobytes())
        # hash(str) is per-process (PYTHONHASHSEED), so the index is rebuilt on every load, never saved.
        hashes = np.fromiter(map(hash, texts), np.int64, n)
        self._order = np.argsort(hashes, kind="stable").astype(np.int32)  # equal hashes: ascending ids
        self._hashes = hashes[self._order]
        self._id_of = None  # see use_index

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def raw(self, token_id: int) -> bytes:
        return self.blob[self.offsets[token_id]:self.offsets[token_id + 1]]

    def text(self, token_id: int) -> str:
        return self.raw(token_id).decode("utf-8", "surrogatepass")

    def texts(self) -> list[str]:
        return [self.text(i) for i in range(len(self))]

    def ids(self, text: str) -> list[int]:
        """Every id whose text is `text`, ascending."""
        h, raw = hash(text), text.encode("utf-8", "surrogatepass")
        i = int(np.searchsorted(self._hashes, h))
        found = []
        while i < len(self._hashes) and self._hashes[i] == h:
            token_id = int(self._order[i])
            if self.raw(token_id) == raw:
                found.append(token_id)
            i += 1
        return found

    def find(self, text: str) -> int | None:
        """The id of `text`; for a text held by several ids the last, as llama.cpp's token_to_id."""
        if self._id_of is not None:
            token_id = self._id_of(text.encode("utf-8", "surrogatepass"))
            return token_id if token_id >= 0 else None
        found = self.ids(text)
        return found[-1] if found else None

    def use_index(self, id_of) -> None:
        """Look texts up with `id_of(utf8) -> id or -1` (a compiled index of these same pieces, with
        find's answers) and drop the hash arrays. `ids` is then unavailable: the tokenizer only
        needs it while it is built."""
        self._id_of, self._hashes, self._order = id_of, None, None


class Tokenizer:
    """SentencePiece-BPE tokenizer with llama.cpp's exact encoding rules."""

    def __init__(
        self,
        tokens: list[str],
        scores: list[float],
        token_types: list[int],
        bos_id: int,
        eos_id: int,
        unk_id: int,
        pad_id: int,
        add_bos: bool = True,
        add_space_prefix: bool = False,
        chat_template: str | None = None,
    ):
        if not len(tokens) == len(scores) == len(token_types):
            raise ValueError("tokens, scores and token_types must have the same length")
        if "" in tokens:  # llama_vocab::impl::load renames empty texts: each gets its own key
            tokens = [text or f"[EMPTY_{i}]" for i, text in enumerate(tokens)]
        self._pieces = _Pieces(tokens)
        # Typed arrays, not lists of Python numbers: 10 MB less resident on every start.
        self._scores = array("d", scores)
        self._types = array("i", token_types)
        self._bos_id, self._eos_id, self._unk_id, self._pad_id = bos_id, eos_id, unk_id, pad_id
        self.add_bos = add_bos
        self.add_space_prefix = add_space_prefix
        # The Jinja template an instruction-tuned checkpoint ships (GGUF tokenizer.chat_template, HF
        # tokenizer_config.json / chat_template.jinja). Rendering uses apply_chat_template, Gemma 3's
        # own; the template only tells whether the checkpoint was tuned to chat (base models have none).
        self.chat_template = chat_template

        types = np.asarray(self._types)
        self._control_ids = frozenset(
            np.flatnonzero((types == CONTROL) | (types == UNKNOWN)).tolist()
            + [i for text in _EOG_TEXTS for i in self._pieces.ids(text)]
        )
        user_defined = [(self._pieces.text(i), i) for i in np.flatnonzero(types == USER_DEFINED).tolist()
                        if i not in self._control_ids]
        control = [(self._pieces.text(i), i) for i in self._control_ids]
        # tokenizer_st_partition: USER_DEFINED texts are always split out; CONTROL and
        # UNKNOWN ones only when parse_special is true.
        self._user_specials = _SpecialTokens(user_defined)
        self._all_specials = _SpecialTokens(user_defined + control)
        self._byte_ids = [self._byte_token(b) for b in range(256)]
        self._spm_cache: dict[str, tuple[int, ...]] = {}
        self._fast_spm = None  # see use_native

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_gguf_metadata(cls, metadata: dict) -> "Tokenizer":
        """Build from GGUF key/values (`tokenizer.ggml.*`, plain Python values)."""
        model = metadata.get("tokenizer.ggml.model", "llama")
        if model != "llama":
            raise ValueError(f"only SPM ('llama') vocabularies are supported, got {model!r}")
        tokens = list(metadata["tokenizer.ggml.tokens"])
        # Defaults are llama.cpp's for an SPM vocabulary without these keys.
        return cls(
            tokens=tokens,
            scores=metadata.get("tokenizer.ggml.scores", [0.0] * len(tokens)),
            token_types=metadata.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens)),
            bos_id=metadata.get("tokenizer.ggml.bos_token_id", 1),
            eos_id=metadata.get("tokenizer.ggml.eos_token_id", 2),
            unk_id=metadata.get("tokenizer.ggml.unknown_token_id", 0),
            pad_id=metadata.get("tokenizer.ggml.padding_token_id", -1),
            add_bos=metadata.get("tokenizer.ggml.add_bos_token", True),
            add_space_prefix=metadata.get("tokenizer.ggml.add_space_prefix", True),
            chat_template=metadata.get("tokenizer.chat_template"),
        )

    def to_gguf_metadata(self) -> dict:
        """The `tokenizer.ggml.*` keys that from_gguf_metadata reads back (for GGUF writers)."""
        md = {
            "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": self._pieces.texts(),
            "tokenizer.ggml.scores": list(self._scores), "tokenizer.ggml.token_type": list(self._types),
            "tokenizer.ggml.bos_token_id": self._bos_id, "tokenizer.ggml.eos_token_id": self._eos_id,
            "tokenizer.ggml.unknown_token_id": self._unk_id, "tokenizer.ggml.add_bos_token": self.add_bos,
            "tokenizer.ggml.add_space_prefix": self.add_space_prefix,
        }
        if self._pad_id >= 0:
            md["tokenizer.ggml.padding_token_id"] = self._pad_id
        if self.chat_template is not None:
            md["tokenizer.chat_template"] = self.chat_template
        return md

    @classmethod
    def from_sentencepiece_model(cls, path: str | Path) -> "Tokenizer":
        """Build from a SentencePiece `tokenizer.model` (a serialized ModelProto).

        Reads what llama.cpp's converter keeps: the pieces (text, score, type), the
        special ids of TrainerSpec and NormalizerSpec.add_dummy_prefix. Piece types
        already use the GGUF numbering.
        """
        proto = _parse_model_proto(Path(path).read_bytes())
        if proto["model_type"] != _SP_MODEL_BPE:
            raise ValueError("only BPE SentencePiece models are supported")
        return cls(
            tokens=proto["pieces"], scores=proto["scores"], token_types=proto["types"],
            bos_id=proto["bos_id"], eos_id=proto["eos_id"], unk_id=proto["unk_id"],
            pad_id=proto["pad_id"], add_bos=True, add_space_prefix=proto["add_dummy_prefix"],
        )

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> "Tokenizer":
        """Build from a Hugging Face `tokenizer.json` holding a byte-fallback BPE model.

        Scores are derived so that the SPM merge order equals the BPE merge order: a
        piece produced by merge number r (0 = applied first) gets score -r, keeping
        the best rank if several merges produce it. The SPM session merges the
        adjacent pair whose concatenation scores highest; BPE merges the adjacent
        pair of lowest rank. The two agree whenever merges are ordered by the piece
        they produce, which is how converters from SentencePiece (Gemma's
        tokenizer.json among them) write them. Pieces that no merge produces
        (single characters, byte tokens, added tokens) get a score below every
        merge, so they can only be formed last.

        Added tokens become CONTROL when "special" and USER_DEFINED otherwise;
        `<0xXX>` pieces become BYTE. Special ids and add_bos come from a
        tokenizer_config.json next to the file when present, else from the usual
        Gemma/Llama texts; add_space_prefix is true when the normalizer prepends "▁".
        """
        path = Path(path)
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data["model"]
        if model.get("type") != "BPE":
            raise ValueError("only BPE tokenizer.json models are supported")
        vocab: dict[str, int] = dict(model["vocab"])
        added = {t["content"]: t for t in data.get("added_tokens", [])}
        for text, tok in added.items():
            vocab[text] = tok["id"]
        size = max(vocab.values()) + 1
        tokens = [""] * size
        for text, i in vocab.items():
            tokens[i] = text

        merges = model.get("merges", [])
        unmerged = -float(len(merges) + 1)
        scores = [unmerged] * size
        for rank, merge in enumerate(merges):
            # Older files store "left right", newer ones [left, right].
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            merged = vocab.get(left + right)
            if merged is not None and scores[merged] == unmerged:
                scores[merged] = -float(rank)

        types = [NORMAL] * size
        if model.get("byte_fallback"):
            for text, i in vocab.items():
                if _is_byte_piece(text):
                    types[i] = BYTE
        for text, tok in added.items():
            types[tok["id"]] = CONTROL if tok.get("special") else USER_DEFINED
        if model.get("unk_token") in vocab:
            types[vocab[model["unk_token"]]] = UNKNOWN

        config_path = path.with_name("tokenizer_config.json")
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}

        def special_id(key: str, *fallbacks: str) -> int:
            for text in (_config_token(config.get(key)), *fallbacks):
                if text in vocab:
                    return vocab[text]
            return -1

        return cls(
            tokens=tokens, scores=scores, token_types=types,
            bos_id=special_id("bos_token", "<bos>", "<s>"),
            eos_id=special_id("eos_token", "<eos>", "</s>"),
            unk_id=special_id("unk_token", model.get("unk_token") or "<unk>"),
            pad_id=special_id("pad_token", "<pad>"),
            add_bos=config.get("add_bos_token", True),
            add_space_prefix=_prepends_space_mark(data.get("normalizer")),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load from a model directory, preferring tokenizer.model over tokenizer.json."""
        path = Path(path)
        if (path / "tokenizer.model").exists():
            tokenizer = cls.from_sentencepiece_model(path / "tokenizer.model")
        elif (path / "tokenizer.json").exists():
            tokenizer = cls.from_tokenizer_json(path / "tokenizer.json")
        else:
            raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {path}")
        tokenizer.chat_template = _dir_chat_template(path)
        return tokenizer

    def save(self, path: str | Path) -> Path:
        """Writes the vocabulary as a SentencePiece `tokenizer.model` into directory `path`;
        `from_dir` reads it back as an identical tokenizer (checkpoints carry one this way)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        out = path / "tokenizer.model"
        out.write_bytes(_encode_model_proto(self._pieces.texts(), self._scores, self._types, self._unk_id,
                                            self._bos_id, self._eos_id, self._pad_id, self.add_space_prefix))
        if self.chat_template is not None:
            (path / CHAT_TEMPLATE_FILE).write_text(self.chat_template, encoding="utf-8")
        return out

    # ------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def unk_id(self) -> int:
        return self._unk_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def special_ids(self) -> frozenset[int]:
        """Control/unknown tokens: never produced from text unless parse_special, dropped by decode."""
        return self._control_ids

    @property
    def start_of_turn_id(self) -> int:
        return self.token_to_id("<start_of_turn>")

    @property
    def end_of_turn_id(self) -> int:
        return self.token_to_id("<end_of_turn>")

    def token_to_id(self, text: str) -> int:
        """Id of the token whose text is exactly `text` (KeyError if there is none)."""
        token_id = self._pieces.find(text)
        if token_id is None:
            raise KeyError(f"no token with text {text!r}")
        return token_id

    def id_to_token(self, token_id: int) -> str:
        """The raw vocabulary text of a token ("▁" for spaces, "<0x0A>" for bytes)."""
        if not 0 <= token_id < len(self._pieces):
            raise IndexError(f"token id {token_id} is not in [0, {len(self._pieces)})")
        return self._pieces.text(token_id)

    @functools.cached_property
    def _piece_to_id(self) -> dict[str, int]:
        """Text -> id for the pure-Python merge loop (`_spm_session`), built on its first use: a
        loaded model whose kernels encode (`use_native`) never holds it. In id order, so a
        duplicated text maps to its last id, as llama.cpp's token_to_id."""
        return dict(zip(self._pieces.texts(), range(len(self._pieces))))

    # --------------------------------------------------------------- encoding

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = False) -> list[int]:
        """Token ids of `text`, identical to llama.cpp's llama_tokenize.

        add_bos: prepend BOS; None follows the vocabulary (tokenizer.ggml.add_bos_token).
        parse_special: also turn CONTROL token texts such as "<start_of_turn>" into
        their ids; USER_DEFINED texts ("\\n", runs of spaces, "<table>" ...) are
        always split out.
        """
        ids = []
        if self.add_bos if add_bos is None else add_bos:
            if self._bos_id < 0:
                raise ValueError("this vocabulary has no BOS token")
            ids.append(self._bos_id)
        if not text:
            return ids
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # JSON's "\ud800" escape can carry one
                raise ValueError(f"text is not valid Unicode: a lone surrogate U+{ord(text[e.start]):04X} at "
                                 f"character {e.start}") from None
        prev_special = True  # llama.cpp: "prefix with space if first token"
        for fragment in self._partition(text, parse_special):
            if isinstance(fragment, int):
                ids.append(fragment)
                prev_special = True
                continue
            if self.add_space_prefix and prev_special:
                fragment = " " + fragment
            ids.extend(self._spm(fragment.replace(" ", SPACE_MARK)))
            prev_special = False
        return ids

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """tokenizer_st_partition: split text into raw fragments (str) and special ids (int).

        For each special token in turn, every raw fragment is cut at the token's
        leftmost non-overlapping occurrences (str.split does the same scan as
        llama.cpp's repeated find from the end of the previous match); empty pieces
        are dropped.
        """
        specials = self._all_specials if parse_special else self._user_specials
        fragments: list[str | int] = [text]
        for special, token_id in specials.occurring_in(text):
            split: list[str | int] = []
            for fragment in fragments:
                if isinstance(fragment, int) or special not in fragment:
                    split.append(fragment)
                    continue
                for k, part in enumerate(fragment.split(special)):
                    if k:
                        split.append(token_id)
                    if part:
                        split.append(part)
            fragments = split
        return fragments

    def spm_tables(self) -> tuple[bytes, array, array, list[int]]:
        """What a compiled encoder needs: the pieces' UTF-8 bytes back to back, the offsets of
        piece i's bytes (i and i + 1: an int64 array one longer than the vocabulary), the scores
        (float64) and the byte-fallback id of each byte or -1."""
        return (self._pieces.blob, self._pieces.offsets, self._scores,
                [-1 if i is None else i for i in self._byte_ids])

    def use_native(self, encode, text_set, id_of) -> None:
        """Compiled versions of the two loops that cost time on long texts, with the same results
        (the CPU kernels' SpmVocab.encode and TextSet, which also release the GIL):
        `encode(escaped_fragment) -> ids` for the merges, and `text_set(texts).occurring(text) ->
        ascending indices of the texts found` for the special-token scan. Text they cannot take
        (a lone surrogate is not UTF-8) falls back to the Python loops. `id_of(utf8) -> id or -1`
        (the compiled vocabulary's hash table) replaces the Python one for lookups by text."""
        self._fast_spm = encode
        self._pieces.use_index(id_of)
        for specials in (self._user_specials, self._all_specials):
            specials._scan = text_set([t for t, _ in specials._ordered]).occurring

    def _spm(self, text: str) -> tuple[int, ...]:
        ids = self._spm_cache.get(text)
        if ids is None:
            if self._fast_spm is not None:
                try:
                    ids = tuple(self._fast_spm(text))
                except (UnicodeError, TypeError, RuntimeError):  # not UTF-8, or a byte without a token
                    pass
            if ids is None:
                ids = self._spm_session(text)
            if len(text) <= _SPM_CACHED_CHARS:  # a megabyte-long fragment is not worth keeping
                if len(self._spm_cache) >= _SPM_CACHE_SIZE:
                    self._spm_cache.clear()
                self._spm_cache[text] = ids
        return ids

    def _spm_session(self, text: str) -> tuple[int, ...]:
        """llm_tokenizer_spm_session::tokenize on one escaped fragment.

        Symbols are Python characters: for valid UTF-8 these are exactly the
        chunks llama.cpp cuts with unicode_len_utf8. Symbol i lives in symbols[i]
        (emptied once merged into its left neighbour) with links nxt/prv.
        """
        vocab, scores = self._piece_to_id, self._scores
        symbols = list(text)
        n = len(symbols)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))

        # Work queue entries: (-score, left, right, merged length). heapq pops the
        # highest score first and, on equal scores, the leftmost pair, like
        # llm_bigram_spm::comparator. Only one entry per left symbol can still be
        # valid, so the remaining tie-break fields never decide anything.
        queue = []
        for i in range(1, n):
            token_id = vocab.get(symbols[i - 1] + symbols[i])
            if token_id is not None:
                queue.append((-scores[token_id], i - 1, i, 2))
        heapq.heapify(queue)

        def try_add_bigram(left: int, right: int) -> None:
            merged = symbols[left] + symbols[right]
            token_id = vocab.get(merged)
            if token_id is not None:
                heapq.heappush(queue, (-scores[token_id], left, right, len(merged)))

        while queue:
            _, left, right, size = heapq.heappop(queue)
            a, b = symbols[left], symbols[right]
            # Skip entries made stale by an earlier merge of either symbol.
            if not a or not b or len(a) + len(b) != size:
                continue
            symbols[left], symbols[right] = a + b, ""
            after = nxt[left] = nxt[right]
            if after >= 0:
                prv[after] = left
            if prv[left] >= 0:
                try_add_bigram(prv[left], left)
            if after >= 0:
                try_add_bigram(left, after)

        # resegment(): every merged symbol is a vocabulary piece by construction (a
        # pair is only queued when its concatenation is one), so llama.cpp's
        # rev_merge lookup can only be reached by single characters, which it never
        # contains; those fall back to one <0xXX> token per UTF-8 byte.
        ids = []
        i = 0
        while i != -1:
            token_id = vocab.get(symbols[i])
            if token_id is not None:
                ids.append(token_id)
            else:
                ids.extend(self._byte_id(b) for b in symbols[i].encode("utf-8"))
            i = nxt[i]
        return tuple(ids)

    def _byte_token(self, byte: int) -> int | None:
        # llama_vocab::byte_to_token: "<0xXX>", else the byte itself as a piece.
        token_id = self._pieces.find(f"<0x{byte:02X}>")
        if token_id is None and byte < 0x80:
            token_id = self._pieces.find(chr(byte))
        return token_id

    def _byte_id(self, byte: int) -> int:
        token_id = self._byte_ids[byte]
        if token_id is None:
            raise ValueError(f"vocabulary has no byte-fallback token for 0x{byte:02X}")
        return token_id

    # --------------------------------------------------------------- decoding

    def token_bytes(self, token_id: int, skip_special: bool = True) -> bytes:
        """The bytes a token stands for (llama_vocab::impl::token_to_piece, SPM case)."""
        if not 0 <= token_id < len(self._pieces):  # a negative index would silently wrap around
            raise ValueError(f"token id {token_id} is not in [0, {len(self._pieces)})")
        piece = self._pieces.raw(token_id)  # UTF-8
        if token_id in self._control_ids:
            return b"" if skip_special else piece
        ttype = self._types[token_id]
        if ttype == NORMAL:
            return piece.replace(_SPACE_MARK_UTF8, b" ")
        if ttype == USER_DEFINED:
            return piece
        if ttype == BYTE:
            return bytes([int(piece[3:5], 16)])
        return b""  # UNUSED and undefined types render as nothing in llama.cpp

    def decode(self, ids, skip_special: bool = True) -> str:
        """Text of `ids`; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD.

        skip_special=False renders control tokens as their text ("<start_of_turn>").
        With add_space_prefix the space that encode prepended is removed again.
        """
        text = b"".join(self.token_bytes(i, skip_special) for i in ids).decode("utf-8", errors="replace")
        if self.add_space_prefix and text.startswith(" "):
            text = text[1:]
        return text


class StreamDecoder:
    """Incremental `Tokenizer.decode` for streaming generation.

    feed() returns only text that is complete: a UTF-8 sequence split across byte
    tokens is held back until its last byte arrives. The concatenation of all feed()
    results plus flush() equals `tokenizer.decode(all_ids, skip_special)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True, keep: frozenset[int] = frozenset()):
        """`keep`: control tokens written out even with skip_special (a tool format's markers)."""
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._keep = keep
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_leading_space = tokenizer.add_space_prefix

    def feed(self, token_id: int) -> str:
        data = self._tokenizer.token_bytes(token_id, self._skip_special and token_id not in self._keep)
        return self._emit(self._utf8.decode(data))

    def flush(self) -> str:
        """Text still held back (an incomplete sequence at the end becomes U+FFFD)."""
        return self._emit(self._utf8.decode(b"", final=True))

    def _emit(self, text: str) -> str:
        if self._strip_leading_space and text:
            self._strip_leading_space = False
            if text.startswith(" "):
                text = text[1:]
        return text


def chat_turns(messages: list[dict]) -> list[tuple[str, str]]:
    """(role, text) per turn, following Gemma 3's official chat template.

    As in the template: "assistant" is rendered as "model"; a leading system message has no turn
    of its own but is prepended, untrimmed, to the first user message as "{system}\\n\\n"; turn
    contents are stripped (Jinja's `| trim`); the remaining roles must alternate user/model
    starting with user (ValueError otherwise, as for a message that is not {"role": str,
    "content": str}).
    """
    for index, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ValueError(f"message {index} must be an object with string 'role' and 'content'")
    prefix = ""
    if messages and messages[0]["role"] == "system":
        prefix = messages[0]["content"] + "\n\n"
        messages = messages[1:]
        if not messages:
            raise ValueError("a system message must be followed by a user message")
    turns = []
    for index, message in enumerate(messages):
        role = {"assistant": "model"}.get(message["role"], message["role"])
        expected = "user" if index % 2 == 0 else "model"
        if role != expected:
            raise ValueError(
                f"message {index} has role {message['role']!r}: conversation roles must "
                "alternate user/assistant/user/assistant/..."
            )
        turns.append((role, (prefix if index == 0 else "") + message["content"].strip()))
    return turns


def apply_chat_template(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render a conversation exactly like Gemma 3's official chat template.

    Returns "<bos><start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n..."
    ending with "<start_of_turn>model\\n" when add_generation_prompt. Encode the result with
    `encode(prompt, add_bos=False, parse_special=True)` — or use `encode_chat`, which gives the
    same ids but never turns control-token text typed by a user into control tokens.
    """
    parts = ["<bos>"] + [f"<start_of_turn>{role}\n{text}<end_of_turn>\n" for role, text in chat_turns(messages)]
    if add_generation_prompt:
        parts.append("<start_of_turn>model\n")
    return "".join(parts)


def encode_chat(tokenizer: "Tokenizer", messages: list[dict], add_generation_prompt: bool = True,
                encode=None) -> list[int]:
    """Token ids of `apply_chat_template(messages)`, with the template's own markers as control
    tokens and message text encoded with parse_special=False: a user who types
    "<end_of_turn>" gets those characters, not a turn boundary (prompt injection). `encode`
    replaces the encoding of each turn's "{role}\n{text}" (images: multimodal.encode_chat_with_images)."""
    sot, eot = tokenizer.start_of_turn_id, tokenizer.end_of_turn_id
    newline = tokenizer.encode("\n", add_bos=False)
    encode = encode or (lambda text: tokenizer.encode(text, add_bos=False))
    ids = [tokenizer.bos_id]
    for role, text in chat_turns(messages):
        ids += [sot] + encode(f"{role}\n{text}") + [eot] + newline
    if add_generation_prompt:
        ids += [sot] + tokenizer.encode("model\n", add_bos=False)
    return ids


# ------------------------------------------------------------------ helpers

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.43 saves it; older ones in tokenizer_config.json


def _dir_chat_template(path: Path) -> str | None:
    """The chat template an HF model directory carries, if any."""
    if (path / CHAT_TEMPLATE_FILE).is_file():
        return (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    for name in ("tokenizer_config.json", "chat_template.json"):
        if (path / name).is_file():
            template = json.loads((path / name).read_text(encoding="utf-8")).get("chat_template")
            if template:  # a string, or a list of named templates
                return template if isinstance(template, str) else json.dumps(template)
    return None

def _is_byte_piece(text: str) -> bool:
    return len(text) == 6 and text.startswith("<0x") and text.endswith(">") and all(
        c in "0123456789ABCDEF" for c in text[3:5])


def _config_token(value) -> str | None:
    # tokenizer_config.json stores special tokens as a string or an AddedToken dict.
    return value.get("content") if isinstance(value, dict) else value


def _prepends_space_mark(normalizer) -> bool:
    if not normalizer:
        return False
    if normalizer.get("type") == "Sequence":
        return any(_prepends_space_mark(n) for n in normalizer.get("normalizers", []))
    return normalizer.get("type") == "Prepend" and normalizer.get("prepend") == SPACE_MARK


# SentencePiece ModelProto (sentencepiece_model.proto) field numbers we read.
_SP_MODEL_BPE = 2  # TrainerSpec.ModelType: UNIGRAM = 1 (the default), BPE = 2


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes):
    """Yield (field number, value) of a serialized protobuf message.

    Varints come back as int, length-delimited fields as bytes, 32/64-bit fixed
    fields as their raw bytes.
    """
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, value


def _signed(value: int) -> int:
    # int32 fields are varint-encoded as 64-bit two's complement (-1 -> 2**64 - 1).
    return value - (1 << 64) if value >= 1 << 63 else value


def _parse_model_proto(buf: bytes) -> dict:
    """The parts of a SentencePiece ModelProto that define tokenization.

    ModelProto: 1 pieces (SentencePiece: 1 piece, 2 score, 3 type),
    2 trainer_spec (3 model_type, 40 unk_id, 41 bos_id, 42 eos_id, 43 pad_id),
    3 normalizer_spec (3 add_dummy_prefix). Defaults are the proto defaults.
    """
    proto = {"pieces": [], "scores": [], "types": [], "model_type": 1,
             "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1, "add_dummy_prefix": True}
    trainer_keys = {3: "model_type", 40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}
    for field, value in _proto_fields(buf):
        if field == 1:
            piece, score, ptype = "", 0.0, NORMAL
            for f, v in _proto_fields(value):
                if f == 1:
                    piece = v.decode("utf-8")
                elif f == 2:
                    score = struct.unpack("<f", v)[0]
                elif f == 3:
                    ptype = v
            proto["pieces"].append(piece)
            proto["scores"].append(score)
            proto["types"].append(ptype)
        elif field == 2:
            for f, v in _proto_fields(value):
                if f in trainer_keys:
                    proto[trainer_keys[f]] = _signed(v)
        elif field == 3:
            for f, v in _proto_fields(value):
                if f == 3:
                    proto["add_dummy_prefix"] = bool(v)
    return proto


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 fields are written as 64-bit two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _proto_field(field: int, value) -> bytes:
    if isinstance(value, (bytes, str)):
        data = value.encode("utf-8") if isinstance(value, str) else value
        return _varint(field << 3 | 2) + _varint(len(data)) + data
    if isinstance(value, float):
        return _varint(field << 3 | 5) + struct.pack("<f", value)
    return _varint(field << 3) + _varint(int(value))


def _encode_model_proto(pieces, scores, types, unk_id, bos_id, eos_id, pad_id, add_dummy_prefix) -> bytes:
    """The inverse of `_parse_model_proto`: a BPE ModelProto with byte fallback and an identity normalizer."""
    out = [_proto_field(1, _proto_field(1, p) + _proto_field(2, float(s)) + _proto_field(3, t))
           for p, s, t in zip(pieces, scores, types)]
    trainer = b"".join(_proto_field(f, v) for f, v in (
        (3, _SP_MODEL_BPE), (35, BYTE in types), (40, unk_id), (41, bos_id), (42, eos_id), (43, pad_id)))
    normalizer = b"".join(_proto_field(f, v) for f, v in (
        (1, "identity"), (3, bool(add_dummy_prefix)), (4, False), (5, True)))
    return b"".join(out) + _proto_field(2, trainer) + _proto_field(3, normalizer)
