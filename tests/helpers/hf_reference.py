"""Builds transformers' Gemma3ForCausalLM with exactly our weights: the numerics reference."""

from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from gemma3.model.config import GLOBAL, Gemma3Config


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


def hf_multimodal_model(model, vision):
    """transformers' Gemma3ForConditionalGeneration carrying `model`'s and `vision`'s weights."""
    from transformers import Gemma3Config as HFGemma3Config
    from transformers import Gemma3ForConditionalGeneration

    vc = vision.config
    config = HFGemma3Config(
        text_config=hf_config(model.config),
        vision_config=dict(model_type="siglip_vision_model", image_size=vc.image_size, patch_size=vc.patch_size,
                           hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size,
                           num_hidden_layers=vc.num_layers, num_attention_heads=vc.num_heads,
                           layer_norm_eps=vc.layer_norm_eps, vision_use_head=False),
        mm_tokens_per_image=vc.mm_tokens_per_image,
    )
    ref = Gemma3ForConditionalGeneration(config).to(model.dtype).eval()
    ref.set_attn_implementation("eager")
    state = {f"model.language_model.{k}": v for k, v in model.state_dict().items()}
    state["lm_head.weight"] = model.embed_tokens.weight
    for k, v in vision.state_dict().items():  # written out here, independently of our loader's mapping
        if k.startswith("projector."):
            state["model.multi_modal_projector." + k.removeprefix("projector.")] = v
        else:
            state["model.vision_tower." + k.replace("layers.", "encoder.layers.", 1)] = v
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return ref
