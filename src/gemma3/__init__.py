"""Gemma 3 in plain PyTorch: `model, tokenizer = load(); generate(model, tokenizer, "Hello")`."""

from .formats.tokenizer import Tokenizer, apply_chat_template
from .inference.generate import generate, stream_generate
from .inference.load import load, load_vision
from .inference.sampling import SamplingParams
from .model.config import Gemma3Config, preset

__all__ = ["Gemma3Config", "SamplingParams", "Tokenizer", "apply_chat_template", "generate", "load", "load_vision",
           "preset", "stream_generate"]
