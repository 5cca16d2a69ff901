"""Constrained decoding: a JSON schema, a grammar, a regex or a list of choices turned into a
per-step mask of the tokens that keep the output valid, through llguidance (chosen over xgrammar
and outlines-core by measurement, docs/structured_output.md). Each sequence has its own `Guide`
(its matcher state); a batch fills all its rows' masks in one call that drops the GIL, so the
server computes them on a thread while the model runs. <eos> / <end_of_turn> are allowed only
where the grammar accepts, and once the grammar can go no further they are all that is allowed."""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass, replace

import llguidance
import llguidance.numpy as llnp
import numpy as np
import torch
from llguidance.gbnf_to_lark import any_to_lark

from .sampling import SamplingParams, adjusted, sample

KINDS = ("json_object", "json_schema", "grammar", "regex", "choice")

# Compact JSON: no free whitespace between tokens. With flexible whitespace a sampled base model
# can spend its whole budget on newlines inside an object and never close it.
_JSON_OPTIONS = {"whitespace_flexible": False}


@dataclass(frozen=True)
class Constraint:
    """What the output must match. `spec`: the JSON schema (JSON text) for json_schema, the
    grammar (llguidance's Lark dialect, or GBNF) for grammar, the regex for regex, a JSON list of
    strings for choice, unused for json_object (any JSON object)."""

    kind: str
    spec: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"constraint kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    @classmethod
    def json_schema(cls, schema: dict | str) -> "Constraint":
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
        return cls("json_schema", json.dumps(schema))

    @classmethod
    def choice(cls, options: list[str]) -> "Constraint":
        if not options or not all(isinstance(o, str) and o for o in options):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        return cls("choice", json.dumps(list(options)))

    def grammar(self) -> str:
        """The llguidance grammar (not yet checked against a tokenizer: see `compile`)."""
        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=_JSON_OPTIONS)
        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.spec, overrides=_JSON_OPTIONS)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.spec)
        if self.kind == "choice":
            # JSON string literals are valid Lark string literals (the same escapes).
            return llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(o) for o in json.loads(self.spec)))
        try:
            return llguidance.LLMatcher.grammar_from_lark(any_to_lark(self.spec))
        except Exception as e:  # the GBNF converter raises plain exceptions on syntax errors
            raise ValueError(f"invalid grammar: {e}") from None


_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def ll_tokenizer(tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of our tokenizer: every token's bytes, control tokens as specials (0xFF
    and their name, llguidance's convention), <eos> and <end_of_turn> as the stop tokens. Built
    once per tokenizer (~1 s for 262k tokens)."""
    with _LOCK:
        found = _TOKENIZERS.get(tokenizer)
        if found is None:
            found = _TOKENIZERS[tokenizer] = llguidance.LLTokenizer(
                llguidance.TokenizerWrapper(_Vocabulary(tokenizer)),
                eos_token=[tokenizer.eos_id, tokenizer.end_of_turn_id])
        return found


class _Vocabulary:
    """The attributes and call llguidance.TokenizerWrapper reads."""

    def __init__(self, tokenizer):
        special = tokenizer.special_ids
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self.special_token_ids = sorted(special)
        self.tokens = [b"\xff" + tokenizer.token_bytes(i, skip_special=False) if i in special
                       else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.encode = tokenizer.encode

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.encode(text, add_bos=False)


def compile_grammar(tokenizer, constraint: Constraint) -> str:
    """The checked grammar of `constraint`; ValueError naming the problem when it is invalid."""
    grammar = constraint.grammar()
    error = llguidance.LLMatcher.validate_grammar(grammar, ll_tokenizer(tokenizer))
    if error:
        what = {"json_schema": "JSON schema", "json_object": "JSON object", "regex": "regex",
                "choice": "choice", "grammar": "grammar"}[constraint.kind]
        raise ValueError(f"invalid {what}: {error}")
    return grammar


class Guide:
    """One sequence's position in its grammar."""

    def __init__(self, tokenizer, constraint: Constraint, grammar: str | None = None):
        self.vocab = tokenizer.vocab_size
        self.matcher = llguidance.LLMatcher(ll_tokenizer(tokenizer), grammar or compile_grammar(tokenizer, constraint),
                                            log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"invalid {constraint.kind}: {self.matcher.get_error()}")

    def allows(self, token: int) -> bool:
        """Whether the grammar takes `token` next (~1 us: no mask computed, the state unchanged)."""
        return self.matcher.validate_tokens([token]) == 1

    def advance(self, token: int):
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def accepting(self) -> bool:
        return self.matcher.is_accepting()

    def mask(self) -> np.ndarray:
        """This step's allowed-token bitmask (one row)."""
        return fill_masks([self])[0]

    def apply(self, logits: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
        """`logits` [vocab] with every token the grammar refuses at -inf (a new tensor)."""
        return apply_masks(logits[None], mask[None], self.vocab)[0]


def apply_masks(logits: torch.Tensor, masks: np.ndarray, vocab: int) -> torch.Tensor:
    """`logits` [rows, width] with every token its row's mask (fill_masks) refuses at -inf, as a
    new tensor; `vocab`: the tokenizer's size (a model may have more rows than it has tokens:
    those are refused). All rows in one unpack and one select: applied row by row (four tensor
    ops of 262k elements per row, each a parallel region) they took 95-380 ms per row of a step on
    a loaded 2-core machine, all 8 rows at once 20 ms (docs/structured_output.md)."""
    width = logits.shape[-1]
    bits = np.unpackbits(masks.view(np.uint8), axis=-1, bitorder="little")[:, :min(vocab, width)]
    if bits.shape[1] < width:
        bits = np.pad(bits, ((0, 0), (0, width - bits.shape[1])))
    allowed = torch.from_numpy(bits.view(np.bool_)).to(logits.device)
    return torch.where(allowed, logits, torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))


_EXECUTOR: llguidance.LLExecutor | None = None


def fill_masks(guides: list[Guide]) -> np.ndarray:
    """The bitmasks [len(guides), words] of every guide's next step, computed together (llguidance
    spreads the rows over its threads and drops the GIL while it works)."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = llguidance.LLExecutor()
    masks = llnp.allocate_token_bitmask(len(guides), guides[0].vocab)
    llnp.fill_next_token_bitmask_par(_EXECUTOR, [(g.matcher, i) for i, g in enumerate(guides)], masks)
    return masks


def lazy_exact(params: SamplingParams) -> bool:
    """Whether a token drawn from the unmasked logits, kept when the grammar allows it and drawn
    again from the masked logits when not, has the distribution of a draw from the masked logits
    (`sample_lazily`). Greedy: the unmasked argmax, when allowed, is the masked one. Temperature
    alone (the bias and the repetition penalty change each logit on its own): a kept token t of
    the allowed set A comes with probability p(t) + (1 - p(A)) p(t) / p(A) = p(t) / p(A), the
    masked probability. Not with top-k / top-p / min-p, which cut by the whole distribution: the
    unmasked cut is not the masked one, so those rows are masked before they sample."""
    return params.greedy or (not params.top_k and params.top_p == 1.0 and params.min_p == 0.0)


def sample_lazily(guides: list[Guide], rows: list[torch.Tensor], params: list[SamplingParams],
                  generators: list, histories: list, vocab: int) -> list[int]:
    """One allowed token per row (each 1-D logits), for rows whose params are `lazy_exact`: each
    row sampled unmasked first; only the rows whose token the grammar refuses get a mask (filled
    together) and are sampled again, over their allowed tokens alone. The mask fill, ~0.6 ms per
    row of the 262k vocabulary, is what most steps skip: a model following its format picks
    allowed tokens most of the time. A refused row draws twice from its generator: reproducible
    for a seed, not the stream the eager mask would draw."""
    tokens = [sample(row, p, g, h) for row, p, g, h in zip(rows, params, generators, histories)]
    refused = [i for i, (guide, token) in enumerate(zip(guides, tokens)) if not guide.allows(token)]
    if refused:
        for i, mask in zip(refused, fill_masks([guides[i] for i in refused])):
            tokens[i] = _sample_allowed(rows[i], allowed_ids(mask, vocab), params[i], generators[i], histories[i])
    return tokens


def allowed_ids(mask: np.ndarray, vocab: int) -> torch.Tensor:
    """The token ids one row's bitmask (fill_masks) allows, ascending. Only its non-zero words are
    unpacked: where the grammar allows a few tokens (JSON punctuation, a key) this takes ~30 us,
    where the full unpack and a select over the row take ~0.5 ms."""
    words = np.flatnonzero(mask)
    bits = np.unpackbits(mask[words].view(np.uint8), bitorder="little").reshape(len(words), 32)
    word, bit = np.nonzero(bits)
    ids = words[word] * 32 + bit
    return torch.from_numpy(ids[ids < vocab])


def _sample_allowed(logits: torch.Tensor, ids: torch.Tensor, params: SamplingParams, generator,
                    history: list[int]) -> int:
    """A draw from 1-D `logits` restricted to `ids` (ascending): the draw from the masked logits,
    for params without cuts over the whole distribution (lazy_exact). The bias and the repetition
    penalty are applied to the whole row first (they are keyed by token id); greedy ties go to the
    lowest id, as over the masked row."""
    if not len(ids):
        raise RuntimeError("the grammar allows no token at all")
    kept = adjusted(logits, params, history)[ids]
    return int(ids[sample(kept, replace(params, logit_bias=(), repetition_penalty=1.0), generator)])


def sample_guided(guide: Guide, logits: torch.Tensor, params: SamplingParams, generator, history: list[int]) -> int:
    """One token of 1-D `logits` that `guide` allows, lazily masked where that is exact."""
    if lazy_exact(params):
        return sample_lazily([guide], [logits], [params], [generator], [history], guide.vocab)[0]
    return sample(guide.apply(logits, guide.mask()), params, generator, history)
