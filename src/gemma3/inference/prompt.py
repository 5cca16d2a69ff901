"""What generation starts from: token ids, or ids with image features spliced in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class MultimodalPrompt:
    """A prompt ready for prefill: what `generate_step` takes in place of token ids."""

    ids: list[int]  # image soft tokens are IMAGE_SOFT_TOKEN_ID (multimodal.py)
    embeds: torch.Tensor  # [1, len(ids), d_model]: scaled text embeddings, image features spliced in
    groups: torch.Tensor  # [1, len(ids)]: view index of each soft token, -1 for text


Prompt = str | Sequence[int] | MultimodalPrompt


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Strings are tokenized with special-token parsing on (like llama.cpp's CLI and transformers),
    so chat-formatted prompts work; a leading <bos> is added only if the text lacks one."""
    if isinstance(prompt, MultimodalPrompt):
        return list(prompt.ids)
    if not isinstance(prompt, str):
        return list(prompt)
    ids = tokenizer.encode(prompt, add_bos=False, parse_special=True)
    if tokenizer.add_bos and (not ids or ids[0] != tokenizer.bos_id):
        ids = [tokenizer.bos_id] + ids
    return ids
