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
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..quant.apply import Recipe, parse_recipe, quantizable
from ..quant.formats import fake_quant, get_format
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


def apply_fake_quant(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Fake-quantizes every weight that `gemma3 quantize` stores quantized, each in its recipe format."""
    modules = {name: model.get_submodule(name.removesuffix(".weight")) for name in quantizable(model)}
    for name, module in modules.items():
        get_format(recipe.format_for(name)).check(tuple(module.weight.shape), name)
    for name, module in modules.items():
        parametrize.register_parametrization(module, "weight", FakeQuant(recipe.format_for(name)))
    return model


def remove_fake_quant(model: nn.Module) -> nn.Module:
    """Back to plain parameters holding the latent (unquantized) weights."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    return model


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
