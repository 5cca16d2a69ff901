"""Vision: SigLIP + projector, Pan & Scan, prompt layout and bidirectional image attention,
against transformers' Gemma3ForConditionalGeneration and Gemma3Processor on tiny random configs."""

import dataclasses
import io
import json

import gguf
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import Gemma3Processor, PreTrainedTokenizerFast
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from gemma3.formats.checkpoint import WeightsError, expected_shapes, read_hf_dir, read_mmproj, read_vision_hf_dir
from gemma3.inference import multimodal as mm
from gemma3.inference.generate import generate_step
from gemma3.inference.load import load_tokenizer, load_vision
from gemma3.inference.sampling import SamplingParams
from gemma3.model.config import UnsupportedModelError
from gemma3.model.vision import VisionConfig, VisionModel, from_gguf_metadata, from_hf_config, siglip_so400m
from tests.helpers.hf_reference import hf_multimodal_model
from tests.helpers.images import TALL, VISION, WIDE, picture, png_claiming, random_vision
from tests.helpers.models import random_model, tiny_config

PAS = mm.PanAndScan()








@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def pair():
    """(our decoder, our vision model, transformers' model with the same weights); 3 layers L L G,
    window 8 < 16 soft tokens per view, so images straddle windows and prefill chunks."""
    model = random_model(tiny_config(layers=3, local_per_global=2, window=8, vocab=262_208))
    vision = random_vision()
    return model, vision, hf_multimodal_model(model, vision)


def hf_image_processor(size=64) -> Gemma3ImageProcessorPil:
    return Gemma3ImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def hf_pas_kwargs(pas: mm.PanAndScan | None) -> dict:
    if pas is None:
        return {"do_pan_and_scan": False}
    return {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": pas.min_crop_size,
            "pan_and_scan_max_num_crops": pas.max_crops, "pan_and_scan_min_ratio_to_activate": pas.min_ratio}


def hf_processor(mm_tokens=16, size=64) -> Gemma3Processor:
    """The real Gemma3Processor; its tokenizer is a stand-in (we compare the expanded text, which
    the processor builds before tokenizing, and tokenize it ourselves)."""
    from tokenizers import Tokenizer, models

    specials = ["<pad>", "<bos>", mm.BOI, mm.EOI, mm.IMAGE_SOFT_TOKEN, "<unk>"]
    stand_in = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({s: i for i, s in enumerate(specials)}, unk_token="<unk>")),
        bos_token="<bos>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"boi_token": mm.BOI, "eoi_token": mm.EOI, "image_token": mm.IMAGE_SOFT_TOKEN})
    return Gemma3Processor(image_processor=hf_image_processor(size), tokenizer=stand_in, image_seq_length=mm_tokens)


def hf_inputs(text, images, pas):
    """transformers' expanded prompt text and pixel values for `images`."""
    proc = hf_processor()
    out = proc.image_processor(images, return_tensors="pt", **hf_pas_kwargs(pas))
    replacements = [proc.replace_image_token(out, i) for i in range(len(images))]
    expanded, _ = proc.get_text_with_replacements([text], replacements)
    return expanded[0], out["pixel_values"]


def soft_token_ids(tok, expanded: str) -> list[int]:
    """An independent tokenization of the processor's string: <image_soft_token> as its own id."""
    pieces = expanded.split(mm.IMAGE_SOFT_TOKEN)
    ids = [tok.bos_id] + tok.encode(pieces[0], add_bos=False, parse_special=True)
    for piece in pieces[1:]:
        ids += [mm.IMAGE_SOFT_TOKEN_ID] + tok.encode(piece, add_bos=False, parse_special=True)
    return ids


# ------------------------------------------------------------------ encoder and projector

def test_vision_tower_and_projector_match_transformers(pair):
    _, vision, ref = pair
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ours = vision(pixels)
        theirs = ref.model.get_image_features(pixels).pooler_output
    assert ours.shape == (3, 16, 64)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_full_size_config():
    cfg = siglip_so400m(2560)
    assert (cfg.patches_per_side, cfg.pool, cfg.mm_tokens_per_image) == (64, 4, 256)
    shapes = expected_shapes(cfg)
    n = sum(int(np.prod(s)) for s in shapes.values())
    assert len([k for k in shapes if k.endswith("fc1.weight")]) == 27
    assert shapes["embeddings.position_embedding.weight"] == (4096, 1152)
    assert shapes["projector.mm_input_projection_weight"] == (1152, 2560)
    assert 400e6 < n - 1152 * 2560 < 430e6  # SigLIP-So400m


def test_vision_config_readers():
    hf = {"model_type": "gemma3", "mm_tokens_per_image": 256, "text_config": {"hidden_size": 2560},
          "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                            "model_type": "siglip_vision_model", "num_attention_heads": 16,
                            "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False}}
    assert from_hf_config(hf) == siglip_so400m(2560)
    assert from_hf_config({"model_type": "gemma3_text"}) is None
    md = {"general.architecture": "clip", "clip.projector_type": "gemma3", "clip.vision.image_size": 896,
          "clip.vision.patch_size": 14, "clip.vision.embedding_length": 1152,
          "clip.vision.feed_forward_length": 4304, "clip.vision.block_count": 27,
          "clip.vision.attention.head_count": 16, "clip.vision.projection_dim": 2560}
    assert from_gguf_metadata(md) == siglip_so400m(2560)
    with pytest.raises(UnsupportedModelError, match="not a Gemma 3 mmproj"):
        from_gguf_metadata(md | {"clip.projector_type": "mlp"})
    with pytest.raises(ValueError, match="cannot be pooled"):
        VisionConfig(64, 4, 32, 48, 2, 4, mm_tokens_per_image=9, projection_dim=64)


# ------------------------------------------------------------------ Pan & Scan and pixels

PAS_CASES = [
    ((896, 896), PAS),  # square: no crops
    ((1200, 800), PAS),  # landscape 1.5 → 2 crops
    ((800, 1200), PAS),  # portrait 1.5 → 2 crops
    ((2048, 512), PAS),  # panorama 4:1 → 4 crops
    ((4000, 500), PAS),  # 8:1, clamped to max_crops
    ((1500, 600), PAS),  # 2.5 rounds half up → 3 crops
    ((1001, 333), PAS),  # ceil'd crop width, last crop cut at the border
    ((1000, 830), PAS),  # ratio 1.205, just above the threshold
    ((1000, 840), PAS),  # ratio 1.19, just below
    ((511, 256), PAS),  # floor(long / min_crop) = 1, raised to 2 crops of 256
    ((700, 250), PAS),  # short side below min_crop_size: no crops
    ((257, 1031), PAS),  # tall 4:1 → 4 crops of 258 rows
    ((300, 200), PAS),  # tiny landscape
    ((40, 30), PAS),  # tiny
    ((1000, 400), mm.PanAndScan(min_crop_size=128, max_crops=3, min_ratio=1.5)),
    ((900, 700), mm.PanAndScan(min_crop_size=100, max_crops=6, min_ratio=1.1)),
]


@pytest.mark.parametrize("size,pas", PAS_CASES, ids=[f"{w}x{h}" for (w, h), _ in PAS_CASES])
def test_pan_and_scan_matches_transformers(size, pas):
    img = picture(*size, seed=size[0])
    proc = hf_image_processor(896)
    kwargs = hf_pas_kwargs(pas)
    # Crop boxes: our crops hold exactly transformers' crop pixels.
    chw = np.asarray(img).transpose(2, 0, 1)
    theirs = proc.pan_and_scan(chw, kwargs["pan_and_scan_min_crop_size"], kwargs["pan_and_scan_max_num_crops"],
                               kwargs["pan_and_scan_min_ratio_to_activate"])
    ours = mm.views(img, pas)[1:]
    assert len(ours) == len(theirs)
    for crop, ref in zip(ours, theirs):
        assert np.array_equal(np.asarray(crop).transpose(2, 0, 1), ref)
    # Pixel tensors: full image first, then the crops.
    out = proc(img, return_tensors="pt", **kwargs)
    pixels = torch.stack([mm.pixels(view, 896) for view in mm.views(img, pas)])
    assert out["num_crops"].tolist() == [len(ours)]
    assert pixels.shape == out["pixel_values"].shape
    assert (pixels - out["pixel_values"]).abs().max().item() <= 1e-5


def test_pan_and_scan_case_coverage():
    counts = [len(pas.boxes(*size)) for size, pas in PAS_CASES]
    assert {0, 2, 3, 4} <= set(counts) and len(PAS_CASES) >= 12


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK"])
def test_colour_modes_match_transformers(mode, tmp_path):
    img = picture(120, 90, 5, mode="RGB")
    if mode in ("RGBA", "LA"):
        img.putalpha(Image.fromarray(np.tile(np.arange(120, dtype=np.uint8) * 2, (90, 1))))
    img = img.convert(mode)
    if mode == "P":
        img.info["transparency"] = 3
    out = hf_image_processor()(img, return_tensors="pt", do_pan_and_scan=False)
    assert (mm.pixels(mm.to_rgb(img), 64) - out["pixel_values"][0]).abs().max().item() <= 1e-5


# ------------------------------------------------------------------ prompt layout and logits

PROMPTS = {
    "one": ("<start_of_image>Describe this image.", [WIDE]),
    "two": ("Compare <start_of_image> with\n<start_of_image>, please.", [WIDE, TALL]),
}


@pytest.mark.parametrize("pas", [None, PAS], ids=["no_pas", "pas"])
@pytest.mark.parametrize("name", PROMPTS)
def test_logits_match_transformers(pair, tok, name, pas):
    model, vision, ref = pair
    text, images = PROMPTS[name]
    prompt = mm.prepare(model, vision, tok, text, images, pas)
    expanded, pixel_values = hf_inputs(text, images, pas)
    crops = [len(mm.views(im, pas)) - 1 for im in images]
    assert mm.expand_prompt(text, crops, 16) == expanded
    assert prompt.ids == soft_token_ids(tok, expanded)
    ids = torch.tensor([prompt.ids])
    token_type_ids = (ids == mm.IMAGE_SOFT_TOKEN_ID).long()
    with torch.inference_mode():
        ours = model(ids, embeds=prompt.embeds, groups=prompt.groups)
        theirs = ref(input_ids=ids, pixel_values=pixel_values, token_type_ids=token_type_ids).logits
    delta = (ours - theirs).abs().max().item()
    print(f"{name} {pas is not None}: {ids.shape[1]} tokens, {sum(crops) + len(images)} views, max|Δ| = {delta:.2e}")
    assert delta <= 1e-4
    assert prompt.groups.max().item() == sum(crops) + len(images) - 1


def test_cached_generation_equals_full_recompute_and_transformers(pair, tok):
    model, vision, ref = pair
    text, images = PROMPTS["two"]
    prompt = mm.prepare(model, vision, tok, text, images, PAS)
    ours = list(generate_step(model, prompt, SamplingParams(), max_tokens=6))
    n = len(prompt.ids)
    cache = model.new_cache(1, n + len(ours))
    ids, embeds, groups = list(prompt.ids), prompt.embeds, prompt.groups
    with torch.inference_mode():
        cached = model(torch.tensor([ids]), cache, last_only=True, embeds=embeds, groups=groups)[0, -1]
        for token in ours:
            full = model(torch.tensor([ids]), last_only=True, embeds=embeds, groups=groups)[0, -1]
            assert (cached - full).abs().max().item() <= 1e-4
            assert int(full.argmax()) == token
            ids.append(token)
            embeds = torch.cat([embeds, model.embed(torch.tensor([[token]]))], 1)
            groups = torch.cat([groups, torch.full((1, 1), -1)], 1)
            cached = model(torch.tensor([[token]]), cache, last_only=True)[0, -1]
    _, pixel_values = hf_inputs(text, images, PAS)
    x = torch.tensor([prompt.ids])
    with torch.inference_mode():
        out = ref.generate(input_ids=x, pixel_values=pixel_values, token_type_ids=(x == mm.IMAGE_SOFT_TOKEN_ID).long(),
                           max_new_tokens=len(ours), min_new_tokens=len(ours), do_sample=False)
    assert out[0, n:].tolist() == ours


# ------------------------------------------------------------------ the attention mask

# text 3 | image A: 16 soft tokens | text 3 | image B: 16 | text 4  (window 8, prefill chunks of 8)
GROUPS = torch.tensor([[-1] * 3 + [0] * 16 + [-1] * 3 + [1] * 16 + [-1] * 4])
A, B = range(3, 19), range(22, 38)
TEXT = [i for i in range(GROUPS.shape[1]) if GROUPS[0, i] < 0]


@pytest.fixture(scope="module")
def masked():
    model = random_model(tiny_config(layers=3, local_per_global=2, window=8))
    embeds = torch.randn(1, GROUPS.shape[1], 64)

    def changed_by(j):
        """Positions whose logits change when the input at position j changes."""
        bumped = embeds.clone()
        bumped[0, j] += 1.0
        with torch.inference_mode():
            before = model(torch.zeros_like(GROUPS), embeds=embeds, groups=GROUPS)[0]
            after = model(torch.zeros_like(GROUPS), embeds=bumped, groups=GROUPS)[0]
        return {i for i in range(GROUPS.shape[1]) if (before[i] - after[i]).abs().max() > 1e-6}

    return changed_by


def test_soft_token_sees_later_tokens_of_its_image(masked):
    assert A[0] in masked(A[-1])  # 15 positions ahead, beyond the window of 8
    assert B[3] in masked(B[10])


def test_text_never_attends_forward(masked):
    for j in (1, A[5], 20, B[0], 40):
        assert not {i for i in TEXT if i < j} & masked(j)


def test_images_never_see_later_images(masked):
    assert not set(A) & masked(B[0])
    assert not set(A) & masked(B[-1])
    assert set(B) <= masked(A[-1])  # while a later image does see an earlier one


@pytest.mark.parametrize("start", [0, 1, 5, 7, 8, 12])
def test_image_straddling_window_and_chunks_matches_transformers(pair, start):
    model, _, ref = pair
    length = start + 16 + 11
    groups = torch.full((1, length), -1)
    groups[0, start:start + 16] = 0
    embeds = torch.randn(1, length, 64)
    with torch.inference_mode():
        ours = model(torch.zeros_like(groups), embeds=embeds, groups=groups)
        theirs = ref(inputs_embeds=embeds, token_type_ids=(groups >= 0).long()).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


# ------------------------------------------------------------------ weights

def _rename(state: dict, layout: str) -> dict:
    """transformers-5 keys (what save_pretrained wrote) in another transformers version's layout."""
    out = {}
    for k, v in state.items():
        if layout == "4.50":
            k = k.replace("vision_tower.", "vision_tower.vision_model.", 1)
        elif layout == "4.52":
            k = k.replace("language_model.model.", "language_model.", 1)
            k = "model." + k.replace("vision_tower.", "vision_tower.vision_model.", 1)
        out[k] = v
    return out


@pytest.fixture(scope="module")
def hf_dir(pair, tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3mm")
    pair[2].save_pretrained(path)
    return path


def _read_state(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("layout", ["5.x", "4.50", "4.52"])
def test_hf_checkpoint_layouts_load(pair, hf_dir, tmp_path, layout):
    model, vision, _ = pair
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    state = _rename(_read_state(hf_dir), layout)
    state["vision_tower.vision_model.head.probe"] = torch.zeros(32, 32)  # SigLIP's pooling head: not Gemma's
    save_file(state, str(tmp_path / "model.safetensors"))
    cfg, text_state = read_hf_dir(tmp_path)
    vcfg, vision_state = read_vision_hf_dir(tmp_path)
    assert cfg.num_layers == 3 and vcfg == VISION
    for k, v in model.state_dict().items():
        assert torch.equal(text_state[k], v), k
    for k, v in vision.state_dict().items():
        assert torch.equal(vision_state[k], v), k


@pytest.mark.parametrize("damage,match", [
    (lambda s: s.pop("vision_tower.encoder.layers.1.mlp.fc2.bias"), "missing tensor layers.1.mlp.fc2.bias"),
    (lambda s: s.update({"vision_tower.encoder.layers.2.mlp.fc1.weight": torch.zeros(48, 32)}),
     "unexpected tensor 'layers.2.mlp.fc1.weight'"),
    (lambda s: s.update({"multi_modal_projector.mm_input_projection_weight": torch.zeros(64, 32)}),
     r"projector.mm_input_projection_weight' has shape \(64, 32\), expected \(32, 64\)"),
])
def test_hf_vision_loading_is_strict(hf_dir, tmp_path, damage, match):
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    state = _read_state(hf_dir)
    damage(state)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match=match):
        read_vision_hf_dir(tmp_path)


def test_text_only_model_has_no_vision(tmp_path):
    from gemma3.formats.checkpoint import save_hf_dir

    model = random_model(tiny_config())
    save_hf_dir(tmp_path, model.config, model.state_dict())
    with pytest.raises(WeightsError, match="text-only model"):
        load_vision(tmp_path)


def write_mmproj(path, vision: VisionModel, legacy_ffn_names=False, extra=None, drop=None):
    """An mmproj GGUF as llama.cpp's convert_hf_to_gguf.py (Gemma3VisionModel) writes one: HF
    orientation throughout, soft_emb_norm stored as 1 + w, the projection forced to F16."""
    cfg = vision.config
    w = gguf.GGUFWriter(path, "clip")
    w.add_clip_projector_type(gguf.VisionProjectorType.GEMMA3)
    w.add_clip_has_vision_encoder(True)
    w.add_vision_projection_dim(cfg.projection_dim)
    w.add_vision_image_size(cfg.image_size)
    w.add_vision_patch_size(cfg.patch_size)
    w.add_vision_embedding_length(cfg.hidden_size)
    w.add_vision_feed_forward_length(cfg.intermediate_size)
    w.add_vision_block_count(cfg.num_layers)
    w.add_vision_head_count(cfg.num_heads)
    w.add_vision_attention_layernorm_eps(cfg.layer_norm_eps)
    w.add_vision_image_mean([0.5] * 3)
    w.add_vision_image_std([0.5] * 3)
    w.add_vision_use_gelu(True)
    if cfg.pool != 4:
        w.add_vision_projector_scale_factor(cfg.pool)
    layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
             "mlp.fc1": "ffn_down" if legacy_ffn_names else "ffn_up",
             "mlp.fc2": "ffn_up" if legacy_ffn_names else "ffn_down"}
    top = {"embeddings.patch_embedding": "v.patch_embd", "embeddings.position_embedding": "v.position_embd",
           "post_layernorm": "v.post_ln"}
    for name, t in vision.state_dict().items():
        data = t.float().numpy()
        if name == "projector.mm_input_projection_weight":
            gguf_name, data = "mm.input_projection.weight", data.astype(np.float16)
        elif name == "projector.mm_soft_emb_norm.weight":
            gguf_name, data = "mm.soft_emb_norm.weight", data + 1.0
        elif name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            module, kind = rest.rsplit(".", 1)
            gguf_name = f"v.blk.{i}.{layer[module]}.{kind}"
        else:
            module, kind = name.rsplit(".", 1)
            gguf_name = f"{top[module]}.{kind}"
        if gguf_name != drop:
            w.add_tensor(gguf_name, data)
    for gguf_name, data in (extra or {}).items():
        w.add_tensor(gguf_name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["convert_hf_to_gguf", "legacy_ffn_names"])
def test_mmproj_gguf_round_trip(pair, tmp_path, legacy):
    _, vision, _ = pair
    loaded = load_vision(mmproj=write_mmproj(tmp_path / "mmproj.gguf", vision, legacy_ffn_names=legacy))
    assert loaded.config.layer_norm_eps == pytest.approx(1e-6)  # GGUF stores it as float32
    assert dataclasses.replace(loaded.config, layer_norm_eps=1e-6) == VISION
    want = vision.state_dict()
    for k, v in loaded.state_dict().items():
        # The projection is stored as F16, as llama.cpp's converter forces it.
        want_k = want[k].half().float() if k == "projector.mm_input_projection_weight" else want[k]
        assert (v - want_k).abs().max().item() <= (1e-7 if "soft_emb" in k else 0.0), k  # (1 + w) - 1 rounds


@pytest.mark.parametrize("kw,match", [
    ({"drop": "v.blk.1.ln2.bias"}, "missing tensor layers.1.layer_norm2.bias"),
    ({"extra": {"v.blk.0.attn_qkv.weight": np.zeros((96, 32), np.float32)}}, "unexpected tensor 'v.blk.0.attn_qkv"),
    ({"extra": {"v.blk.2.ffn_up.weight": np.zeros((48, 32), np.float32)}}, "unexpected tensor 'layers.2.mlp.fc1"),
])
def test_mmproj_loading_is_strict(pair, tmp_path, kw, match):
    path = write_mmproj(tmp_path / "mmproj.gguf", pair[1], **kw)
    with pytest.raises(WeightsError, match=match):
        read_mmproj(path)


# ------------------------------------------------------------------ bad images



def _truncated_jpeg(path):
    picture(200, 150).save(path, "JPEG")
    path.write_bytes(path.read_bytes()[:1500])


BAD_IMAGES = {
    "truncated.jpg": (_truncated_jpeg, "truncated"),
    "one_pixel.png": (lambda p: Image.new("RGB", (1, 1)).save(p), "1×1 image is too small"),
    "bomb.png": (lambda p: p.write_bytes(png_claiming(20000, 20000)), "decompression-bomb"),
    "large.png": (lambda p: p.write_bytes(png_claiming(10000, 10000)), "10000×10000 image has more than"),
    "notes.jpg": (lambda p: p.write_text("this is not a picture\n" * 20), "not an image"),
    "empty.png": (lambda p: p.write_bytes(b""), "not an image"),
    "missing.png": (lambda p: None, "no such file"),
    "folder.png": (lambda p: p.mkdir(), "is a directory"),
}


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_bad_images_give_one_line_errors(tmp_path, name):
    make, needle = BAD_IMAGES[name]
    path = tmp_path / name
    make(path)
    with pytest.raises(mm.ImageError) as info:
        mm.load_image(path)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert str(path) in message and needle in message, message


def test_cmyk_and_animated_gif_are_read_like_transformers(tmp_path):
    cmyk = tmp_path / "cmyk.jpg"
    picture(160, 100, 3).convert("CMYK").save(cmyk, "JPEG")
    gif = tmp_path / "anim.gif"
    frames = [picture(96, 64, 4).convert("P"), Image.new("P", (96, 64), 7)]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    proc = hf_image_processor()
    for path in (cmyk, gif):
        ours = mm.pixels(mm.load_image(path), 64)
        with Image.open(path) as img:  # transformers takes the opened image as it is: the first frame
            theirs = proc(img, return_tensors="pt", do_pan_and_scan=False)["pixel_values"][0]
        assert (ours - theirs).abs().max().item() <= 1e-5, path
    with Image.open(gif) as img:
        first = mm.to_rgb(img)
    assert np.array_equal(np.asarray(mm.load_image(gif)), np.asarray(first))


def test_placeholder_count_must_match_images(pair, tok):
    model, vision, _ = pair
    with pytest.raises(ValueError, match="2 <start_of_image> placeholders for 1 images"):
        mm.prepare(model, vision, tok, "<start_of_image><start_of_image>", [WIDE], None)
    assert mm.with_placeholders("Describe.", 2) == "<start_of_image><start_of_image>Describe."
    assert mm.with_placeholders("A <start_of_image> B", 1) == "A <start_of_image> B"


# ------------------------------------------------------------------ command line

@pytest.fixture(scope="module")
def mmproj_270m(tmp_path_factory):
    """A random mmproj for the embedded 270M text model (d_model 640): --mmproj end to end."""
    vision = random_vision(dataclasses.replace(VISION, projection_dim=640))
    return str(write_mmproj(tmp_path_factory.mktemp("mmproj") / "mmproj.gguf", vision))


@pytest.fixture(scope="module")
def model_270m():
    from gemma3.inference.load import load

    return load()


@pytest.fixture
def cli_270m(model_270m, monkeypatch):
    """The CLI with the embedded 270M model loaded once for the module (loading is tested elsewhere)."""
    from gemma3.cli import options as cli

    monkeypatch.setattr(cli, "load_model", lambda args: model_270m)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    path = tmp_path_factory.mktemp("images")
    WIDE.save(path / "wide.png")
    TALL.save(path / "tall.jpg", quality=95)
    return str(path / "wide.png"), str(path / "tall.jpg")


def test_cli_generate_with_images(cli_270m, mmproj_270m, image_files, tok, capsys):
    from tests.helpers.cli import run_cli as run_main

    text = "Describe <start_of_image> and <start_of_image>."
    counts = {}
    for flags in ([], ["--no-pan-and-scan"]):
        code, out, err = run_main(["generate", text, "--image", image_files[0], "--image", image_files[1],
                                   "--mmproj", mmproj_270m, "-n", "3", "--json", *flags], capsys)
        assert code == 0, err
        result = json.loads(out)
        assert result["completion_tokens"] == 3
        counts[bool(flags)] = result["prompt_tokens"]
    pas_layout = mm.expand_prompt(text, [3, 2], 16)
    assert counts == {False: len(soft_token_ids(tok, pas_layout)),
                      True: len(soft_token_ids(tok, mm.expand_prompt(text, [0, 0], 16)))}


def test_cli_image_errors_are_one_line(image_files, tmp_path, capsys):
    from tests.helpers.cli import one_line_error
    from tests.helpers.cli import run_cli as run_main

    one_line_error(*run_main(["generate", "Describe", "--image", image_files[0]], capsys), "--mmproj")
    missing = str(tmp_path / "nope.png")
    one_line_error(*run_main(["generate", "Describe", "--image", missing], capsys), missing, "no such file")


def test_cli_chat_image_command(cli_270m, mmproj_270m, image_files, capsys, monkeypatch):
    from tests.helpers.cli import run_cli as run_main

    lines = ["/image nope.png", f"/image {image_files[0]}", "What is in the picture?", "/exit"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    code, out, err = run_main(["chat", "--mmproj", mmproj_270m, "-n", "2"], capsys)
    assert code == 0
    assert "gemma3: error: /image: nope.png: no such file" in err
    assert f"(image {image_files[0]} attached" in err
    assert out.strip()  # the model answered
