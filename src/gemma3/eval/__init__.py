"""Evaluations: perplexity, needle in a haystack, memorization, weight formats, speed (bench),
the KV memory measurements, and the results file they all append to."""
