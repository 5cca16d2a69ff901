"""Rollouts on the quantized engine with the training model's LoRA adapter (train/rollout.py), on a
tiny random model quantized to Q8_0: a zero adapter samples what the base engine samples, a trained
one gives the training model's logits up to quantization error, and `refresh` carries updates over."""

import pytest
import torch
from gguf import GGMLQuantizationType as T

from gemma3.model import adapters
from gemma3.train import lora
from gemma3.train.rollout import EnginePolicy, rollout
from tests.helpers.kernels import needs_kernels, quantized_copy, rel_err
from tests.helpers.models import random_model, tiny_config

PROMPTS = [[2, 70, 71, 72], [2, 100, 101, 102, 103, 104]]


def _models():
    """(engine, base engine, training model): two quantized copies and the dequantized reference."""
    cfg = tiny_config(layers=6, heads=4, kv_heads=2, head_dim=32, hidden=64, window=8)
    engine, reference = quantized_copy(random_model(cfg, seed=4), T.Q8_0)
    base, _ = quantized_copy(random_model(cfg, seed=4), T.Q8_0)
    lora.apply_lora(reference, lora.LoRAConfig(rank=4, alpha=8))
    return engine, base, reference


def _train_step(model, seed):
    """Stands in for an optimizer step: new random values in every LoRA matrix."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.2)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)


@needs_kernels
def test_zero_adapter_rollouts_equal_the_base_engine():
    engine, base, model = _models()
    EnginePolicy(engine, model)  # B = 0 at initialisation
    got = rollout(engine, PROMPTS, group=3, max_tokens=10, temperature=0.0, stop_ids=set())
    assert got == rollout(base, PROMPTS, group=3, max_tokens=10, temperature=0.0, stop_ids=set())
    sampled = [rollout(m, PROMPTS, 4, 10, 1.0, set(), torch.Generator().manual_seed(1)) for m in (engine, base)]
    assert sampled[0] == sampled[1] and len({tuple(c) for c in sampled[0]}) > 1


@needs_kernels
def test_refreshed_engine_gives_the_training_models_logits():
    engine, base, model = _models()
    policy = EnginePolicy(engine, model)
    ids = torch.tensor([PROMPTS[1] + [5, 6, 7, 8, 9, 10]])

    def engine_logits():
        """Prefill, then batched decode steps (the fused layers) and the one-call step: every path."""
        caches = [engine.new_cache(1, 32) for _ in range(2)]
        out = [engine(ids[:, :4], c, last_only=True)[0, -1] for c in caches][:1]
        for t in range(4, ids.shape[1]):
            out.append(engine.decode(ids[0, t].repeat(2), caches)[0])
        return torch.stack(out + [engine(ids[:, :1] * 0 + 11, caches[0])[0, -1]])

    def model_logits():
        full = torch.cat([ids, torch.tensor([[11]])], 1)
        with torch.no_grad():
            logits = model(full)[0]
        return torch.cat([logits[3:ids.shape[1]], logits[-1:]])

    with torch.inference_mode():
        quantization = rel_err(engine_logits(), model_logits())  # zero adapter: quantization error only
        _train_step(model, seed=1)
        stale = rel_err(engine_logits(), model_logits())
        policy.refresh()
        fresh = rel_err(engine_logits(), model_logits())
        _train_step(model, seed=2)  # a second update reaches the rebuilt fused layers too
        policy.refresh()
        again = rel_err(engine_logits(), model_logits())
    assert quantization < 1e-2 and stale > 0.1
    assert fresh < 2e-2 and again < 2e-2, (quantization, fresh, again)


def test_update_refuses_a_different_adapter():
    cfg = tiny_config()
    engine, model = random_model(cfg), random_model(cfg)
    lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")))
    EnginePolicy(engine, model)
    state = {k: v.clone() for k, v in lora.lora_state(model).items()}
    with pytest.raises(ValueError, match="missing"):
        adapters.update(engine, "policy", {k: v for k, v in state.items() if "v_proj" not in k})
    key = next(iter(state))
    with pytest.raises(ValueError, match="shape"):
        adapters.update(engine, "policy", {**state, key: state[key][:, :-1]})
    with pytest.raises(ValueError, match="no adapter 'other'"):
        adapters.update(engine, "other", state)
