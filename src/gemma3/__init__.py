"""Gemma 3 in plain PyTorch: `model, tokenizer = load(); generate(model, tokenizer, "Hello")`."""

from .config import Gemma3Config, preset
from .generate import generate, stream_generate
from .load import load
from .sampling import SamplingParams
from .tokenizer import Tokenizer

__all__ = ["Gemma3Config", "SamplingParams", "Tokenizer", "generate", "load", "preset", "stream_generate"]
