"""Builds transformers' Gemma3ForCausalLM with exactly our weights: the numerics reference."""

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from gemma3.config import GLOBAL, Gemma3Config


def hf_config(cfg: Gemma3Config) -> Gemma3TextConfig:
    full = {"rope_type": "default", "rope_theta": cfg.rope_global_base}
    if cfg.rope_global_scale != 1.0:
        full = {"rope_type": "linear", "factor": cfg.rope_global_scale, "rope_theta": cfg.rope_global_base}
    return Gemma3TextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_context, rms_norm_eps=cfg.rms_norm_eps,
        query_pre_attn_scalar=cfg.query_pre_attn_scalar, sliding_window=cfg.sliding_window,
        layer_types=["full_attention" if t == GLOBAL else "sliding_attention" for t in cfg.layer_types],
        rope_parameters={"full_attention": full,
                         "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_base}},
        attn_implementation="eager", pad_token_id=0,
    )


def hf_model(model) -> Gemma3ForCausalLM:
    """A transformers model carrying `model`'s weights (same dtype)."""
    ref = Gemma3ForCausalLM(hf_config(model.config)).to(model.dtype).eval()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["lm_head.weight"] = model.embed_tokens.weight
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= set(), (missing, unexpected)
    return ref
