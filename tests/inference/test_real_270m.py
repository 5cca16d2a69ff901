"""End to end on the embedded Gemma 3 270M GGUF, against transformers with the same weights."""


import pytest
import torch

from gemma3.inference.load import load
from tests.helpers import DATA
from tests.helpers.hf_reference import hf_model

TEXT = (DATA / "gpl-3.0.txt").read_text()


@pytest.fixture(scope="module")
def pair():
    model, tok = load()
    return model, tok, hf_model(model)


def test_real_weights_logits_match_transformers(pair):
    model, tok, ref = pair
    ids = tok.encode(TEXT)[:1500]  # 3× the 512-token window
    assert len(ids) == 1500
    x = torch.tensor([ids])
    with torch.inference_mode():
        ours = model(x)[0]
        theirs = ref(x).logits[0]
    span = (theirs.max() - theirs.min()).item()
    rel = (ours - theirs).abs().max().item() / span
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    print(f"max|Δ|/range = {rel:.2e}, argmax agreement = {agree:.4%}")
    assert rel <= 1e-3
    assert agree >= 0.999


def test_real_weights_greedy_128_tokens_match_transformers(pair):
    from gemma3.inference.generate import generate_step
    from gemma3.inference.sampling import SamplingParams

    model, tok, ref = pair
    prompt = tok.encode("The history of the printing press begins")
    ours = list(generate_step(model, prompt, SamplingParams(), max_tokens=128))
    with torch.inference_mode():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=128, do_sample=False, min_new_tokens=128)
    theirs = out[0, len(prompt):].tolist()
    assert ours == theirs


def test_generate_api_is_coherent(pair):
    from gemma3 import generate

    model, tok, _ = pair
    assert generate(model, tok, "The capital of France is the city of", max_tokens=8).startswith(" Paris")
    assert generate(model, tok, "One, two, three, four,", max_tokens=8).startswith(" five, six, seven")
