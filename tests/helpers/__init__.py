"""Shared test helpers: tiny models, the CLI in-process, HF references, servers, training data."""

from pathlib import Path

DATA = Path(__file__).parents[1] / "data"
