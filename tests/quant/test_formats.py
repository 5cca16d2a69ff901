"""Weight formats (quant/formats.py, quant/sfp8.py) and the module swap (quant/apply.py).

Each format's quantize → dequantize error is checked against its own bound on random tensors
whose rows span five orders of magnitude; SFP8 against gemma.cpp's codec (all 256 codes, its
golden values, its exhaustive bf16 statistics); int4-block32 byte for byte against the gguf package.
"""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gq

from gemma3.model.decoder import Gemma3
from gemma3.quant import FORMATS, QuantError, dequantize, fake_quant, parse_recipe, quantize, quantize_model, sfp8
from gemma3.quant.apply import QuantizedEmbedding, QuantizedLinear, float_state
from gemma3.quant.formats import ROWS_PER_SLICE, get_format
from tests.helpers.models import random_model, tiny_config


def weights(rows=96, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 10 ** torch.empty(rows, 1).uniform_(-4, 1, generator=g)
    w[0] = 0.0  # an all-zero row/block
    w[1, :32] = 0.5  # a block of equal values
    w[2, :32] = torch.linspace(-1, 1, 32)  # the extreme at both signs
    return w


def blocks(w, n=32):
    return w.reshape(-1, n)


def f16_error(d):
    return (d - d.half().float()).abs()


# ---- error bounds ----------------------------------------------------------------------------

def test_int8_channel_within_half_a_step():
    w = weights()
    err = (dequantize(quantize(w, "int8-channel")) - w).abs()
    s = w.abs().amax(dim=1, keepdim=True) / 127
    assert (err <= s / 2 * (1 + 1e-5) + 1e-30).all()


def test_int4_channel_within_half_a_step():
    w = weights()
    q = quantize(w, "int4-channel")
    assert q.data.shape == (w.shape[0], w.shape[1] // 2)
    err = (dequantize(q) - w).abs()
    s = w.abs().amax(dim=1, keepdim=True) / 7
    assert (err <= s / 2 * (1 + 1e-5) + 1e-30).all()


@pytest.mark.parametrize("fmt,levels", [("int4-block32", 8), ("q5_0", 16)])
def test_signed_block_formats_within_half_a_step(fmt, levels):
    """d = (value of largest magnitude) / -levels, stored as f16: half a step plus the f16 rounding
    of d; values of the opposite sign beyond levels - 1/2 steps clip and may miss by a full step."""
    b = blocks(weights())
    err = (blocks(dequantize(quantize(b.reshape(-1, 256), fmt))) - b).abs()
    d = b.gather(1, b.abs().argmax(1, keepdim=True)) / -levels
    slack = levels * f16_error(d) + 1e-7 * d.abs()
    clipped = b / torch.where(d == 0, 1, d) > levels - 0.5
    bound = torch.where(clipped, d.abs(), d.abs() / 2) + slack
    assert (err <= bound).all()


@pytest.mark.parametrize("fmt,levels", [("q4_1", 15), ("q5_1", 31)])
def test_offset_block_formats_within_half_a_step(fmt, levels):
    b = blocks(weights())
    err = (blocks(dequantize(quantize(b.reshape(-1, 256), fmt))) - b).abs()
    lo, hi = b.amin(1, keepdim=True), b.amax(1, keepdim=True)
    d = (hi - lo) / levels
    bound = d / 2 + levels * f16_error(d) + f16_error(lo) + 1e-6 * (hi.abs() + lo.abs())
    assert (err <= bound).all()


def test_q8_0_within_half_a_step():
    b = blocks(weights())
    err = (blocks(dequantize(quantize(b.reshape(-1, 256), "q8_0"))) - b).abs()
    d = b.abs().amax(1, keepdim=True) / 127
    assert (err <= d / 2 + 127 * f16_error(d) + 1e-7 * d).all()


@pytest.mark.parametrize("fmt,rel,tiny", [("f16", 2.0 ** -11, 2.0 ** -25), ("bf16", 2.0 ** -8, 0.0), ("f32", 0.0, 0.0)])
@pytest.mark.parametrize("seed", range(4))
def test_float_formats_round_to_nearest(fmt, rel, tiny, seed):
    """Half a unit in the last place, relative; below f16's normal range (6.1e-5) its subnormals
    are 2^-24 apart, so half of that absolute (an unseeded draw there failed CI once)."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(seed))
    w[0, :4] = torch.tensor([3e-5, -1e-6, 2.0 ** -20, 0.0])
    assert ((dequantize(quantize(w, fmt)) - w).abs() <= rel * w.abs() + tiny).all()


def test_sfp8_within_its_relative_bound():
    """Half a step after truncation to 6 mantissa bits: 2^-4 + 2^-6 relative at 3 mantissa bits
    (|x| ≥ 2^-7 after scaling), 2^-3 + 2^-6 at 2; flush to zero below 2^-23."""
    w = weights()  # max |x| > 1.875: the tensor is scaled down
    q = quantize(w, "sfp8")
    s = float(q.scale)
    assert s == pytest.approx(float(w.abs().max()) / 1.875)
    err = (dequantize(q) - w).abs()
    a = w.abs() / s
    rel = torch.where(a >= 2.0 ** -7, 2.0 ** -4 + 2.0 ** -6, 2.0 ** -3 + 2.0 ** -6) * (1 + 1e-6)
    bound = torch.where(a >= 2.0 ** -23, rel * w.abs(), torch.full_like(w, 2.0 ** -22 * s))
    assert (err <= bound).all()
    small = torch.randn(16, 64) * 0.01  # max |x| ≤ 1.875: gemma.cpp leaves the tensor unscaled
    assert float(quantize(small, "sfp8").scale) == 1.0


def test_every_format_has_a_bound_test():
    assert set(FORMATS) == {"int8-channel", "int4-channel", "int4-block32", "q5_0", "q4_1", "q5_1", "q8_0",
                            "f16", "bf16", "f32", "sfp8"}


# ---- int4-block32 = GGUF Q4_0, byte for byte --------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_int4_block32_bytes_equal_gguf_q4_0(seed):
    w = weights(64, 640, seed)
    w[5, :32] = torch.tensor([1.0, -1.0] * 16)  # tie between +max and -max: the first one wins
    w[6, :64] = 1e-30  # f16 scale underflows to zero
    ours = quantize(w, "int4-block32").data.numpy().reshape(-1)
    theirs = gq.quantize(w.numpy(), GGMLQuantizationType.Q4_0).reshape(-1)
    assert np.array_equal(ours, theirs)


# ---- SFP8 against gemma.cpp ------------------------------------------------------------------

def test_sfp8_every_code_decodes_and_re_encodes_to_itself():
    codes = torch.arange(256, dtype=torch.uint8)
    values = sfp8.decode(codes)
    assert len({v for v in values.tolist() if v != 0} | {0.0}) == 255  # gemma.cpp TestAllUnique
    again = sfp8.encode(values)
    assert torch.equal(again[codes != 0x80], codes[codes != 0x80])
    assert again[0x80] == 0  # 0x80 ("-0") is reserved; -0.0 encodes as 0


def test_sfp8_decode_matches_gemma_cpp_bit_decoder():
    """SfpCodec::DecBytes builds the bf16 directly: hi:lo = 0x3400 + c·32 for c < 64, 0x3800 + c·16 above."""
    c = torch.arange(1, 128, dtype=torch.int32)
    bf16 = torch.where(c < 64, 0x3400 + c * 32, 0x3800 + c * 16)
    expected = (bf16 << 16).view(torch.float32)
    assert torch.equal(sfp8.decode(c.to(torch.uint8)), expected)
    assert torch.equal(sfp8.decode((c | 0x80).to(torch.uint8)), -expected)


# gemma.cpp compression/sfp_test.cc TestGolden: (input, decoded output), both signs.
GOLDEN = [(0.46875, 0.46875), (0.9375, 0.9375), (0.484375, 0.5), (0.96875, 1.0), (0.28125, 0.28125),
          (0.5625, 0.5625), (0.296875, 0.3125), (0.59375, 0.625), (0.279296875, 0.28125), (0.55859375, 0.5625),
          (0.265625, 0.25), (0.53125, 0.5), (0.0068359375, 0.0068359375), (0.00732421875, 0.0078125),
          (0.007568359375, 0.0078125), (1.0, 1.0), (1.0625, 1.0), (2.384185791015625e-7, 2.384185791015625e-7),
          (1.49011611938e-07, 1.49011611938e-07), (1.19209289551e-07, 1.49011611938e-07), (5.96046447754e-08, 0.0),
          (8.94069671631e-08, 0.0), (1.11758708954e-07, 1.49011611938e-07), (0.013841, 0.013671875)]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_sfp8_gemma_cpp_golden_values(sign):
    x = torch.tensor([sign * a for a, _ in GOLDEN])
    want = torch.tensor([sign * b for _, b in GOLDEN])
    assert torch.equal(sfp8.decode(sfp8.encode(x)).abs(), want.abs())
    assert torch.equal(sfp8.decode(sfp8.encode(x)), torch.where(want == 0, 0.0, want))


def test_sfp8_gemma_cpp_exhaustive_statistics():
    """gemma.cpp TestEncDec: every bf16 with the low 3 mantissa bits clear and |x| ≤ 1.875, both
    signs: max |error| exactly 0.0625, 256 exact, 3322 rounded to zero, no sign flips, ΣL1 in [1.880, 1.885]."""
    f = (torch.arange(0, 0x8000, 8, dtype=torch.int32) << 16).view(torch.float32)
    f = f[torch.isfinite(f) & (f <= 1.875)]
    x = torch.stack([f, -f], 1).reshape(-1)
    y = sfp8.decode(sfp8.encode(x))
    err = (x - y).abs()
    assert err.max() == 0.0625
    assert int((err == 0).sum()) == 256
    assert int(((y == 0) & (x != 0)).sum()) == 3322
    assert int((x * y < 0).sum()) == 0
    assert 1.880 <= err.double().sum() <= 1.885


def test_sfp8_float32_inputs_are_truncated_to_bf16_first():
    """Enc4F chops float32 to bf16 without rounding, then EncBytes rounds."""
    x = torch.randn(4096) * 0.3
    x = x.clamp(-1.875, 1.875)
    truncated = ((x.view(torch.int32) >> 16) << 16).view(torch.float32)
    assert torch.equal(sfp8.encode(x), sfp8._encode_bits(truncated.view(torch.int32)))


def test_sfp8_rejects_out_of_range():
    with pytest.raises(ValueError, match="1.875"):
        sfp8.encode(torch.tensor([2.0]))
    with pytest.raises(ValueError):
        sfp8.encode(torch.tensor([float("nan")]))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_tall_weights_are_quantized_in_slices_to_the_same_bytes(fmt):
    w = torch.randn(ROWS_PER_SLICE + 40, 32, generator=torch.Generator().manual_seed(0))
    whole, sliced = get_format(fmt).quantize(w), quantize(w, fmt)
    assert torch.equal(sliced.data, whole.data) and sliced.shape == whole.shape
    assert (sliced.scale is None and whole.scale is None) or torch.equal(sliced.scale, whole.scale)


# ---- fake quantization (QAT) -------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["int4-block32", "int4-channel", "sfp8"])
def test_fake_quant_forward_is_roundtrip_backward_is_identity(fmt):
    w = torch.randn(16, 64, requires_grad=True)
    out = fake_quant(w, fmt)
    assert torch.equal(out, dequantize(quantize(w, fmt)))
    g = torch.randn(16, 64)
    out.backward(g)
    assert torch.equal(w.grad, g)


# ---- recipes -----------------------------------------------------------------------------------

def test_recipes_pick_the_most_specific_format():
    r = parse_recipe("q4_0-embed-q8")
    assert r.format_for("embed_tokens.weight") == "q8_0"
    assert r.format_for("layers.0.mlp.down_proj.weight") == "int4-block32"
    r = parse_recipe("attn=q8_0,v_proj=int8-channel", "sfp8")
    assert r.format_for("layers.3.self_attn.q_proj.weight") == "q8_0"
    assert r.format_for("layers.3.self_attn.v_proj.weight") == "int8-channel"
    assert r.format_for("layers.3.mlp.up_proj.weight") == "sfp8"
    assert r.format_for("embed_tokens.weight") == "sfp8"
    assert r.spec == "default=sfp8,attn=q8_0,v_proj=int8-channel"


@pytest.mark.parametrize("recipe,default,match", [
    (None, "nope", "unknown format 'nope'"),
    ("embed=q9_9", "q8_0", "unknown format 'q9_9'"),
    ("lm_head=q8_0", "q8_0", "unknown recipe key 'lm_head'"),
    ("fancy", "q8_0", "unknown recipe 'fancy'"),
    ("embed=q8_0", None, "no default format"),
])
def test_bad_recipes_are_one_line_errors(recipe, default, match):
    with pytest.raises(QuantError, match=match) as e:
        parse_recipe(recipe, default)
    assert "\n" not in str(e.value)


def test_format_that_cannot_hold_a_shape_is_refused_before_any_change():
    model = random_model(tiny_config(hidden=48, vocab=257))  # rows of 48: not whole blocks of 32
    with pytest.raises(QuantError, match="int4-block32 cannot hold"):
        quantize_model(model, parse_recipe(default="int4-block32"))
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


# ---- the module swap ---------------------------------------------------------------------------

def dequantized_reference(model):
    with torch.device("meta"):
        ref = Gemma3(model.config)
    ref.load_state_dict(float_state(model), strict=True, assign=True)
    return ref.eval()


@pytest.mark.parametrize("recipe", ["int8-channel", "int4-channel", "int4-block32", "sfp8", "q8_0", "q5_1",
                                    "q4_0-embed-q8"])
def test_module_swap_logits_match_dequantized_reference(recipe):
    model = random_model(tiny_config())
    r = parse_recipe(recipe) if "embed" in recipe else parse_recipe(default=recipe)
    quantize_model(model, r)
    assert isinstance(model.embed_tokens, QuantizedEmbedding)
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 1 + 7 * model.config.num_layers
    ids = torch.randint(0, model.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got, want = model(ids), dequantized_reference(model)(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert model.quant_recipe == r.spec


def test_quantized_embedding_lookup_and_head_slices():
    model = random_model(tiny_config())
    quantize_model(model, parse_recipe(default="int4-channel"))
    emb = model.embed_tokens
    emb.rows_per_slice = 50  # several LM-head slices, the last one partial
    table = dequantize(emb.quantized)
    ids = torch.tensor([[0, 5, 256, 5]])
    assert torch.equal(emb(ids), table[ids])
    h = torch.randn(3, model.config.hidden_size)
    torch.testing.assert_close(emb.attend(h), h @ table.T)


def test_requantizing_converts_between_formats():
    model = random_model(tiny_config())
    quantize_model(model, parse_recipe(default="int8-channel"))
    once = float_state(model)
    quantize_model(model, parse_recipe(default="q8_0"))
    assert all(m.fmt == "q8_0" for m in model.modules() if isinstance(m, QuantizedLinear))
    expected = dequantize(quantize(once["layers.0.mlp.up_proj.weight"], "q8_0"))
    assert torch.equal(float_state(model)["layers.0.mlp.up_proj.weight"], expected)


# ---- the real 270M -------------------------------------------------------------------------------

def test_real_270m_int4_block32_bytes_and_q4_0_embed_q8_swap():
    """On the embedded model's real weights: Q4_0 bytes equal gguf's, and the mixed recipe's
    module swap gives the logits of its own dequantized weights."""
    from gemma3.inference.load import load

    model, tok = load()
    for name in ("layers.0.self_attn.q_proj.weight", "layers.5.mlp.down_proj.weight"):
        w = model.get_parameter(name).detach()
        assert np.array_equal(quantize(w, "int4-block32").data.numpy().reshape(-1),
                              gq.quantize(w.numpy(), GGMLQuantizationType.Q4_0).reshape(-1)), name
    quantize_model(model, parse_recipe("q4_0-embed-q8"))
    ids = torch.tensor([tok.encode("The capital of France is", add_bos=True)])
    with torch.inference_mode():
        got, want = model(ids), dequantized_reference(model)(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert tok.decode([int(got[0, -1].argmax())]).strip()  # a real word comes out
