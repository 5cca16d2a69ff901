"""The fast CPU backend, applied to a `model/` Gemma3 as module swaps: projections that read GGUF
blocks in place (linear.py), fused decode-step modules (fused.py), and the C++ kernels they call
(kernels/). `install` is the whole swap; the loader (inference/load.py) calls it."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ..formats.gguf import QTensor
from . import kernels
from .fused import make_fast
from .linear import GGMLEmbedding, GGMLLinear
from .repack_cache import RepackCache


def available() -> bool:
    return kernels.available()


def install(model: nn.Module, tensors: dict[str, QTensor], source: Path | None = None) -> set[str]:
    """Swaps every projection of `model` (built on the meta device) and its tied embedding for
    modules that read the GGUF blocks of `tensors` (by our names) in place, repacks what a decode
    step streams, and swaps in the fused modules. Returns the names it took; the rest (norms, and
    projections of types without a kernel) are the caller's to load as float parameters.
    `source`: the GGUF file the tensors map, whose repacked bytes the repack cache keeps (a later
    install maps them instead of repacking)."""
    taken = set()
    for name, module in list(model.named_modules()):
        t = tensors.get(f"{name}.weight")
        if name == "embed_tokens":
            new = GGMLEmbedding.from_qtensor(t)
        elif isinstance(module, nn.Linear) and t.ggml_type in kernels.TYPES:
            new = GGMLLinear.from_qtensor(t)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        taken.add(f"{name}.weight")
    # Everything a decode step streams goes to one allocation on 2 MB pages (kernels.HugePages),
    # repacked in place, the GGUF pages let go as they are read: one copy of the weights, which
    # prefill and batches read too (the bf16 GEMM decodes interleaved groups 16 rows at a time).
    # Largest first: while a tensor is repacked, one slice of its source is resident beside the
    # output, so the peak is the whole model plus the last tensor's slice; the table (the 270M's
    # 178 MB) last would put up to 64 MB on top of the peak.
    modules = sorted([m for m in model.modules() if type(m) is GGMLLinear] + [model.embed_tokens],
                     key=lambda m: -m.packed_nbytes())
    sizes = [m.packed_nbytes() for m in modules]
    cache = RepackCache(source, [(m.layout(), m.out_features, m.in_features) for m in modules],
                        kernels.HugePages.bytes_for(sizes)) if source is not None else None
    cached = cache.load() if cache is not None else None
    # No file yet: the repacking writes one (its pages are where the weights live from now on).
    target = cache.create() if cache is not None and cached is None else None
    memory = kernels.HugePages(sizes, buffer=cached if cached is not None else target)
    try:
        for module in modules:
            module.pack(in_place=True, drop_source=True, memory=memory, repacked=cached is not None)
    except BaseException:
        if target is not None:
            cache.close()
        raise
    if target is not None:
        cache.commit(target)
    make_fast(model)
    return taken


def accelerate_tokenizer(tokenizer) -> bool:
    """Have `tokenizer` merge and find special tokens with the kernels (same ids, no GIL held:
    a long prompt tokenized for one request no longer stalls the engine thread); False where the
    kernels are unavailable (the Python loops stay)."""
    ops = kernels.ops()
    if ops is None:
        return False
    blob, offsets, scores, byte_ids = tokenizer.spm_tables()
    with warnings.catch_warnings():  # the blob is a bytes object: read-only, and SpmVocab only reads it
        warnings.filterwarnings("ignore", "The given buffer is not writable")
        blob = torch.frombuffer(blob, dtype=torch.uint8)
    # Views of the tokenizer's own arrays, which SpmVocab reads in place (no copy of the vocabulary).
    vocab = ops.SpmVocab(blob, torch.frombuffer(offsets, dtype=torch.int64), torch.frombuffer(scores, dtype=torch.float64),
                         byte_ids)
    tokenizer.use_native(vocab.encode, ops.TextSet, vocab.id_of)
    return True
