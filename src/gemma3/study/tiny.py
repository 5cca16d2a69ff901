"""What every study trains on, and one train-then-measure run of a tiny Gemma 3.

- Tokenizer: byte level. Gemma's special ids (pad 0, eos 1, bos 2, unk 3), one piece for the space
  ("▁", as SentencePiece writes it) and the 256 byte pieces: 261 ids; every other character is
  its UTF-8 bytes. With Gemma's 262k vocabulary the embedding would be >99% of a model this size
  and every step would go into the head, not into the attention layers the studies vary.
- Data: one UTF-8 text, or a directory's files joined in path order (default: the gemma3 package's
  own Python source), cut at a line break into a training part and a held-out tail, packed into
  sequences by `train.data`.
- Held-out perplexity: the trainer's held-out evaluation at the last step: the held-out text packed
  like the training text into sequences of `seq_len` tokens, every token scored (with 0 to
  seq_len − 1 tokens of context), batched on the training device.
- KV memory: `memory.kv_bytes_windowed`, window-sized caches on local layers and the whole
  context on global ones (what `KVCache` allocates), at a stated context and dtype.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..eval.perplexity import read_text
from ..formats.tokenizer import BYTE, CONTROL, NORMAL, SPACE_MARK, UNKNOWN, Tokenizer
from ..model import memory
from ..model.config import GLOBAL, Gemma3Config, layer_pattern
from ..train.data import DataError, PackedDataset, text_document
from ..train.student import new_model
from ..train.trainer import TrainConfig, train

# The package's own Python source (~450 KB, shipped with every install): the only text in the repo
# large enough that 200 steps of 4K tokens stay near two epochs; GPL-3.0 (35 KB) is memorised.
DEFAULT_SOURCE = Path(__file__).resolve().parents[1]
SOURCE_SUFFIXES = (".py", ".txt", ".md")


def byte_tokenizer() -> Tokenizer:
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", SPACE_MARK] + [f"<0x{b:02X}>" for b in range(256)]
    types = [CONTROL, CONTROL, CONTROL, UNKNOWN, NORMAL] + [BYTE] * 256
    return Tokenizer(pieces, [0.0] * len(pieces), types, bos_id=2, eos_id=1, unk_id=3, pad_id=0)


TOKENIZER_NOTE = "byte level: 256 byte pieces + one piece for the space + 4 specials (261 ids)"


@dataclass
class Corpus:
    source: str
    files: int
    sha256: str
    tokenizer: Tokenizer
    train: PackedDataset
    held_out: PackedDataset

    def info(self) -> dict:
        return {"source": self.source, "files": self.files, "sha256": self.sha256, "tokenizer": TOKENIZER_NOTE,
                "seq_len": self.train.seq_len, "train_tokens": len(self.train.tokens),
                "held_out_tokens": self.held_out.n * self.held_out.seq_len}


def data_note(info: dict) -> str:
    """One line for plot titles: where the text came from and how much of it there is."""
    files = f", {info['files']} files" if info["files"] > 1 else ""
    return (f"data: {Path(info['source']).name}{files}, {info['train_tokens'] / 1e3:.0f}K training / "
            f"{info['held_out_tokens'] / 1e3:.0f}K held-out tokens")


def source_files(path: str | Path) -> list[Path]:
    """A file, or the *.py, *.txt and *.md files under a directory, sorted by path."""
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.suffix in SOURCE_SUFFIXES and f.is_file())
        if not files:
            raise DataError(f"{path}: no {', '.join(SOURCE_SUFFIXES)} files")
        return files
    if not path.is_file():
        raise DataError(f"{path}: no such file or directory")
    return [path]


def load_corpus(path: str | Path | None, seq_len: int, held_out: float = 0.1) -> Corpus:
    """The text of `path` (a file or a directory's files joined in path order; default: the gemma3
    package's source), its first 1 − `held_out` for training, the rest, cut at a line break, held out."""
    if not 0 < held_out < 1:
        raise ValueError(f"--held-out must be in (0, 1), got {held_out}")
    if seq_len < 8:
        raise ValueError(f"--seq-len must be at least 8, got {seq_len}")
    path = Path(path) if path is not None else DEFAULT_SOURCE
    files = source_files(path)
    text = "".join(read_text(f) if len(files) == 1 else read_text(f).rstrip("\n") + "\n" for f in files)
    cut = int(len(text) * (1 - held_out))
    cut = text.rfind("\n", 0, cut) + 1 or cut
    tok = byte_tokenizer()
    parts = []
    for name, part in (("training", text[:cut]), ("held-out", text[cut:])):
        try:
            parts.append(PackedDataset([text_document(tok, part)], seq_len))
        except DataError as e:
            raise DataError(f"{path}: the {name} part is too short ({e}); use a longer text or another "
                            f"--held-out") from None
    return Corpus(str(path), len(files), hashlib.sha256(text.encode()).hexdigest()[:16], tok, *parts)


@dataclass(frozen=True)
class ModelSize:
    """Dimensions of a tiny Gemma 3; everything else (norms, RoPE bases, GeGLU) is Gemma 3's."""
    d_model: int = 64
    layers: int = 12
    heads: int = 4
    kv_heads: int = 1
    head_dim: int = 16
    ffn: int = 256

    @classmethod
    def parse(cls, spec: str) -> "ModelSize":
        """"DxL": d_model D, L layers, head_dim 16, D/16 query heads, one KV head, ffn 4·D."""
        m = re.fullmatch(r"(\d+)x(\d+)", spec.strip())
        if not m or int(m[1]) % 16 or int(m[1]) == 0 or int(m[2]) == 0:
            raise ValueError(f"model size {spec!r}: expected DxL with D a positive multiple of 16, e.g. 64x6")
        d, layers = int(m[1]), int(m[2])
        return cls(d_model=d, layers=layers, heads=d // 16, kv_heads=1, head_dim=16, ffn=4 * d)

    def config(self, seq_len: int, window: int, local_per_global: int | None, name: str) -> Gemma3Config:
        return Gemma3Config(
            vocab_size=byte_tokenizer().vocab_size, hidden_size=self.d_model, num_layers=self.layers,
            num_heads=self.heads, num_kv_heads=self.kv_heads, head_dim=self.head_dim,
            intermediate_size=self.ffn, sliding_window=window, max_context=seq_len,
            layer_types=layer_pattern(self.layers, local_per_global), query_pre_attn_scalar=self.head_dim,
            name=name)


@dataclass(frozen=True)
class Schedule:
    """The optimisation every model of a study shares: AdamW, 10% linear warm-up, cosine decay."""
    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.1

    def train_config(self, out: Path, seed: int, progress: bool, steps: int | None = None) -> TrainConfig:
        steps = steps or self.steps
        return TrainConfig(out=str(out), steps=steps, batch_size=self.batch_size, lr=self.lr,
                           warmup=max(1, steps // 10), weight_decay=self.weight_decay, seed=seed,
                           eval_every=steps, progress=progress)

    def to_dict(self) -> dict:
        return asdict(self) | {"warmup": "10% of the steps", "schedule": "cosine to 0.1 × lr"}


def pattern(cfg: Gemma3Config) -> str:
    """Layer types as a string, G for global and L for local (e.g. "LLLLLGLLLLLG")."""
    return "".join("G" if t == GLOBAL else "L" for t in cfg.layer_types)


def kv_figures(cfg: Gemma3Config, ctx: int, dtype: str) -> dict:
    """KV cache bytes at `ctx` tokens, and as a fraction of a global-only model of the same size."""
    kv = memory.kv_bytes_windowed(cfg, ctx, dtype)
    return {"kv_bytes": kv, "kv_vs_global_only": kv / memory.kv_bytes_full(cfg, ctx, dtype)}


def train_and_measure(cfg: Gemma3Config, corpus: Corpus, targets, schedule: Schedule, seed: int, out: Path,
                      ctx, progress: bool, steps: int | None = None):
    """Trains `cfg` from a seeded random init on the training part; returns (model, record) with
    the held-out perplexity after the last step and the training figures."""
    model = new_model(cfg, seed=seed)
    summary = train(model, corpus.train, targets, schedule.train_config(out, seed, progress, steps),
                    tokenizer=corpus.tokenizer, eval_data=corpus.held_out, ctx=ctx)
    return model, {"seed": seed, "steps": summary["steps"], "train_tokens": summary["tokens"],
                   "final_train_loss": summary["final_loss"], "held_out_nll": summary["eval_loss"],
                   "held_out_ppl": math.exp(summary["eval_loss"]), "seconds": summary["seconds"]}
