"""The chat page at / in real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright)
against the real server: replies stream in with their timings, settings reach the request body,
conversations survive a reload, regenerate and edit re-send the conversation, a stop keeps the
session. Two tests fake the server's answer with page.route: a reply full of Markdown and HTML
(rendered, never injected), and a model that reads images (the embedded one does not; the
server's side of that is in test_api.py / test_images.py). Screenshots go to docs/."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.helpers.server import ServerProcess

CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
DOCS = Path(__file__).resolve().parents[2] / "docs"
CHAT = "/v1/chat/completions"

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM}: install it with scripts/install_chromium.sh (apt-get install chromium)",
                allow_module_level=True)
expect = sync_api.expect


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--ctx", "1024", "--max-tokens", "256")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """A fresh browser context per test: its own, empty localStorage."""
    context = browser.new_context(viewport={"width": 1000, "height": 640},
                                  permissions=["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.goto(server.url + "/")
    expect(page.locator("#model option")).to_have_count(1, timeout=30_000)
    yield page
    context.close()


def chat_requests(page) -> list[dict]:
    """The bodies of the chat requests the page sends from now on (appended as they go out)."""
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data))
            if r.method == "POST" and r.url.endswith(CHAT) else None)
    return bodies


def wait_reply(page):
    expect(page.locator("#stop")).to_be_disabled(timeout=120_000)
    expect(page.locator(".msg.assistant").last).to_have_attribute("data-done", "1")


def send(page, text: str):
    page.fill("#input", text)
    page.press("#input", "Enter")
    wait_reply(page)


def texts(page, selector: str) -> list[str]:
    return page.locator(selector).all_inner_texts()


def fake_stream(*pieces: str, completion_tokens: int) -> str:
    """An SSE body shaped like the server's: role delta, content deltas, finish, usage, [DONE]."""
    def choice(delta, finish=None):
        return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    chunks = [choice({"role": "assistant", "content": ""}), *(choice({"content": p}) for p in pieces),
              choice({}, "stop"), {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": completion_tokens,
                                                            "total_tokens": 9 + completion_tokens}}]
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def test_chat_page_streams_a_reply_with_its_timings(page):
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    page.fill("#input", "Write a haiku about the sea.")
    page.press("#input", "Enter")
    expect(page.locator(".msg.user")).to_have_text("Write a haiku about the sea.")
    reply = page.locator(".msg.assistant").last
    # Streaming: text appears before the reply ends (data-done is set at the end).
    expect(reply).not_to_be_empty(timeout=120_000)
    wait_reply(page)
    status = page.locator("#status").inner_text()
    assert status.startswith("finished")
    assert reply.inner_text().strip()
    stats = page.locator(".turn.assistant .meta span").inner_text()
    m = re.fullmatch(r"(\d+) tokens · ([\d.]+) tok/s · first token ([\d.]+) s", stats)
    assert m, stats
    tokens, tps, ttft = int(m[1]), float(m[2]), float(m[3])
    # The count is the server's usage: 24 exactly when the reply ran to max_tokens.
    assert tokens == 24 if status == "finished: length" else 0 < tokens < 24
    assert tps > 0 and ttft > 0
    expect(page.locator("#conversations li")).to_have_count(1)
    expect(page.locator("#conversations li.current")).to_have_text(re.compile("Write a haiku about the sea."))
    page.screenshot(path=str(DOCS / "chat_page.png"))
    assert (DOCS / "chat_page.png").stat().st_size > 5000


def test_settings_reach_the_request(page):
    requests = chat_requests(page)
    page.fill("#system", "Answer in one word.")
    for field, value in [("temperature", "0.5"), ("max-tokens", "3"), ("top-p", "0.9"), ("top-k", "20"),
                         ("min-p", "0.05"), ("seed", "1234")]:
        page.fill("#" + field, value)
    send(page, "Hi")
    assert len(requests) == 1
    body = requests[0]
    assert body["messages"] == [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hi"}]
    assert {k: body[k] for k in ("temperature", "max_tokens", "top_p", "top_k", "min_p", "seed")} == {
        "temperature": 0.5, "max_tokens": 3, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "seed": 1234}
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert page.locator(".msg.error").count() == 0

    # An empty field leaves the server's default; an invalid one sends nothing and says which field.
    page.fill("#seed", "")
    page.fill("#system", "")
    send(page, "Again")
    assert "seed" not in requests[1] and requests[1]["messages"][0] == {"role": "user", "content": "Hi"}
    page.fill("#top-p", "0")
    page.fill("#input", "Not sent")
    page.press("#input", "Enter")
    expect(page.locator("#status")).to_contain_text("Top-p")
    assert len(requests) == 2 and page.locator("#input").input_value() == "Not sent"


def test_conversations_survive_a_reload(page):
    page.fill("#max-tokens", "3")
    page.fill("#system", "Be brief.")
    send(page, "First chat")
    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    send(page, "Second chat")
    before = texts(page, ".msg") + texts(page, ".meta span")
    expect(page.locator("#conversations li")).to_have_count(2)

    page.reload()
    expect(page.locator("#conversations .open")).to_have_text(["Second chat", "First chat"])  # newest first
    assert texts(page, ".msg") + texts(page, ".meta span") == before
    assert page.locator("#system").input_value() == "Be brief." and page.locator("#max-tokens").input_value() == "3"

    page.click("#conversations .open >> text=First chat")
    assert texts(page, ".msg.user") == ["First chat"] and len(texts(page, ".msg.assistant")) == 1
    page.click("#conversations li:has-text('Second chat') .delete")
    expect(page.locator("#conversations li")).to_have_count(1)
    page.reload()
    expect(page.locator("#conversations .open")).to_have_text(["First chat"])
    assert texts(page, ".msg.user") == ["First chat"]


def test_reply_with_html_renders_as_text(page):
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    reply = ("### Result\nSome **bold**, *italic* and `inline <b>code</b>`.\n\n"
             "```python\nprint('<script>alert(2)</script>')\n```\n"
             "- one <img src=x onerror=alert(1)>\n- two\n\n"
             "1. [docs](https://example.com/docs) and [bad](javascript:alert(3))\n\n"
             "<img src=x onerror=alert(1)><script>alert(4)</script>")
    # Cut into pieces at arbitrary points, as a stream would be.
    page.route("**" + CHAT, lambda route: route.fulfill(status=200, content_type="text/event-stream",
                                                        body=fake_stream(*re.findall(r".{1,7}", reply, re.S),
                                                                         completion_tokens=42)))
    send(page, "Show me <img src=x onerror=alert(5)>")

    msg = page.locator(".msg.assistant")
    assert page.locator(".msg img, .msg script").count() == 0
    assert "<img src=x onerror=alert(1)><script>alert(4)</script>" in msg.inner_text()
    assert texts(page, ".msg.user") == ["Show me <img src=x onerror=alert(5)>"]
    assert texts(page, ".msg.assistant :is(h3, h4, h5, h6)") == ["Result"]
    assert texts(page, ".msg.assistant strong") == ["bold"] and texts(page, ".msg.assistant em") == ["italic"]
    assert texts(page, ".msg.assistant p code") == ["inline <b>code</b>"]
    assert texts(page, ".msg.assistant pre code") == ["print('<script>alert(2)</script>')"]
    assert texts(page, ".msg.assistant ul li") == ["one <img src=x onerror=alert(1)>", "two"]
    links = msg.locator("a")
    expect(links).to_have_count(1)
    assert links.get_attribute("href") == "https://example.com/docs" and links.inner_text() == "docs"
    assert "[bad](javascript:alert(3))" in msg.inner_text()
    assert page.locator(".turn.assistant .meta span").inner_text().startswith("42 tokens")
    # Copy gives the Markdown source, not the rendered text.
    page.click(".turn.assistant .copy")
    expect(page.locator("#status")).to_have_text("copied")
    assert page.evaluate("navigator.clipboard.readText()") == reply
    assert dialogs == []
    page.screenshot(path=str(DOCS / "chat_page_markdown.png"))


def test_regenerate_and_edit_resend_the_conversation(page):
    requests = chat_requests(page)
    page.fill("#temperature", "1")
    page.fill("#seed", "7")
    page.fill("#max-tokens", "8")
    send(page, "Tell me a joke.")
    first = texts(page, ".msg.assistant")

    page.click(".turn.assistant .regenerate")
    wait_reply(page)
    # The request went out again with the same conversation (not the old reply), and its reply
    # replaced the old one; same seed, same text.
    assert len(requests) == 2 and requests[1] == requests[0]
    assert texts(page, ".msg.user") == ["Tell me a joke."] and texts(page, ".msg.assistant") == first

    page.click(".turn.user .edit")
    page.fill(".msg.user textarea", "Tell me a story.")
    page.click(".msg.user .save")
    wait_reply(page)
    assert len(requests) == 3 and requests[2]["messages"] == [{"role": "user", "content": "Tell me a story."}]
    assert texts(page, ".msg.user") == ["Tell me a story."] and len(texts(page, ".msg.assistant")) == 1
    assert page.locator(".regenerate").count() == 1  # on the last reply only
    assert page.locator(".msg.error").count() == 0


def test_stop_button_cancels_the_stream(page, server):
    page.fill("#max-tokens", "200")
    page.fill("#input", "Tell me a long story.")
    page.press("#input", "Enter")
    reply = page.locator(".msg.assistant").last
    expect(reply).not_to_be_empty(timeout=120_000)
    page.click("#stop")
    expect(page.locator("#status")).to_have_text("stopped", timeout=30_000)
    assert server.wait_metric("gemma3_active_sequences", 0) == 0
    expect(page.locator(".turn.assistant .meta span")).to_contain_text("stopped")
    # A second turn still works: the conversation alternates user/assistant after a stop.
    page.fill("#max-tokens", "4")
    send(page, "And then?")
    assert page.locator(".msg.error").count() == 0 and page.locator(".msg.assistant").count() == 2


def png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_image_attach_only_when_the_model_reads_images(page):
    expect(page.locator("#attach")).to_be_hidden()  # the embedded model is text-only

    def reads_images(route):
        body = route.fetch().json()
        body["data"][0]["input_modalities"] = ["text", "image"]
        route.fulfill(json=body)
    page.route("**/v1/models", reads_images)
    page.route("**" + CHAT, lambda route: route.fulfill(status=200, content_type="text/event-stream",
                                                        body=fake_stream("A red square.", completion_tokens=4)))
    requests = chat_requests(page)
    page.reload()
    expect(page.locator("#attach")).to_be_visible()
    image = png()
    page.set_input_files("#image", files=[{"name": "red.png", "mimeType": "image/png", "buffer": image}])
    expect(page.locator("#attachments img")).to_have_count(1)
    send(page, "What is this?")
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    assert requests[0]["messages"] == [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}]
    assert page.locator(".msg.user img").get_attribute("src") == url
    expect(page.locator("#attachments img")).to_have_count(0)
