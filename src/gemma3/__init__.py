"""Gemma 3 in plain PyTorch: `model, tokenizer = load(); generate(model, tokenizer, "Hello")`.

Names are imported lazily so `import gemma3.quants` (or `gemma3 --help`) does not pay for
everything else.
"""

import importlib

_EXPORTS = {
    "Gemma3Config": "config", "preset": "config", "load": "load", "generate": "generate",
    "stream_generate": "generate", "SamplingParams": "sampling", "Tokenizer": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gemma3' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
