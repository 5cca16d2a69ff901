"""HF safetensors loading and its strictness; config readers."""

import json

import pytest
import torch
from safetensors.torch import save_file

from gemma3.formats.checkpoint import WeightsError, read_hf_dir, save_hf_dir
from gemma3.model.config import PRESETS, UnsupportedModelError, from_gguf_metadata, from_hf_config


def _save(tmp_path, model):
    save_hf_dir(tmp_path, model.config, model.state_dict())
    return tmp_path


def test_hf_dir_round_trip(tmp_path, tiny):
    cfg, state = read_hf_dir(_save(tmp_path, tiny))
    assert cfg == tiny.config.replace(name=cfg.name)
    for k, v in tiny.state_dict().items():
        assert torch.equal(state[k], v), k


def test_conditional_generation_layout_loads_language_part(tmp_path, tiny):
    """Gemma3ForConditionalGeneration: text weights under model.language_model., vision weights ignored."""
    state = {f"model.language_model.{k}": v for k, v in tiny.state_dict().items()}
    state["model.vision_tower.vision_model.post_layernorm.weight"] = torch.ones(4)
    state["model.multi_modal_projector.mm_soft_emb_norm.weight"] = torch.ones(4)
    state["lm_head.weight"] = tiny.embed_tokens.weight.clone()
    save_file(state, str(tmp_path / "model.safetensors"))
    _save(tmp_path / "tmp", tiny)
    text = json.loads((tmp_path / "tmp" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text}))
    cfg, loaded = read_hf_dir(tmp_path)
    assert set(loaded) == set(tiny.state_dict())


@pytest.mark.parametrize("damage,match", [
    (lambda s: s.pop("layers.0.mlp.up_proj.weight"), "missing tensor layers.0.mlp.up_proj.weight"),
    (lambda s: s.__setitem__("layers.0.extra.weight", torch.zeros(2)), "unexpected tensor 'layers.0.extra.weight'"),
    (lambda s: s.__setitem__("layers.1.self_attn.k_proj.weight", torch.zeros(3, 64)),
     r"tensor 'layers.1.self_attn.k_proj.weight' has shape \(3, 64\), expected \(32, 64\)"),
])
def test_strict_loading_names_the_tensor(tmp_path, tiny, damage, match):
    state = dict(tiny.state_dict())
    damage(state)
    save_hf_dir(tmp_path, tiny.config, state)
    with pytest.raises(WeightsError, match=match):
        read_hf_dir(tmp_path)


def test_corrupt_safetensors_is_clear(tmp_path, tiny):
    _save(tmp_path, tiny)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError, match="corrupt safetensors"):
        read_hf_dir(tmp_path)


def test_hf_config_old_and_new_keys():
    new = {"model_type": "gemma3_text", "num_hidden_layers": 12, "sliding_window": 1024, "head_dim": 128,
           "query_pre_attn_scalar": 168, "num_attention_heads": 8, "num_key_value_heads": 4,
           "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    old = {"model_type": "gemma3_text", "num_hidden_layers": 12, "sliding_window": 1024, "head_dim": 128,
           "query_pre_attn_scalar": 168, "num_attention_heads": 8, "num_key_value_heads": 4,
           "rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window_pattern": 6,
           "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    a, b = from_hf_config(new), from_hf_config(old)
    assert a == b
    assert a.rope_global_scale == 8.0 and a.rope_local_base == 1e4 and a.query_pre_attn_scalar == 168
    assert a.global_layers == [5, 11]


def test_unknown_architecture():
    with pytest.raises(UnsupportedModelError, match="unknown architecture"):
        from_hf_config({"model_type": "llama"})
    with pytest.raises(UnsupportedModelError, match="unknown architecture 'llama'"):
        from_gguf_metadata({"general.architecture": "llama"})


@pytest.mark.parametrize("change, match", [
    ({"sliding_window_pattern": 0}, "local_per_global must be >= 0"),
    ({"num_hidden_layers": 2**40}, "num_layers must be in"),
    ({"hidden_size": "wide"}, "invalid model configuration"),
])
def test_bad_config_values_are_named(change, match):
    with pytest.raises(UnsupportedModelError, match=match):
        from_hf_config({"model_type": "gemma3_text", "num_hidden_layers": 6, **change})


def test_presets_follow_the_report():
    p = PRESETS
    assert [p[n].num_layers for n in p] == [18, 26, 34, 48, 62]
    assert p["27b"].query_pre_attn_scalar == 168 and p["27b"].head_dim == 128
    assert p["4b"].rope_global_scale == 8.0 and p["1b"].rope_global_scale == 1.0
    assert all(len(c.global_layers) * 6 == c.num_layers - c.num_layers % 6 for c in p.values())
    # Parameter counts land on the names (embedding included).
    assert 0.26e9 < p["270m"].num_params() < 0.28e9
    assert 0.95e9 < p["1b"].num_params() < 1.05e9
    assert 26e9 < p["27b"].num_params() < 28e9
