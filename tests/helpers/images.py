"""Pictures and tiny random vision towers shared by the vision and server tests."""

import struct
import zlib

import numpy as np
import torch
from PIL import Image

from gemma3.model.vision import VisionConfig, VisionModel

# 16×16 patches pooled 4×4 → 16 soft tokens per view: the real 64×64 → 256 structure, scaled down.
VISION = VisionConfig(image_size=64, patch_size=4, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, mm_tokens_per_image=16, projection_dim=64)


def random_vision(cfg=VISION, seed=1) -> VisionModel:
    """Random weights; norm weights away from their init values so a (1 + w) slip shows."""
    torch.manual_seed(seed)
    vision = VisionModel(cfg)
    with torch.no_grad():
        for name, p in vision.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_((0.0 if "soft_emb" in name else 1.0) + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return vision.eval()


def picture(width, height, seed=0, mode="RGB") -> Image.Image:
    """Smooth gradients plus noise, so that resizing and cropping are exercised for real."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width, 1), y * 255 / max(height, 1), (x + y) % 256], -1)
    img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(img).convert(mode)


WIDE, TALL = picture(900, 300, 1), picture(280, 700, 2)  # 3 and 2 Pan & Scan crops


def png_claiming(width, height) -> bytes:
    """A 1×1 PNG whose header claims width×height (the size check must not decode it)."""
    import io

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = 12  # signature (8) + chunk length (4)
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)
