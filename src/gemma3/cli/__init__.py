"""The `gemma3` command: the only place that parses arguments."""

from .commands import main

__all__ = ["main"]
