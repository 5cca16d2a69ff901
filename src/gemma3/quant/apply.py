"""Quantization as a module swap after loading (like gpt-fast's quantize.py).

`quantize_model(model, recipe)` replaces every projection `nn.Linear` with a `QuantizedLinear`
and the tied embedding / LM head with one `QuantizedEmbedding` (so it stays tied), each holding
its weight in a format of `formats.py`. Norms stay float. These modules are the *reference*
matmul path: decode the weight, then one dense matmul. Faster kernels swap in the same way.

A recipe picks a format per weight: `default` for all, overridden by role (`embed`, `attn`,
`mlp`) and by projection (`q_proj` … `down_proj`, most specific wins), e.g.
`embed=q8_0,default=int4-block32`, or a named recipe from `RECIPES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .formats import QuantError, Quantized, dequantize, get_format, quantize

# Named recipes. q4_0-embed-q8 keeps the embedding (= LM head) at 8 bits, as llama.cpp's Q4_K_M does.
RECIPES = {"q4_0-embed-q8": "embed=q8_0,default=int4-block32"}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KEYS = ("default", "embed", "attn", "mlp") + PROJECTIONS


@dataclass(frozen=True)
class Recipe:
    formats: tuple[tuple[str, str], ...]  # (key, canonical format name), in KEYS order

    def format_for(self, name: str) -> str:
        """The format of our parameter `name` (e.g. layers.3.self_attn.q_proj.weight)."""
        table = dict(self.formats)
        parts = name.split(".")
        if parts[0] == "embed_tokens":
            keys = ("embed",)
        else:
            keys = (parts[-2], "attn" if parts[-3] == "self_attn" else "mlp")
        return next((table[k] for k in keys if k in table), table["default"])

    @property
    def spec(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.formats)

    def names(self) -> list[str]:
        return sorted({fmt for _, fmt in self.formats})


def parse_recipe(recipe: str | None = None, default: str | None = None) -> Recipe:
    """`--recipe` (named, or key=format pairs) over `--to` (the default format)."""
    text = RECIPES.get(recipe, recipe) if recipe else ""
    table = {"default": get_format(default).name} if default else {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, fmt = item.partition("=")
        key = key.strip()
        if not sep:
            raise QuantError(f"unknown recipe {item!r}: use a named recipe ({', '.join(RECIPES)}) or key=format pairs")
        if key not in KEYS:
            raise QuantError(f"unknown recipe key {key!r}; expected one of {', '.join(KEYS)}")
        table[key] = get_format(fmt.strip()).name
    if "default" not in table:
        raise QuantError("no default format: pass --to FORMAT or default=FORMAT in the recipe")
    return Recipe(tuple((k, table[k]) for k in KEYS if k in table))


class QuantizedLinear(nn.Module):
    """y = x · Wᵀ with W decoded from its format on every call (reference path)."""

    def __init__(self, q: Quantized):
        super().__init__()
        self.fmt, self.out_features, self.in_features = q.fmt, *q.shape
        self.register_buffer("qdata", q.data)
        self.register_buffer("qscale", q.scale)

    @property
    def quantized(self) -> Quantized:
        return Quantized(self.fmt, (self.out_features, self.in_features), self.qdata, self.qscale)

    def forward(self, x):
        return F.linear(x, dequantize(self.quantized).to(x.dtype))

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, fmt={self.fmt}"


class QuantizedEmbedding(QuantizedLinear):
    """The tied embedding and LM head in one quantized table: a lookup decodes only the rows it
    needs; `attend` (the LM head) decodes the vocabulary a slice at a time to bound memory."""

    rows_per_slice = 16384

    def __init__(self, q: Quantized, dtype: torch.dtype):
        super().__init__(q)
        self.dtype = dtype

    def forward(self, ids):
        rows = dequantize(self.quantized.rows(ids.reshape(-1)))
        return rows.to(self.dtype).reshape(*ids.shape, -1)

    def attend(self, hidden):
        q, step = self.quantized, self.rows_per_slice
        out = hidden.new_empty(*hidden.shape[:-1], self.out_features)
        for start in range(0, self.out_features, step):
            w = dequantize(q.rows(slice(start, start + step))).to(hidden.dtype)
            out[..., start:start + step] = hidden @ w.T
        return out


def quantizable(model: nn.Module) -> list[str]:
    """Our names of the weights a recipe applies to: the embedding and every projection."""
    return ["embed_tokens.weight"] + [f"{n}.weight" for n, m in model.named_modules()
                                      if isinstance(m, (nn.Linear, QuantizedLinear)) and n.startswith("layers.")]


def _weight(module: nn.Module) -> torch.Tensor:
    return dequantize(module.quantized) if isinstance(module, QuantizedLinear) else module.weight.detach()


def install(model: nn.Module, name: str, q: Quantized, dtype: torch.dtype | None = None):
    """Replace the module that owns weight `name` by its quantized counterpart; `dtype` is the
    compute dtype embedding lookups return (default: the model's)."""
    path = name.removesuffix(".weight")
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if path == "embed_tokens":
        setattr(parent, child, QuantizedEmbedding(q, dtype or model.dtype))
    else:
        setattr(parent, child, QuantizedLinear(q))


def quantize_model(model: nn.Module, recipe: Recipe, progress=None) -> nn.Module:
    """Quantize `model` in place with `recipe`; returns it. Weights already quantized are decoded
    first (converting between formats). `progress` wraps the loop over the (name, module) pairs
    quantized (e.g. tqdm)."""
    modules = {name: model.get_submodule(name.removesuffix(".weight")) for name in quantizable(model)}
    for name, module in modules.items():  # every check before any change
        shape = (module.out_features, module.in_features) if isinstance(module, QuantizedLinear) else module.weight.shape
        get_format(recipe.format_for(name)).check(tuple(shape), name)
    for name, module in (progress or iter)(list(modules.items())):
        install(model, name, quantize(_weight(module), recipe.format_for(name)))
    model.quant_recipe = recipe.spec
    return model


def quantized_weights(model: nn.Module) -> dict[str, Quantized]:
    return {f"{n}.weight": m.quantized for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight as float32, quantized ones decoded (the "dequantized" reference)."""
    state = {k: v.float() for k, v in model.state_dict().items() if not k.endswith(("qdata", "qscale"))}
    state.update({k: dequantize(q) for k, q in quantized_weights(model).items()})
    return state
