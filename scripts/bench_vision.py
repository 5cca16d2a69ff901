"""Time the full-size Gemma 3 vision encoder (SigLIP-So400m at 896 px + projector) on
random weights: seconds per image, and per Pan & Scan crop set (the image plus its crops).

    .venv/bin/python scripts/bench_vision.py                   # float32, PyTorch's thread count
    .venv/bin/python scripts/bench_vision.py --dtype bfloat16 --threads 8 --repeat 3

Prints one JSON object. Random weights cost the same time as real ones; none ship on a registry.
"""

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image

from gemma3.inference.multimodal import PanAndScan, encode_image, views
from gemma3.model.vision import VisionModel, siglip_so400m


def timed(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement; the best is reported")
    parser.add_argument("--d-model", type=int, default=2560, help="projector output width (2560 = Gemma 3 4B)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    start = time.perf_counter()
    torch.manual_seed(0)
    vision = VisionModel(siglip_so400m(args.d_model)).to(dtype).eval()
    build_s = time.perf_counter() - start

    rng = np.random.default_rng(0)
    square = Image.fromarray(rng.integers(0, 256, (896, 896, 3), dtype=np.uint8))
    wide = Image.fromarray(rng.integers(0, 256, (896, 2400, 3), dtype=np.uint8))  # 2.7:1 → 3 crops
    pas = PanAndScan()
    image_s, tokens = timed(lambda: encode_image(vision, square, None), args.repeat)
    pas_s, pas_tokens = timed(lambda: encode_image(vision, wide, pas), args.repeat)
    print(json.dumps({
        "device": "cpu", "threads": torch.get_num_threads(), "dtype": args.dtype,
        "params": sum(p.numel() for p in vision.parameters()), "build_s": round(build_s, 2),
        "s_per_image": round(image_s, 2), "soft_tokens": list(tokens.shape),
        "pas_views": len(views(wide, pas)), "s_per_pas_set": round(pas_s, 2),
        "s_per_view_in_pas_set": round(pas_s / len(views(wide, pas)), 2), "pas_soft_tokens": list(pas_tokens.shape),
    }))


if __name__ == "__main__":
    main()
