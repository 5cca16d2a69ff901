"""The Gemma 3 vision encoder: a SigLIP ViT and the multimodal projector. Pure math.

SigLIP: pixels → non-overlapping patches (a strided conv) + learned position embeddings →
pre-LayerNorm transformer blocks (full bidirectional attention, gelu_tanh MLP) → LayerNorm.
Projector: the patch grid is average-pooled to `mm_tokens_per_image` tokens (4×4 pooling of the
64×64 grid at 896 px → 256), RMS-normalised with Gemma's (1 + w) and projected to d_model.
Parameter names follow transformers' SiglipVisionModel / Gemma3MultiModalProjector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import UnsupportedModelError
from .decoder import RMSNorm


@dataclass(frozen=True)
class VisionConfig:
    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    mm_tokens_per_image: int
    projection_dim: int  # d_model of the text decoder the soft tokens are fed to
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.tokens_per_side ** 2 != self.mm_tokens_per_image:
            raise ValueError(f"mm_tokens_per_image {self.mm_tokens_per_image} is not a square")
        if self.patches_per_side % self.tokens_per_side:
            raise ValueError(f"{self.patches_per_side}×{self.patches_per_side} patches cannot be pooled to "
                             f"{self.tokens_per_side}×{self.tokens_per_side} tokens")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_side(self) -> int:
        return math.isqrt(self.mm_tokens_per_image)

    @property
    def pool(self) -> int:
        """Average-pooling kernel (and stride) over the patch grid."""
        return self.patches_per_side // self.tokens_per_side


def siglip_so400m(projection_dim: int) -> VisionConfig:
    """SigLIP-So400m/14 at 896 px, the encoder of Gemma 3 4B/12B/27B."""
    return VisionConfig(image_size=896, patch_size=14, hidden_size=1152, intermediate_size=4304, num_layers=27,
                        num_heads=16, mm_tokens_per_image=256, projection_dim=projection_dim)


def from_hf_config(cfg: dict) -> VisionConfig | None:
    """The vision part of a multimodal `Gemma3Config` (config.json); None for a text-only model.

    A key missing from `vision_config` takes transformers' SiglipVisionConfig default, as
    transformers itself would read the file.
    """
    if cfg.get("model_type") != "gemma3" or not cfg.get("vision_config"):
        return None
    v = cfg["vision_config"]
    if v.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise UnsupportedModelError(f"unknown vision tower {v['model_type']!r} (expected siglip_vision_model)")
    return VisionConfig(
        image_size=int(v.get("image_size", 224)), patch_size=int(v.get("patch_size", 16)),
        hidden_size=int(v.get("hidden_size", 768)), intermediate_size=int(v.get("intermediate_size", 3072)),
        num_layers=int(v.get("num_hidden_layers", 12)), num_heads=int(v.get("num_attention_heads", 12)),
        mm_tokens_per_image=int(cfg.get("mm_tokens_per_image", 256)),
        projection_dim=int(cfg.get("text_config", {}).get("hidden_size", 2304)),
        layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
    )


def from_gguf_metadata(md: dict) -> VisionConfig:
    """The `clip.vision.*` keys of a llama.cpp mmproj GGUF with the gemma3 projector."""
    arch = md.get("general.architecture")
    projector = md.get("clip.vision.projector_type", md.get("clip.projector_type"))
    if arch != "clip" or projector != "gemma3":
        raise UnsupportedModelError(f"not a Gemma 3 mmproj GGUF (architecture {arch!r}, projector {projector!r})")

    def get(key):
        if f"clip.vision.{key}" not in md:
            raise UnsupportedModelError(f"mmproj GGUF metadata lacks 'clip.vision.{key}'")
        return md[f"clip.vision.{key}"]

    image_size, patch_size = int(get("image_size")), int(get("patch_size"))
    # llama.cpp pools the patch grid by `projector.scale_factor`, 4 unless the file says otherwise
    # (clip.cpp: n_merge defaults to 4 for Gemma 3; only test models write the key).
    pool = int(md.get("clip.vision.projector.scale_factor", 4))
    return VisionConfig(
        image_size=image_size, patch_size=patch_size, hidden_size=int(get("embedding_length")),
        intermediate_size=int(get("feed_forward_length")), num_layers=int(get("block_count")),
        num_heads=int(get("attention.head_count")), mm_tokens_per_image=(image_size // patch_size // pool) ** 2,
        projection_dim=int(get("projection_dim")),
        layer_norm_eps=float(md.get("clip.vision.attention.layer_norm_epsilon", 1e-6)),
    )


class Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.patches_per_side ** 2, cfg.hidden_size)

    def forward(self, pixels):
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # [n, hidden, side, side]
        return x.flatten(2).transpose(1, 2) + self.position_embedding.weight  # patches in row-major order


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads = cfg.num_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # every patch sees every patch; scale 1/sqrt(head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Projector(nn.Module):
    """Gemma3MultiModalProjector: pool the patch grid, RMSNorm (1 + w), project to d_model."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.side, self.pool = cfg.patches_per_side, cfg.pool
        self.mm_soft_emb_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        # Stored [vision width, d_model] and applied as x @ W, as both transformers and llama.cpp's
        # mmproj files hold it, so neither checkpoint format needs a transpose.
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(cfg.hidden_size, cfg.projection_dim))

    def forward(self, x):
        n, _, width = x.shape
        grid = x.transpose(1, 2).reshape(n, width, self.side, self.side)
        pooled = F.avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)  # [n, tokens, width], row-major
        return (self.mm_soft_emb_norm(pooled) @ self.mm_input_projection_weight).type_as(x)


class VisionModel(nn.Module):
    """pixels [n, 3, image_size, image_size] → soft tokens [n, mm_tokens_per_image, projection_dim]."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.projector = Projector(config)

    @property
    def dtype(self):
        return self.projector.mm_input_projection_weight.dtype

    @property
    def device(self):
        return self.projector.mm_input_projection_weight.device

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.layers:
            x = layer(x)
        return self.projector(self.post_layernorm(x))
