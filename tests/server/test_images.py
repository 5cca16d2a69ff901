"""Images through the real server: `image_url` parts with base64 data URLs on a tiny
random multimodal HF directory served by uvicorn, answers equal to the library's, and every kind
of bad image a 400 that names the part while the server keeps serving."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

openai = pytest.importorskip("openai")

from gemma3.formats.tokenizer import apply_chat_template, encode_chat  # noqa: E402
from gemma3.inference import multimodal as mm  # noqa: E402
from gemma3.inference.generate import generate  # noqa: E402
from gemma3.inference.load import load, load_tokenizer, load_vision  # noqa: E402
from tests.helpers.hf_reference import hf_multimodal_model  # noqa: E402
from tests.helpers.images import TALL, WIDE, picture, png_claiming, random_vision  # noqa: E402
from tests.helpers.models import random_model, tiny_config  # noqa: E402
from tests.helpers.server import ServerProcess  # noqa: E402

MODEL = "tiny-mm"
N = 6  # completion tokens per request


def data_url(img: Image.Image | bytes, fmt="PNG", mime="image/png") -> str:
    if isinstance(img, Image.Image):
        buf = io.BytesIO()
        img.save(buf, fmt)
        img = buf.getvalue()
    return f"data:{mime};base64,{base64.b64encode(img).decode()}"


@pytest.fixture(scope="module")
def mm_dir(tmp_path_factory):
    """Gemma3ForConditionalGeneration directory (3 text layers, window 8 < 16 soft tokens per view)
    plus the embedded tokenizer."""
    path = tmp_path_factory.mktemp("mm")
    model = random_model(tiny_config(layers=3, local_per_global=2, window=8, vocab=262_208))
    hf_multimodal_model(model, random_vision()).save_pretrained(path)
    load_tokenizer().save(path)
    return path


@pytest.fixture(scope="module")
def server(mm_dir):
    srv = ServerProcess("--model", str(mm_dir), "--backend", "torch", "--served-model-name", MODEL,
                        "--ctx", "1024", "--max-tokens", str(N), "--max-batch", "2")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def library(mm_dir):
    model, tok = load(mm_dir)
    return model, load_vision(mm_dir), tok


def library_answer(library, text: str, images, pan_and_scan=mm.PanAndScan()):
    """The same conversation through the library: chat template with <start_of_image> placeholders."""
    model, vision, tok = library
    prompt = mm.prepare(model, vision, tok, apply_chat_template([{"role": "user", "content": text}]), images,
                        pan_and_scan)
    return generate(model, tok, prompt, N), len(prompt.ids)  # greedy


def chat(client, content, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          temperature=0, max_tokens=N, **kw)


def test_chat_ids_with_image_marks_equal_the_processor_layout():
    """encode_chat_with_images ≡ tokenizing the processor's expanded template (build_prompt's ids,
    checked against transformers in test_vision), while text typed by the user stays text."""
    tok = load_tokenizer()
    for crops in ([0], [3], [2, 0]):
        marks = "".join(f" look {mm.IMAGE_MARK}" for _ in crops)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi{marks} ok"}]
        got = mm.encode_chat_with_images(tok, messages, crops, mm_tokens=16)
        template = apply_chat_template([{**m, "content": m["content"].replace(mm.IMAGE_MARK, mm.BOI)} for m in messages])
        layout = mm.expand_prompt(template, crops, 0)
        want = []
        for t in tok.encode(layout, add_bos=False, parse_special=True):
            want += [t] + [mm.IMAGE_SOFT_TOKEN_ID] * 16 * (t == tok.token_to_id(mm.BOI))
        assert got == want, crops
    # Typed tags never make an image: soft tokens come from the real image part only (the typed
    # <start_of_image>, a user-defined piece, tokenizes as that piece like llama.cpp does, alone).
    typed = [{"role": "user", "content": f"<start_of_image><end_of_turn>{mm.IMAGE_MARK}"}]
    ids = mm.encode_chat_with_images(tok, typed, [0], mm_tokens=4)
    assert ids.count(mm.IMAGE_SOFT_TOKEN_ID) == 4 and ids.count(tok.token_to_id(mm.EOI)) == 1
    assert ids.count(tok.end_of_turn_id) == 1  # the typed control tag stayed text
    assert mm.without_marks(f"a{mm.IMAGE_MARK}b") == "a\ufffdb"
    assert encode_chat(tok, [{"role": "user", "content": "x"}]) == mm.encode_chat_with_images(
        tok, [{"role": "user", "content": "x"}], [], 16)


def test_models_say_the_server_reads_images(client):
    """The chat page offers image attach from this field."""
    assert client.models.list().data[0].input_modalities == ["text", "image"]


def test_images_answer_like_the_library(client, library):
    """Two images (one with 3 Pan & Scan crops) between text parts; greedy text and prompt token
    count equal the library's on the same conversation."""
    content = [{"type": "text", "text": "Compare "},
               {"type": "image_url", "image_url": {"url": data_url(WIDE)}},
               {"type": "text", "text": " with"},
               {"type": "image_url", "image_url": {"url": data_url(TALL, "JPEG", "image/jpeg")}}]
    want, prompt_tokens = library_answer(library, f"Compare{mm.BOI}with{mm.BOI}",
                                         [Image.open(io.BytesIO(base64.b64decode(data_url(im, f, m).split(",")[1])))
                                          for im, f, m in ((WIDE, "PNG", "image/png"), (TALL, "JPEG", "image/jpeg"))])
    out = chat(client, content)
    assert out.choices[0].message.content == want
    assert out.usage.prompt_tokens == prompt_tokens and 1 <= out.usage.completion_tokens <= N
    stream = chat(client, content, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want


def test_square_image_has_no_crops(client, library):
    square = picture(64, 64, 5)
    want, prompt_tokens = library_answer(library, f"{mm.BOI}What is it?", [square])
    out = chat(client, [{"type": "image_url", "image_url": {"url": data_url(square)}},
                        {"type": "text", "text": "What is it?"}])
    assert out.choices[0].message.content == want and out.usage.prompt_tokens == prompt_tokens


def _jpeg_bytes(img):
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


BAD = {
    "remote URL": ("https://example.com/cat.png", "not fetched"),
    "file URL": ("file:///etc/passwd", "not fetched"),
    "wrong mime": ("data:text/plain;base64," + base64.b64encode(b"hello").decode(), "unsupported image type"),
    "not base64": ("data:image/png;base64,@@@not-base64@@@", "not valid base64"),
    "no base64 flag": ("data:image/png,rawbytes", "must be base64"),
    "declared png, is jpeg": (data_url(_jpeg_bytes(picture(64, 48))), "not the declared PNG"),
    "truncated": (data_url(_jpeg_bytes(picture(200, 150))[:1500], mime="image/jpeg"), "truncated"),
    "1x1": (data_url(Image.new("RGB", (1, 1))), "too small"),
    "bomb": (data_url(png_claiming(20000, 20000)), "decompression-bomb"),
    "not an image": (data_url(b"just text, no picture" * 10), "not an image"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_images_are_400_naming_the_part(server, case):
    url, needle = BAD[case]
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": url}}]}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] and "messages.0.content.1" in err["message"], err
    assert err["param"] == "messages.0.content.1"


def test_cmyk_and_animated_gif_are_accepted_and_server_keeps_serving(client, server):
    cmyk = picture(96, 64, 3).convert("CMYK")
    gif = io.BytesIO()
    frames = [picture(96, 64, 4).convert("P"), Image.new("P", (96, 64), 7)]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    for url in (data_url(cmyk, "JPEG", "image/jpeg"), data_url(gif.getvalue(), mime="image/gif")):
        out = chat(client, [{"type": "image_url", "image_url": {"url": url}}])
        assert out.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert chat(client, "plain text still works").usage.completion_tokens >= 1


def test_too_many_image_tokens_for_the_context_is_400(server):
    """Each view is 16 soft tokens here; 70 images exceed --ctx 1024: refused before any encoding."""
    url = data_url(picture(64, 64))
    body = {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}] * 70}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
