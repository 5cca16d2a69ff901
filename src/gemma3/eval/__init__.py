"""Evaluations and the paper's studies (SPEC §8)."""
