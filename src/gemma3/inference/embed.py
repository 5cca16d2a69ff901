"""Text embeddings from a decoder: the final-norm hidden states of a prompt pooled into one
vector and L2-normalised, so a dot product is a cosine similarity. "mean" averages every
position (the usual choice for a model not trained for embeddings); "last" takes the final
token's state, which has attended to the whole text (what decoder embedders such as E5-Mistral
train for)."""

from __future__ import annotations

import torch

POOLINGS = ("mean", "last")


def embed(model, ids: list[int], pooling: str = "mean") -> torch.Tensor:
    """[d_model] float32 unit vector for token ids `ids`."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    if not ids:
        raise ValueError("cannot embed an empty text")
    with torch.inference_mode():
        cache = model.new_cache(1, max_len=len(ids))
        hidden = model.forward_hidden(torch.tensor([ids], device=model.device), cache)[0].float()
        pooled = hidden.mean(0) if pooling == "mean" else hidden[-1]
        return torch.nn.functional.normalize(pooled, dim=0).cpu()
