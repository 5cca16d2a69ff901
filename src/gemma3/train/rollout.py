"""RL rollouts: group samples from the batched decode, on the training model itself or on the
quantized engine with the training model's LoRA adapter applied unmerged.

`rollout` prefills each prompt once and gives each of its G samples a copy of that cache (the
rows diverge from the first sampled token), then decodes all P·G rows together, `decode_batch`
rows per `model.decode` call (on the CPU backend, 16 rows in one call through the batched
projections ran 1.6× faster than two calls of 8 through its fused one-kernel layer).

`EnginePolicy` is the policy RL samples from: the quantized model (GGUF blocks on the C++ kernels,
`load(..., backend="cpu")`) plus the training model's current LoRA tensors as an adapter beside the
quantized projections (model/adapters.py). `refresh()` copies the trained A/B matrices into the
engine after each optimizer step (a few MB; nothing is re-quantized). The loss still needs the
training model's log-probabilities of the sampled tokens (rl.completion_logprobs): the engine only
decides *which* tokens are sampled, up to its quantization error.
"""

from __future__ import annotations

import torch

from ..inference.sampling import draw_rows
from ..model import adapters
from . import lora


@torch.inference_mode()
def rollout(model, prompts: list[list[int]], group: int, max_tokens: int, temperature: float,
            stop_ids: set[int], generator: torch.Generator | None = None, decode_batch: int = 64,
            adapter: int | None = None) -> list[list[int]]:
    """`group` completions per prompt (row p·G + g), sampled at `temperature` (0 = greedy); a
    completion ends after a stop id (kept) or `max_tokens` tokens. `adapter`: the LoRA adapter slot
    to sample with (model/adapters.py; None: the model's default)."""
    caches, first = [], []
    for ids in prompts:
        cache = model.new_cache(1, max_len=len(ids) + max_tokens, adapter=adapter)
        first.append(model(torch.tensor([ids], device=model.device), cache, last_only=True)[0, -1])
        snap = cache.snapshot()
        caches += [cache] + [cache.resumed(snap, cache.max_len) for _ in range(group - 1)]
    logits = torch.stack(first).repeat_interleave(group, 0)
    out = [[] for _ in caches]
    active = list(range(len(caches)))
    for step in range(max_tokens):
        if temperature > 0:
            tokens = draw_rows(torch.softmax(logits.float() / temperature, -1), generator)
        else:
            tokens = logits.argmax(-1)
        still = []
        for row, token in zip(active, tokens.tolist()):
            out[row].append(token)
            if token not in stop_ids:
                still.append(row)
        kept = set(still)
        keep = [i for i, row in enumerate(active) if row in kept]
        active = still
        if not active or step == max_tokens - 1:
            break
        tokens = tokens[keep]
        logits = torch.cat([model.decode(tokens[s:s + decode_batch], [caches[r] for r in active[s:s + decode_batch]])
                            for s in range(0, len(active), decode_batch)])
    return out


class EnginePolicy:
    """The quantized engine sampling with the training model's LoRA adapter (unmerged), as adapter
    `name` (the engine's default one where `default`; `slot` names it to `rollout`)."""

    def __init__(self, engine, model, name: str = "policy", default: bool = True):
        if not hasattr(model, "lora_config"):
            raise ValueError("EnginePolicy samples with the training model's LoRA adapter: apply_lora(model, ...) first")
        self.engine, self.model, self.name = engine, model, name
        cfg = model.lora_config
        self.slot = adapters.attach(engine, name, cfg.rank, cfg.alpha, self._tensors(), default=default)

    def _tensors(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        return {k: v.float() for k, v in (state if state is not None else lora.lora_state(self.model)).items()}

    def refresh(self, state: dict[str, torch.Tensor] | None = None):
        """The engine's adapter takes the training model's current LoRA weights, or `state` (e.g. an
        EMA anchor of them, under the same names): copies."""
        adapters.update(self.engine, self.name, self._tensors(state))
