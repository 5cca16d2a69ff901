"""The Gemma 3 model as pure math: configuration, text decoder, vision tower, KV cache, the
tensor-parallel transform and the memory plan. No file I/O, no sampling."""

from .cache import KVCache
from .config import Gemma3Config, preset
from .decoder import Gemma3

__all__ = ["Gemma3", "Gemma3Config", "KVCache", "preset"]
