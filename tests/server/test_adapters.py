"""Two LoRA adapters served at once (`serve --adapter NAME=DIR`, the real uvicorn server on the
embedded 270M, the official openai client): each request's `model` picks its adapter, concurrent
requests under different adapters share the continuous batch, unknown names are an OpenAI 404."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from gemma3.formats.peft import ALL_TARGETS, LoRAConfig  # noqa: E402
from tests.helpers.server import MODEL_ID, ServerProcess  # noqa: E402

PROMPT = "The capital of France is"


def write_adapter(path, model, seed):
    from gemma3.train.lora import save_adapter

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in ALL_TARGETS:
            state[f"{name}.lora_A"] = torch.randn(8, m.in_features, generator=g) / m.in_features ** 0.5
            state[f"{name}.lora_B"] = torch.randn(m.out_features, 8, generator=g) * 0.05
    save_adapter(path, LoRAConfig(8, 16.0), state, base_name="270m")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from gemma3 import load

    tmp = tmp_path_factory.mktemp("adapters")
    model, tok = load(None, backend="cpu")
    dirs = {name: write_adapter(tmp / name, model, seed) for name, seed in (("alpha", 1), ("beta", 2))}
    srv = ServerProcess("--ctx", "256", "--max-tokens", "16", "--max-batch", "4",
                        *[a for name, d in dirs.items() for a in ("--adapter", f"{name}={d}")])
    yield srv, dirs
    srv.stop()


def local_greedy(adapter_dir):
    from gemma3 import load
    from gemma3.inference.generate import generate
    from gemma3.inference.load import load_adapter

    model, tok = load(None, backend="cpu")
    if adapter_dir is not None:
        load_adapter(model, adapter_dir, default=True)
    return generate(model, tok, PROMPT, max_tokens=10)


def test_two_adapters_answer_per_model(setup):
    srv, dirs = setup
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [MODEL_ID, "alpha", "beta"]

    def complete(model):
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0)
        assert r.model == model
        return r.choices[0].text

    with ThreadPoolExecutor(3) as pool:  # one batch holding rows of both adapters and of the base
        texts = dict(zip((MODEL_ID, "alpha", "beta"), pool.map(complete, (MODEL_ID, "alpha", "beta"))))
    want = {MODEL_ID: local_greedy(None), "alpha": local_greedy(dirs["alpha"]), "beta": local_greedy(dirs["beta"])}
    assert texts == want
    assert len(set(texts.values())) == 3  # each adapter changes the greedy text its own way
    chat = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert chat.model == "beta"


def test_unknown_model_is_a_404_naming_it(setup):
    srv, _ = setup
    r = httpx.post(srv.url + "/v1/completions", json={"model": "gamma", "prompt": "x", "max_tokens": 1}, timeout=60)
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and "'gamma'" in err["message"] and "'alpha'" in err["message"]
