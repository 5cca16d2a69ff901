"""Tiny models with a real (byte-level) tokenizer in a directory, so training tests go through
the same `gemma3` entry points as users, in seconds."""

from pathlib import Path

from gemma3.formats.checkpoint import save_hf_dir
from gemma3.formats.tokenizer import BYTE, CONTROL, UNKNOWN, USER_DEFINED, Tokenizer
from tests.helpers.models import random_model, tiny_config

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def byte_tokenizer() -> Tokenizer:
    """Gemma's special ids (pad 0, eos 1, bos 2, unk 3), the turn markers, "\\n", and 256 byte pieces."""
    pieces = SPECIALS + ["\n"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [CONTROL, CONTROL, CONTROL, UNKNOWN, CONTROL, CONTROL, USER_DEFINED] + [BYTE] * 256
    return Tokenizer(pieces, [0.0] * len(pieces), types, bos_id=2, eos_id=1, unk_id=3, pad_id=0)


def tiny_model_dir(path: Path, seed: int = 0, **config) -> Path:
    """A random tiny Gemma 3 (vocabulary = the byte tokenizer's 263 ids) saved as an HF-style directory."""
    cfg = tiny_config(**({"vocab": 263, "layers": 6, "window": 16} | config))
    model = random_model(cfg, seed=seed)
    save_hf_dir(path, cfg, model.state_dict())
    byte_tokenizer().save(path)
    return path


TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be on "
        "his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
        "families, that he is considered as the rightful property of some one or other of their daughters.\n") * 3
