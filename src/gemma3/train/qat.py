"""Quantization-aware training (the report's quantization-aware training).

In the forward pass every weight that `gemma3 quantize` stores quantized (the embedding / tied LM
head and the seven projections of each layer; norms stay float), in the format its recipe gives
(`quant.apply`), is replaced by dequantize(quantize(w)), with the straight-through estimator in the
backward pass (`quant.formats.fake_quant`). The target is the unquantized model's output
distribution (dense KL, `losses.DenseTarget`). Training updates the latent full-precision weights,
which are what a checkpoint holds: `gemma3 quantize` with the same recipe turns them into exactly
the weights the QAT forward pass used.

Fake quantization is a `torch.nn.utils.parametrize` parametrization, so parameter names only gain
the standard `.parametrizations.weight.original` infix (`checkpoint.public_name` strips it).

The tied embedding / LM head (168M of the 270M's 268M parameters) is frozen by default
(`FrozenEmbedding`): it is still read quantized, exactly as exported, but it has no gradient or
optimizer state, and the teacher shares its float table instead of copying it. That is what fits
the 270M's QAT in under 3 GB of RAM; `train_embeddings=True` trains it too (about 4.5 GB more).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..formats.checkpoint import gguf_float
from ..formats.gguf import QTensor
from ..model.decoder import TiedEmbedding
from ..quant.apply import Recipe, parse_recipe, quantizable
from ..quant.formats import Quantized, dequantize, fake_quant, get_format, quantize
from .losses import DenseTarget

QAT_FORMATS = ("int4-block32", "int4-channel", "sfp8")


class FakeQuant(nn.Module):
    def __init__(self, fmt: str):
        super().__init__()
        self.fmt = fmt

    def forward(self, w):
        return fake_quant(w, self.fmt)


def recipe_for(fmt: str, recipe: str | None = None) -> Recipe:
    """The per-weight formats, exactly as `gemma3 quantize --to FMT [--recipe R]` chooses them."""
    return parse_recipe(recipe, fmt)


class FrozenEmbedding(TiedEmbedding):
    """The tied embedding / LM head, frozen. `weight` stays the latent float table (what checkpoints
    hold and the export quantizes; the teacher's head shares it), while lookups and the head read
    the table the export will hold, quantized once in `fmt` and decoded only where read: the rows a
    lookup needs, and for the head a slice of the vocabulary at a time (`losses.SlicedHead`). A
    float copy of the fake-quantized table would be another 0.67 GB for the 270M."""

    rows_per_slice = 16384

    def __init__(self, weight: torch.Tensor, fmt: str):
        super().__init__(*weight.shape, _weight=weight.detach(), _freeze=True)
        q = quantize(self.weight, fmt)
        self.fmt, self.shape = fmt, tuple(self.weight.shape)
        # Not persistent: a checkpoint holds the latent table under its usual name, nothing else.
        self.register_buffer("qdata", q.data, persistent=False)
        self.register_buffer("qscale", q.scale, persistent=False)

    @property
    def quantized(self) -> Quantized:
        return Quantized(self.fmt, self.shape, self.qdata, self.qscale)

    def forward(self, ids):
        rows = dequantize(self.quantized.rows(ids.reshape(-1)))
        return rows.to(self.weight.dtype).reshape(*ids.shape, -1)

    def slices(self, dtype: torch.dtype):
        for start in range(0, self.shape[0], self.rows_per_slice):
            end = min(start + self.rows_per_slice, self.shape[0])
            yield start, end, dequantize(self.quantized.rows(slice(start, end))).to(dtype)

    def sliced_head(self) -> "FrozenEmbedding":
        return self

    def attend(self, hidden):
        out = hidden.new_empty(*hidden.shape[:-1], self.shape[0])
        for start, end, w in self.slices(hidden.dtype):
            out[..., start:end] = hidden @ w.T
        return out


def apply_fake_quant(model: nn.Module, recipe: Recipe, train_embeddings: bool = True) -> nn.Module:
    """Fake-quantizes every weight that `gemma3 quantize` stores quantized, each in its recipe
    format; with `train_embeddings=False` the tied embedding becomes a `FrozenEmbedding` instead."""
    modules = {name: model.get_submodule(name.removesuffix(".weight")) for name in quantizable(model)}
    for name, module in modules.items():
        get_format(recipe.format_for(name)).check(tuple(module.weight.shape), name)
    if not train_embeddings:
        model.embed_tokens = FrozenEmbedding(model.embed_tokens.weight, recipe.format_for("embed_tokens.weight"))
        del modules["embed_tokens.weight"]
    for name, module in modules.items():
        parametrize.register_parametrization(module, "weight", FakeQuant(recipe.format_for(name)))
    return model


def remove_fake_quant(model: nn.Module) -> nn.Module:
    """Back to plain parameters holding the latent (unquantized) weights."""
    if isinstance(model.embed_tokens, FrozenEmbedding):
        model.embed_tokens = TiedEmbedding(*model.embed_tokens.shape, _weight=model.embed_tokens.weight.detach())
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    return model


class DecodingLinear(nn.Module):
    """A frozen projection kept in the GGUF blocks the model was loaded from and decoded at each
    call, to exactly the float weight the loader made of them (`gguf_float`): a teacher's layers
    then cost the file's bytes (70 MB for the 270M) instead of a float copy (0.4 GB)."""

    def __init__(self, tensor: QTensor):
        super().__init__()
        self.tensor = tensor

    def forward(self, x):
        return F.linear(x, gguf_float(self.tensor, False, x.dtype))


def teacher_of(model: nn.Module, share_embedding: bool, source: dict[str, QTensor] | None = None) -> nn.Module:
    """A frozen float copy of `model` (taken before fake quantization), the source of the targets.
    `share_embedding`: the copy reads the model's own embedding table rather than a second one,
    which is exact while that table is frozen. `source`: the GGUF tensors (by our names) the model
    was loaded from; its projections are read from them (`DecodingLinear`) rather than copied."""
    projections = {n: t for n, t in (source or {}).items()
                   if n.startswith("layers.") and isinstance(model.get_submodule(n.removesuffix(".weight")), nn.Linear)}
    shared = [model.get_parameter(n) for n in projections] + ([model.embed_tokens.weight] if share_embedding else [])
    teacher = copy.deepcopy(model, {id(p): p for p in shared})
    for name, tensor in projections.items():
        parent, _, child = name.removesuffix(".weight").rpartition(".")
        setattr(teacher.get_submodule(parent), child, DecodingLinear(tensor))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


class TeacherDistribution:
    """Dense targets from a frozen teacher that shares the vocabulary (for QAT: the model itself
    before quantization)."""

    def __init__(self, teacher, temperature: float = 1.0):
        self.teacher, self.temperature = teacher, temperature

    def __call__(self, batch) -> DenseTarget:
        with torch.inference_mode():
            hidden = self.teacher.hidden_states(batch.inputs.to(self.teacher.device))
        return DenseTarget(hidden.reshape(-1, hidden.shape[-1]).clone(), self.teacher.embed_tokens.weight.detach(),
                           batch.mask.reshape(-1).float(), self.temperature)
