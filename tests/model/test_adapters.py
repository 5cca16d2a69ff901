"""LoRA adapters applied unmerged (model/adapters.py, cpu/fused.py's DecodeLayer): on tiny random
models, the adapted model equals the merged one (torch backend), and the quantized base + adapter
on every fast path (prefill, one-call step, continuous batch with mixed adapters, a shared cache)
equals the dequantized reference + adapter."""

import pytest
import torch
from gguf import GGMLQuantizationType as T

from gemma3.formats.peft import ALL_TARGETS
from gemma3.model import adapters
from tests.helpers.kernels import needs_kernels, quantized_copy, rel_err
from tests.helpers.models import random_model, tiny_config


def random_adapter(model, rank=4, seed=0, targets=ALL_TARGETS, scale=0.2):
    """Tensors of a LoRA adapter for `model` (our names), B not zero so it changes the output."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            out[f"{name}.lora_A"] = torch.randn(rank, m.in_features, generator=g) * scale
            out[f"{name}.lora_B"] = torch.randn(m.out_features, rank, generator=g) * scale
    return out


def merged(model, tensors, rank, alpha):
    """A copy of `model` with the adapter folded into its weights."""
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith(".lora_A"):
                target = key[:-len(".lora_A")]
                m.get_submodule(target).weight += (tensors[target + ".lora_B"] @ a) * (alpha / rank)
    return m


def test_unmerged_equals_merged_and_rows_follow_their_caches():
    cfg = tiny_config(layers=6, window=8)
    base = random_model(cfg)
    one, two = random_adapter(base, seed=1), random_adapter(base, seed=2, targets=("q_proj", "down_proj"))
    adapted = random_model(cfg)
    assert adapters.attach(adapted, "one", 4, 8.0, one) == 0
    assert adapters.attach(adapted, "two", 4, 8.0, two) == 1
    ids = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plain = base(ids)
        for slot, (tensors, reference) in enumerate([(one, merged(base, one, 4, 8.0)),
                                                     (two, merged(base, two, 4, 8.0))]):
            got = adapted(ids, adapted.new_cache(1, 64, adapter=slot))
            torch.testing.assert_close(got, reference(ids), rtol=0, atol=1e-4)
            assert (got - plain).abs().max() > 1e-2  # the adapter does change the output
        torch.testing.assert_close(adapted(ids), plain, rtol=0, atol=0)  # no adapter named: the base
        # A decode step with one row per adapter (and one without): each row as if alone.
        caches = [adapted.new_cache(1, 64, adapter=s) for s in (0, None, 1)]
        for c in caches:
            adapted(ids, c)
        step = adapted.decode(torch.tensor([5, 6, 7]), caches)
        for row, (token, slot) in enumerate(zip((5, 6, 7), (0, None, 1))):
            c = adapted.new_cache(1, 64, adapter=slot)
            adapted(ids, c)
            torch.testing.assert_close(step[row], adapted(torch.tensor([[token]]), c)[0, -1], rtol=0, atol=1e-5)


def test_bad_adapters_are_refused():
    model = random_model(tiny_config())
    good = random_adapter(model)
    with pytest.raises(ValueError, match="no projection layers.99"):
        adapters.attach(model, "x", 4, 8.0, {"layers.99.self_attn.q_proj.lora_A": torch.zeros(4, 64),
                                             "layers.99.self_attn.q_proj.lora_B": torch.zeros(64, 4)})
    with pytest.raises(ValueError, match="expected"):
        adapters.attach(model, "x", 8, 16.0, good)  # rank 8 claimed, rank-4 tensors
    adapters.attach(model, "x", 4, 8.0, good)
    with pytest.raises(ValueError, match="loaded already"):
        adapters.attach(model, "x", 4, 8.0, good)


@needs_kernels
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0])
def test_quantized_base_with_adapters_matches_the_reference_on_every_path(qtype):
    """Prefill (GEMM), the batch-1 one-call step (DecodeStack), the continuous batch with rows under
    different adapters or none (DecodeLayer, one call per layer), and a shared cache (FastAttention
    + the modules' MLP): the quantized base + adapters gives the dequantized reference + adapters."""
    cfg = tiny_config(layers=6, heads=4, kv_heads=2, head_dim=32, hidden=64, window=8)
    fast, ref = quantized_copy(random_model(cfg), qtype)
    one, two = random_adapter(ref, seed=1), random_adapter(ref, seed=2, targets=("v_proj", "o_proj", "up_proj"))
    for model in (fast, ref):
        adapters.attach(model, "one", 4, 8.0, one)
        adapters.attach(model, "two", 4, 8.0, two)
    ids = torch.randint(0, cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for slot in (0, 1):
            cf, cr = fast.new_cache(1, 64, adapter=slot), ref.new_cache(1, 64, adapter=slot)
            assert rel_err(fast(ids[:1, :24], cf), ref(ids[:1, :24], cr)) < 2e-2  # bf16 GEMM prefill
            assert fast.decode_stack(cf) is None
            for t in range(24, 40):  # one-call steps, past the window
                a, b = fast(ids[:1, t:t + 1], cf), ref(ids[:1, t:t + 1], cr)
                assert fast.decode_stack(cf) is not None
                assert rel_err(a, b) < 2e-2, t
        slots = (0, None, 1)
        cfs = [fast.new_cache(1, 64, adapter=s) for s in slots]
        crs = [ref.new_cache(1, 64, adapter=s) for s in slots]
        for r in range(3):
            fast(ids[r:r + 1, :4], cfs[r])
            ref(ids[r:r + 1, :4], crs[r])
        for t in range(4, 30):  # the continuous batch: one DecodeLayer call per layer, rows routed
            a, b = fast.decode(ids[:, t], cfs), ref.decode(ids[:, t], crs)
            assert rel_err(a, b) < 1e-3, t
        cf, cr = fast.new_cache(3, 64, adapter=1), ref.new_cache(3, 64, adapter=1)
        for t in range(12):  # three rows in one cache: FastAttention, then the modules' MLP
            a, b = fast(ids[:, t:t + 1], cf), ref(ids[:, t:t + 1], cr)
            assert rel_err(a, b) < 1e-3, t
