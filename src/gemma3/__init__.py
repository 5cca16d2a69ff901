"""Gemma 3 in plain PyTorch: `model, tokenizer = load(); generate(model, tokenizer, "Hello")`."""

from .formats.tokenizer import Tokenizer
from .inference.generate import generate, stream_generate
from .inference.load import load
from .inference.sampling import SamplingParams
from .model.config import Gemma3Config, preset

__all__ = ["Gemma3Config", "SamplingParams", "Tokenizer", "generate", "load", "preset", "stream_generate"]
