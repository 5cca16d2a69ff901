"""The fast CPU backend, applied to a `model/` Gemma3 as module swaps: projections that read GGUF
blocks in place, fused decode-step modules, and the C++ kernels they call."""
